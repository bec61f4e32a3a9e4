"""Directions for loss surfaces: filter normalization, 1-D policies, interpolation, PCA of a trajectory, Hessian
eigenvectors, the gradient and the plane through three checkpoints."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from landscape.engine.objective import Objective
from landscape.examples import quadratic
from landscape.inputs.batches import mean_squared_error
from landscape.surfaces.directions import (
    DirectionError,
    between,
    checkpoint_plane,
    eigenvector_directions,
    flat_state,
    gradient_direction,
    pca_directions,
    random_directions,
)
from landscape.surfaces.surface import compute_surface, grid_axis
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


def test_pca_explained_variance_is_numpys_svd_of_the_trajectory():
    _, _, batches = classification_batches(30, (12,), 4, [30])
    objective = Objective(tiny_mlp(), batches, dtype=torch.float64)
    trajectory = [tiny_mlp(seed).double() for seed in range(1, 7)]  # six unrelated points: a spread-out spectrum
    d = pca_directions(objective, trajectory, [f"{i}" for i in range(6)])
    flat = np.stack([torch.cat([p.detach().flatten() for p in m.parameters()]).numpy() for m in trajectory])
    centred = flat - flat.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    expected = singular[:2] ** 2 / (singular**2).sum()
    np.testing.assert_allclose(d.spec["explained_variance_ratio"], expected, rtol=1e-10)
    assert 0.2 < expected[0] < 0.9  # not a degenerate case where any answer near 1 would pass


# ---------------------------------------------------------------- a quadratic with a known Hessian
def _quadratic(eigenvalues, seed=0, offset=0.3):
    """L(w) = ½(w − w*)ᵀA(w − w*), A = Q diag(λ) Qᵀ, as least squares: rows X = √(N/2)·diag(√λ)Qᵀ, y = Xw*.

    Returns the Objective at w0 = w* + offset·(a random unit vector), A, its eigenvectors (columns, λ descending),
    w0 and w*."""
    eigenvalues = np.asarray(eigenvalues, dtype=float)
    n = len(eigenvalues)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    x = np.sqrt(n / 2) * (np.sqrt(eigenvalues)[:, None] * q.T)
    w_star = rng.standard_normal(n)
    step = rng.standard_normal(n)
    w0 = w_star + offset * step / np.linalg.norm(step)
    model = nn.Linear(n, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w0)[None])
    batches = [(torch.from_numpy(x), torch.from_numpy(x @ w_star)[:, None])]
    objective = Objective(model, batches, loss=mean_squared_error, dtype=torch.float64, device="cpu")
    a = (q * eigenvalues) @ q.T
    values, vectors = np.linalg.eigh(a)
    return objective, a, vectors[:, ::-1], w0, w_star


def _closed_form(a, w0, w_star, vectors, xs, ys):
    """½(w − w*)ᵀA(w − w*) at w = w0 + x·v₁ + y·v₂ on the grid."""
    out = np.empty((len(xs), len(ys)))
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            r = w0 + x * vectors[0] + y * vectors[1] - w_star
            out[i, j] = 0.5 * r @ a @ r
    return out


def test_eigenvector_plane_of_a_quadratic_is_the_closed_form():
    eigenvalues = [9.0, 4.0, 2.5, 2.0, *np.linspace(1.5, 0.1, 16)]
    objective, a, eigvecs, w0, w_star = _quadratic(eigenvalues)
    d = eigenvector_directions(objective, 2, seed=1, tol=1e-10)
    assert d.kind == "eigenvector" and d.spec["certified"] and d.spec["converged"]
    np.testing.assert_allclose(d.spec["eigenvalues"], [9.0, 4.0], rtol=1e-9)
    assert d.spec["seed"] == 1 and d.spec["n_matvecs"] > 0
    v = d.vectors.numpy()
    np.testing.assert_allclose(v @ v.T, np.eye(2), atol=1e-12)  # unit vectors: coordinates are distances
    for i in range(2):  # the dense eigenvectors, up to sign
        sign = np.sign(v[i] @ eigvecs[:, i])
        np.testing.assert_allclose(v[i], sign * eigvecs[:, i], atol=1e-8)
    xs, ys = grid_axis(-1, 1, 5), grid_axis(-0.5, 1, 4)
    surface = compute_surface(objective, d, [xs, ys])
    g = a @ (w0 - w_star)
    loss0 = 0.5 * (w0 - w_star) @ a @ (w0 - w_star)
    dense = eigvecs[:, :2].T * np.sign(np.sum(v * eigvecs[:, :2].T, axis=1))[:, None]
    # the closed form in the plane: L₀ + x·g·v₁ + y·g·v₂ + ½λ₁x² + ½λ₂y²
    expected = np.array([[loss0 + x * g @ dense[0] + y * g @ dense[1] + 0.5 * (9.0 * x**2 + 4.0 * y**2) for y in ys] for x in xs])
    np.testing.assert_allclose(surface.loss["train"], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(surface.loss["train"], _closed_form(a, w0, w_star, dense, xs, ys), rtol=1e-12, atol=1e-12)


def test_a_close_pair_lanczos_cannot_separate_is_recorded_uncertified():
    # λ₁ and λ₂ one part in 10⁶ apart, over 200 dimensions, and a budget far below what would resolve them
    eigenvalues = [1.0, 1.0 - 1e-6, *np.linspace(0.9, 0.01, 198)]
    objective, a, eigvecs, *_ = _quadratic(eigenvalues, seed=3)
    d = eigenvector_directions(objective, 2, seed=0, max_matvecs=12)
    assert d.spec["certified"] is False and d.spec["n_matvecs"] <= 12
    # still unit, orthogonal Ritz vectors, and the recorded values are the curvature along them (Rayleigh quotients)
    v = d.vectors
    torch.testing.assert_close(v @ v.T, torch.eye(2, dtype=v.dtype), rtol=0, atol=1e-12)
    curvature = torch.einsum("in,nm,im->i", v, torch.from_numpy(a), v)
    np.testing.assert_allclose(curvature.numpy(), d.spec["eigenvalues"], rtol=1e-10)
    full = eigenvector_directions(objective, 2, seed=0, tol=1e-10)  # the default budget certifies the pair
    assert full.spec["certified"] is True
    np.testing.assert_allclose(full.spec["eigenvalues"], eigenvalues[:2], rtol=1e-9)
    plane = eigvecs[:, :2]  # both axes lie in the top eigenspace (one pair: axes within it are not determined)
    np.testing.assert_allclose(np.linalg.norm(plane.T @ full.vectors.numpy().T, axis=0), [1.0, 1.0], atol=1e-6)


def test_eigenvector_directions_refuse_three_axes():
    objective, *_ = _quadratic([3.0, 2.0, 1.0])
    with pytest.raises(DirectionError, match="1 or 2"):
        eigenvector_directions(objective, 3)


def test_gradient_direction_is_the_normalized_gradient_and_its_plane():
    eigenvalues = [9.0, 4.0, *np.linspace(2.0, 0.1, 30)]
    objective, a, eigvecs, w0, w_star = _quadratic(eigenvalues, seed=2)
    g = a @ (w0 - w_star)
    unit = g / np.linalg.norm(g)
    line = gradient_direction(objective)
    np.testing.assert_allclose(line.vectors[0].numpy(), unit, atol=1e-12)
    assert line.spec["gradient_norm"] == pytest.approx(np.linalg.norm(g), rel=1e-12)
    assert line.spec["curvature"] == pytest.approx(unit @ a @ unit, rel=1e-12)
    plane = gradient_direction(objective, 2, tol=1e-10)
    v = plane.vectors.numpy()
    np.testing.assert_allclose(v @ v.T, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(v[0], unit, atol=1e-12)
    top = eigvecs[:, 0]  # the second axis is the top eigenvector minus its gradient component
    residual = top - (top @ unit) * unit
    np.testing.assert_allclose(abs(v[1] @ residual) / np.linalg.norm(residual), 1.0, atol=1e-9)
    assert abs(plane.spec["cosine"]) == pytest.approx(abs(top @ unit), abs=1e-9)
    assert plane.spec["certified"] and plane.spec["eigenvalues"][0] == pytest.approx(9.0, rel=1e-9)
    with pytest.raises(DirectionError, match="gradient at this checkpoint is zero"):
        gradient_direction(quadratic())  # at its minimum, exactly


# ---------------------------------------------------------------- the plane through three checkpoints
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_checkpoint_plane_passes_through_all_three_checkpoints(conv_problem, dtype):
    model, _, _, batches = conv_problem
    b, c = tiny_convnet_bn(seed=5), tiny_convnet_bn(seed=7)  # other weights and BN running statistics
    objective = Objective(model, batches, dtype=dtype)
    plane = checkpoint_plane(objective, b, c, ("A", "B", "C"))
    assert plane.kind == "plane" and plane.labels == ("A", "B", "C")
    coords = plane.trajectory
    v = plane.vectors.double()
    torch.testing.assert_close(v @ v.T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-6)
    assert tuple(coords[0]) == (0.0, 0.0) and coords[1, 1] == 0.0 and coords[2, 1] > 0
    w_b, _ = flat_state(objective, b)
    assert coords[1, 0] == pytest.approx(float((w_b - objective.w).double().norm()), rel=1e-12)
    xs, ys = sorted({0.0, *coords[:, 0]}), [0.0, coords[2, 1]]
    surface = compute_surface(objective, plane, [xs, ys])
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for (x, y), net in zip(coords, (model, b, c)):
        own = Objective(net, batches, dtype=dtype).loss()  # each checkpoint on its own, BN statistics its own
        assert surface.loss["train"][xs.index(x), ys.index(y)] == pytest.approx(own, rel=tol), (x, y)
    # without moving the BN statistics the plane would miss B: the test above can fail
    still = compute_surface(objective, type(plane)(plane.vectors, "plane", plane.spec), [[coords[1, 0]], [0.0]])
    assert abs(still.loss["train"][0, 0] - Objective(b, batches, dtype=dtype).loss()) > 1e-3


def test_checkpoint_plane_refuses_degenerate_triangles(conv_objective):
    model = conv_objective.model
    same = copy.deepcopy(model)
    with pytest.raises(DirectionError, match="same weights"):
        checkpoint_plane(conv_objective, same, tiny_convnet_bn(seed=5))
    b = tiny_convnet_bn(seed=5).double()
    c = copy.deepcopy(b)
    w_a, w_b = conv_objective.w, flat_state(conv_objective, b)[0]
    with torch.no_grad():  # C = A + 2(B − A): on the line through A and B
        for name, t in conv_objective.layout.unflatten(w_a + 2 * (w_b - w_a)).items():
            c.get_parameter(name).copy_(t)
    with pytest.raises(DirectionError, match="on the line"):
        checkpoint_plane(conv_objective, b, c)
    with pytest.raises(DirectionError, match="not the same architecture"):
        checkpoint_plane(conv_objective, tiny_mlp(), c)


def test_pca_needs_three_checkpoints(conv_objective):
    with pytest.raises(DirectionError, match="at least 3"):
        pca_directions(conv_objective, [tiny_convnet_bn(1)], ["one"])
