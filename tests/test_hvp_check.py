"""The Objective's run-time HVP self-check: a broken path is caught, replaced, and the products come out right."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from landscape.engine import hvp_paths
from landscape.engine.hvp_check import HVPCheckWarning
from landscape.engine.objective import Objective
from tests.ground_truth import dense_hessian, rel_err
from tests.helpers import cli_command
from tests.model_zoo import ZOO, CustomFunctionResidual, zoo_batches


def drifting_linearize():
    """A fast path whose products drift from call to call (stateful, as the in-place bug was)."""
    calls = 0

    def path(objective, V):
        nonlocal calls
        calls += 1
        return hvp_paths.linearize(objective, V) * (1 + 0.01 * calls)

    return path


def scaled_linearize():
    """A fast path that is repeatable but wrong by 0.5%."""
    return lambda objective, V: 1.005 * hvp_paths.linearize(objective, V)


def broken_linearize(monkeypatch, broken=scaled_linearize):
    """The registry's linearize path replaced by a broken one, for this test."""
    monkeypatch.setitem(hvp_paths.HVP_PATHS, "linearize", broken())


@pytest.fixture
def residual():
    model, batches = ZOO["inplace-residual-add"].build(), zoo_batches("inplace-residual-add")
    return model, batches, dense_hessian(model, batches, "eval")


@pytest.mark.slow
@pytest.mark.parametrize("broken", [drifting_linearize, scaled_linearize])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_broken_path_is_caught_and_replaced(broken, dtype, residual, monkeypatch):
    model, batches, H = residual
    broken_linearize(monkeypatch, broken)
    objective = Objective(model, batches, dtype=dtype, device="cpu", hvp_method="linearize")
    V = torch.randn(3, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with pytest.warns(HVPCheckWarning, match="linearize path differs from double backward.*using double-backward"):
        first = objective.hvp_batched(V.to(dtype))
    assert objective.hvp_method == "double-backward"
    check = objective.hvp_check_result
    assert not check.passed and check.replaced_by == "double-backward" and check.path == "linearize"
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(first.double(), V @ H) <= tolerance  # the first block itself is recomputed, not returned wrong
    assert rel_err(objective.hvp_batched(V.to(dtype)).double(), V @ H) <= tolerance


def test_the_original_defect_is_caught_when_functionalization_is_off(residual, monkeypatch):
    """Linearizing `out += h` without functionalization (the released behaviour): the check must catch it."""
    model, batches, H = residual
    monkeypatch.setattr(torch.func, "functionalize", lambda f: f)
    objective = Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method="linearize")
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with pytest.warns(HVPCheckWarning):
        hv = objective.hvp(v)
    assert objective.hvp_check_result.repeat_difference > 0.1  # the second product was the wrong one
    assert rel_err(hv, H @ v) <= 1e-10 and rel_err(objective.hvp(v), H @ v) <= 1e-10


@pytest.mark.parametrize("path", ["linearize", "reuse", "fwd-rev"])
def test_a_correct_path_passes_once_and_is_kept(path, residual):
    model, batches, H = residual
    objective = Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method=path)
    V = torch.randn(2, H.shape[0], dtype=torch.float64)
    objective.hvp_batched(V)
    check = objective.hvp_check_result
    assert check.passed and check.replaced_by is None and objective.hvp_method == path
    assert check.difference < 1e-12 and check.repeat_difference < 1e-12 and check.n_extra_hvps == 2
    objective.hvp_batched(V)
    assert objective.hvp_check_result is check  # checked once, on the first call only


def test_a_zero_first_probe_is_checked_on_a_random_one(residual, monkeypatch):
    model, batches, H = residual
    broken_linearize(monkeypatch)
    objective = Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method="linearize")
    V = torch.zeros(2, H.shape[0], dtype=torch.float64)
    V[1, 0] = 1.0
    with pytest.warns(HVPCheckWarning):
        out = objective.hvp_batched(V)
    assert rel_err(out[1], H[0]) <= 1e-10


def test_the_check_can_be_turned_off_and_double_backward_needs_none(residual, monkeypatch):
    model, batches, H = residual
    broken_linearize(monkeypatch)
    off = Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method="linearize", hvp_check=False)
    v = torch.ones(H.shape[0], dtype=torch.float64)
    assert rel_err(off.hvp(v), 1.005 * H @ v) <= 1e-10 and off.hvp_check_result is None
    reference = Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method="double-backward")
    reference.hvp(v)
    assert reference.hvp_check_result is None


@pytest.mark.cli
def test_the_cli_says_so_in_one_line_and_measures_with_a_correct_path(tmp_path):
    """A real `landscape measure` process with functionalization switched off (the first release's linearize) on
    `out += h`: the check catches the wrong products, says so in one line, and the result equals double backward."""
    torch.manual_seed(0)
    torch.save(CustomFunctionResidual().state_dict(), tmp_path / "weights.pt")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [
        "measure",
        str(tmp_path / "weights.pt"),
        "--model",
        "tests.model_zoo:CustomFunctionResidual",
        "--data",
        "digits",
        "--n-samples",
        "256",
        "--metrics",
        "eig",
        "--k",
        "2",
        "--json",
        "--quiet",
    ]
    released = (
        "import sys, torch; torch.func.functionalize = lambda f: f; from analysis.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    checked = subprocess.run(
        [sys.executable, "-c", released, *args, "--hvp", "linearize"], capture_output=True, text=True, env=env, timeout=600
    )
    assert checked.returncode == 0, checked.stderr
    (line,) = checked.stderr.strip().splitlines()
    assert line.startswith("landscape measure: warning: HVP self-check: the linearize path differs from double backward")
    assert line.endswith("using double-backward")
    (report,) = json.loads(checked.stdout)
    assert report["hvp_check"]["passed"] is False and report["hvp_check"]["repeat_difference"] > 0.01
    assert report["setup"]["hvp_method"] == "double-backward"
    reference = subprocess.run(
        [*cli_command(), *args, "--hvp", "double-backward"], capture_output=True, text=True, env=env, timeout=600
    )
    assert reference.returncode == 0 and reference.stderr == ""
    expected = json.loads(reference.stdout)[0]["metrics"]["eig"]["values"]
    assert report["metrics"]["eig"]["values"] == pytest.approx(expected, rel=1e-5)
    fixed = subprocess.run([*cli_command(), *args, "--hvp", "linearize"], capture_output=True, text=True, env=env, timeout=600)
    assert fixed.returncode == 0 and fixed.stderr == ""  # functionalized (eager jvp here): no warning
    assert json.loads(fixed.stdout)[0]["hvp_check"]["passed"] is True
