"""Perturbation sharpness against ground truth: exact quadratics, dense Hessians of tiny nets (ε-sharpness: test_box.py)."""

import copy
import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from landscape.engine.objective import Objective
from landscape.engine.operators import DenseOperator, DiagonalScaledOperator
from landscape.engine.params import rescale_filters
from landscape.sharpness.perturb import expected_loss, noise_std, sharpness_curve, unit_noise
from tests.helpers import classification_batches, tiny_convnet_bn, tiny_mlp

F64 = {"dtype": torch.float64, "device": "cpu"}
SIGMA = {"uniform": 3**-0.5, "gaussian": 1.0}  # std of U[−1, 1] and N(0, 1)


def half_mse(out, y):
    return 0.5 * ((out - y) ** 2).mean()


def quadratic(d=5, k=2, n=64, at_minimum=True, bias=True, seed=0):
    """Linear regression with half-MSE: L(w+u) − L(w) = gᵀu + ½uᵀHu exactly; g = 0 at the least-squares solution."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, k, generator=g, dtype=torch.float64)
    model = nn.Linear(d, k, bias=bias).double()
    if at_minimum:
        design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1) if bias else x
        solution = torch.linalg.lstsq(design, y).solution.T  # (k, d [+1])
        with torch.no_grad():
            model.weight.copy_(solution[:, :d])
            if bias:
                model.bias.copy_(solution[:, d])
    else:
        with torch.no_grad():
            model.weight.normal_(generator=g)
    return Objective(model, [(x, y)], loss_fn=half_mse, **F64)


def dense_hessian(objective, loss_fn=F.cross_entropy):
    """∇²L at the objective's point from an independent functional reference (eval mode, all parameters)."""
    net = copy.deepcopy(objective.model).eval()
    params = {n: p.detach() for n, p in net.named_parameters()}
    buffers = dict(net.named_buffers())
    names = list(objective.layout.names)
    assert names == list(params)
    total = sum(len(y) for _, y in objective.batches)

    def loss(w):
        state = {**buffers, **objective.layout.unflatten(w)}
        return sum(len(y) / total * loss_fn(functional_call(net, state, (x,)), y) for x, y in objective.batches)

    return torch.autograd.functional.hessian(loss, objective.w.clone(), vectorize=True)


def reference_std(objective, distribution, scale):
    """Per-coordinate noise std computed here from the definitions (not from landscape.sharpness.perturb)."""
    w = objective.layout.unflatten(objective.w)
    if scale == "absolute":
        return torch.full_like(objective.w, SIGMA[distribution])
    if scale == "weight":
        return SIGMA[distribution] * objective.w.abs()
    parts = []
    for t in w.values():
        rows = t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(-1, 1)
        per_row = rows.norm(dim=1, keepdim=True) / rows.shape[1] ** 0.5
        parts.append(per_row.expand_as(rows).reshape(-1))
    return torch.cat(parts)


def descend(model, x, y, steps, lr):
    """A float64 copy of `model` after `steps` of full-batch gradient descent (near a minimum, H mostly PSD)."""
    objective = Objective(model, [(x, y)], **F64)
    w = objective.w.clone()
    for _ in range(steps):
        w -= lr * objective.grad(w)
    net = copy.deepcopy(model).double()
    net.load_state_dict(objective.layout.unflatten(w), strict=False)
    return net


@pytest.fixture(scope="module")
def trained_mlp():
    x, y, batches = classification_batches(50, (12,), 4, [20, 20, 10])
    return Objective(descend(tiny_mlp(), x, y, 300, 0.5), batches, **F64)


@pytest.fixture(scope="module")
def trained_conv():
    x, y, batches = classification_batches(40, (1, 4, 4), 3, [16, 16, 8])
    return Objective(descend(tiny_convnet_bn(), x, y, 200, 0.3), batches, **F64)


# ----------------------------------------------------------------------------- expected loss
NOISES = [
    ("uniform", "absolute"),
    ("gaussian", "absolute"),
    ("uniform", "weight"),
    ("gaussian", "weight"),
    ("uniform", "filter"),
    ("gaussian", "filter"),
]


