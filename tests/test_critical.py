"""Critical sharpness against ground truth: the closed form gᵀHg/gᵀg on quadratics, an independent loss scan on a
network, and the command line's row and JSON."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from landscape.engine.objective import Objective
from landscape.examples import quadratic
from landscape.sharpness.critical import critical_sharpness
from tests.ground_truth import dense_reference
from tests.helpers import classification_batches, digits_mlp_checkpoint, least_squares, run_cli


def _least_squares(seed: int, d: int = 12, n: int = 40) -> tuple[Objective, np.ndarray, np.ndarray]:
    """A linear least-squares objective away from its minimum; its Hessian (2/n)XᵀX / outputs and gradient exactly."""
    objective, X, w, y = least_squares(d, n, torch.Generator().manual_seed(seed))
    H = 2 * X.T @ X / n  # L(w) = mean((Xw − y)²)
    grad = 2 * X.T @ (X @ w - y) / n
    return objective, H, grad


@pytest.mark.parametrize("seed", range(100))
def test_on_a_quadratic_the_bracket_holds_the_curvature_along_the_gradient(seed):
    objective, H, g = _least_squares(seed)
    exact = g @ H @ g / (g @ g)  # η_c = 2gᵀg/gᵀHg exactly
    r = critical_sharpness(objective, rtol=1e-4)
    assert r.lower <= exact <= r.upper
    assert r.upper / r.lower <= 1 + 1e-4 + 1e-12 and r.value == pytest.approx(exact, rel=1e-4)
    assert np.linalg.eigvalsh(H)[0] - 1e-9 <= r.value <= np.linalg.eigvalsh(H)[-1] + 1e-9  # within the spectrum
    assert r.n_forward < 80


def test_on_a_network_an_independent_scan_finds_the_rise_inside_the_bracket():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    batches = classification_batches(64, (12,), 4, [32, 32])[2]
    objective = Objective(model, batches, dtype=torch.float64, device="cpu")
    r = critical_sharpness(objective, rtol=1e-3)
    loss, w0 = dense_reference(model, batches, "eval")  # the loss written out again, not the Objective's
    g = torch.autograd.functional.jacobian(loss, w0)
    base = float(loss(w0))
    assert base == pytest.approx(r.loss, rel=1e-12) and float(g.norm()) == pytest.approx(r.grad_norm, rel=1e-10)
    assert float(loss(w0 - r.eta_low * g)) <= base < float(loss(w0 - r.eta_high * g))
    scan = np.array([float(loss(w0 - eta * g)) for eta in np.linspace(0, r.eta_low, 201)[1:]])
    assert (scan <= base).all()  # no rise before the bracket on a fine grid: it holds the first crossing
    assert r.upper / r.lower <= 1.001 + 1e-12


def test_a_minimum_has_no_update_to_step_along():
    with pytest.raises(ValueError, match="critical sharpness needs a nonzero, finite gradient"):
        critical_sharpness(quadratic())


@pytest.mark.cli
def test_measure_prints_its_bracket_and_saves_it(tmp_path):
    checkpoint = digits_mlp_checkpoint(tmp_path, (16,))
    common = ["--metrics", "critical-sharpness", "--n-samples", "200", "--device", "cpu"]
    table = run_cli("measure", checkpoint, *common)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("critical sharpness λ_c"))
    assert "[bracket " in row and "forwards" in row
    (report,) = json.loads(run_cli("measure", checkpoint, *common, "--json").stdout)
    found = report["metrics"]["critical-sharpness"]
    assert found["lower"] <= found["value"] <= found["upper"] and found["eta_low"] < found["eta_high"]
