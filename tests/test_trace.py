"""Trace estimators against exact traces of dense matrices: bias, error bars, variance reduction, blocks."""

import functools
import json

import numpy as np
import pytest
import torch

from landscape.curvature.blocks import BlockOperator
from landscape.curvature.trace import hutchinson, hutchpp, xtrace
from landscape.engine.objective import Objective
from landscape.engine.operators import DenseOperator, DiagonalScaledOperator, HessianOperator
from tests.ground_truth import dense_hessian
from tests.helpers import dense

ESTIMATORS = {"hutchinson": hutchinson, "hutchpp": hutchpp, "xtrace": xtrace}
BLOCKS = {"w1": slice(0, 20), "b1": slice(20, 25), "w2": slice(25, 60)}
N_SEEDS = 200


def mixed():
    """Indefinite, n = 60, with a non-trivial diagonal so that blocks differ: the statistical workhorse."""
    a, _ = dense(np.random.default_rng(1).normal(1, 3, 60))
    a = a + np.diag(np.random.default_rng(2).uniform(0, 4, 60))
    return a, DenseOperator(torch.tensor(a))


def blocky():
    """n = 60, block-constant diagonal (20 / −15 / 5 on BLOCKS) plus random coupling: block traces differ
    strongly, and a low-rank sketch's cross terms tr_b(QQᵀA(I−QQᵀ)) are large, so dropping them shows."""
    g = np.random.default_rng(6).standard_normal((60, 60))
    a = np.diag(np.repeat([20.0, -15.0, 5.0], [20, 5, 35])) + (g + g.T) / np.sqrt(2)
    return a, DenseOperator(torch.tensor(a))


def decaying():
    """PSD, n = 200, λ_i = 100·0.8^i: low-rank structure that Hutch++ and XTrace exploit."""
    return dense(100 * 0.8 ** np.arange(200), seed=3)


def budget_kwargs(method, budget):
    return {"n_probes": budget} if method == "hutchinson" else {"n_matvecs": budget}


@functools.cache
def sweep(method, matrix, budget, n_seeds=N_SEEDS, blocks=False):
    """Estimates, stderrs and (optionally) per-block estimates over seeds 0..n_seeds-1."""
    _, op = MATRICES[matrix]()
    results = [
        ESTIMATORS[method](op, **budget_kwargs(method, budget), seed=s, blocks=BLOCKS if blocks else None) for s in range(n_seeds)
    ]
    estimates = np.array([r.estimate for r in results])
    stderrs = np.array([r.stderr for r in results])
    per_block = {name: np.array([r.blocks[name][0] for r in results]) for name in BLOCKS} if blocks else None
    return estimates, stderrs, per_block


MATRICES = {"mixed": mixed, "blocky": blocky, "decaying": decaying}
BUDGETS = {"hutchinson": 10, "hutchpp": 30, "xtrace": 30}


@pytest.mark.parametrize("method", ESTIMATORS)
def test_unbiased_over_seeds(method):
    estimates, _, _ = sweep(method, "mixed", BUDGETS[method])
    truth = np.trace(mixed()[0])
    assert abs(estimates.mean() - truth) <= 4 * estimates.std(ddof=1) / np.sqrt(N_SEEDS)


@pytest.mark.parametrize("method, budget", [("hutchinson", 30), ("hutchpp", 60)])
def test_two_stderr_intervals_cover_the_truth(method, budget):
    estimates, stderrs, _ = sweep(method, "mixed", budget)
    coverage = np.mean(np.abs(estimates - np.trace(mixed()[0])) <= 2 * stderrs)
    assert 0.85 <= coverage <= 0.99


@pytest.mark.parametrize("matrix", ["mixed", "decaying"])
def test_xtrace_error_estimate_matches_actual_error(matrix):
    estimates, stderrs, _ = sweep("xtrace", matrix, 30 if matrix == "mixed" else 40)
    truth = np.trace(MATRICES[matrix]()[0])
    rms_error, rms_stderr = np.sqrt(np.mean((estimates - truth) ** 2)), np.sqrt(np.mean(stderrs**2))
    assert 1 / 3 <= rms_stderr / rms_error <= 3