@pytest.mark.parametrize("distribution,scale", NOISES)
def test_increase_on_quadratic_is_half_a_squared_trace(distribution, scale):
    """E[L(w+u)] − L(w) = ½a²·tr(SHS): (a²/6)tr(H) uniform, (a²/2)tr(H) Gaussian, (a²/6)tr(DHD) weight, per-filter for filter."""
    objective = quadratic()
    H = dense_hessian(objective, half_mse)
    s = reference_std(objective, distribution, scale)
    radius = 0.3
    truth = 0.5 * radius**2 * float((s[:, None] * H * s[None, :]).trace())
    r = expected_loss(objective, radius, distribution=distribution, scale=scale, n_samples=400, seed=1)
    assert r.ci[0] - r.clean_loss <= truth <= r.ci[1] - r.clean_loss
    assert r.increase_ci == pytest.approx((r.ci[0] - r.clean_loss, r.ci[1] - r.clean_loss))
    assert r.stderr < 0.05 * truth  # the CI is tight enough to tell a wrong constant (1/6 vs 1/2, D vs D²) apart
    assert abs(r.increase - truth) <= 3 * r.stderr
    assert r.n_forward == 401 and r.n_draws == 400 and len(r.samples) == 200
    assert r.accuracy is None and r.clean_accuracy is None  # regression targets


@pytest.mark.parametrize("antithetic", [False, True])
def test_ci_covers_truth_in_about_95_percent_of_repeats(antithetic):
    """200 seeded repeats with 10 forwards each; off the minimum so the gradient term is live."""
    objective = quadratic(d=4, k=1, at_minimum=False)
    H = dense_hessian(objective, half_mse)
    truth = 0.3**2 / 6 * float(H.trace())
    covered = [
        r.ci[0] - r.clean_loss <= truth <= r.ci[1] - r.clean_loss
        for r in (expected_loss(objective, 0.3, n_samples=10, antithetic=antithetic, seed=s) for s in range(200))
    ]
    assert 0.90 <= np.mean(covered) <= 0.99


@pytest.mark.parametrize("problem", ["trained_mlp", "trained_conv"])
@pytest.mark.parametrize("scale", ["absolute", "weight"])
def test_small_radius_increase_matches_dense_hessian_on_networks(problem, scale, request):
    """At a small radius the measured increase is (a²/6)·tr(DHD) from the dense Hessian (O(a⁴) is negligible)."""
    objective = request.getfixturevalue(problem)
    H = dense_hessian(objective)
    d = reference_std(objective, "uniform", scale)
    radius = 0.01 if scale == "absolute" else 0.02
    truth = 0.5 * radius**2 * float((d[:, None] * H * d[None, :]).trace())
    r = expected_loss(objective, radius, scale=scale, n_samples=200, seed=2)
    assert truth > 0 and r.stderr < 0.1 * truth
    assert abs(r.increase - truth) <= 3 * r.stderr + 0.01 * truth
    # one accuracy per antithetic pair (the mean of its two draws), averaged with its own standard error
    assert len(r.accuracy_samples) == 100 and r.accuracy == pytest.approx(float(np.mean(r.accuracy_samples)))
    assert r.accuracy_stderr == pytest.approx(float(np.std(r.accuracy_samples, ddof=1)) / 10)


def test_antithetic_pairs_lower_the_stderr_when_the_gradient_is_nonzero(mlp_problem):
    model, _, _, batches = mlp_problem
    objective = Objective(model, batches, **F64)
    assert float(objective.grad().norm()) > 0.1
    paired = expected_loss(objective, 0.02, n_samples=40, antithetic=True, seed=3)
    independent = expected_loss(objective, 0.02, n_samples=40, antithetic=False, seed=3)
    assert paired.n_forward == independent.n_forward == 41
    assert paired.stderr / independent.stderr < 0.3
    # pair means are the iid units: the stderr is their spread, not that of the 40 single draws
    assert paired.stderr == pytest.approx(np.std(paired.samples, ddof=1) / np.sqrt(20))


