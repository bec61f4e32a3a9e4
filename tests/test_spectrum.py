"""Eigenvalue solvers and spectral density against dense ground truth (numpy.linalg.eigh)."""

import json

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid

from landscape.curvature.density import slq_density
from landscape.curvature.spectrum import lanczos, power_iteration
from landscape.engine.objective import Objective
from landscape.engine.operators import DenseOperator, HessianOperator
from tests.helpers import dense

# outliers, a near-degenerate cluster, negative eigenvalues and a bulk
MIXED = np.concatenate([[40, 25, 18, 12, 9, 6, 6 + 1e-5, 6 + 2e-5, -20, -7], np.random.default_rng(1).uniform(-2, 4, 190)])


@pytest.mark.parametrize("which, k", [("LA", 5), ("SA", 2), ("LM", 4)])
def test_lanczos_matches_eigh(which, k):
    a, op = dense(MIXED)
    true = np.linalg.eigvalsh(a)
    expected = {"LA": true[::-1][:k], "SA": true[:k], "LM": true[np.argsort(-np.abs(true))][:k]}[which]
    result = lanczos(op, k, which=which, tol=1e-10)
    assert result.converged and result.method == "lanczos"
    np.testing.assert_allclose(result.values, expected, rtol=1e-8)
    assert result.n_matvecs == op.n_matvecs < len(MIXED) // 2  # a Krylov space, not the whole space


@pytest.mark.parametrize("stop", ["error", "residual"])
def test_lanczos_residuals_bound_the_errors_and_match_true_residuals(stop):
    """Whatever the stopping rule, `residuals` are true residual norms and rigorous error bounds."""
    a, op = dense(MIXED)
    true = np.linalg.eigvalsh(a)[::-1]
    for seed in range(6):
        result = lanczos(op, 5, tol=1e-2, seed=seed, return_vectors=True, stop=stop)
        stopped_on = result.error_bounds if stop == "error" else result.residuals
        assert result.converged and np.all(stopped_on <= 1e-2 * np.abs(result.values))
        assert np.all(result.error_bounds <= result.residuals)
        assert np.all(np.abs(true[:5] - result.values) <= result.residuals)
        y = result.vectors.numpy()  # one eigenvector per row
        assert y.shape == (5, a.shape[0])
        np.testing.assert_allclose(y @ y.T, np.eye(5), atol=1e-10)
        true_residuals = np.linalg.norm(y @ a.T - result.values[:, None] * y, axis=1)
        np.testing.assert_allclose(result.residuals, true_residuals, rtol=1e-3, atol=1e-10)


# Spectra for the error-estimate stopping rule: (top five, bulk) with a known answer.
STOP_SPECTRA = {
    "separated": np.concatenate([[40, 25, 18, 12, 9], np.random.default_rng(11).uniform(-2, 4, 295)]),
    "clustered": np.concatenate([[10, 9.3, 8.6, 7.4, 6.6], np.random.default_rng(12).uniform(0, 6, 295)]),  # within 35%
    "near-degenerate": np.concatenate([[10, 8, 8 * (1 - 1e-5), 6, 5], np.random.default_rng(13).uniform(0, 4.5, 295)]),
    "tight": np.concatenate([[10, 9.8, 9.6, 9.4, 9.2], np.linspace(0, 9, 295)]),
}


@pytest.mark.parametrize("name", STOP_SPECTRA)
@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_lanczos_error_stop_meets_tol_in_true_relative_error(name, tol):
    """stop="error" (r²/gap estimates) stops with |θ_i − λ_i| ≤ tol·λ_i for λ1..λ5, over matrices and seeds."""
    for matrix_seed in range(3):
        a, op = dense(STOP_SPECTRA[name], seed=matrix_seed)
        true = np.linalg.eigvalsh(a)[::-1][:5]
        for seed in range(4):
            result = lanczos(op, 5, tol=tol, seed=seed)
            assert result.converged and np.all(result.error_bounds <= tol * np.abs(result.values))
            assert np.all(np.abs(result.values - true) <= tol * true), (matrix_seed, seed, result.values - true)
            assert np.all(np.abs(result.values - true) <= result.residuals + 1e-13 * true)  # rigorous, up to rounding


