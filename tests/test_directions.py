"""Directions for loss surfaces: filter normalization, 1-D policies, interpolation, PCA of a trajectory."""

import copy

import pytest
import torch

from landscape.engine.objective import Objective
from landscape.surfaces.directions import DirectionError, between, flat_state, pca_directions, random_directions
from tests.helpers import classification_batches, tiny_convnet_bn, tiny_mlp


@pytest.fixture
def conv_objective(conv_problem):
    model, _, _, batches = conv_problem
    return Objective(model, batches, dtype=torch.float64)


def _tensors(objective, directions, row=0):
    return objective.layout.unflatten(directions.vectors[row])


def test_filter_normalized_filters_have_the_weight_filters_norm(conv_objective):
    d = random_directions(conv_objective, 2, seed=3)
    weights = conv_objective.layout.unflatten(conv_objective.w)
    for row in range(2):
        for name, t in _tensors(conv_objective, d, row).items():
            w = weights[name]
            if w.ndim <= 1:
                assert torch.count_nonzero(t) == 0, f"{name} should be ignored (zero)"
            else:
                torch.testing.assert_close(t.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-12, atol=0)
    # Gaussian, not uniform [0, 1): both signs, and the two directions differ
    assert (d.vectors < 0).any() and (d.vectors > 0).any()
    assert not torch.allclose(d.vectors[0], d.vectors[1])


def test_one_d_copy_and_states_follow_the_reference(conv_objective):
    d = random_directions(conv_objective, 1, seed=0, one_d="copy", states=True)
    weights = conv_objective.layout.unflatten(conv_objective.w)
    for name, t in _tensors(conv_objective, d).items():
        if weights[name].ndim <= 1:
            assert torch.equal(t, weights[name])
    buffers = dict(conv_objective.model.named_buffers())
    assert set(d.buffers) == {n for n, b in buffers.items() if b.is_floating_point()}
    for name, t in d.buffers.items():
        assert torch.equal(t[0], buffers[name])  # 1-D running statistics copied
    ignored = random_directions(conv_objective, 1, seed=0, states=True)
    assert all(torch.count_nonzero(t) == 0 for t in ignored.buffers.values())


def test_layer_and_weight_normalization(conv_objective):
    weights = conv_objective.layout.unflatten(conv_objective.w)
    layer = _tensors(conv_objective, random_directions(conv_objective, 1, seed=1, normalization="layer"))
    raw = _tensors(conv_objective, random_directions(conv_objective, 1, seed=1, normalization="none"))
    weight = _tensors(conv_objective, random_directions(conv_objective, 1, seed=1, normalization="weight"))
    for name, w in weights.items():
        if w.ndim > 1:
            torch.testing.assert_close(layer[name].norm(), w.norm(), rtol=1e-12, atol=0)
            torch.testing.assert_close(weight[name], raw[name] * w, rtol=1e-12, atol=0)


def test_all_zero_filter_gives_a_zero_finite_direction(conv_problem):
    model = conv_problem[0]
    with torch.no_grad():
        model[0].weight[1].zero_()
    objective = Objective(model, conv_problem[3])
    d = _tensors(objective, random_directions(objective, 1, seed=0))
    assert torch.isfinite(d["0.weight"]).all()
    assert torch.count_nonzero(d["0.weight"][1]) == 0 and torch.count_nonzero(d["0.weight"][0]) > 0


def test_same_seed_same_directions_in_any_dtype(conv_problem):
    model, _, _, batches = conv_problem
    a = random_directions(Objective(model, batches), 2, seed=7)
    b = random_directions(Objective(model, batches, dtype=torch.float64), 2, seed=7)
    torch.testing.assert_close(a.vectors.double(), b.vectors, rtol=1e-6, atol=1e-7)
    assert a.fingerprint() == random_directions(Objective(model, batches), 2, seed=7).fingerprint()
    assert a.fingerprint() != random_directions(Objective(model, batches), 2, seed=8).fingerprint()


def test_bad_options_are_refused(conv_objective):
    with pytest.raises(DirectionError, match="normalization"):
        random_directions(conv_objective, 1, normalization="filterwise")
    with pytest.raises(DirectionError, match="1 or 2"):
        random_directions(conv_objective, 3)


def test_between_is_the_difference_including_bn_buffers(conv_objective):
    other = tiny_convnet_bn(seed=5)
    d = between(conv_objective, other, "B")
    w_b, buffers_b = flat_state(conv_objective, other)
    torch.testing.assert_close(d.vectors[0], w_b - conv_objective.w, rtol=0, atol=0)
    mine = dict(conv_objective.model.named_buffers())
    assert set(d.buffers) == {"1.running_mean", "1.running_var", "4.running_mean", "4.running_var"}
    for name, t in d.buffers.items():
        torch.testing.assert_close(t[0], buffers_b[name] - mine[name], rtol=0, atol=0)


def test_between_refuses_another_architecture(conv_objective):
    with pytest.raises(DirectionError, match="not the same architecture"):
        between(conv_objective, tiny_mlp(), "an MLP")


def test_pca_recovers_a_known_plane_and_projects_the_trajectory():
    _, _, batches = classification_batches(30, (12,), 4, [30])
    model = tiny_mlp()
    objective = Objective(model, batches, dtype=torch.float64)
    n = objective.n_params
    e, _ = torch.linalg.qr(torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = torch.tensor([-3.0, -2.0, -1.2, -0.5, 0.0], dtype=torch.float64)  # large spread: first component
    b = torch.tensor([0.3, -0.2, 0.25, -0.1, 0.0], dtype=torch.float64)
    trajectory = []
    for ai, bi in zip(a, b):
        m = copy.deepcopy(model).double()
        w = objective.w + ai * e[:, 0] + bi * e[:, 1]
        with torch.no_grad():
            for name, t in objective.layout.unflatten(w).items():
                m.get_parameter(name).copy_(t)
        trajectory.append(m)
    d = pca_directions(objective, trajectory, [f"epoch {i}" for i in range(5)])
    v = d.vectors
    torch.testing.assert_close(v @ v.T, torch.eye(2, dtype=v.dtype), rtol=0, atol=1e-12)  # orthonormal
    torch.testing.assert_close(
        torch.linalg.matrix_norm(v @ e), torch.tensor(2.0, dtype=v.dtype).sqrt(), rtol=0, atol=1e-10
    )  # spans the plane of the run
    offsets = torch.stack([a, b], 1) @ e.T
    torch.testing.assert_close(torch.from_numpy(d.trajectory) @ v, offsets, rtol=0, atol=1e-10)  # exact projection
    assert sum(d.spec["explained_variance_ratio"]) == pytest.approx(1.0, abs=1e-10)
    assert d.spec["explained_variance_ratio"][0] > 0.9
    assert (d.trajectory[0] <= 0).all(), "the run starts at negative coordinates"
    assert d.labels[0] == "epoch 0"


def test_pca_needs_three_checkpoints(conv_objective):
    with pytest.raises(DirectionError, match="at least 3"):
        pca_directions(conv_objective, [tiny_convnet_bn(1)], ["one"])
