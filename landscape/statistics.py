"""The uncertainty arithmetic every interval and test in the toolkit uses, in one place.

Standard error of a mean, Student-t quantiles and interval half-widths at CONFIDENCE, Welch's
unequal-variance test (Welch 1947), the paired t test, and Holm's step-down correction (Holm 1979).
scipy is imported inside the functions that need it: the CLI's start-up must not pay for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

CONFIDENCE = 0.95  # every interval the toolkit reports is two-sided at this level


def stderr(samples: ArrayLike, axis: int = 0) -> float | np.ndarray:
    """Standard error of the mean of iid samples: their standard deviation (ddof=1) / √count.

    Args:
        samples: the samples, along `axis` (at least two for a finite answer).
        axis: the axis the samples run along.

    Returns:
        A float for a 1-D input, else an array with `axis` removed.
    """
    values = np.asarray(samples, dtype=float)
    se = values.std(axis=axis, ddof=1) / math.sqrt(values.shape[axis])
    return float(se) if np.ndim(se) == 0 else se


def t_quantile(df: float, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t quantile: P(|T_df| ≤ q) = confidence.

    Args:
        df: degrees of freedom (a float for Welch's); below 1 it is taken as 1, the widest
            interval a finite sample gets (its spread is NaN anyway with a single sample).
        confidence: the two-sided level, CONFIDENCE by default.

    Returns:
        q, e.g. 12.706 at df=1, 2.228 at df=10, → 1.960 as df grows.
    """
    import scipy.stats  # here, not at the top: ~0.3 s that the CLI's start-up should not pay

    return float(scipy.stats.t.ppf(0.5 + confidence / 2, max(df, 1.0)))


def t_halfwidth(samples: ArrayLike, axis: int = 0) -> float | np.ndarray:
    """Half-width of the two-sided Student-t interval of the mean at CONFIDENCE, (count − 1) df.

    Args:
        samples: iid samples along `axis`, at least two.
        axis: the axis the samples run along.

    Returns:
        t_quantile(count − 1) · stderr: a float for a 1-D input, else an array with `axis` removed.

    Raises:
        ValueError: fewer than two samples (no spread, no interval).
    """
    values = np.asarray(samples, dtype=float)
    n = values.shape[axis]
    if n < 2:
        raise ValueError(f"a confidence interval of a mean needs at least two values, got {n}")
    return t_quantile(n - 1) * stderr(values, axis)


