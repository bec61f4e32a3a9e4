"""The spread over random directions and the quantities on the grid: each member is the single-seed surface, the
median and band are numpy's, the sharpness radius is the quadratic's closed form, grad-norm is autograd's."""

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from landscape.engine.objective import Objective
from landscape.examples import quadratic
from landscape.surfaces.directions import random_directions
from landscape.surfaces.quantities import QUANTITIES, QuantityError, register_quantity
from landscape.surfaces.spread import compute_spread, read_spread, sharpness_radius, spread_directions
from landscape.surfaces.surface import SurfaceError, compute_surface, grid_axis, read_surface
from tests.helpers import classification_batches, tiny_convnet_bn, tiny_mlp


@pytest.fixture
def mlp():
    _, _, batches = classification_batches(50, (12,), 4, [20, 20, 10])
    return Objective(tiny_mlp(), batches, dtype=torch.float64)


def test_each_member_is_the_surface_of_its_seed_and_median_band_are_numpys(tmp_path, mlp):
    axes = [grid_axis(-1, 1, 5)]
    spread = compute_spread(mlp, axes, n=4, seed=5, path=tmp_path / "spread.h5")
    assert spread.loss["train"].shape == (4, 5) and spread.complete and spread.seeds == (5, 6, 7, 8)
    for k in range(4):
        alone = compute_surface(mlp, random_directions(mlp, 1, seed=5 + k), axes)
        np.testing.assert_array_equal(spread.loss["train"][k], alone.loss["train"])
        np.testing.assert_array_equal(spread.accuracy["train"][k], alone.accuracy["train"])
        assert spread.member(k).directions.fingerprint() == alone.directions.fingerprint()  # vectors, kind and spec
    curves = spread.loss["train"]
    assert len({tuple(c) for c in curves}) == 4  # the directions really differ
    np.testing.assert_array_equal(spread.median(), np.median(curves, axis=0))
    low, high = spread.band()
    np.testing.assert_array_equal(low, np.percentile(curves, 10, axis=0))
    np.testing.assert_array_equal(high, np.percentile(curves, 90, axis=0))
    stored = read_spread(tmp_path / "spread.h5")
    np.testing.assert_array_equal(stored.loss["train"], curves)
    assert stored.seeds == spread.seeds
    with pytest.raises(SurfaceError, match="read it with read_spread"):
        read_surface(tmp_path / "spread.h5")


def test_a_plane_member_is_the_2d_surface_of_its_seed(mlp):
    axes = [grid_axis(-1, 1, 3), grid_axis(-0.5, 0.5, 3)]
    spread = compute_spread(mlp, axes, n=2, seed=1)
    assert spread.loss["train"].shape == (2, 3, 3)
    alone = compute_surface(mlp, random_directions(mlp, 2, seed=2), axes)
    np.testing.assert_array_equal(spread.loss["train"][1], alone.loss["train"])


def test_sharpness_radius_is_the_quadratics_closed_form():
    """L(c) = ½ cᵀMc with M = D H Dᵀ, H = diag(4, 1): along d, |α| = √(2Δ/dᵀHd); in a plane, √(A/π) = √(2Δ/√det M)."""
    objective, hessian, rise = quadratic(), torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)), 0.5
    line = compute_spread(objective, [grid_axis(-2, 2, 801)], n=5, normalization="none")
    expected = [float(np.sqrt(2 * rise / float(d @ hessian @ d))) for d in line.directions.vectors]
    summary = sharpness_radius(line, rise)
    np.testing.assert_allclose(summary.radii, expected, rtol=1e-4)
    assert summary.median == pytest.approx(np.median(expected), rel=1e-4)
    assert (summary.q25, summary.q75) == pytest.approx(tuple(np.percentile(expected, [25, 75])), rel=1e-4)
    assert summary.loss_at_origin == 0.0 and summary.level == rise and summary.n_censored == 0

    plane = compute_spread(objective, [grid_axis(-2, 2, 41)] * 2, n=3, seed=0, normalization="none")
    summary = sharpness_radius(plane, 0.2)
    for k, radius in enumerate(summary.radii):
        d = plane.directions.vectors[2 * k : 2 * k + 2]
        curvatures = torch.linalg.eigvalsh(d @ hessian @ d.T)
        longest = float(np.sqrt(2 * 0.2 / float(curvatures[0])))  # the ellipse's longer semi-axis
        assert summary.censored[k] == (longest > 2)  # the set reaches the grid's edge: a lower bound only
        if not summary.censored[k]:
            assert radius == pytest.approx(np.sqrt(2 * 0.2 / np.sqrt(float(curvatures.prod()))), rel=0.03)
    assert 0 < summary.n_censored < 3  # seed 0's first plane is nearly degenerate, the others are not
    assert summary.areas == pytest.approx(np.pi * summary.radii**2)

    censored = sharpness_radius(compute_spread(objective, [grid_axis(-0.1, 0.1, 5)], n=3, normalization="none"), 10.0)
    assert censored.n_censored == 3 and censored.median == float("inf")
    with pytest.raises(SurfaceError, match="does not hold the origin"):
        sharpness_radius(compute_spread(objective, [grid_axis(0.1, 1, 4)], n=2), 0.1)
    with pytest.raises(SurfaceError, match="positive"):
        sharpness_radius(line, 0.0)