def test_hutchpp_and_xtrace_beat_hutchinson_on_a_decaying_spectrum():
    truth = np.trace(decaying()[0])
    rms = {m: np.sqrt(np.mean((sweep(m, "decaying", 60, n_seeds=30)[0] - truth) ** 2)) for m in ESTIMATORS}
    assert rms["hutchinson"] >= 3 * rms["hutchpp"]
    assert rms["hutchinson"] >= 3 * rms["xtrace"]


def test_hutchinson_stops_at_target_relative_stderr():
    a = mixed()[0] + 10 * np.eye(60)  # trace far from zero
    op = DenseOperator(torch.tensor(a))
    result = hutchinson(op, n_probes=2000, block_size=10, target_rel_stderr=0.02, seed=5)
    assert 20 <= result.n_matvecs < 2000 and result.n_matvecs % 10 == 0
    assert result.stderr <= 0.02 * abs(result.estimate)
    assert op.n_matvecs == result.n_matvecs == len(result.samples)
    fixed = hutchinson(op, n_probes=result.n_matvecs, block_size=10, seed=5)  # same probes, no early stop
    assert fixed.estimate == result.estimate and fixed.stderr == result.stderr


@pytest.mark.parametrize("method", ESTIMATORS)
def test_block_traces_sum_to_total_and_match_dense_blocks(method):
    a, op = blocky()
    result = ESTIMATORS[method](op, **budget_kwargs(method, BUDGETS[method]), seed=11, blocks=BLOCKS)
    assert sum(est for est, _ in result.blocks.values()) == pytest.approx(result.estimate, rel=1e-10, abs=1e-10)
    for name, block in BLOCKS.items():
        est, stderr = result.blocks[name]
        assert abs(est - np.trace(a[block, block])) <= 4 * stderr
    # unbiased per block over seeds (a dropped cross term or a wrong diagonal would show here)
    _, _, per_block = sweep(method, "blocky", BUDGETS[method], n_seeds=100, blocks=True)
    for name, block in BLOCKS.items():
        values = per_block[name]
        assert abs(values.mean() - np.trace(a[block, block])) <= 4 * values.std(ddof=1) / 10


@pytest.mark.parametrize("method", ["hutchpp", "xtrace"])
def test_exact_on_low_rank_psd_matrix(method):
    a, op = dense(np.concatenate([[9.0, 4.0, 3.0, 1.0, 0.5], np.zeros(95)]), seed=4)
    result = ESTIMATORS[method](op, n_matvecs=30, seed=1, blocks={"head": slice(0, 40), "tail": slice(40, None)})
    assert result.estimate == pytest.approx(17.5, rel=1e-8)
    assert result.stderr <= 1e-8 * 17.5
    assert result.blocks["head"][0] == pytest.approx(np.trace(a[:40, :40]), rel=1e-8)


@pytest.mark.parametrize("method", ESTIMATORS)
def test_deterministic_counted_and_serializable(method):
    _, op = mixed()
    kwargs = budget_kwargs(method, 30)
    first, again, other = (ESTIMATORS[method](op, **kwargs, seed=s) for s in (3, 3, 4))
    assert first.estimate == again.estimate and np.array_equal(first.samples, again.samples)
    assert first.estimate != other.estimate
    assert first.method == method and first.seed == 3 and first.n_matvecs == 30
    assert op.n_matvecs == 90
    assert first.estimate == pytest.approx(first.samples.mean(), rel=1e-12)
    json.dumps(first.to_dict())


@pytest.mark.parametrize("method", ESTIMATORS)
def test_float32_operator(method):
    a, op = dense(np.random.default_rng(7).uniform(0.5, 2, 100), dtype=torch.float32)
    result = ESTIMATORS[method](op, **budget_kwargs(method, 40), seed=0, blocks={"all": slice(None)})
    assert abs(result.estimate - np.trace(a)) <= 5 * result.stderr + 1e-4 * np.trace(a)
    assert result.blocks["all"][0] == pytest.approx(result.estimate, rel=1e-5)


