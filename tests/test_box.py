"""ε-sharpness (Keskar et al. 2017) against independent answers: closed-form box maxima, brute-force corners,
and, on a trained 17k-parameter network at the real ε, the two trivial lower bounds any maximizer must beat."""

import itertools
import json
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from analysis.cli import build_parser
from analysis.cli.measure import measure_checkpoint
from analysis.cli.specs import MeasureSpec
from analysis.report.checkpoint_table import format_measurement
from landscape.engine.from_checkpoint import objective_from_checkpoint
from landscape.engine.objective import Objective
from landscape.inputs.checkpoints import load_checkpoint
from landscape.inputs.data import MeasurementSet
from landscape.sharpness.box import METHODS, epsilon_sharpness
from landscape.training.loop import TrainConfig, train

F64 = {"dtype": torch.float64, "device": "cpu"}


# ------------------------------------------------------------------------------------ problems
class DiagonalQuadratic(nn.Module):
    """L(w) = ½ Σ h_i w_i² + Σ g_i w_i (the input is ignored): a separable convex loss."""

    def __init__(self, w, h, g):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.register_buffer("h", h)
        self.register_buffer("g", g)

    def forward(self, x):
        value = 0.5 * (self.h * self.w**2).sum() + (self.g * self.w).sum()
        return value.expand(len(x))


