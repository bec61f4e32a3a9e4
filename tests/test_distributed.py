"""Data-parallel measurement on real 2-process gloo groups: the same numbers as one process, and clean failures."""

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from analysis.cli import build_parser
from analysis.cli.measure import measure_checkpoint
from analysis.cli.specs import MeasureSpec
from landscape.curvature.density import slq_density
from landscape.curvature.spectrum import lanczos
from landscape.curvature.trace import hutchinson, hutchpp, xtrace
from landscape.engine import distributed as ranks
from landscape.engine.objective import Objective, ObjectiveError
from landscape.engine.operators import HessianOperator
from landscape.inputs.checkpoints import save_checkpoint
from landscape.inputs.models import model_for_data
from landscape.results import to_jsonable
from landscape.sharpness.box import epsilon_sharpness
from landscape.sharpness.perturb import expected_loss, sharpness_curve
from landscape.surfaces.directions import random_directions
from landscape.surfaces.surface import compute_surface, grid_axis, read_surface
from tests.helpers import classification_batches, cli_command, tiny_convnet_bn
from tests.process_groups import free_port, process_env, run_on_ranks, torchrun

pytestmark = pytest.mark.distributed  # every test here starts real process groups

WORLD = 2
REL = 1e-8  # float64: only the order of the per-rank partial sums differs from one process


# ------------------------------------------------------------------ API: estimators and surfaces
def _problem(sizes):
    _, _, batches = classification_batches(sum(sizes), (1, 4, 4), 3, sizes, seed=1)
    return tiny_convnet_bn(), batches


def _objective(sizes, mode, distributed, hvp="reuse"):
    model, batches = _problem(sizes)
    return Objective(
        model,
        ranks.shard(batches) if distributed else batches,
        mode=mode,
        dtype=torch.float64,
        device="cpu",
        hvp_method=hvp,
        distributed=distributed,
    )


def _basics(objective) -> dict:
    evaluation = objective.evaluate()
    V = torch.randn(3, objective.n_params, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eig = lanczos(HessianOperator(objective), 3, tol=1e-10, seed=2)
    return {
        "loss": evaluation.loss,
        "accuracy": evaluation.accuracy,
        "n_samples": evaluation.n_samples,
        "grad": objective.grad().numpy(),
        "hvp": objective.hvp_batched(V).numpy(),
        "eig": eig.values,
        "eig_matvecs": eig.n_matvecs,
    }


def _measurements(distributed: bool) -> dict:
    """Every estimator on uneven shards (3 + 2 batches), BN train mode, and a rank holding no batch at all."""
    objective = _objective([10, 10, 10, 10, 5], "eval", distributed)
    op = HessianOperator(objective)
    density = slq_density(op, n_runs=2, n_steps=15, seed=3)
    noise = expected_loss(objective, 0.1, n_samples=8, seed=4, bn_recalibration=3)
    curve = sharpness_curve(objective, [0.01, 0.05], n_samples=4, n_probes=6, seed=4)
    eps = epsilon_sharpness(objective, 1e-2, restarts=2, max_iter=3, seed=6)
    return {
        "eval": _basics(objective),
        "hutchinson": hutchinson(op, 20, seed=1).estimate,
        "hutchpp": hutchpp(op, 30, seed=1).estimate,
        "xtrace": xtrace(op, 30, seed=1).estimate,
        "density": density.density,
        "nodes": density.nodes,
        "expected_loss": noise.samples,
        "curve": curve.increase,
        "prediction": curve.prediction,
        "eps_sharpness": eps.max_losses,
        "describe": objective.describe(),
        "train_mode": _basics(_objective([10, 10, 10, 10, 5], "train", distributed, hvp="double-backward")),
        "one_batch": _basics(_objective([12], "eval", distributed)),
    }


def _surface(path) -> np.ndarray:
    """A 5×4 surface of a NON-distributed objective: grid points, not batches, are split over the ranks."""
    objective = _objective([10, 10, 10, 10, 5], "eval", distributed=False)
    directions = random_directions(objective, 2, seed=0)
    surface = compute_surface(objective, directions, [grid_axis(-1, 1, 5), grid_axis(-0.5, 1, 4)], path=path, bn_recalibration=2)
    assert surface.complete
    return surface.loss["train"]


def _on_a_rank(out: Path) -> dict:
    return {"measurements": _measurements(distributed=True), "surface": _surface(out / "surface.h5")}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    return out, run_on_ranks(functools.partial(_on_a_rank, out), out, WORLD)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def test_every_rank_runs_the_estimators_identically(two_ranks):
    """All-reduced HVPs are the same bits on every rank, so seeded estimators take the same path everywhere."""
    _, (rank0, rank1) = two_ranks
    a, b = _flatten(rank0["measurements"]), _flatten(rank1["measurements"])
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key], dtype=object), np.asarray(b[key], dtype=object), err_msg=key)