def test_small_operators_use_their_whole_space():
    a, op = dense([3.0, -1.0, 2.0, 0.5], seed=8)
    for method in ("hutchpp", "xtrace"):  # the sketch spans everything: exact
        assert ESTIMATORS[method](op, n_matvecs=30).estimate == pytest.approx(4.5, rel=1e-10)


@pytest.mark.parametrize(
    "call",
    [
        lambda op: hutchinson(op, n_probes=1),
        lambda op: hutchinson(op, block_size=0),
        lambda op: hutchinson(op, target_rel_stderr=0.0),
        lambda op: hutchinson(op, seed=1.5),
        lambda op: hutchinson(op, blocks={"a": slice(0, 100)}),
        lambda op: hutchinson(op, blocks={"a": [0, 1]}),
        lambda op: hutchinson(op, blocks={"a": slice(5, 5)}),
        lambda op: hutchinson(op, blocks={"a": slice(None, None, -1)}),
        lambda op: hutchinson(op, blocks={}),
        lambda op: hutchpp(op, n_matvecs=3),
        lambda op: xtrace(op, n_matvecs=3),
        lambda op: xtrace(op, blocks={"a": slice(-3, None)}),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call(mixed()[1])


@pytest.mark.parametrize("method", ESTIMATORS)
def test_per_layer_traces_of_a_network_hessian(method, mlp_problem):
    """The real operator with one block per parameter tensor (HVPs are checked in test_objective)."""
    model, _, _, batches = mlp_problem
    objective = Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method="double-backward")
    op = HessianOperator(objective)
    h = op.products(torch.eye(op.shape[0], dtype=torch.float64)).numpy()
    calls = op.n_matvecs
    blocks = objective.layout.slices()
    result = ESTIMATORS[method](op, **budget_kwargs(method, 60), blocks=blocks)
    assert op.n_matvecs - calls == result.n_matvecs == 60
    assert abs(result.estimate - np.trace(h)) <= 4 * result.stderr
    assert sum(est for est, _ in result.blocks.values()) == pytest.approx(result.estimate, rel=1e-10)
    for name, block in blocks.items():
        est, stderr = result.blocks[name]
        assert abs(est - np.trace(h[block, block])) <= 4 * stderr + 1e-10


def test_operators_take_and_return_probe_rows(mlp_problem):
    """products(V): V holds k probes as ROWS (k, n) and row i of the answer is A vᵢ. With k ≠ n and non-symmetric
    dense matrices, a column-oriented (A @ V) or transposed (V @ A) implementation fails here."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)  # not symmetric: A vᵢ and Aᵀvᵢ differ
    d = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    model, _, _, batches = mlp_problem
    cases = {
        "dense": (DenseOperator(a), a),
        "diagonal-scaled": (DiagonalScaledOperator(DenseOperator(a), d), torch.diag(d) @ a @ torch.diag(d)),
        "block": (BlockOperator(DenseOperator(a), slice(2, 6)), a[2:6, 2:6]),
        "hessian": (
            HessianOperator(Objective(model, batches, dtype=torch.float64, device="cpu")),
            dense_hessian(model, batches, "eval"),
        ),
    }
    for name, (op, matrix) in cases.items():
        n = matrix.shape[0]
        V = torch.randn(3, n, generator=g, dtype=torch.float64)
        expected = torch.stack([matrix @ v for v in V])
        products = op.products(V)
        assert products.shape == (3, n) and op.n_matvecs == 3, name
        torch.testing.assert_close(products, expected, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(op.matvec(V[1]), expected[1], rtol=1e-10, atol=1e-12, msg=name)
        # scipy's convention is columns: its adapter transposes there, once
        torch.testing.assert_close(torch.as_tensor(op.to_scipy() @ V.T.numpy()), expected.T, rtol=1e-10, atol=1e-12, msg=name)