def test_target_ci_halfwidth_stops_early_on_a_prefix_of_the_same_draws():
    objective = quadratic(at_minimum=False)
    full = expected_loss(objective, 0.1, n_samples=200, seed=4)
    target = 3 * (full.ci[1] - full.mean)
    early = expected_loss(objective, 0.1, n_samples=200, target_ci_halfwidth=target, seed=4)
    assert 20 <= early.n_draws < 200 and early.n_forward < full.n_forward
    assert early.ci[1] - early.mean <= target
    np.testing.assert_array_equal(early.samples, full.samples[: len(early.samples)])
    unreachable = expected_loss(objective, 0.1, n_samples=40, target_ci_halfwidth=1e-12, seed=4)
    assert unreachable.n_draws == 40


def test_same_seed_same_numbers_and_radius_zero_is_exact(mlp_problem):
    model, _, _, batches = mlp_problem
    objective = Objective(model, batches, **F64)
    a = expected_loss(objective, 0.05, scale="filter", n_samples=20, seed=5)
    b = expected_loss(objective, 0.05, scale="filter", n_samples=20, seed=5)
    c = expected_loss(objective, 0.05, scale="filter", n_samples=20, seed=6)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert not np.array_equal(a.samples, c.samples)
    zero = expected_loss(objective, 0.0, n_samples=20)
    assert zero.increase == 0 and zero.stderr == 0 and zero.clean_loss == objective.loss()
    assert zero.setup == objective.describe() and zero.setup["params"] == "all"


def test_only_the_selected_parameters_are_perturbed_and_the_selection_is_recorded(conv_problem):
    model, _, _, batches = conv_problem
    objective = Objective(model, batches, params="weights", **F64)
    r = expected_loss(objective, 0.05, scale="filter", n_samples=10)
    assert r.setup["params"] == "weights" and r.setup["n_params"] == objective.n_params == 3 * 9 + 2 * 27 + 24
    assert unit_noise(objective, 2, generator=torch.Generator()).shape == (2, objective.n_params)
    assert r.increase > 0


# --------------------------------------------------------------------------------- noise shapes
def test_filter_noise_rows_have_norm_radius_times_weight_row_norm(conv_problem):
    model, _, _, batches = conv_problem
    objective = Objective(model, batches, **F64)
    radius = 0.07
    noise = radius * unit_noise(objective, 8, scale="filter", generator=torch.Generator().manual_seed(0))
    weights = objective.layout.unflatten(objective.w)
    for name, u in objective.layout.unflatten(noise).items():
        w = weights[name]
        if w.ndim >= 2:
            got, want = u.reshape(8, w.shape[0], -1).norm(dim=-1), radius * w.reshape(w.shape[0], -1).norm(dim=-1)
        else:
            got, want = u.abs(), radius * w.abs()
        torch.testing.assert_close(got, want.expand_as(got), rtol=1e-12, atol=0)


@pytest.mark.parametrize("distribution,scale", NOISES)
def test_noise_covariance_is_diag_of_noise_std_squared(distribution, scale, conv_problem):
    """Second moments of 20000 draws: diagonal s² (also for cube directions normalized per filter), no correlations."""
    model, _, _, batches = conv_problem
    objective = Objective(model, batches, **F64)
    noise = unit_noise(objective, 20000, distribution=distribution, scale=scale, generator=torch.Generator().manual_seed(1))
    s = noise_std(objective, distribution=distribution, scale=scale)
    torch.testing.assert_close(s, reference_std(objective, distribution, scale), rtol=1e-12, atol=0)
    second = noise.T @ noise / len(noise)
    torch.testing.assert_close(second.diagonal() / s**2, torch.ones_like(s), rtol=0.06, atol=0)
    off = (second - torch.diag(second.diagonal())) / (s[:, None] * s[None, :])
    assert float(off.abs().max()) < 0.06


