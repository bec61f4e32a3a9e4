"""The coverage suite: every stated 95% interval covers a known truth in 93–97% of seeds.

Trace intervals (Hutchinson, Hutch++, XTrace) against the exact trace of real networks' dense Hessians, the
expected loss's CI against a Monte Carlo truth and a quadratic's closed form, correlate's bootstrap intervals
against a known population τ (tests/interval_coverage.py has the machinery; benchmarks/coverage.py runs more
seeds). Lower bounds (ε-sharpness, worst case, m-sharpness) are shown as lower bounds. The slow tests together
take about a minute on two busy cores; the rest, under 5 s, run by default.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analysis.measures.registry import MEASURES, is_lower_bound
from analysis.measures.text import EPSILON_SHARPNESS
from landscape.curvature.trace import xtrace
from landscape.engine.probes import seeded_generator, sphere_rows
from landscape.sharpness.balls import MSharpness, WorstCase
from landscape.sharpness.box import EpsilonSharpness
from landscape.statistics import skew_corrected_interval, t_halfwidth
from tests.helpers import dense, result_of
from tests.interval_coverage import (
    expected_loss_coverage,
    networks,
    pooled,
    quadratic_coverage,
    tau_coverage,
    trace_coverage,
)

SEEDS = range(200)
BAND = (0.93, 0.97)  # the standard, for each quantity pooled over its problems


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of tiny products: one thread each for torch and BLAS, or on busy cores their threads spin (10× slower)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def nets():
    return networks()


# ------------------------------------------------------------------------------- fast: the formulas
def _xtrace_reference(a: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """The paper's leave-one-out estimates with the improved normalization, by brute force (one QR per estimate)."""
    n, m = omega.shape
    y = a @ omega
    out = []
    for i in range(m):
        q, _ = np.linalg.qr(np.delete(y, i, axis=1))
        residual = omega[:, i] - q @ (q.T @ omega[:, i])
        out.append(np.trace(q.T @ a @ q) + (n - m + 1) / (residual @ residual) * residual @ a @ residual)
    return np.array(out)


def test_xtrace_stderr_is_the_leave_two_out_variance_by_brute_force():
    """stderr² = s²/m + max(mean_{i≠j} δ_ij·δ_ji, 0), δ_ij = T_i − T_i^(−j): recomputed by running XTrace without ω_j."""
    a, op = dense(np.linspace(-1, 3, 30) ** 3, seed=2)
    result = xtrace(op, 12, seed=4)
    omega = sphere_rows(seeded_generator(op.device, 4), 6, op).numpy().T
    loo = _xtrace_reference(a, omega)
    m = len(loo)
    delta = np.zeros((m, m))
    for j in range(m):
        without = _xtrace_reference(a, np.delete(omega, j, axis=1))  # T_i^(−j) for i ≠ j, in order
        delta[np.arange(m) != j, j] = np.delete(loo, j) - without
    variance = loo.var(ddof=1) / m + max((delta * delta.T).sum() / (m * (m - 1)), 0.0)
    np.testing.assert_allclose(result.samples, loo, rtol=1e-10)
    assert result.stderr == pytest.approx(np.sqrt(variance), rel=1e-8)
    low, high = result.ci
    assert high - result.estimate == pytest.approx(result.estimate - low) and high > low


def test_skew_corrected_interval_is_the_t_interval_for_symmetric_samples_and_leans_on_the_tail():
    symmetric = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    low, high = skew_corrected_interval(symmetric)
    assert (low, high) == pytest.approx((-t_halfwidth(symmetric), t_halfwidth(symmetric)))
    skewed = np.random.default_rng(0).exponential(size=50)
    low, high = skew_corrected_interval(skewed)
    assert high - skewed.mean() > skewed.mean() - low > 0
    assert skew_corrected_interval([3.0, 3.0, 3.0]) == (3.0, 3.0)


@pytest.mark.parametrize("cls", [EpsilonSharpness, WorstCase, MSharpness])
def test_lower_bounds_are_labelled_as_such_in_the_table_and_the_json(cls):
    given = {"value": 0.25, "values": np.array([0.25, 0.1]), "start_kinds": ("zero", "corner"), "p": "2"}
    given |= {"batch_values": np.array([0.2, 0.3]), "batch_spreads": np.array([0.0, 0.1]), "n_batches": 2, "m": 8}
    result = result_of(cls, **{k: v for k, v in given.items() if k in cls.__dataclass_fields__})
    metric = {EpsilonSharpness: "eps-sharpness", WorstCase: "worst-case", MSharpness: "m-sharpness"}[cls]
    (row,) = MEASURES[metric].rows(result, metric, "HVPs")
    assert row[1].startswith("≥ 0.25") and "lower bound" in row[3]
    assert json.loads(json.dumps(cls.from_dict({**result.to_dict(), "bound": "lower"}).to_dict()))["bound"] == "lower"
    assert "bound" in cls.__dataclass_fields__ and cls.__dataclass_fields__["bound"].default == "lower"
    assert is_lower_bound(EPSILON_SHARPNESS if cls is EpsilonSharpness else metric)
    assert not is_lower_bound("trace") and not is_lower_bound("λ1")


def test_xtrace_interval_covers_on_a_real_hessian_smoke():
    """60 seeds on a trained MLP's Hessian (140 parameters): XTrace's stated interval is honest."""
    net = networks(steps=100)[0]
    coverage = trace_coverage("xtrace", net, 40, range(60))[0]
    assert coverage.hits >= 54 and 0.75 <= coverage.z_rms <= 1.3, coverage.line()


# ------------------------------------------------------------------------------- slow: 200 seeds each
@pytest.mark.slow
@pytest.mark.parametrize("method, budget", [("hutchinson", 100), ("hutchpp", 102), ("xtrace", 100)])
def test_trace_intervals_cover_the_exact_trace(nets, method, budget):
    found = [c for net in nets for c in trace_coverage(method, net, budget, SEEDS)]
    total = pooled(found, method)
    assert BAND[0] <= total.rate <= BAND[1], "\n".join(c.line() for c in [*found, total])
    assert all(c.rate >= 0.9 for c in found), "\n".join(c.line() for c in found)


@pytest.mark.slow
def test_expected_loss_intervals_cover_the_monte_carlo_truth(nets):
    found = [expected_loss_coverage(net, 0.1, SEEDS) for net in nets] + [quadratic_coverage(0.1, SEEDS)]
    total = pooled(found, "expected loss")
    assert BAND[0] <= total.rate <= BAND[1], "\n".join(c.line() for c in [*found, total])
    assert all(c.rate >= 0.9 for c in found), "\n".join(c.line() for c in found)


@pytest.mark.slow
def test_correlate_tau_interval_covers_the_population_tau():
    found = tau_coverage(12, 0.5, SEEDS) + tau_coverage(20, 0.0, SEEDS)
    tau = [c for c in found if "tau" in c.quantity]
    assert BAND[0] <= pooled(tau, "tau").rate <= BAND[1], "\n".join(c.line() for c in found)
    # ψ and Ψ: the percentile bootstrap over runs is conservative (duplicated runs leave groups with one or two
    # distinct members, whose τ is ±1): it covers, at more than 95%
    assert all(c.rate >= BAND[0] for c in found), "\n".join(c.line() for c in found)