def quadratic_objective(d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
    h = 2 * torch.rand(d, generator=gen, dtype=torch.float64)
    h[: d // 10] = 0  # flat directions: the gradient alone decides those coordinates
    g = 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
    model = DiagonalQuadratic(w, h, g)
    batch = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    return Objective(model, [batch], loss_fn=lambda out, y: out.mean(), **F64), (w, h, g)


def closed_form_phi(w, h, g, eps):
    """The box maximum of a separable convex quadratic: each coordinate takes the better end ±b_i."""
    b = eps * (w.abs() + 1)
    c = h * w + g  # ∂L/∂w_i at w
    gain = 0.5 * h * b**2 + (c * b).abs()  # max over z_i = ±b_i of ½h_i z_i² + c_i z_i
    clean = float(0.5 * (h * w**2).sum() + (g * w).sum())
    return 100 * float(gain.sum()) / (1 + clean)


class Regression(nn.Module):
    def __init__(self, d, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(d, 1, bias=False)

    def forward(self, x):
        return self.linear(x)


def least_squares_objective(d=6, seed=0):
    """Half-MSE linear regression at its least-squares solution: g = 0 and H = XᵀX/n dense (not separable)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, d, generator=gen, dtype=torch.float64)
    y = torch.randn(40, 1, generator=gen, dtype=torch.float64)
    model = Regression(d, seed).double()
    with torch.no_grad():
        model.linear.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    objective = Objective(model, [(x, y)], loss_fn=lambda out, t: 0.5 * ((out - t) ** 2).mean(), **F64)
    return objective, x.T @ x / len(x)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A digits MLP 64-100-100-10 (17,610 parameters) trained at batch 512 with SGD: a real checkpoint file."""
    config = TrainConfig(data="digits", model="mlp", batch_size=512, lr=0.1, epochs=20, seed=0, save_every=1000)
    return train(config, tmp_path_factory.mktemp("run"), progress=False)


@pytest.fixture(scope="module")
def trained(trained_run):
    return objective_from_checkpoint(load_checkpoint(trained_run), measurement=MeasurementSet("train", 500, 500, 0), device="cpu")


# ----------------------------------------------------------------- the trivial lower bounds
def phi(objective, z):
    clean = objective.loss()
    return 100 * (objective.loss(objective.w + z) - clean) / (1 + clean)


def corner_phi(objective, eps):
    """φ at the single corner z = b·sign(∇L(w))."""
    w = objective.w
    b = eps * (w.abs() + 1)
    return phi(objective, b * torch.where(objective.grad() >= 0, 1.0, -1.0).to(w.dtype))


def sign_ascent_phi(objective, eps, steps=20):
    """The best φ of `steps` projected sign-ascent steps from z = 0, with a fixed step of b and of b/4."""
    w = objective.w
    b = eps * (w.abs() + 1)
    best = 0.0
    for fraction in (1.0, 0.25):
        z = torch.zeros_like(w)
        for _ in range(steps):
            z = torch.clamp(z + fraction * b * torch.sign(objective.grad(w + z)), -b, b)
            best = max(best, phi(objective, z))
    return best


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("method", METHODS)
def test_quadratic_d10000_equals_the_closed_form_box_maximum(method):
    objective, (w, h, g) = quadratic_objective(10_000)
    truth = closed_form_phi(w, h, g, 5e-4)
    r = epsilon_sharpness(objective, 5e-4, method=method, seed=0)
    assert r.value == pytest.approx(truth, rel=1e-9)
    zero = r.values[r.start_kinds.index("zero")]
    assert zero == pytest.approx(truth, rel=1e-9)  # the ascent itself reaches it from z = 0, not only the corner start
    assert np.all(r.values <= truth * (1 + 1e-9))


@pytest.mark.parametrize("method", METHODS)
def test_brute_force_best_corner_of_a_dense_quadratic(method):
    objective, H = least_squares_objective(d=6)
    eps = 0.05
    b = eps * (objective.w.abs() + 1)
    corners = [
        0.5 * float((s * b) @ H @ (s * b))
        for s in (torch.tensor(signs, dtype=torch.float64) for signs in itertools.product((-1, 1), repeat=6))
    ]
    truth = 100 * max(corners) / (1 + objective.loss())
    r = epsilon_sharpness(objective, eps, max_iter=100, restarts=8, method=method, seed=0)
    assert r.value == pytest.approx(truth, rel=1e-6)
    assert np.all(r.values <= truth * (1 + 1e-9))
    # a convex quadratic's local maxima on the box are its vertices: every start ends on one, but for z = 0, which
    # L-BFGS-B cannot leave at this minimum (g = 0 up to rounding: φ stays ~1e-14, its size depending on how the
    # BLAS threads summed the gradient)
    vertices = 100 * np.array(corners) / (1 + objective.loss())
    for kind, value in zip(r.start_kinds, r.values):
        stayed = kind == "zero" and abs(value) <= 1e-9 * truth
        assert np.abs(vertices - value).min() <= 1e-9 * truth or stayed, (kind, value)


@pytest.mark.slow
@pytest.mark.parametrize("eps", [1e-4, 5e-4, 1e-3])
def test_trained_network_beats_the_corner_and_twenty_sign_steps(trained, eps):
    assert trained.n_params >= 10_000
    corner, ascent = corner_phi(trained, eps), sign_ascent_phi(trained, eps)
    r = epsilon_sharpness(trained, eps)  # defaults: sign ascent, 20 iterations, z = 0 + corner + 2 random starts
    assert r.value >= corner and r.value >= ascent, (r.values, corner, ascent)
    lbfgsb = epsilon_sharpness(trained, eps, method="lbfgsb")
    assert lbfgsb.value >= corner, (lbfgsb.values, corner)
    assert r.max_iter == 20 and r.n_grad <= 4 * 20 + 1 and r.n_forward <= 4 * 21 + 1  # cost as documented


def test_same_seed_same_numbers_and_the_seed_moves_only_random_starts(trained):
    a, b = (epsilon_sharpness(trained, 5e-4, restarts=2, seed=3) for _ in range(2))
    c = epsilon_sharpness(trained, 5e-4, restarts=2, seed=4)
    assert np.array_equal(a.values, b.values) and a.n_forward == b.n_forward and a.n_grad == b.n_grad
    assert a.start_kinds == ("zero", "corner", "random", "random") and a.seed == 3
    assert np.array_equal(a.values[:2], c.values[:2]) and not np.array_equal(a.values[2:], c.values[2:])


def test_result_fields_and_json(trained):
    start = time.perf_counter()
    r = epsilon_sharpness(trained, 5e-4, restarts=1, max_iter=3, seed=0)
    elapsed = time.perf_counter() - start
    assert r.best == r.value == r.values.max() and r.spread == pytest.approx(r.values.max() - r.values.min())
    assert r.std == pytest.approx(np.std(r.values, ddof=1)) and len(r.iterations) == len(r.converged) == 3
    assert np.allclose(r.values, 100 * (r.max_losses - r.clean_loss) / (1 + r.clean_loss))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["method"] == "sign-ascent" and d["start_kinds"] == ["zero", "corner", "random"]
    assert 0 < d["seconds"] == r.seconds <= elapsed  # the call's own wall time, in seconds
    only_fixed = epsilon_sharpness(trained, 5e-4, restarts=0, max_iter=2)
    assert only_fixed.start_kinds == ("zero", "corner")


def test_subspace_is_not_sharper_than_the_full_space():
    objective, _ = least_squares_objective(d=8)
    full = epsilon_sharpness(objective, 1e-3, max_iter=50, restarts=3)
    sub = epsilon_sharpness(objective, 1e-3, subspace_dim=2, max_iter=50, restarts=3)
    assert 0 < sub.value <= full.value  # at the minimum the subspace's corners still raise the loss
    assert sub.subspace_dim == 2 and full.subspace_dim is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-3}, "eps"),
        ({"eps": math.nan}, "eps"),
        ({"restarts": -1}, "restarts"),
        ({"method": "adam"}, "method"),
        ({"max_iter": 0}, "max_iter"),
        ({"subspace_dim": 7}, "subspace_dim"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(kwargs, match):
    objective, _ = least_squares_objective(d=6)
    with pytest.raises(ValueError, match=match) as error:
        epsilon_sharpness(objective, **kwargs)
    assert "\n" not in str(error.value)


def test_measure_shows_best_spread_and_start_values(trained_run):
    args = build_parser().parse_args(
        [
            "measure",
            str(trained_run),
            "--metrics",
            "eps-sharpness",
            "--n-samples",
            "300",
            "--eps",
            "5e-4",
            "--restarts",
            "1",
            "--eps-iters",
            "3",
            "--device",
            "cpu",
        ]
    )
    measured = measure_checkpoint(str(trained_run), MeasureSpec.from_args(args))
    report = measured.to_dict()
    result = report["metrics"]["eps-sharpness"]
    assert result["start_kinds"] == ["zero", "corner", "random"] and result["max_iter"] == 3
    text = format_measurement(measured)
    row = next(line for line in text.splitlines() if "ε-sharpness" in line)
    assert f"{result['value']:.4g} (best of 3 starts, spread {result['spread']:.2g})" in row
    assert "sign-ascent" in row and f"corner {result['values'][1]:.4g}" in row
    json.dumps(report, default=str)
