"""Mode connectivity: exact curve ends, a trained bend that removes a permutation barrier, BN re-estimated at the ends,
a resumed run equal to an uninterrupted one, refused mismatches, and the command end to end."""

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from landscape.engine.objective import Objective
from landscape.engine.recalibration import recalibration_inputs
from landscape.statistics import t_halfwidth
from landscape.surfaces import connectivity
from landscape.surfaces.connectivity import (
    Connection,
    ConnectivityError,
    Curve,
    CurveTraining,
    barrier_interval,
    connect,
    read_connection,
)
from landscape.surfaces.directions import DirectionError
from landscape.surfaces.surface import SurfaceError
from tests.helpers import digits_mlp_checkpoint, one_line, run_cli, tiny_convnet_bn, tiny_mlp

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("kind", ["bezier", "chain", "line"])
def test_curve_ends_are_the_checkpoints_exactly(kind):
    g = torch.Generator().manual_seed(0)
    nodes = torch.randn(3, 50, generator=g)
    curve = Curve(kind, nodes)
    assert torch.equal(curve.point(0.0), nodes[0])
    assert torch.equal(curve.point(1.0), nodes[2])
    middle = {"bezier": 0.25 * nodes[0] + 0.5 * nodes[1] + 0.25 * nodes[2], "chain": nodes[1]}
    middle["line"] = (nodes[0] + nodes[2]) / 2
    torch.testing.assert_close(curve.point(0.5), middle[kind])
    quarter = {"bezier": (0.5625, 0.375, 0.0625), "chain": (0.5, 0.5, 0.0), "line": (0.75, 0.0, 0.25)}[kind]
    torch.testing.assert_close(curve.point(0.25), sum(c * n for c, n in zip(quarter, nodes)))


@pytest.mark.parametrize("kind", ["bezier", "chain"])
def test_losses_at_the_ends_are_each_checkpoints_own(mlp_problem, kind):
    model, _, _, batches = mlp_problem
    other = tiny_mlp(seed=5)
    a = {"train": Objective(model, batches[:2], dtype=torch.float64), "test": Objective(model, batches[2:], dtype=torch.float64)}
    b = {"train": Objective(other, batches[:2], dtype=torch.float64), "test": Objective(other, batches[2:], dtype=torch.float64)}
    result = connect(a, other, training=CurveTraining(kind, epochs=2, lr=0.1), points=5)
    for path in (result.line, result.curve):
        for split in ("train", "test"):
            assert path.loss[split][0] == a[split].loss()
            assert path.loss[split][-1] == b[split].loss()
            assert path.accuracy[split][-1] == b[split].evaluate().accuracy
    assert result.curve.kind == kind and result.n_steps == 2 * 2
    assert not torch.equal(result.bend, (a["train"].w + b["train"].w) / 2)  # the bend was trained
    again = Connection.from_dict(json.loads(json.dumps(result.to_dict())))
    np.testing.assert_array_equal(again.curve.loss["test"], result.curve.loss["test"])
    assert again.to_dict()["curve"]["summary"] == result.to_dict()["curve"]["summary"]


