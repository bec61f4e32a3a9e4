"""Measuring with the model in bfloat16 or float16: near float32's numbers, float32 solvers, one-line overflow.

Tolerances come from benchmarks/precision.py and from these problems measured over seeds 0-2: bfloat16's λ1 was
within 1.4e-4 (MLP) and 6.7e-3 (tiny GPT-2) of float32's, its trace (same probes) within 2.8e-4 and 1.8e-2;
each bound below is about three times the largest error seen.
"""

import json
import warnings

import pytest
import torch
from torch import nn

from analysis.measures.measurement import Measurement
from analysis.report.checkpoint_table import format_measurement
from landscape.curvature.spectrum import lanczos
from landscape.curvature.trace import hutchinson
from landscape.engine.hvp_check import hvp_check_tolerance
from landscape.engine.objective import Objective, ObjectiveError
from landscape.engine.operators import FisherOperator, GGNOperator, HessianOperator, LinearOperator
from landscape.inputs.batches import token_cross_entropy
from landscape.inputs.precision import parse_dtype
from tests.helpers import classification_batches, digits_mlp_checkpoint, run_cli

# (λ1, trace) relative to float32, bfloat16 model: measured maxima 1.4e-4/2.8e-4 (MLP), 6.7e-3/1.8e-2 (GPT-2)
BFLOAT16_TOLERANCE = {"mlp": (5e-4, 1e-3), "gpt2": (2e-2, 5e-2)}


def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))
    _, _, batches = classification_batches(256, (20,), 5, [128, 128])
    return model, batches, {}


def gpt2_problem():
    pytest.importorskip("transformers")
    from tests.helpers import gpt2, token_batches

    return gpt2(), token_batches(), {"loss": token_cross_entropy}


PROBLEMS = {"mlp": mlp_problem, "gpt2": gpt2_problem}


def lambda1_and_trace(objective: Objective | LinearOperator) -> tuple[float, float]:
    op = HessianOperator(objective) if isinstance(objective, Objective) else objective
    return float(lanczos(op, 1, seed=0).values[0]), hutchinson(op, 20, seed=0).estimate


@pytest.mark.parametrize("name", PROBLEMS)
def test_bfloat16_lambda1_and_trace_are_near_float32(name):
    model, batches, kwargs = PROBLEMS[name]()
    reference = lambda1_and_trace(Objective(model, batches, device="cpu", **kwargs))
    low = Objective(model, batches, dtype=torch.bfloat16, device="cpu", **kwargs)
    measured = lambda1_and_trace(low)
    for value, exact, tolerance in zip(measured, reference, BFLOAT16_TOLERANCE[name]):
        assert abs(value - exact) <= tolerance * abs(exact), (name, value, exact)
    assert low.hvp_check_result.passed


# GGN and Fisher (λ1, trace) relative to float32, measured maxima over both problems: 1.4e-3/1.1e-3 (bfloat16),
# 3.7e-4/3.5e-4 (float16). float16 GPT-2 GGN products were NaN before they were loss-scaled and transposed.
GAUSS_NEWTON_TOLERANCE = {torch.bfloat16: 5e-3, torch.float16: 2e-3}


@pytest.mark.parametrize("name", PROBLEMS)
def test_gauss_newton_and_fisher_in_low_precision_are_near_float32(name):
    model, batches, kwargs = PROBLEMS[name]()
    operators = [GGNOperator] if name == "gpt2" else [GGNOperator, FisherOperator]  # a token loss has no Fisher here
    exact = Objective(model, batches, device="cpu", **kwargs)
    references = [lambda1_and_trace(operator(exact)) for operator in operators]
    for dtype, tolerance in GAUSS_NEWTON_TOLERANCE.items():
        low = Objective(model, batches, dtype=dtype, device="cpu", **kwargs)
        for operator, reference in zip(operators, references):
            for value, exact_value in zip(lambda1_and_trace(operator(low)), reference):
                assert abs(value - exact_value) <= tolerance * abs(exact_value), (dtype, operator, value, exact_value)