def test_rescale_filters_with_leading_batch_dims_equals_one_at_a_time():
    g = torch.Generator().manual_seed(0)
    weights = {"conv": torch.randn(4, 3, 2, 2, generator=g), "bias": torch.randn(4, generator=g)}
    stack = {n: torch.randn(5, *w.shape, generator=g) for n, w in weights.items()}
    batched = rescale_filters(stack, weights, 0.5)
    for i in range(5):
        single = rescale_filters({n: d[i] for n, d in stack.items()}, weights, 0.5)
        for n in weights:
            torch.testing.assert_close(batched[n][i], single[n])
    torch.testing.assert_close(batched["bias"].abs(), 0.5 * weights["bias"].abs().expand(5, 4))
    assert torch.equal(batched["bias"].sign(), stack["bias"].sign())


def test_diagonal_scaled_operator_is_dad():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = a + a.T
    d = torch.rand(6, generator=g, dtype=torch.float64)
    op = DiagonalScaledOperator(DenseOperator(a), d)
    v = torch.randn(3, 6, generator=g, dtype=torch.float64)  # 3 probes, as rows
    torch.testing.assert_close(op.products(v), v @ (torch.diag(d) @ a @ torch.diag(d)).T)
    assert op.n_matvecs == 3
    with pytest.raises(ValueError, match="diagonal"):
        DiagonalScaledOperator(DenseOperator(a), d[:5])


# ----------------------------------------------------------------------------- BN recalibration
def recalibrated_copy(model, batches):
    """The textbook recalibration: reset running stats, cumulative average over the batches in train mode."""
    net = copy.deepcopy(model).double()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for x, _ in batches:
            net(x.double())
    return net.eval()


def test_bn_recalibration_at_radius_zero_changes_nothing(conv_problem):
    model, _, _, batches = conv_problem
    objective = Objective(model, batches, **F64)
    before = {n: b.clone() for n, b in objective.model.named_buffers()}
    r = expected_loss(objective, 0.0, n_samples=10, bn_recalibration=2)
    assert r.increase == 0 and r.stderr == 0
    reference = Objective(recalibrated_copy(model, batches[:2]), batches, **F64).loss()
    assert r.clean_loss == pytest.approx(reference, rel=1e-12)
    assert abs(r.clean_loss - objective.loss()) > 1e-3  # the conftest running statistics are not the data's
    assert r.n_recalibration_forward == 11 * 2
    for n, b in objective.model.named_buffers():
        assert torch.equal(b, before[n]), n
    other = expected_loss(objective, 0.0, n_samples=10, bn_recalibration=1, recalibration_batches=batches[2:])
    assert other.clean_loss == pytest.approx(Objective(recalibrated_copy(model, batches[2:]), batches, **F64).loss())


def test_bn_recalibration_lowers_the_increase_at_a_large_radius(conv_problem):
    """Noise shifts activation statistics; stale running statistics overstate the increase (same draws in both)."""
    model, _, _, batches = conv_problem
    objective = Objective(recalibrated_copy(model, batches), batches, **F64)  # running stats match the data at w
    stale = expected_loss(objective, 0.3, n_samples=20, seed=7)
    fresh = expected_loss(objective, 0.3, n_samples=20, seed=7, bn_recalibration=3)
    assert fresh.clean_loss == pytest.approx(stale.clean_loss, rel=1e-12)
    difference = stale.samples - fresh.samples
    assert fresh.increase < 0.5 * stale.increase
    assert difference.mean() > 3 * difference.std(ddof=1) / np.sqrt(len(difference))


def test_bn_recalibration_errors(conv_problem, mlp_problem):
    model, _, _, batches = conv_problem
    with pytest.raises(ValueError, match="train mode"):
        expected_loss(Objective(model, batches, mode="train", **F64), 0.1, bn_recalibration=1)
    with pytest.raises(ValueError, match="only 3"):
        expected_loss(Objective(model, batches, **F64), 0.1, bn_recalibration=4)
    with pytest.raises(ValueError, match="only used with bn_recalibration"):
        expected_loss(Objective(model, batches, **F64), 0.1, recalibration_batches=batches)
    mlp, _, _, mlp_batches = mlp_problem
    with pytest.raises(ValueError, match="no BatchNorm"):
        expected_loss(Objective(mlp, mlp_batches, **F64), 0.1, bn_recalibration=1)