def _ring_minima(hidden: int = 8) -> tuple[nn.Module, nn.Module, list]:
    """A tanh MLP trained to tell the inside of a ring from the outside, and the same network with its hidden units
    in reverse order: the same function and loss, but the straight line between them averages unrelated units."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    y = (x.norm(dim=1) > 1.1).long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    permuted = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    order = torch.arange(hidden).flip(0)
    with torch.no_grad():
        permuted[0].weight.copy_(net[0].weight[order])
        permuted[0].bias.copy_(net[0].bias[order])
        permuted[2].weight.copy_(net[2].weight[:, order])
        permuted[2].bias.copy_(net[2].bias)
    return net, permuted, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]


@pytest.mark.parametrize("kind", ["bezier", "chain"])
def test_trained_bend_removes_the_barrier_of_permuted_hidden_units(kind):
    """Measured (seed 0): line barrier 4.00; after 30 epochs the Bézier curve's 0.18, the chain's 0.18."""
    net, permuted, batches = _ring_minima()
    objective = Objective(net, batches)
    assert objective.loss() < 0.03 and Objective(permuted, batches).loss() == pytest.approx(objective.loss(), rel=1e-5)
    result = connect(objective, permuted, training=CurveTraining(kind, epochs=30, lr=0.2, seed=0), points=11)
    line, curve = result.line.barrier("train"), result.curve.barrier("train")
    assert line > 3.0
    assert curve < line / 10
    assert result.curve.barrier("train", "interpolated") < result.line.barrier("train", "interpolated") / 10
    assert result.train_loss[-1] < result.train_loss[0] / 5


def test_bn_statistics_are_re_estimated_at_every_point_ends_included(conv_problem):
    model, _, _, batches = conv_problem
    other = tiny_convnet_bn(seed=3)  # other weights and other running statistics
    a, b = Objective(model, batches, dtype=torch.float64), Objective(other, batches, dtype=torch.float64)
    result = connect(a, other, training=CurveTraining(epochs=1, lr=0.01), points=3, bn_batches=2)
    inputs = recalibration_inputs(a, 2)
    at_a = a.evaluate(None, a.bn_statistics(a.w, inputs)).loss
    at_b = b.evaluate(None, b.bn_statistics(b.w, inputs)).loss
    for path in (result.line, result.curve):
        assert path.loss["train"][0] == pytest.approx(at_a, rel=1e-12)
        assert path.loss["train"][-1] == pytest.approx(at_b, rel=1e-12)
    assert abs(at_a - a.loss()) > 1e-3  # the checkpoint's own running statistics give another loss: the test can fail
    assert result.settings["bn_recalibration"] == 2
    with pytest.raises(ConnectivityError, match="batch statistics"):
        connect(a, other, train=a, training=CurveTraining(epochs=1))


def _interrupt_after(monkeypatch, method: str, calls: int) -> None:
    """Make _CurveFile.`method` raise KeyboardInterrupt after its `calls`-th write, as a killed run would stop."""
    original, seen = getattr(connectivity._CurveFile, method), []

    def write(self, state, key):
        original(self, state, key)
        seen.append(key)
        if len(seen) == calls:
            raise KeyboardInterrupt

    monkeypatch.setattr(connectivity._CurveFile, method, write)


@pytest.mark.parametrize("where", [("write_epoch", 2), ("write_path", 4)])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, mlp_problem, monkeypatch, where):
    """Killed after 2 of 4 epochs, or after the line and one block of the curve: resuming gives every number of an
    uninterrupted run, training only the missing epochs and evaluating only the missing points."""
    model, _, _, batches = mlp_problem
    other = tiny_mlp(seed=5)
    objective = Objective(model, batches)
    settings = {"training": CurveTraining("bezier", epochs=4, lr=0.1, seed=3), "points": 5, "points_per_call": 2}
    straight = connect(objective, other, **settings)
    path = tmp_path / "curve.h5"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, *where)
        with pytest.raises(KeyboardInterrupt):
            connect(objective, other, path=path, **settings)
    partial = read_connection(path)
    missing = {name: int(np.isnan(getattr(partial, name).loss["train"]).sum()) for name in ("line", "curve")}
    assert missing == ({"line": 0, "curve": 5} if where[0] == "write_epoch" else {"line": 0, "curve": 3})
    epochs_left = 2 if where[0] == "write_epoch" else 0
    assert int(np.isfinite(partial.train_loss).sum()) == 4 - epochs_left

    evaluated, epochs = [], []
    evaluate, shuffle = connectivity._evaluate_points, connectivity._epoch_batches
    monkeypatch.setattr(connectivity, "_evaluate_points", lambda *a: evaluated.append(len(a[4])) or evaluate(*a))
    monkeypatch.setattr(connectivity, "_epoch_batches", lambda *a: epochs.append(1) or shuffle(*a))
    resumed = connect(objective, other, path=path, resume=True, **settings)
    assert sum(evaluated) == missing["curve"] and len(epochs) == epochs_left
    assert torch.equal(resumed.bend, straight.bend)
    np.testing.assert_array_equal(resumed.train_loss, straight.train_loss)
    for name in ("line", "curve"):
        np.testing.assert_array_equal(getattr(resumed, name).loss["train"], getattr(straight, name).loss["train"])
        np.testing.assert_array_equal(getattr(resumed, name).accuracy["train"], getattr(straight, name).accuracy["train"])
    stored = read_connection(path)
    np.testing.assert_array_equal(stored.curve.loss["train"], straight.curve.loss["train"])
    assert torch.equal(stored.bend, straight.bend)


def test_resume_refuses_other_settings_and_an_existing_file_without_resume(tmp_path, mlp_problem):
    model, _, _, batches = mlp_problem
    objective, other = Objective(model, batches), tiny_mlp(seed=5)
    path = tmp_path / "curve.h5"
    connect(objective, other, training=CurveTraining(epochs=1), points=3, path=path)
    with pytest.raises(SurfaceError, match="exists; pass resume=True"):
        connect(objective, other, training=CurveTraining(epochs=1), points=3, path=path)
    with pytest.raises(SurfaceError, match=r"training\.epochs differs: 1 in the file, 2 asked"):
        connect(objective, other, training=CurveTraining(epochs=2), points=3, path=path, resume=True)
    with pytest.raises(SurfaceError, match="points differs: 0:1:3 in the file, 0:1:5 asked"):
        connect(objective, other, training=CurveTraining(epochs=1), points=5, path=path, resume=True)
    with pytest.raises(SurfaceError, match="checkpoint B differs"):
        connect(objective, tiny_mlp(seed=6), training=CurveTraining(epochs=1), points=3, path=path, resume=True)
    with pytest.raises(SurfaceError, match=r"training\.curve differs: bezier in the file, chain asked"):
        connect(objective, other, training=CurveTraining("chain", epochs=1), points=3, path=path, resume=True)
    with h5py.File(path) as f:
        assert int(f["training"].attrs["epochs_done"]) == 1 and f["curve/done"][()].all()


def test_bad_input_is_one_clear_error(mlp_problem):
    model, _, _, batches = mlp_problem
    objective = Objective(model, batches)
    with pytest.raises(DirectionError, match="has shape"):
        connect(objective, nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 4)))
    broken = tiny_mlp(seed=1)
    with torch.no_grad():
        broken[1].weight[0, 0] = float("nan")
    with pytest.raises(DirectionError, match="non-finite"):
        connect(objective, broken)
    with pytest.raises(ConnectivityError, match="unknown curve 'spline'"):
        connect(objective, tiny_mlp(seed=1), training=CurveTraining("spline"))
    with pytest.raises(ConnectivityError, match="at least 3 points"):
        connect(objective, tiny_mlp(seed=1), points=2)
    with pytest.raises(ConnectivityError, match="diverged in epoch 2"):
        connect(objective, tiny_mlp(seed=1), training=CurveTraining(epochs=3, lr=1e38))


def test_barrier_interval_over_pairs_is_the_t_interval_of_their_barriers(mlp_problem):
    model, _, _, batches = mlp_problem
    objective = Objective(model, batches)
    runs = [connect(objective, tiny_mlp(seed=s), training=CurveTraining(epochs=1), points=3) for s in (1, 2, 3)]
    interval = barrier_interval(runs, path="line", split="train")
    values = [r.line.barrier("train") for r in runs]
    assert interval.values == tuple(values) and interval.mean == pytest.approx(np.mean(values))
    assert interval.halfwidth == pytest.approx(t_halfwidth(values))
    assert np.isnan(barrier_interval(runs[:1], path="line", split="train").halfwidth)


@pytest.mark.cli
def test_connect_command_end_to_end(tmp_path):
    a = digits_mlp_checkpoint(tmp_path / "a", hidden=(16,), seed=0)
    b = digits_mlp_checkpoint(tmp_path / "b", hidden=(16,), seed=1)
    out = tmp_path / "c.h5"
    args = [a, b, "--epochs", "2", "--points", "5", "--n-samples", "300", "--out", out, "--quiet"]
    done = run_cli("connect", *args, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    (connection,) = result["connections"]
    assert connection["curve"]["summary"]["test"]["barrier"] <= connection["line"]["summary"]["test"]["barrier"] + 0.05
    assert connection["n_steps"] == 2 * 12  # digits' train split in minibatches of 128
    stored = read_connection(out)
    assert stored.line.loss["train"][2] == pytest.approx(connection["line"]["loss"]["train"][2])
    table = run_cli("connect", *args, "--resume")
    assert table.returncode == 0, table.stderr
    assert "straight line" in table.stdout and "bezier curve" in table.stdout and "barrier" in table.stdout
    refused = one_line(run_cli("connect", *args[:-3], "--epochs", "3", "--out", out, "--resume"))
    assert "training.epochs differs: 2 in the file, 3 asked" in refused


def test_checkpoints_come_in_pairs():
    from analysis.cli.connect import pairs_of

    assert pairs_of(["a", "b", "c", "d"]) == [("a", "b"), ("c", "d")]
    with pytest.raises(ValueError, match="c has no partner"):
        pairs_of(["a", "b", "c"])


def test_connectivity_plot_names_each_paths_barrier_with_its_interval(mlp_problem, tmp_path):
    from analysis.report.charts import plot_connectivity, save

    model, _, _, batches = mlp_problem
    objective = Objective(model, batches)
    runs = [connect(objective, tiny_mlp(seed=s), training=CurveTraining(epochs=1), points=3) for s in (1, 2)]
    fig = plot_connectivity({"sgd B=32": runs, "smoothout B=32": runs[:1]}, splits=("train",))
    texts = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    half = t_halfwidth([r.line.barrier("train") for r in runs])
    assert f"sgd B=32, line: {np.mean([r.line.barrier('train') for r in runs]):.3g} ± {half:.2g}" in texts
    assert any(t.startswith("smoothout B=32, Bézier: ") and "±" not in t for t in texts)
    assert save(fig, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