def test_grad_norm_at_each_point_is_autograds(conv_problem):
    """With BN statistics moving along the direction (states=True): the gradient at the point's weights and buffers."""
    model, _, _, batches = conv_problem
    objective = Objective(model, batches, dtype=torch.float64)
    directions = random_directions(objective, 1, seed=0, one_d="copy", states=True)
    surface = compute_surface(objective, directions, [np.array([-0.5, 0.0, 0.5])], quantities=["loss", "grad-norm"])
    for i, alpha in enumerate((-0.5, 0.0, 0.5)):
        net = tiny_convnet_bn().double().eval()
        state = {name: t.clone() for name, t in objective.layout.unflatten(objective.w + alpha * directions.vectors[0]).items()}
        state.update(
            {n: b + alpha * directions.buffers[n][0] for n, b in objective.model.named_buffers() if n in directions.buffers}
        )
        net.load_state_dict(state, strict=False)
        x, y = torch.cat([b[0] for b in batches]).double(), torch.cat([b[1] for b in batches])
        F.cross_entropy(net(x), y).backward()
        expected = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
        assert surface.quantities["grad-norm"]["train"][i] == pytest.approx(float(expected), rel=1e-10)
    assert surface.quantities["grad-norm"]["train"][0] != surface.quantities["grad-norm"]["train"][1]


def test_each_point_records_its_cost_and_any_registered_quantity(tmp_path, mlp):
    test = Objective(mlp.model, mlp.batches[:1], dtype=torch.float64)
    register_quantity("weight-norm", lambda point: float(point.w.norm()), forward_passes=0, description="‖w‖")
    try:
        surface = compute_surface(
            {"train": mlp, "test": test},
            random_directions(mlp, 1, seed=0),
            [grid_axis(-1, 1, 5)],
            path=tmp_path / "s.h5",
            quantities=["loss", "accuracy", "grad-norm", "weight-norm"],
        )
    finally:
        del QUANTITIES["weight-norm"]
    d = surface.directions.vectors[0]
    norms = [float((mlp.w + a * d).norm()) for a in surface.axes[0]]
    np.testing.assert_allclose(surface.quantities["weight-norm"]["test"], norms, rtol=1e-12)
    stored = read_surface(tmp_path / "s.h5")
    np.testing.assert_array_equal(stored.quantities["grad-norm"]["test"], surface.quantities["grad-norm"]["test"])
    assert (stored.cost["forwards"] == 2 * (1 + 1 + 0)).all() and (stored.cost["backwards"] == 2).all()
    assert (stored.cost["seconds"] > 0).all()
    with h5py.File(tmp_path / "s.h5") as f:
        assert sorted(f["cost"]) == ["backwards", "forwards", "seconds"] and "grad-norm" in f["train"]
    with pytest.raises(QuantityError, match="unknown quantity 'hessian'"):
        compute_surface(mlp, random_directions(mlp, 1, seed=0), [grid_axis(-1, 1, 3)], quantities=["hessian"])
    with pytest.raises(SurfaceError, match="quantities differs"):  # a file of other quantities is not resumed
        compute_surface(
            {"train": mlp, "test": test},
            random_directions(mlp, 1, seed=0),
            [grid_axis(-1, 1, 5)],
            path=tmp_path / "s.h5",
            resume=True,
        )


def test_a_killed_spread_resumes_to_the_same_values(tmp_path, mlp, monkeypatch):
    axes, path = [grid_axis(-1, 1, 5)], tmp_path / "spread.h5"
    full = compute_spread(mlp, axes, n=3, path=path, quantities=["grad-norm"])
    with h5py.File(path, "r+") as f:  # forget the last member and a half, as a killed run would
        f["done"][1, 2:] = 0
        f["done"][2] = 0
        f["train/loss"][2] = np.nan
    calls = []
    original = Objective.evaluate
    monkeypatch.setattr(Objective, "evaluate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    resumed = compute_spread(mlp, axes, n=3, path=path, resume=True, quantities=["grad-norm"])
    assert len(calls) == 8
    np.testing.assert_array_equal(resumed.loss["train"], full.loss["train"])
    np.testing.assert_array_equal(resumed.quantities["grad-norm"]["train"], full.quantities["grad-norm"]["train"])
    with pytest.raises(SurfaceError, match="differs"):
        compute_spread(mlp, axes, n=4, path=path, resume=True, quantities=["grad-norm"])
    with pytest.raises(SurfaceError, match="at least 2 directions"):
        spread_directions(mlp, 1)


@pytest.mark.slow
def test_cli_spread_prints_the_radius_and_refuses_other_directions(tmp_path, capsys):
    import json

    from analysis.cli import main
    from landscape.inputs.checkpoints import save_checkpoint
    from landscape.inputs.models import model_for_data

    torch.manual_seed(0)
    model, spec = model_for_data("mlp", (1, 8, 8), 10)
    checkpoint = save_checkpoint(tmp_path / "net.pt", model, model_spec=spec, data_spec={"spec": "digits"})
    args = ["surface", str(checkpoint), "--spread", "3", "--range", "-4:4:9", "--n-samples", "64", "--rise", "0.05"]
    assert main([*args, "--quantities", "grad-norm", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    spread = read_spread(tmp_path / "net-spread-1d-n3.h5")
    radius = report["sharpness_radius"]["train"]
    assert radius["median"] == pytest.approx(sharpness_radius(spread, 0.05).median) and radius["rise"] == 0.05
    assert report["seeds"] == [0, 1, 2] and "grad-norm" in report["quantities"]
    assert main([*args, "--out", str(tmp_path / "other.h5")]) == 0
    assert "sharpness radius over the 3 directions" in capsys.readouterr().out
    assert main([*args, "--between", str(checkpoint), "--out", str(tmp_path / "x.h5")]) == 2
    assert "--spread draws random directions" in capsys.readouterr().err