# ------------------------------------------------------------------------------ sharpness curve
@pytest.mark.parametrize("scale", ["absolute", "weight"])
def test_sharpness_curve_is_monotone_and_matches_its_prediction(scale):
    objective = quadratic()
    H = dense_hessian(objective, half_mse)
    d = reference_std(objective, "uniform", scale)
    trace = float((d[:, None] * H * d[None, :]).trace())
    radii = [0.02, 0.05, 0.1, 0.2, 0.4]
    curve = sharpness_curve(objective, radii, scale=scale, n_samples=40, n_probes=50, seed=8)
    assert np.all(np.diff(curve.increase) > 0)
    # common random numbers on an exact quadratic at its minimum: increase/a² is the same number at every radius
    np.testing.assert_allclose(curve.increase / np.array(radii) ** 2, curve.increase[0] / radii[0] ** 2, rtol=1e-6)
    truth = 0.5 * np.array(radii) ** 2 * trace
    assert np.all(curve.prediction_stderr > 0)
    assert np.all(np.abs(curve.prediction - truth) <= 3 * curve.prediction_stderr)
    np.testing.assert_allclose(curve.prediction_stderr, 0.5 * np.array(radii) ** 2 * curve.trace.stderr)
    assert curve.n_matvecs == 50 and curve.n_forward == len(radii) * 41
    no_prediction = sharpness_curve(objective, radii[:2], n_samples=10, with_prediction=False)
    assert no_prediction.prediction is None and no_prediction.trace is None and no_prediction.n_matvecs == 0


def test_sharpness_curve_prediction_on_a_network(trained_mlp):
    curve = sharpness_curve(trained_mlp, [0.005, 0.01], n_samples=100, n_probes=100, seed=9)
    H = dense_hessian(trained_mlp)
    truth = np.array([0.005, 0.01]) ** 2 / 6 * float(H.trace())
    assert np.all(np.abs(curve.prediction - truth) <= 3 * curve.prediction_stderr)
    assert np.all(np.abs(curve.increase - truth) <= 3 * curve.increase_stderr + 0.01 * truth)


# --------------------------------------------------------------------------- results, arguments
def test_results_are_json_serializable(mlp_problem):
    model, _, _, batches = mlp_problem
    objective = Objective(model, batches, **F64)
    began = time.perf_counter()
    results = [expected_loss(objective, 0.01, n_samples=10), sharpness_curve(objective, [0.01, 0.02], n_samples=10, n_probes=4)]
    elapsed = time.perf_counter() - began
    for r in results:
        d = json.loads(json.dumps(r.to_dict()))
        assert d["setup"]["n_samples"] == 50 and 0 < d["seconds"] == r.seconds <= elapsed


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"radius": -0.1}, "radius"),
        ({"radius": float("nan")}, "radius"),
        ({"distribution": "laplace"}, "distribution"),
        ({"scale": "layer"}, "scale"),
        ({"n_samples": 1}, "n_samples"),
        ({"n_samples": 11}, "even"),
        ({"target_ci_halfwidth": 0.0}, "target_ci_halfwidth"),
        ({"seed": 1.5}, "seed"),
        ({"bn_recalibration": 0}, "bn_recalibration"),
    ],
)
def test_expected_loss_rejects_bad_arguments(kwargs, match, mlp_problem):
    model, _, _, batches = mlp_problem
    objective = Objective(model, batches, **F64)
    with pytest.raises(ValueError, match=match):
        expected_loss(objective, **{"radius": 0.1, **kwargs})


def test_curve_rejects_bad_arguments(mlp_problem):
    model, _, _, batches = mlp_problem
    objective = Objective(model, batches, **F64)
    for call, match in [
        (lambda: sharpness_curve(objective, []), "radii"),
        (lambda: sharpness_curve(objective, [0.1], n_probes=1), "n_probes"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
