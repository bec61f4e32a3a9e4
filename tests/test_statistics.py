"""landscape.statistics: stderr, Student-t quantiles and intervals, Welch and paired tests, Holm's correction."""

import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from landscape.statistics import CONFIDENCE, holm, paired, stderr, t_halfwidth, t_quantile, two_sided_p, welch


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042), (10**7, 1.960)])
def test_t_quantile_matches_the_printed_table(df, table):
    assert CONFIDENCE == 0.95
    assert t_quantile(df) == pytest.approx(table, abs=5e-4)


def test_t_quantile_other_levels_and_fewer_than_one_df():
    assert t_quantile(10**7, confidence=0.90) == pytest.approx(1.645, abs=5e-4)
    assert t_quantile(4, confidence=0.99) == pytest.approx(4.604, abs=5e-4)
    assert t_quantile(0.5) == t_quantile(0) == t_quantile(1)  # below one df: the one-df quantile
    assert t_quantile(3.5) == pytest.approx(scipy.stats.t.ppf(0.975, 3.5), rel=1e-12)  # Welch's fractional df


def test_stderr_by_hand():
    # mean 3, squared deviations 4+1+0+1+4 = 10, s² = 10/4, stderr = √(2.5/5) = √0.5
    assert stderr([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(math.sqrt(0.5), rel=1e-15)
    assert isinstance(stderr(np.array([1.0, 2.0])), float)
    columns = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 13.0], [4.0, 10.0], [5.0, 7.0]])
    # second column: mean 10, squared deviations 0+0+9+0+9 = 18, s² = 4.5, stderr = √(4.5/5)
    np.testing.assert_allclose(stderr(columns, axis=0), [math.sqrt(0.5), math.sqrt(0.9)], rtol=1e-15)
    np.testing.assert_allclose(stderr(columns.T, axis=1), [math.sqrt(0.5), math.sqrt(0.9)], rtol=1e-15)


def test_t_halfwidth_is_quantile_times_stderr_and_needs_two_values():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert t_halfwidth(x) == pytest.approx(2.776445 * math.sqrt(0.5), rel=1e-6)  # t(0.975, 4) = 2.776445
    grid = np.random.default_rng(0).normal(size=(3, 6))
    np.testing.assert_allclose(t_halfwidth(grid, axis=0), t_quantile(2) * grid.std(axis=0, ddof=1) / math.sqrt(3))
    with pytest.raises(ValueError, match="at least two"):
        t_halfwidth([1.0])


def test_the_t_interval_covers_the_true_mean_95_percent_of_the_time():
    # n = 8: a normal (1.96) interval would cover only ~91%, so this fails on the wrong quantile or df
    rng = np.random.default_rng(2024)
    mu = 3.0
    samples = rng.normal(mu, 2.0, size=(2000, 8))
    covered = np.abs(samples.mean(axis=1) - mu) <= t_halfwidth(samples, axis=1)
    assert abs(covered.mean() - CONFIDENCE) <= 0.015, covered.mean()


@pytest.mark.parametrize("seed, na, nb", [(0, 3, 4), (1, 5, 5), (2, 12, 4), (3, 2, 30)])
def test_welch_matches_scipy(seed, na, nb):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.0, 1.0, na), rng.normal(0.7, 3.0, nb)
    test = welch(a, b)
    ref = scipy.stats.ttest_ind(b, a, equal_var=False)
    ci = ref.confidence_interval(CONFIDENCE)
    assert test.diff == pytest.approx(b.mean() - a.mean(), rel=1e-12)
    assert test.df == pytest.approx(ref.df, rel=1e-12)
    assert test.diff / test.stderr == pytest.approx(ref.statistic, rel=1e-12)
    assert test.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert test.diff - test.halfwidth == pytest.approx(ci.low, rel=1e-10)
    assert test.diff + test.halfwidth == pytest.approx(ci.high, rel=1e-10)


def test_welch_of_constant_groups_and_too_few_values():
    test = welch([1.0, 1.0], [2.0, 2.0, 2.0])
    assert test.stderr == 0 and test.df == 1.0 and test.p_value == 0.0
    with pytest.raises(ValueError, match="at least two"):
        welch([1.0], [1.0, 2.0])


@pytest.mark.parametrize("seed, n", [(0, 2), (1, 5), (2, 40)])
def test_paired_matches_scipy(seed, n):
    rng = np.random.default_rng(seed)
    a = rng.normal(5.0, 3.0, n)
    b = a + rng.normal(0.2, 0.1, n)  # a shared component the pairing removes
    test = paired(a, b)
    ref = scipy.stats.ttest_rel(b, a)
    ci = ref.confidence_interval(CONFIDENCE)
    assert test.df == n - 1 == ref.df
    assert test.diff / test.stderr == pytest.approx(ref.statistic, rel=1e-10)
    assert test.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert test.diff - test.halfwidth == pytest.approx(ci.low, rel=1e-10)
    assert test.diff + test.halfwidth == pytest.approx(ci.high, rel=1e-10)
    if n > 2:
        assert test.halfwidth < welch(a, b).halfwidth  # pairing is the point


def test_paired_refuses_mismatched_samples():
    with pytest.raises(ValueError, match="equally long"):
        paired([1.0, 2.0, 3.0], [1.0, 2.0])


def test_two_sided_p():
    assert two_sided_p(1.0, 0.0, 5) == 0.0 and two_sided_p(0.0, 0.0, 5) == 1.0
    assert two_sided_p(-1.8, 1.0, None) == pytest.approx(2 * scipy.stats.norm.sf(1.8), rel=1e-12)
    assert two_sided_p(2.0, 0.5, 7) == pytest.approx(2 * scipy.stats.t.sf(4.0, 7), rel=1e-12)
    assert two_sided_p(t_quantile(9), 1.0, 9) == pytest.approx(1 - CONFIDENCE, rel=1e-9)


def test_holm_worked_example():
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1: 0.04, 0.09, 0.08 → 0.09 (monotone), 0.5
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    # sorted 0.02, 0.3, 0.6 times 3, 2, 1: 0.06, 0.6, 0.6
    assert holm([0.3, 0.02, 0.6]) == pytest.approx([0.6, 0.06, 0.6])
    # 0.4·3 = 1.2 capped at 1; everything after it stays at 1
    assert holm([0.4, 0.5, 0.45]) == [1.0, 1.0, 1.0]
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_holm_is_monotone_capped_and_never_below_the_raw_p():
    rng = np.random.default_rng(7)
    for size in (2, 5, 17):
        p = rng.uniform(0, 0.3, size).tolist()
        adjusted = holm(p)
        order = np.argsort(p)
        assert np.all(np.diff(np.array(adjusted)[order]) >= 0)
        assert all(raw <= adj <= 1.0 for raw, adj in zip(p, adjusted))
        assert min(adjusted) == pytest.approx(min(1.0, size * min(p)))


def test_importing_the_module_does_not_import_scipy():
    code = "import sys, landscape.statistics; sys.exit('scipy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