def test_lanczos_error_stop_is_cheaper_than_residual_stop():
    """The eigenvalue error shrinks like r²/gap: on well-separated eigenvalues the residual rule overspends."""
    a, op = dense(STOP_SPECTRA["separated"])
    true = np.linalg.eigvalsh(a)[::-1][:5]
    for tol in (1e-3, 1e-6):
        for seed in range(3):
            fast, slow = (lanczos(op, 5, tol=tol, seed=seed, stop=stop) for stop in ("error", "residual"))
            assert fast.n_matvecs < slow.n_matvecs
            assert np.all(np.abs(fast.values - true) <= tol * true)
            assert np.any(fast.residuals > tol * np.abs(fast.values))  # the residual rule would have gone on
    error, residual = (lanczos(op, 5, tol=1e-6, stop=stop).n_matvecs for stop in ("error", "residual"))
    assert error <= 0.85 * residual


def test_error_bounds_use_the_gap_to_the_other_ritz_values():
    """min(r, r²/gap) with gap = distance to the nearest other Ritz value minus that value's residual."""
    from landscape.curvature.spectrum import _error_bounds

    theta, r = np.array([10.0, 6.0, 1.0]), np.array([0.1, 1.0, 3.0])
    # θ=10: nearest other interval edge 6+1 → gap 3; θ=6: 10−0.1 = 3.9 vs 1+3 → gap 2; θ=1: 6−1 → gap 4
    np.testing.assert_allclose(_error_bounds(theta, r), [0.01 / 3, min(1.0, 1.0 / 2), min(3.0, 9.0 / 4)])
    # overlapping intervals (no gap information) and a single Ritz value fall back to the residual
    np.testing.assert_allclose(_error_bounds(np.array([5.0, 4.9]), np.array([0.2, 0.2])), [0.2, 0.2])
    np.testing.assert_allclose(_error_bounds(np.array([5.0]), np.array([0.3])), [0.3])


def test_lanczos_is_deterministic_per_seed():
    _, op = dense(MIXED)
    first, again, other = (lanczos(op, 3, tol=1e-4, seed=s) for s in (7, 7, 8))
    assert np.array_equal(first.values, again.values) and first.n_matvecs == again.n_matvecs
    assert not np.array_equal(first.values, other.values)


def test_lanczos_reports_unconverged_when_budget_is_too_small():
    _, op = dense(MIXED)
    result = lanczos(op, 3, tol=1e-10, max_matvecs=6)
    assert not result.converged and result.n_matvecs == 6 and len(result.values) == 3
    assert np.any(result.error_bounds > 1e-10 * np.abs(result.values))
    assert np.any(result.residuals > 1e-10 * np.abs(result.values))


def test_lanczos_needs_fewer_matvecs_than_power_iteration():
    """Clustered top eigenvalues (ratios ≈ 0.98): power iteration crawls, Lanczos does not."""
    top = [10, 9.8, 9.6, 9.4, 9.2]
    a, op = dense(np.concatenate([top, np.linspace(0, 9, 195)]))
    true = np.linalg.eigvalsh(a)[::-1][:5]
    fast = lanczos(op, 5, tol=1e-3)
    assert np.all(np.abs(fast.values - true) <= 1e-3 * true)
    for tol in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7):  # the loosest PyHessian tolerance that reaches the same accuracy
        slow = power_iteration(op, 5, tol=tol, max_matvecs=20000)
        if np.all(np.abs(np.sort(slow.values)[::-1] - true) <= 1e-3 * true):
            break
    else:
        pytest.fail("power iteration never reached 1e-3")
    assert fast.n_matvecs * 3 < slow.n_matvecs


def test_lanczos_breakdown_on_low_rank_matrix_is_exact():
    a, op = dense(np.concatenate([[5.0, 3.0, 1.0], np.zeros(47)]))
    three = lanczos(op, 3, tol=1e-12)
    assert three.certified and three.n_matvecs <= 12  # range(A) + null directions: the guards and the check
    np.testing.assert_allclose(three.values, [5, 3, 1], rtol=1e-10)
    five = lanczos(op, 5, tol=1e-12, return_vectors=True)  # more than the invariant subspace holds: restarts
    assert five.converged and not np.isnan(five.values).any() and not torch.isnan(five.vectors).any()
    np.testing.assert_allclose(five.values, [5, 3, 1, 0, 0], atol=1e-10)


