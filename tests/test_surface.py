"""Loss surfaces: closed form on a quadratic, exact centre and end points, HDF5 resume after a real kill -9."""

import json
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from landscape.engine.objective import Objective
from landscape.inputs.checkpoints import save_checkpoint
from landscape.inputs.models import model_for_data
from landscape.surfaces.directions import (
    between,
    checkpoint_plane,
    eigenvector_directions,
    gradient_direction,
    random_directions,
)
from landscape.surfaces.surface import SurfaceError, compute_surface, grid_axis, read_surface
from tests.helpers import cli_command, digits_mlp_checkpoint, run_cli, tiny_convnet_bn


def _mse(out, y):
    return (out.squeeze(-1) - y).square().mean()


def test_grid_on_a_quadratic_matches_the_closed_form(tmp_path):
    """L(θ) = ‖Zθ − y‖²/N is exactly quadratic: L(θ0 + Dᵀc) = L0 + gᵀDᵀc + ½ cᵀ D H Dᵀ c."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    model = nn.Linear(5, 1)
    objective = Objective(model, [(x[:25], y[:25]), (x[25:], y[25:])], loss_fn=_mse, dtype=torch.float64)
    directions = random_directions(objective, 2, seed=2, normalization="none", one_d="copy")
    axes = [grid_axis(-2, 1, 7), grid_axis(-1, 1, 5)]
    surface = compute_surface(objective, directions, axes, path=tmp_path / "q.h5")

    z = np.hstack([x.numpy(), np.ones((40, 1))])
    theta = objective.w.numpy()
    residual = z @ theta - y.numpy()
    loss0, grad, hess = residual @ residual / 40, 2 * z.T @ residual / 40, 2 * z.T @ z / 40
    d = directions.vectors.numpy()
    expected = np.array(
        [[loss0 + grad @ d.T @ c + 0.5 * c @ d @ hess @ d.T @ c for c in (np.array([a, b]) for b in axes[1])] for a in axes[0]]
    )
    np.testing.assert_allclose(surface.loss["train"], expected, rtol=1e-12)
    assert np.isnan(surface.accuracy["train"]).all()  # regression targets: no accuracy
    np.testing.assert_array_equal(read_surface(tmp_path / "q.h5").loss["train"], surface.loss["train"])


def test_centre_is_the_checkpoint_itself_and_the_model_is_untouched(conv_problem):
    model, _, _, batches = conv_problem
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objective = Objective(model, batches)
    test = Objective(model, batches[:1])
    surface = compute_surface(
        {"train": objective, "test": test}, random_directions(objective, 2, seed=0), [grid_axis(-1, 1, 5)] * 2
    )
    assert surface.axes[0][2] == 0.0 and surface.complete
    assert surface.loss["train"][2, 2] == objective.evaluate().loss  # exactly, not approximately
    assert surface.accuracy["train"][2, 2] == objective.evaluate().accuracy
    assert surface.loss["test"][2, 2] == test.evaluate().loss
    assert surface.loss["train"][0, 0] != surface.loss["train"][2, 2]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_interpolation_end_points_are_the_two_checkpoints(conv_problem):
    model, _, _, batches = conv_problem
    other = tiny_convnet_bn(seed=3)  # other weights and other BN running statistics
    a, b = Objective(model, batches, dtype=torch.float64), Objective(other, batches, dtype=torch.float64)
    surface = compute_surface(a, between(a, other, "B"), [grid_axis(-1, 2, 7)])
    alphas = list(surface.axes[0])
    assert surface.loss["train"][alphas.index(0.0)] == a.loss()
    assert surface.loss["train"][alphas.index(1.0)] == pytest.approx(b.loss(), rel=1e-12)


def test_states_directions_move_the_bn_statistics(conv_problem):
    model, _, _, batches = conv_problem
    objective = Objective(model, batches, dtype=torch.float64)
    directions = random_directions(objective, 1, seed=0, one_d="copy", states=True)
    surface = compute_surface(objective, directions, [np.array([-0.5, 0.0, 0.5])])
    buffers = {n: (1.5 * b) for n, b in objective.model.named_buffers() if b.is_floating_point()}
    expected = objective.evaluate(objective.w + 0.5 * directions.vectors[0], buffers).loss
    assert surface.loss["train"][2] == pytest.approx(expected, rel=1e-12)


def test_bn_recalibration_at_each_point(conv_problem):
    model, _, _, batches = conv_problem
    objective = Objective(model, batches, dtype=torch.float64)
    surface = compute_surface(objective, random_directions(objective, 1, seed=0), [np.array([0.0, 0.3])], bn_recalibration=2)
    inputs = [x for x, _ in objective.batches[:2]]
    w = objective.w + 0.3 * random_directions(objective, 1, seed=0).vectors[0]
    assert surface.loss["train"][1] == pytest.approx(objective.evaluate(w, objective.bn_statistics(w, inputs)).loss, rel=1e-12)
    assert surface.loss["train"][0] != objective.loss()  # re-estimated statistics differ from the stored ones


def test_diverging_points_are_recorded_not_fatal(mlp_problem):
    model, _, _, batches = mlp_problem
    objective = Objective(model, batches)
    surface = compute_surface(objective, random_directions(objective, 1, seed=0, normalization="none"), [np.array([0.0, 1e38])])
    assert np.isfinite(surface.loss["train"][0]) and not np.isfinite(surface.loss["train"][1])
    assert surface.complete


def test_existing_foreign_or_mismatched_files_are_refused(tmp_path, mlp_problem):
    model, _, _, batches = mlp_problem
    objective = Objective(model, batches)
    path = tmp_path / "s.h5"
    axes = [grid_axis(-1, 1, 3)]
    compute_surface(objective, random_directions(objective, 1, seed=0), axes, path=path)
    with pytest.raises(SurfaceError, match="exists; pass resume=True"):
        compute_surface(objective, random_directions(objective, 1, seed=0), axes, path=path)
    with pytest.raises(SurfaceError, match="directions differs"):
        compute_surface(objective, random_directions(objective, 1, seed=1), axes, path=path, resume=True)
    with pytest.raises(SurfaceError, match="axes differs"):
        compute_surface(objective, random_directions(objective, 1, seed=0), [grid_axis(-1, 1, 5)], path=path, resume=True)
    other = Objective(model, batches[:1])
    with pytest.raises(SurfaceError, match="measurement|n_samples|splits"):
        compute_surface(other, random_directions(other, 1, seed=0), axes, path=path, resume=True)
    (tmp_path / "foreign.h5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(SurfaceError, match="cannot be opened as HDF5"):
        compute_surface(objective, random_directions(objective, 1, seed=0), axes, path=tmp_path / "foreign.h5", resume=True)
    with pytest.raises(SurfaceError, match="no such file"):
        read_surface(tmp_path / "missing.h5")


def test_resume_computes_only_the_missing_points(tmp_path, mlp_problem, monkeypatch):
    model, _, _, batches = mlp_problem
    objective = Objective(model, batches)
    directions, axes, path = random_directions(objective, 2, seed=0), [grid_axis(-1, 1, 5)] * 2, tmp_path / "s.h5"
    full = compute_surface(objective, directions, axes, path=path)
    with h5py.File(path, "r+") as f:  # forget two rows, as a killed run would
        f["done"][3:] = 0
        f["train/loss"][3:] = np.nan
    calls = []
    original = Objective.evaluate
    monkeypatch.setattr(Objective, "evaluate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    resumed = compute_surface(objective, directions, axes, path=path, resume=True)
    assert len(calls) == 10
    np.testing.assert_array_equal(resumed.loss["train"], full.loss["train"])


@pytest.fixture(scope="module")
def convnet_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, spec = model_for_data("convnet", (1, 8, 8), 10)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "net.pt",
        model,
        model_spec=spec,
        data_spec={"spec": "digits", "seed": 0, "normalize": None},
    )


@pytest.mark.cli
def test_killed_run_resumes_to_the_same_file(tmp_path, convnet_checkpoint):
    """kill -9 a real `landscape surface` process mid-grid; --resume finishes it with identical values."""
    args = [convnet_checkpoint, "--dim", "2", "--range", "-1:1:15", "--n-samples", "400", "--test", "--quiet"]
    killed = tmp_path / "killed.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        cli_command() + ["surface", *map(str, args), "--out", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not killed.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # some blocks flushed, most of the grid still to do
    process.send_signal(signal.SIGKILL)
    process.wait()
    with h5py.File(killed, "r") as f:
        n_done = int(f["done"][()].sum())
    assert 0 < n_done < 225, f"the kill should land mid-grid ({n_done}/225 done)"

    resumed = run_cli("surface", *args, "--out", killed, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["n_done"] == 225
    straight = run_cli("surface", *args, "--out", tmp_path / "straight.h5")
    assert straight.returncode == 0, straight.stderr
    a, b = read_surface(killed), read_surface(tmp_path / "straight.h5")
    for split in ("train", "test"):
        np.testing.assert_array_equal(a.loss[split], b.loss[split])
        np.testing.assert_array_equal(a.accuracy[split], b.accuracy[split])

    again = run_cli("surface", *args, "--out", killed)
    assert again.returncode == 2 and "exists; pass --resume" in again.stderr
    other = run_cli("surface", *args, "--out", killed, "--resume", "--direction-seed", "5")
    assert other.returncode == 2 and "does not match this run (directions differs:" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


@pytest.mark.cli
def test_cli_between_and_unwritable_output(tmp_path, convnet_checkpoint):
    torch.manual_seed(1)
    model, spec = model_for_data("convnet", (1, 8, 8), 10)
    other = save_checkpoint(tmp_path / "other.pt", model, model_spec=spec, data_spec={"spec": "digits"})
    result = run_cli(
        "surface",
        convnet_checkpoint,
        "--between",
        other,
        "--range",
        "0:1:3",
        "--n-samples",
        "100",
        "--out",
        tmp_path / "b.h5",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["directions"]["kind"] == "between" and report["axes"] == [[0.0, 0.5, 1.0]]
    blocked = tmp_path / "file"
    blocked.write_text("a file, not a folder")
    result = run_cli("surface", convnet_checkpoint, "--range", "0:1:3", "--n-samples", "100", "--out", blocked / "s.h5")
    assert result.returncode == 2 and "cannot create the folder" in result.stderr
    mlp, mlp_spec = model_for_data("mlp", (1, 8, 8), 10)
    foreign = save_checkpoint(tmp_path / "mlp.pt", mlp, model_spec=mlp_spec, data_spec={"spec": "digits"})
    result = run_cli("surface", convnet_checkpoint, "--between", foreign, "--n-samples", "100", "--out", tmp_path / "x.h5")
    assert result.returncode == 2 and "not the same architecture" in result.stderr


# ------------------------------------------------ eigenvector, gradient and three-checkpoint directions in files
def test_new_direction_kinds_round_trip_through_the_file_and_resume(tmp_path, conv_problem, mlp_problem):
    mlp = Objective(mlp_problem[0], mlp_problem[3], dtype=torch.float64)  # cheap Hessian-vector products
    conv = Objective(conv_problem[0], conv_problem[3], dtype=torch.float64)  # BN statistics that move in a plane
    made = {
        "eigenvector": (mlp, eigenvector_directions(mlp, 2, seed=3, max_matvecs=16)),  # certified or not: a record
        "gradient": (mlp, gradient_direction(mlp)),
        "plane": (conv, checkpoint_plane(conv, tiny_convnet_bn(seed=5), tiny_convnet_bn(seed=7), ("a.pt", "b.pt", "c.pt"))),
    }
    for kind, (objective, directions) in made.items():
        axes = [grid_axis(-0.5, 0.5, 3)] * directions.dim
        path = tmp_path / f"{kind}.h5"
        full = compute_surface(objective, directions, axes, path=path)
        back = read_surface(path).directions
        assert back.kind == kind and back.spec == json.loads(json.dumps(directions.spec)), kind
        assert torch.equal(back.vectors, directions.vectors.cpu()), kind
        assert set(back.buffers) == set(directions.buffers) and back.labels == directions.labels, kind
        for name, tensor in directions.buffers.items():
            assert torch.equal(back.buffers[name], tensor.cpu()), (kind, name)
        if directions.trajectory is not None:
            np.testing.assert_array_equal(back.trajectory, directions.trajectory)
        assert back.fingerprint() == directions.fingerprint(), kind  # so the file resumes with what it holds
        with h5py.File(path, "r+") as f:  # forget a row, as a killed run would
            f["done"][1:] = 0
            f["train/loss"][1:] = np.nan
        resumed = compute_surface(objective, back.to(objective.device, objective.dtype), axes, path=path, resume=True)
        np.testing.assert_array_equal(resumed.loss["train"], full.loss["train"])
    assert made["eigenvector"][1].spec["max_matvecs"] == 16 and len(made["plane"][1].buffers) == 4


def test_surface_command_plane_and_refused_combinations(tmp_path, convnet_checkpoint, capsys):
    from analysis.cli import main

    others = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model, spec = model_for_data("convnet", (1, 8, 8), 10)
        others.append(save_checkpoint(tmp_path / f"net{seed}.pt", model, model_spec=spec, data_spec={"spec": "digits"}))
    base = ["surface", str(convnet_checkpoint), "--n-samples", "64", "--quiet"]
    grid = ["--range", "-1:1:2", "--yrange", "0:1:2", "--json"]
    assert main([*base, "--plane", *map(str, others), *grid, "--out", str(tmp_path / "p.h5")]) == 0
    report = json.loads(capsys.readouterr().out)
    directions = report["directions"]
    assert directions["kind"] == "plane" and directions["labels"] == [str(convnet_checkpoint), *map(str, others)]
    assert directions["trajectory"][0] == [0.0, 0.0] and directions["trajectory"][1][1] == 0.0
    surface = read_surface(tmp_path / "p.h5")
    assert surface.complete and surface.directions.buffers  # the convnet's BN statistics move with the point
    for argv, message in (
        (["--plane", *map(str, others), "--directions", "gradient"], "choose one of --plane and --directions gradient"),
        (["--plane", *map(str, others), "--between", str(others[0])], "choose one of --between and --plane"),
        (["--plane", *map(str, others), "--dim", "2"], "--dim applies to random, eigenvector and gradient"),
    ):
        assert main([*base, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.cli
def test_cli_eigenvector_plane_end_to_end_and_resumed(tmp_path):
    checkpoint = digits_mlp_checkpoint(tmp_path, (16,))
    args = ["surface", checkpoint, "--directions", "eigenvectors", "--n-samples", "100", "--range", "-0.2:0.2:3"]
    out = tmp_path / "e.h5"
    result = run_cli(*args, "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)["directions"]["spec"]
    assert len(spec["eigenvalues"]) == 2 and spec["eigenvalues"][0] >= spec["eigenvalues"][1] and spec["n_matvecs"] > 0
    written = read_surface(out)
    assert written.directions.kind == "eigenvector" and written.dim == 2 and written.complete
    with h5py.File(out, "r+") as f:
        f["done"][2:] = 0
    resumed = run_cli(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "read back from the file" in resumed.stderr and "eigenvalue(s)" in resumed.stdout
    np.testing.assert_array_equal(read_surface(out).loss["train"], written.loss["train"])