def test_the_model_runs_in_bfloat16_and_the_solver_in_float32():
    model, batches, _ = mlp_problem()
    objective = Objective(model, batches, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in objective.model.parameters())
    op = HessianOperator(objective)
    assert objective.w.dtype == op.dtype == torch.float32
    assert objective.grad().dtype == torch.float32
    assert op.products(torch.ones(2, op.shape[0])).dtype == torch.float32
    result = lanczos(op, 2, seed=0, return_vectors=True)
    assert result.vectors.dtype == torch.float32
    setup = objective.describe()
    assert (setup["dtype"], setup["solver_dtype"]) == ("bfloat16", "float32") and "loss_scale" not in setup
    assert "solver_dtype" not in Objective(model, batches, device="cpu").describe()


def test_float16_products_are_loss_scaled_and_near_float32():
    model, batches, _ = mlp_problem()
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(1))
    exact = Objective(model, batches, device="cpu").hvp(v)
    low = Objective(model, batches, dtype=torch.float16, device="cpu")
    assert low.describe()["loss_scale"] == 1024
    assert float((low.hvp(v) - exact).norm() / exact.norm()) < 5e-3  # measured 5.5e-4 (seed 0)
    assert float((low.grad() - Objective(model, batches, device="cpu").grad()).norm()) < 5e-3 * float(low.grad().norm())


def test_float16_backs_off_its_loss_scale_until_the_product_fits():
    model, batches, _ = mlp_problem()
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(1))
    exact = Objective(model, batches, device="cpu").hvp(v)
    objective = Objective(model, batches, dtype=torch.float16, device="cpu", loss_scale=2.0**24)
    product = objective.hvp(v)  # 2^24·Hv overflows float16: halved until it fits
    assert 1 <= objective.loss_scale < 2.0**24 and objective.describe()["loss_scale"] == objective.loss_scale
    assert float((product - exact).norm() / exact.norm()) < 5e-3


def test_float16_overflow_is_one_line():
    """The tiny GPT-2's LayerNorm: its second derivative (∝ 1/σ³ of small activations) passes 65504 at any scale."""
    model, batches, kwargs = gpt2_problem()
    objective = Objective(model, batches, dtype=torch.float16, device="cpu", **kwargs)
    with pytest.raises(ObjectiveError, match="float16 overflowed in the Hessian-vector product") as error:
        objective.hvp(torch.ones(objective.n_params))
    assert "\n" not in str(error.value) and "bfloat16" in str(error.value)


def test_loss_scale_and_dtype_names_are_checked():
    model, batches, _ = mlp_problem()
    with pytest.raises(ObjectiveError, match="power of two"):
        Objective(model, batches, dtype=torch.float16, device="cpu", loss_scale=1000.0)
    assert parse_dtype("bfloat16") == torch.bfloat16 and parse_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="bfloat16"):
        parse_dtype("half")
    assert hvp_check_tolerance(torch.float32) == pytest.approx(3.45e-3, rel=1e-2)
    assert hvp_check_tolerance(torch.bfloat16) > hvp_check_tolerance(torch.float16) > hvp_check_tolerance(torch.float32)


@pytest.mark.cli
def test_cli_measures_in_bfloat16(tmp_path):
    checkpoint = digits_mlp_checkpoint(tmp_path, (16,))
    common = ["--n-samples", "200", "--batch-size", "100", "--metrics", "eig,trace", "--k", "1", "--probes", "10"]
    result = run_cli("measure", checkpoint, "--dtype", "bfloat16", "--json", *common)
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)
    assert (report["setup"]["dtype"], report["setup"]["solver_dtype"]) == ("bfloat16", "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "bfloat16 model, float32 solvers on cpu" in format_measurement(Measurement.from_dict(report))
    reference = run_cli("measure", checkpoint, "--json", *common)
    (exact,) = json.loads(reference.stdout)
    assert report["metrics"]["eig"]["values"][0] == pytest.approx(exact["metrics"]["eig"]["values"][0], rel=5e-3)