def test_lanczos_k_at_least_n_returns_the_whole_spectrum_with_multiplicities():
    a, op = dense([2.0, 2.0, 1.0, 0.0, -1.0, -1.0], seed=3)
    result = lanczos(op, 10, tol=1e-12)
    assert result.certified and result.n_matvecs == 6  # the whole space: every eigenvalue, multiplicities too
    np.testing.assert_allclose(result.values, [2, 2, 1, 0, -1, -1], atol=1e-10)
    tiny = lanczos(DenseOperator(torch.tensor([[3.0]], dtype=torch.float64)), 2)
    assert tiny.values.tolist() == [3.0] and tiny.converged


def test_lanczos_float32_operator():
    a, op = dense(MIXED, dtype=torch.float32)
    result = lanczos(op, 3, tol=1e-5, return_vectors=True)
    assert result.vectors.dtype == torch.float32
    np.testing.assert_allclose(result.values, [40, 25, 18], rtol=1e-5)


def test_results_serialize_to_json():
    _, op = dense(MIXED)
    for result in (
        lanczos(op, 2, return_vectors=True),
        power_iteration(op, 2, return_vectors=True),
        slq_density(op, n_runs=2, n_steps=10),
    ):
        assert json.loads(json.dumps(result.to_dict())).keys() == result.to_dict().keys()


