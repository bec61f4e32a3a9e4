"""Tracking sharpness along training: warm-started Lanczos, and the edge of stability (Cohen et al. 2021)."""

import copy

import numpy as np
import pytest
import torch

from landscape.curvature.spectrum import lanczos
from landscape.curvature.stability import GDConfig, gradient_descent
from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator
from tests.helpers import dense


def hessian(model, batches):
    return HessianOperator(Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method="double-backward"))


def perturbed(model, scale, seed=1):
    """A copy of `model` with every parameter moved by `scale` times its own norm in a seeded random direction."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.add_(scale * p.norm() * noise / noise.norm())
    return model


def test_lanczos_is_seeded_and_a_start_is_mixed_with_its_gaussian(mlp_problem):
    """The same seed gives a bit-identical run; a caller's start is mixed with that seed's Gaussian vector, so even a
    start on the wrong eigenvector (λ2's) gives the certified λ1."""
    model, _, _, batches = mlp_problem
    op = hessian(model, batches)
    cold, again = (lanczos(op, 2, tol=1e-8, seed=5, return_vectors=True) for _ in range(2))
    assert np.array_equal(cold.values, again.values) and torch.equal(cold.vectors, again.vectors)
    wrong = lanczos(op, 1, tol=1e-8, seed=5, start=3.0 * cold.vectors[1])  # λ2's eigenvector, normalized inside
    assert wrong.certified and abs(wrong.values[0] - cold.values[0]) <= wrong.error_bounds[0] + cold.error_bounds[0]


def test_warm_started_lanczos_equals_cold_on_a_network_hessian(mlp_problem):
    """Warm-started from another model's eigenvectors, Lanczos finds the same λ1..λ3, to its tolerance, as cold starts."""
    model, _, _, batches = mlp_problem
    op = hessian(model, batches)
    h = op.products(torch.eye(op.shape[0], dtype=torch.float64)).numpy()
    true = np.linalg.eigvalsh((h + h.T) / 2)[::-1][:3]
    start = lanczos(hessian(perturbed(model, 0.05), batches), 1, tol=1e-6, return_vectors=True).vectors[0]
    tol = 1e-6
    warm = lanczos(op, 3, tol=tol, start=start)
    assert warm.converged
    np.testing.assert_allclose(warm.values, true, rtol=tol)
    for seed in range(3):
        cold = lanczos(op, 3, tol=tol, seed=seed)
        np.testing.assert_allclose(warm.values, cold.values, rtol=2 * tol)


def test_warm_start_from_the_unperturbed_eigenvector_saves_matvecs(mlp_problem):
    """After a small step in weight space the previous top eigenvector is a better start than any random one."""
    model, _, _, batches = mlp_problem
    previous = lanczos(hessian(model, batches), 1, tol=1e-8, return_vectors=True).vectors[0]
    op = hessian(perturbed(model, 0.01), batches)
    for stop in ("error", "residual", "certified"):
        warm = lanczos(op, 1, tol=1e-6, stop=stop, start=previous)
        colds = [lanczos(op, 1, tol=1e-6, stop=stop, seed=seed) for seed in range(5)]
        assert warm.converged and all(cold.converged for cold in colds)
        assert warm.n_matvecs < min(cold.n_matvecs for cold in colds), (warm.n_matvecs, [c.n_matvecs for c in colds])
        for cold in colds:
            np.testing.assert_allclose(warm.values, cold.values, rtol=2e-6)


def test_start_on_an_exact_eigenvector():
    """A start on an eigenvector, the top one or another, still gives the certified top eigenvalues (it is mixed with a
    Gaussian vector, so it hides no eigenvector)."""
    eigenvalues = np.concatenate([[9.0, 7.0, 5.0], np.linspace(-1, 3, 47)])
    a, op = dense(eigenvalues)
    vectors = np.linalg.eigh(a)[1]
    for column in (-1, -2, 0):  # λ1's, λ2's and the smallest one's eigenvector
        one = lanczos(op, 1, tol=1e-10, start=torch.as_tensor(vectors[:, column]))
        assert one.certified
        np.testing.assert_allclose(one.values, [9.0], rtol=1e-9)
    top = torch.as_tensor(vectors[:, -1])
    three = lanczos(op, 3, tol=1e-10, start=top)
    assert three.converged
    np.testing.assert_allclose(three.values, [9.0, 7.0, 5.0], rtol=1e-9)


@pytest.mark.parametrize(
    "start, message",
    [
        (torch.ones(7), "entries"),
        (torch.zeros(50), "nonzero"),
        (torch.full((50,), float("nan")), "finite"),
        (np.ones(50), "Tensor"),
    ],
)
def test_lanczos_rejects_a_bad_start(start, message):
    _, op = dense(np.arange(50.0))
    with pytest.raises(ValueError, match=message):
        lanczos(op, 1, start=start)


def test_gd_config_is_validated():
    for bad in ({"lr": 0.0}, {"lr": float("nan")}, {"steps": -1}, {"every": 0}, {"stop": "never"}, {"dtype": "half"}):
        with pytest.raises(ValueError):
            GDConfig(**{"lr": 0.1, "steps": 10, **bad})


@pytest.mark.slow
def test_gradient_descent_sharpens_to_the_edge_of_stability():
    """Cohen et al. 2021 at laptop scale: λ1 rises from well below 2/η to it and stays within ±15% of it.

    A 40-16-16-10 tanh MLP, squared loss, 200 mnist1d samples, full-batch GD for 800 steps with seeded
    initialization: λ1 starts at 0.42 and 0.56 of 2/η and, over steps 500–800, stays within
    [1.005, 1.063] and [1.022, 1.105] of 2/η for η = 0.3 and 0.4 (other initialization seeds: 0.95–1.16).
    """
    from analysis.experiments.edge_of_stability import squared_loss
    from landscape.inputs.data import load_data
    from landscape.inputs.models import MLP

    data = load_data("mnist1d")
    x, y = data.x_train[:200], data.y_train[:200]
    for lr in (0.3, 0.4):
        torch.manual_seed(0)
        model = MLP(data.input_shape, data.num_classes, (16, 16), activation="tanh")
        before = copy.deepcopy(model.state_dict())
        run = gradient_descent(model, x, y, GDConfig(lr=lr, steps=800, every=10), squared_loss)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # trained a copy
        assert len(run.loss) == 801 and list(run.recorded) == list(range(0, 801, 10))
        assert run.threshold == pytest.approx(2 / lr) and run.converged.all()
        assert np.all(run.residuals <= 1e-3 * run.sharpness)
        assert run.sharpness[0] < 0.7 * run.threshold  # progressive sharpening from well below 2/η
        assert run.loss[-1] < 0.5 * run.loss[0]
        window = run.sharpness[run.recorded >= 500] / run.threshold
        assert np.all(np.abs(window - 1) <= 0.15), (lr, window.min(), window.max())
        assert np.nanmedian(run.alignment[run.recorded >= 500]) > 0.2  # the gradient oscillates along v1 (~0.03 at random)


@pytest.mark.slow
def test_full_batch_adam_sharpens_to_the_adaptive_edge_of_stability():
    """Cohen et al. 2022 at laptop scale: λ1(P⁻¹H) rises to 38/η under full-batch Adam and stays near it, while a
    small-η control stays far below (tests/test_preconditioned.py checks λ1(P⁻¹H) against dense matrices).

    A 40-16-16-10 tanh MLP, squared loss, 200 mnist1d samples, 400 full-batch Adam steps at η = 8e-3 (threshold
    4750) and η = 1e-4 (threshold 380000).
    """
    from analysis.experiments.edge_of_stability import squared_loss
    from landscape.inputs.data import load_data
    from landscape.inputs.models import MLP

    data = load_data("mnist1d")
    x, y = data.x_train[:200], data.y_train[:200]
    ratios, along = {}, {}
    for lr in (8e-3, 1e-4):
        torch.manual_seed(0)
        model = MLP(data.input_shape, data.num_classes, (16, 16), activation="tanh")
        run = gradient_descent(model, x, y, GDConfig(lr=lr, steps=400, every=20, optimizer="adam"), squared_loss)
        assert list(run.recorded) == list(range(20, 401, 20))  # step 0 has no second moment yet
        assert run.threshold == pytest.approx(38 / lr) and run.converged.all()
        ratios[lr] = run.sharpness[run.recorded >= 200] / run.threshold
        along[lr] = np.nanmedian(run.alignment[run.recorded >= 200])
    assert np.all(np.abs(ratios[8e-3] - 1) <= 0.2), ratios[8e-3]
    assert np.all(ratios[1e-4] < 0.05), ratios[1e-4]
    assert along[8e-3] > 100 * along[1e-4]  # in P^(1/2)-coordinates the gradient leans on the top eigenvector at the edge