def test_data_parallel_estimates_equal_one_process(two_ranks):
    _, (rank0, _) = two_ranks
    distributed, single = _flatten(rank0["measurements"]), _flatten(_measurements(distributed=False))
    for key, value in single.items():
        if key.startswith("describe."):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            assert distributed[key] == value, key  # sample counts, matvec counts: the same iterations
        else:
            np.testing.assert_allclose(distributed[key], value, rtol=REL, atol=1e-12, err_msg=key)
    setup = rank0["measurements"]["describe"]
    assert (setup["world_size"], setup["sharded"], setup["n_samples"], setup["n_batches"]) == (2, True, 45, 5)
    assert setup["batch_sizes"] == [5, 10] and single["describe.sharded"] is False


def test_two_process_surface_equals_one_process_and_rank_0_wrote_it(two_ranks, tmp_path):
    out, (rank0, rank1) = two_ranks
    single = _surface(tmp_path / "one.h5")
    assert not np.isnan(single).any()
    np.testing.assert_array_equal(rank0["surface"], single)  # each point evaluated whole, on one rank: same bits
    np.testing.assert_array_equal(rank1["surface"], single)
    stored = read_surface(out / "surface.h5")
    assert stored.complete
    np.testing.assert_array_equal(stored.loss["train"], single)


def test_distributed_objective_needs_a_process_group():
    model, batches = _problem([4, 4])
    with pytest.raises(ObjectiveError, match="torchrun"):
        Objective(model, batches, distributed=True)


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf", "nan"])
def test_bad_timeout_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv(ranks.TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=f"{ranks.TIMEOUT_ENV}=.*positive number of seconds"):
        ranks.timeout()