def skew_corrected_interval(samples: ArrayLike, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval of the mean of iid samples corrected for their skewness: Hall's (1992) transformation of Student's t.

    The t interval assumes t = √n(x̄ − μ)/s is symmetric; for skewed samples it is skewed the other way, and the
    interval misses on the long tail's side. Hall ("On the removal of skewness by transformation", JRSS B 54)
    maps t by g(t) = t + a·t² + a²·t³/3 + b, a = γ/(3√n), b = γ/(6√n), γ the sample skewness, monotone and with
    a closed-form inverse, so μ ∈ [x̄ − s/√n·g⁻¹(q), x̄ − s/√n·g⁻¹(−q)], q the t quantile with n − 1 df. For
    symmetric samples (γ = 0) it is the t interval shifted by nothing. On the losses of a trained network under
    weight noise (skewness 1–4) it lifted the coverage of a nominal 95% from 86–93% to 92–95% (tests/test_coverage.py).

    Args:
        samples: iid values, at least two.
        confidence: the two-sided level, CONFIDENCE by default.

    Returns:
        (low, high); a single point when the samples are constant.

    Examples:
        >>> low, high = skew_corrected_interval([0.1, 0.2, 0.1, 0.3, 2.0, 0.2, 0.1, 0.4])
        >>> mean = 3.4 / 8
        >>> bool(high - mean > mean - low)  # longer on the long tail's side
        True
    """
    values = np.asarray(samples, dtype=float)
    n = len(values)
    if n < 2:
        raise ValueError(f"a confidence interval of a mean needs at least two values, got {n}")
    mean, spread = float(values.mean()), float(values.std())
    if spread == 0:
        return mean, mean
    gamma = float(((values - mean) ** 3).mean()) / spread**3
    se, q = stderr(values), t_quantile(n - 1, confidence)
    a, b = gamma / (3 * math.sqrt(n)), gamma / (6 * math.sqrt(n))

    def inverse(x: float) -> float:  # g⁻¹(x) = ((1 + 3a(x − b))^⅓ − 1)/a
        return x - b if abs(a) < 1e-12 else (float(np.cbrt(1 + 3 * a * (x - b))) - 1) / a

    return mean - se * inverse(q), mean - se * inverse(-q)


def two_sided_p(diff: float, se: float, df: float | None) -> float:
    """Two-sided p-value of diff/se under Student's t with `df` (standard normal when df is None).

    Args:
        diff: the observed difference (or any estimate tested against zero).
        se: its standard error; 0 gives p = 0 for a nonzero diff and 1 for a zero one.
        df: degrees of freedom (below 1 taken as 1), or None for the normal limit.

    Returns:
        P(|T| ≥ |diff|/se).
    """
    import scipy.stats  # here, not at the top: ~0.3 s that the CLI's start-up should not pay

    if se == 0:
        return 0.0 if diff != 0 else 1.0
    z = abs(diff) / se
    return float(2 * (scipy.stats.t.sf(z, max(df, 1.0)) if df is not None else scipy.stats.norm.sf(z)))


@dataclass(frozen=True)
class TTest:
    """A two-sample t comparison of mean(b) − mean(a): the difference, its stderr and degrees of freedom."""

    diff: float
    stderr: float
    df: float
    method: str

    @property
    def halfwidth(self) -> float:
        """Half-width of the two-sided interval of `diff` at CONFIDENCE."""
        return t_quantile(self.df) * self.stderr

    @property
    def p_value(self) -> float:
        """Two-sided p-value of diff = 0."""
        return two_sided_p(self.diff, self.stderr, self.df)


def welch(a: ArrayLike, b: ArrayLike) -> TTest:
    """Welch's unequal-variance t test of mean(b) − mean(a) (Welch 1947), Welch–Satterthwaite df.

    Args:
        a, b: two independent samples, at least two values each.

    Returns:
        TTest with stderr = √(s²_a/n_a + s²_b/n_b); df = 1 when both samples are constant.

    Raises:
        ValueError: a sample with fewer than two values.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs at least two values per group, got {len(a)} and {len(b)}")
    sa, sb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1)) if sa + sb > 0 else 1.0
    return TTest(diff=float(b.mean() - a.mean()), stderr=math.sqrt(sa + sb), df=float(df), method="welch")


def paired(a: ArrayLike, b: ArrayLike) -> TTest:
    """Paired t test of mean(b − a) (Student 1908): the one-sample t test of the pairwise differences.

    Args:
        a, b: matched 1-D samples (a[i] and b[i] share a seed, a draw, a batch).

    Returns:
        TTest with stderr = stderr(b − a) and df = pairs − 1; a single pair has no spread, so its
        stderr (hence interval and p-value) is NaN rather than an error.

    Raises:
        ValueError: samples of different shapes, or not 1-D, or empty.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"a paired test needs two equally long 1-D samples, got shapes {a.shape} and {b.shape}")
    d = b - a
    return TTest(diff=float(d.mean()), stderr=stderr(d), df=float(len(d) - 1), method="paired")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): family-wise error control over the given tests.

    The i-th smallest p is multiplied by (m − i + 1), capped at 1, and made non-decreasing in that
    order; rejecting every adjusted p below α keeps the chance of any false call at most α.

    Args:
        p_values: the family's raw p-values, in any order.

    Returns:
        The adjusted p-values, in the input's order.
    """
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def binomial_interval(hits: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Clopper–Pearson (1934) exact interval of a proportion: e.g. how often an interval covered the truth.

    Args:
        hits: successes, 0 ≤ hits ≤ n.
        n: trials, at least 1.
        confidence: the two-sided level, CONFIDENCE by default.

    Returns:
        (low, high), never narrower than the true level (conservative).

    Examples:
        >>> tuple(round(b, 4) for b in binomial_interval(190, 200))
        (0.91, 0.9758)
    """
    import scipy.stats

    if not 0 <= hits <= n or n < 1:
        raise ValueError(f"need 0 ≤ hits ≤ n and n ≥ 1, got hits={hits}, n={n}")
    tail = (1 - confidence) / 2
    low = 0.0 if hits == 0 else float(scipy.stats.beta.ppf(tail, hits, n - hits + 1))
    high = 1.0 if hits == n else float(scipy.stats.beta.ppf(1 - tail, hits + 1, n - hits))
    return low, high