def test_progress_goes_to_stderr(capsys, monkeypatch):
    _, op = dense(MIXED)
    lanczos(op, 1, progress="bar")
    assert "lanczos" in capsys.readouterr().err
    monkeypatch.setenv("LANDSCAPE_PROGRESS_INTERVAL", "0")
    result = lanczos(op, 1, progress=True)  # stderr is not a terminal here: plain lines
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith(f"lanczos: {result.n_matvecs}/{len(MIXED)} matvecs, ") and lines[-1].endswith(", done")
    assert len(lines) == result.n_matvecs + 1
    lanczos(op, 1)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "call",
    [
        lambda op: lanczos(op, 0),
        lambda op: lanczos(op, 2, which="BE"),
        lambda op: lanczos(op, 5, max_matvecs=4),
        lambda op: lanczos(op, 1, tol=-1.0),
        lambda op: lanczos(op, 1, stop="gap"),
        lambda op: lanczos(op, 1, seed="a"),
        lambda op: power_iteration(op, 1.5),
        lambda op: slq_density(op, n_runs=0),
        lambda op: slq_density(op, sigma=0.0),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call(dense(MIXED[:20])[1])


def test_power_iteration_top_three_with_a_gap():
    a, op = dense(np.concatenate([[10.0, 5.0, 2.5], np.random.default_rng(2).uniform(-1, 1, 97)]))
    result = power_iteration(op, 3, tol=1e-7, return_vectors=True)
    assert result.converged and result.method == "power_iteration"
    np.testing.assert_allclose(result.values, [10, 5, 2.5], rtol=1e-4)
    v = result.vectors.numpy()  # one eigenvector per row
    assert v.shape == (3, a.shape[0])
    np.testing.assert_allclose(v @ v.T, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(result.residuals, np.linalg.norm(v @ a.T - result.values[:, None] * v, axis=1), rtol=1e-8)
    assert result.n_matvecs == op.n_matvecs
    assert not power_iteration(op, 3, tol=1e-12, max_matvecs=9).converged


# SLQ: a bulk in [-1, 3] and an outlier group of 15 eigenvalues in [40, 50] (5% of the spectrum)
OUTLIERS = np.concatenate([np.random.default_rng(4).uniform(40, 50, 15), np.random.default_rng(5).uniform(-1, 3, 285)])


def test_slq_density_is_a_normalized_quadrature():
    _, op = dense(OUTLIERS)
    spectrum = slq_density(op, n_runs=4, n_steps=30)
    assert spectrum.nodes.shape == spectrum.weights.shape == (4, 30)
    np.testing.assert_allclose(spectrum.weights.sum(1), 1, atol=1e-10)
    assert abs(trapezoid(spectrum.density, spectrum.grid) - 1) < 1e-2
    assert spectrum.n_matvecs == 4 * 30
    np.testing.assert_allclose(spectrum.sigma, (spectrum.nodes.max() - spectrum.nodes.min()) / 100)
    assert spectrum.grid[0] < OUTLIERS.min() and spectrum.grid[-1] > OUTLIERS.max()


def test_slq_outlier_mass_matches_eigenvalue_fraction():
    _, op = dense(OUTLIERS)
    spectrum = slq_density(op, n_runs=32, n_steps=40, seed=1)
    above = spectrum.grid > 20
    mass = trapezoid(spectrum.density[above], spectrum.grid[above])
    assert abs(mass - 15 / 300) < 0.015  # per-run weight std ≈ 0.018, so 32 runs give ≈ 0.003
    assert abs(trapezoid(spectrum.density, spectrum.grid) - 1) < 1e-2


def test_slq_first_moment_is_unbiased_for_mean_eigenvalue():
    """Σ_j w_j θ_j = q₀ᵀAq₀ = zᵀAz/n for the normalized Rademacher start: Hutchinson's tr(A)/n."""
    a, op = dense(OUTLIERS)
    spectrum = slq_density(op, n_runs=200, n_steps=3, seed=2)
    moments = (spectrum.weights * spectrum.nodes).sum(1)
    assert abs(moments.mean() - np.trace(a) / 300) < 4 * moments.std(ddof=1) / np.sqrt(200)


def test_slq_with_full_krylov_space_recovers_the_eigenvalues():
    eigenvalues = np.array([-3.0, -1.0, 0.5, 2.0, 2.0, 7.0])
    _, op = dense(eigenvalues, seed=6)
    spectrum = slq_density(op, n_runs=3, n_steps=50)  # breaks down at 5 distinct values: padded, zero weight
    assert spectrum.nodes.shape == (3, 6) and np.all(spectrum.weights[:, 5] == 0)
    for nodes, weights in zip(spectrum.nodes, spectrum.weights):
        np.testing.assert_allclose(nodes[:5], np.unique(eigenvalues), atol=1e-10)
        assert weights.sum() == pytest.approx(1, abs=1e-12)


def test_estimators_on_a_network_hessian(mlp_problem):
    """The real operator: a tiny MLP's HessianOperator (HVPs are checked against autograd in test_objective)."""
    model, _, _, batches = mlp_problem
    op = HessianOperator(Objective(model, batches, dtype=torch.float64, device="cpu", hvp_method="double-backward"))
    h = op.products(torch.eye(op.shape[0], dtype=torch.float64)).numpy()
    true = np.linalg.eigvalsh((h + h.T) / 2)
    top = lanczos(op, 3, tol=1e-10)
    np.testing.assert_allclose(top.values, true[::-1][:3], rtol=1e-8)
    bottom = lanczos(op, 1, which="SA", tol=1e-10)
    np.testing.assert_allclose(bottom.values, true[:1], rtol=1e-6, atol=1e-10 * true[-1])
    np.testing.assert_allclose(power_iteration(op, 1, tol=1e-8).values, true[-1:], rtol=1e-4)
    spectrum = slq_density(op, n_runs=2, n_steps=20)
    np.testing.assert_allclose(spectrum.weights.sum(1), 1, atol=1e-10)
    assert spectrum.nodes.max() <= true[-1] + 1e-10 and spectrum.nodes.min() >= true[0] - 1e-10


def test_an_uncertified_eigenvalue_is_shown_as_a_bound_without_plus_minus():
    """The table never prints a ± beside an eigenvalue whose index is unproven: only what interlacing guarantees."""
    from analysis.measures.curvature import eig_rows as result_rows

    a, op = dense(MIXED)
    certified = lanczos(op, 2, tol=1e-6)
    cheap = lanczos(op, 2, tol=1e-6, stop="residual")
    assert certified.certified and not cheap.certified and cheap.converged
    rows = result_rows(certified, "eig", "HVPs")
    assert "±" in rows[0][1] and rows[0][3] == ""
    for (label, value, _, note), theta in zip(result_rows(cheap, "eig", "HVPs"), cheap.values):
        assert value == f"≥ {theta:.6g}" and note == "not certified (stop=residual)", (label, value, note)
    smallest = lanczos(op, 1, which="SA", tol=1e-6, stop="residual")
    assert result_rows(smallest, "eig", "HVPs")[0][1].startswith("≤ ")


def test_a_budget_spent_during_the_check_is_converged_but_not_certified():
    """Converged values whose check the budget cut short are reported as such, never as certified."""
    from analysis.measures.curvature import eig_rows as result_rows

    a, op = dense(MIXED)
    full = lanczos(op, 1, tol=1e-6)
    residual = lanczos(op, 1, tol=1e-6, stop="residual")
    assert full.certified and full.n_matvecs > residual.n_matvecs + 1
    cut = lanczos(op, 1, tol=1e-6, max_matvecs=residual.n_matvecs + 1)
    assert cut.converged and not cut.certified and cut.n_matvecs == residual.n_matvecs + 1
    note = result_rows(cut, "eig", "HVPs")[0][3]
    assert note == f"not certified (its check unfinished in {cut.n_matvecs} HVPs; raise --max-matvecs)"


@pytest.mark.parametrize("which, k", [("LA", 5), ("SA", 2), ("LM", 3)])
def test_a_bounded_basis_restarts_and_finds_the_same_eigenvalues(which, k):
    """Thick restarts in 2k + 10 vectors: the eigenvalues of the full basis, certified, never more vectors held."""
    a, op = dense(MIXED)
    true = np.linalg.eigvalsh(a)
    expected = {"LA": true[::-1][:k], "SA": true[:k], "LM": true[np.argsort(-np.abs(true))][:k]}[which]
    for seed in range(3):
        full = lanczos(op, k, which=which, tol=1e-8, seed=seed)
        bounded = lanczos(op, k, which=which, tol=1e-8, seed=seed, max_vectors=2 * k + 10, return_vectors=True)
        assert full.restarts == 0 and bounded.restarts > 0
        assert bounded.certified and bounded.stored_vectors <= 2 * k + 10 < full.stored_vectors
        assert np.all(np.abs(bounded.values - expected) <= bounded.error_bounds)
        y = bounded.vectors.numpy()
        true_residuals = np.linalg.norm(y @ a.T - bounded.values[:, None] * y, axis=1)
        np.testing.assert_allclose(bounded.residuals, true_residuals, rtol=1e-3, atol=1e-10)


def test_restarted_residuals_are_exact():
    """After a thick restart the factorization A V = V H + Qᵀ B still gives every Ritz pair's true residual."""
    from landscape.curvature.krylov import AugmentedKrylov

    a, op = dense(MIXED)
    krylov = AugmentedKrylov(op, torch.ones(len(MIXED), dtype=torch.float64), max_steps=100, capacity=12)
    for _ in range(3):  # fill, restart to the top 5, and grow again
        while not krylov.needs_restart:
            krylov.apply()
            assert krylov.follow()
        krylov.apply()
        theta, s, residuals = krylov.ritz()
        y = krylov.vectors(s).numpy()
        np.testing.assert_allclose(residuals, np.linalg.norm(y @ a.T - theta[:, None] * y, axis=1), atol=1e-9)
        np.testing.assert_allclose(y @ y.T, np.eye(len(theta)), atol=1e-9)
        krylov.restart(s[:, -5:], theta[-5:])
        theta, s, residuals = krylov.ritz()
        y = krylov.vectors(s).numpy()
        np.testing.assert_allclose(residuals, np.linalg.norm(y @ a.T - theta[:, None] * y, axis=1), atol=1e-9)
        assert krylov.follow()
    assert krylov.restarts == 3 and krylov.peak_vectors <= 13


@pytest.mark.parametrize("k, m, n", [(3, 7, 100), (7, 7, 13), (1, 4, 5)])
@pytest.mark.parametrize("end", ["front", "back"])
def test_rows_are_combined_in_place_block_by_block(k, m, n, end):
    """V s written over the rows it is made of, a block of columns at a time (one vector's worth of temporary, not k
    vectors'): equal to the whole product, every other row untouched. The restart does it at the buffer's front (the
    basis), the remainder directions at its back (Q)."""
    from landscape.curvature.krylov import combine_rows_in_place

    g = torch.Generator().manual_seed(0)
    buffer = torch.randn(m + 2, n, dtype=torch.float64, generator=g)
    coefficients = torch.randn(k, m, dtype=torch.float64, generator=g)
    rows, into = (slice(0, m), slice(0, k)) if end == "front" else (slice(2, m + 2), slice(m + 2 - k, m + 2))
    expected = buffer.clone()
    expected[into] = coefficients @ buffer[rows]
    combine_rows_in_place(buffer[rows], coefficients, buffer[into])
    torch.testing.assert_close(buffer, expected, rtol=1e-12, atol=1e-12)


def test_too_few_vectors_to_restart_is_refused():
    with pytest.raises(ValueError, match="max_vectors=6 leaves no room to restart for k=3: give at least 13"):
        lanczos(dense(MIXED)[1], 3, max_vectors=6)