# ----------------------------------------------------------------------- CLI: torchrun and failures
MEASURE = [
    "--dtype",
    "float64",
    "--n-samples",
    "250",
    "--batch-size",
    "64",
    "--k",
    "2",
    "--tol",
    "1e-6",
    "--probes",
    "12",
    "--density-runs",
    "2",
    "--density-steps",
    "10",
    "--radius",
    "0.05",
    "--noise-samples",
    "6",
    "--bn-recalibration",
    "2",
    "--restarts",
    "2",
    "--eps",
    "1e-3",
    "--metrics",
    "eig,trace,density,expected-loss,eps-sharpness",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, spec = model_for_data("convnet", (1, 8, 8), num_classes=10, channels=(2, 3))
    path = tmp_path_factory.mktemp("ckpt") / "conv.pt"
    save_checkpoint(path, model, model_spec=spec, data_spec={"spec": "digits", "seed": 0, "normalize": None})
    return path


def test_torchrun_measure_prints_once_and_matches_one_process(checkpoint):
    command = [*torchrun(WORLD), *cli_command(), "measure", str(checkpoint), "--json", *MEASURE]
    result = subprocess.run(command, capture_output=True, text=True, env=process_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)  # one JSON document: only rank 0 printed
    args = build_parser().parse_args(["measure", str(checkpoint), *MEASURE])
    single = measure_checkpoint(str(checkpoint), MeasureSpec.from_args(args)).to_dict()
    assert report["setup"]["world_size"] == 2 and report["setup"]["sharded"] is True
    assert report["setup"]["n_samples"] == 250 and report["setup"]["n_batches"] == 4
    for key in ("loss", "accuracy", "grad_norm"):
        assert report[key] == pytest.approx(single[key], rel=REL), key
    got, want = report["metrics"], to_jsonable(single["metrics"])
    assert got["eig"]["values"] == pytest.approx(want["eig"]["values"], rel=REL)
    assert got["eig"]["n_matvecs"] == want["eig"]["n_matvecs"]
    assert got["trace"]["estimate"] == pytest.approx(want["trace"]["estimate"], rel=REL)
    assert got["density"]["density"] == pytest.approx(want["density"]["density"], rel=REL, abs=1e-12)
    assert got["expected-loss"]["samples"] == pytest.approx(want["expected-loss"]["samples"], rel=REL)
    assert got["eps-sharpness"]["max_losses"] == pytest.approx(want["eps-sharpness"]["max_losses"], rel=REL)


def test_torchrun_compare_and_surface_match_one_process(checkpoint, tmp_path):
    """compare: data-parallel measurements and surfaces; surface: grid points split over the ranks."""
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    model, spec = model_for_data("convnet", (1, 8, 8), num_classes=10, channels=(2, 3))
    save_checkpoint(other, model, model_spec=spec, data_spec={"spec": "digits", "seed": 0, "normalize": None})
    options = [
        "--dtype",
        "float64",
        "--n-samples",
        "250",
        "--batch-size",
        "64",
        "--k",
        "1",
        "--probes",
        "8",
        "--radius",
        "0.05",
        "--noise-samples",
        "6",
        "--metrics",
        "eig,sharpness-curve,surface",
        "--surface-range=-1:1:5",
        "--quiet",
    ]
    runs = {}
    for name, prefix in (("two", torchrun(WORLD)), ("one", [])):
        out = tmp_path / name
        result = subprocess.run(
            [*prefix, *cli_command(), "compare", str(checkpoint), str(other), "--out", str(out), *options],
            capture_output=True,
            text=True,
            env=process_env(),
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("report:") == 1  # one rank printed
        runs[name] = json.loads((out / "results.json").read_text())
    two, one = runs["two"]["checkpoints"], runs["one"]["checkpoints"]
    assert two[0]["setup"]["sharded"] and not one[0]["setup"]["sharded"]
    for a, b in zip(two, one):
        for name in ("λ1", "ΔL a=0.05", "test accuracy"):
            assert a["quantities"][name]["value"] == pytest.approx(b["quantities"][name]["value"], rel=REL), name
        np.testing.assert_allclose(
            read_surface(a["raw"]["surface"]).loss["train"], read_surface(b["raw"]["surface"]).loss["train"], rtol=REL
        )
        with h5py.File(a["raw"]["surface"]) as sharded, h5py.File(b["raw"]["surface"]) as whole:
            assert sharded.attrs["fingerprint"] == whole.attrs["fingerprint"]  # either file resumes in either mode
    surfaces = {}
    for name, prefix in (("two", torchrun(WORLD)), ("one", [])):
        path = tmp_path / f"{name}.h5"
        result = subprocess.run(
            [
                *prefix,
                *cli_command(),
                "surface",
                str(checkpoint),
                "--dim",
                "2",
                "--range=-1:1:5",
                "--n-samples",
                "250",
                "--out",
                str(path),
                "--quiet",
            ],
            capture_output=True,
            text=True,
            env=process_env(),
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        surfaces[name] = read_surface(path)
    assert surfaces["two"].complete
    np.testing.assert_array_equal(surfaces["two"].loss["train"], surfaces["one"].loss["train"])


FAULTY_RANK = """
import os, sys, time
from analysis.cli import main
from landscape.engine import distributed
from landscape.engine.objective import Objective

if os.environ["RANK"] == "1":  # rank 1 fails at its first Hessian-vector product, or after its last collective
    def fail(*args):
        if sys.argv[1] == "hang":
            time.sleep(3600)
        os._exit(3)
    if sys.argv[1] == "late":
        distributed.barrier = fail
    else:
        Objective.hvp_batched = fail
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("fault, timeout", [("die", 60), ("late", 60), ("hang", 6)])
def test_a_failed_rank_ends_the_job_with_one_line(tmp_path, checkpoint, fault, timeout):
    """A dead rank (connection reset; also after the last collective) or a hung one (timeout): rank 0 exits 1, one line."""
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY_RANK)
    env = process_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LANDSCAPE_DIST_TIMEOUT=str(timeout))
    command = [
        sys.executable,
        str(script),
        fault,
        "measure",
        str(checkpoint),
        "--n-samples",
        "100",
        "--metrics",
        "eig",
        "--quiet",
    ]  # no progress line on a loaded machine: stderr is the one error line
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for r in range(2)
    ]
    try:
        _, stderr = procs[0].communicate(timeout=timeout + 60)
        elapsed = time.perf_counter() - start
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("landscape measure: error: distributed: "), stderr
    assert "rank 0 of 2" in lines[0] and f"LANDSCAPE_DIST_TIMEOUT={timeout}" in lines[0]
    if fault in ("die", "late"):
        assert procs[1].returncode == 3 and elapsed < 30
    else:
        assert "timed out" in lines[0].lower() or "timeout" in lines[0].lower()
        assert timeout <= elapsed < timeout + 30
