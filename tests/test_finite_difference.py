"""The finite-difference HVP path: against the dense Hessian, its error estimate against the true error, through
fused attention, in Lanczos, and from the command line."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.cli import main
from landscape.curvature.spectrum import lanczos
from landscape.engine import finite_difference as fd
from landscape.engine import hvp_paths
from landscape.engine.hvp_check import HVPCheckWarning
from landscape.engine.hvp_paths import FINITE_DIFFERENCE_HVP
from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator
from landscape.inputs.batches import token_cross_entropy
from tests.ground_truth import dense_hessian
from tests.helpers import classification_batches, digits_mlp_checkpoint, two_layer_gpt2

N_PROBES = 200
COVERAGE = 0.95  # share of random probes whose estimated error must be at least the true one (measured: all)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    _, _, batches = classification_batches(60, (12,), 4, [30, 30], seed=1)
    return model, batches, dense_hessian(model, batches, "eval")


def test_pure_math():
    g_plus, g_minus = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    assert fd.central_difference(g_plus, g_minus, 0.5).tolist() == [2.0, 0.0]
    assert fd.default_step(100.0, torch.float64) == pytest.approx(100 * 2.0 ** (-52 / 3))
    assert fd.default_step(0.0, torch.float32) == pytest.approx(2.0 ** (-23 / 3))
    # h = (3σ/M)^{1/3} minimizes h²M/6 + σ/h, kept within STEP_RANGE of the default
    noise, third = 1e-7, 2.0
    h = fd.optimal_step(noise, third, default=1e-2)
    total = lambda s: s**2 * third / 6 + noise / s  # noqa: E731
    assert total(h) <= min(total(0.9 * h), total(1.1 * h))
    assert fd.optimal_step(noise, 0.0, default=1e-2) == 1e-2  # no curvature change measured: the default
    assert fd.optimal_step(1.0, 1e-30, default=1e-2) == 1e-2 * fd.STEP_RANGE
    assert fd.third_derivative_scale(3.0, 0.5) == 24.0
    rows = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    assert fd.richardson_error(*rows).tolist() == [2.0, 5.0]
    first = fd.FiniteDifferenceErrors(step=0.1, min_step=0.05, max_step=0.1, n_refined=1, n_products=4, max_error=2e-5)
    later = fd.FiniteDifferenceErrors(step=0.2, min_step=0.2, max_step=0.3, n_products=3, max_error=1e-5, max_relative_error=1e-3)
    both = later.combined(first)  # a resumed run's record with the interrupted run's
    assert (both.min_step, both.max_step, both.n_refined, both.n_products) == (0.05, 0.3, 1, 7)
    assert (both.max_error, both.max_relative_error) == (2e-5, 1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_products_match_the_dense_hessian_and_the_error_estimate_covers_the_error(mlp, dtype):
    model, batches, H = mlp
    objective = Objective(model, batches, dtype=dtype, device="cpu", hvp_method=FINITE_DIFFERENCE_HVP)
    V = torch.randn(N_PROBES, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    products = objective.hvp_batched(V.to(dtype)).double()
    exact = V @ H
    true = (products - exact).norm(dim=1)
    estimated = objective.last_hvp_errors
    relative = (true / exact.norm(dim=1)).max()
    assert relative < (1e-9 if dtype == torch.float64 else 1e-3)  # measured: 2e-10, 1e-4
    coverage = float((estimated >= true).double().mean())
    assert coverage >= COVERAGE, coverage  # measured 1.0 in both dtypes, estimate ≈ 2.5 × the true error
    assert float((estimated / true).median()) < 10  # and not vacuous
    record = objective.hvp_error
    assert record.n_products == N_PROBES and record.max_relative_error >= float(relative)
    check = objective.hvp_check_result
    assert check.passed and check.path == FINITE_DIFFERENCE_HVP and check.estimated_error > 0
    assert check.tolerance == fd.check_tolerance(check.estimated_error, dtype) < 1e-3


def test_a_zero_probe_is_exact_and_a_single_vector_works(mlp):
    model, batches, H = mlp
    objective = Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method=FINITE_DIFFERENCE_HVP)
    V = torch.zeros(2, H.shape[0], dtype=torch.float64)
    V[1, 3] = 2.0
    products = objective.hvp_batched(V)
    assert products[0].abs().max() == 0 and objective.last_hvp_errors[0] == 0
    assert torch.allclose(products[1], 2.0 * H[3], rtol=0, atol=1e-7)
    assert torch.allclose(objective.hvp(V[1]), products[1])


def test_a_wrong_product_fails_the_check_and_double_backward_takes_over(mlp, monkeypatch):
    def biased(objective, V, record=True):
        return 1.01 * hvp_paths.finite_difference(objective, V, record)

    monkeypatch.setitem(hvp_paths.HVP_PATHS, FINITE_DIFFERENCE_HVP, biased)
    model, batches, H = mlp
    objective = Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method=FINITE_DIFFERENCE_HVP)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.warns(HVPCheckWarning, match="finite-difference path differs.*error estimate allows.*using double-backward"):
        product = objective.hvp(v)
    assert objective.hvp_method == "double-backward" and objective.hvp_check_result.replaced_by == "double-backward"
    assert torch.allclose(product, H @ v, rtol=1e-10)


class TanhDerivative(torch.autograd.Function):
    """grad·(1 − y²) with no derivative of its own, as a fused kernel's backward has none."""

    @staticmethod
    def forward(ctx, grad, y):
        return grad * (1 - y * y)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("derivative for tanh_derivative is not implemented")


class NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward cannot be differentiated: double backward raises."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return TanhDerivative.apply(grad, y)


class OnceDifferentiable(nn.Module):
    def forward(self, x):
        return NoDoubleBackward.apply(x)


def test_a_model_without_double_backward_is_measured_and_the_check_says_why_it_was_skipped(mlp):
    model, batches, H = mlp  # the same function as the MLP: tanh by a Function without a second derivative
    custom = nn.Sequential(model[0], model[1], OnceDifferentiable(), model[3])
    objective = Objective(custom, batches, dtype=torch.float64, device="cpu", hvp_method=FINITE_DIFFERENCE_HVP)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    product = objective.hvp(v)
    assert float((product - H @ v).norm()) <= float(objective.last_hvp_errors[0])
    check = objective.hvp_check_result
    assert check.skipped.startswith("no double backward through this model") and not check.passed
    assert objective.hvp_method == FINITE_DIFFERENCE_HVP


def test_lanczos_through_finite_differences_is_within_the_stated_error(mlp):
    model, batches, H = mlp
    exact = torch.linalg.eigvalsh(H).flip(0)[:3].numpy()
    for dtype in (torch.float64, torch.float32):
        objective = Objective(model, batches, dtype=dtype, device="cpu", hvp_method=FINITE_DIFFERENCE_HVP)
        result = lanczos(HessianOperator(objective), 3, tol=1e-6 if dtype == torch.float64 else 1e-4, seed=0)
        stated = objective.hvp_error.max_error  # per unit probe: moves an eigenvalue by about that much (Weyl)
        assert stated > 0
        assert abs(result.values - exact).max() <= stated + result.error_bounds.max(), (dtype, result.values, exact, stated)


@pytest.mark.slow
def test_gpt2_with_fused_attention_matches_double_backward_within_the_estimate(monkeypatch):
    pytest.importorskip("transformers")
    model, batches = two_layer_gpt2()
    kernels = []  # math-only (the exact paths) or any kernel (the finite-difference gradients), per attention call
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        kernels.append("any" if torch.backends.cuda.flash_sdp_enabled() else "math")
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    objective = Objective(model, batches, loss=token_cross_entropy, device="cpu", hvp_method=FINITE_DIFFERENCE_HVP)
    exact = Objective(model, batches, loss=token_cross_entropy, device="cpu", hvp_method="double-backward", hvp_check=False)
    V = torch.randn(4, objective.n_params, generator=torch.Generator().manual_seed(3))
    kernels.clear()
    products = objective.hvp_batched(V)
    assert "any" in kernels  # the finite-difference gradients ran with the fused kernels allowed
    reference = exact.hvp_batched(V)
    true = (products - reference).double().norm(dim=1)
    assert bool((objective.last_hvp_errors >= true).all()), (objective.last_hvp_errors, true)
    assert objective.hvp_check_result.passed
    assert float((true / reference.double().norm(dim=1)).max()) < 1e-3  # measured 9e-5
    found = lanczos(HessianOperator(objective), 3, tol=1e-4, seed=0)
    expected = lanczos(HessianOperator(exact), 3, tol=1e-4, seed=0)
    stated = objective.hvp_error.max_error
    assert abs(found.values - expected.values).max() <= stated + found.error_bounds.max() + expected.error_bounds.max()


def test_cli_measures_with_finite_differences(tmp_path, capsys):
    checkpoint = digits_mlp_checkpoint(tmp_path, hidden=(8,))
    options = ["--hvp", "finite-difference", "--metrics", "eig", "--k", "2", "--n-samples", "64", "--quiet"]
    assert main(["measure", str(checkpoint), *options, "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["setup"]["hvp_method"] == FINITE_DIFFERENCE_HVP
    assert report["hvp_check"]["passed"] and report["hvp_check"]["estimated_error"] > 0
    error = report["hvp_error"]
    assert error["n_products"] >= report["metrics"]["eig"]["n_matvecs"] and math.isfinite(error["max_error"])
    assert main(["measure", str(checkpoint), *options]) == 0
    table = capsys.readouterr().out
    assert "HVP error: central differences, steps" in table and "within twice its estimated error" in table
    assert main(["measure", str(checkpoint), *options[:1], "finite-differences"]) == 2  # one-line refusal
    assert "--hvp finite-differences: use one of" in capsys.readouterr().err
