"""Does a sharpness measure rank training runs by their generalization gap? Kendall's τ and the granulated τ.

Jiang et al. (2019), "Fantastic generalization measures and where to find them":
- Kendall's τ between a measure and the generalization gap over all runs of a sweep;
- the granulated τ: for one hyperparameter i, the τ over runs that differ only in i, averaged over
  every setting of the others (ψ_i); and Ψ, the mean of ψ_i over the hyperparameters. A measure
  that only tracks one hyperparameter (say, batch size) scores well on τ and on that ψ_i alone.

τ here is τ-b (ties counted as scipy.stats.kendalltau counts them). A group of runs in which the
measure or the gap is constant has no τ and is left out of ψ_i; the number of groups used is kept.

Uncertainty: a percentile bootstrap over runs. Each resample draws n runs with replacement and
recomputes τ, every ψ_i and Ψ from them, so all three intervals come from the same resamples.
Vectorized over resamples (scipy's kendalltau, one call per group per resample, would take
minutes for a sweep's worth of groups).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from landscape.statistics import CONFIDENCE

RESAMPLES = 2000
_PAIRS_PER_CHUNK = 4_000_000  # resample × pair entries held at once


@dataclass(frozen=True)
class Estimate:
    """A statistic on all runs with its bootstrap interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Correlation:
    """How one measure ranks the runs by their gap: τ, ψ_i per hyperparameter (with its number of groups), Ψ."""

    measure: str
    gap: str
    n_runs: int
    tau: Estimate
    granulated: dict[str, Estimate] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)
    psi: Estimate | None = None

    def to_dict(self) -> dict:
        return {
            "measure": self.measure,
            "gap": self.gap,
            "n_runs": self.n_runs,
            "tau": self.tau.to_dict(),
            "granulated": {h: e.to_dict() for h, e in self.granulated.items()},
            "groups": dict(self.groups),
            "psi": None if self.psi is None else self.psi.to_dict(),
        }


def grouped_tau(x: np.ndarray, y: np.ndarray, groups: np.ndarray, index: np.ndarray, n_groups: int) -> np.ndarray:
    """τ-b of (x, y) within each group, for each resample.

    `index` (resamples × n) names the runs of each resample; `groups` (n,) gives each run's group,
    0..n_groups-1. Returns (resamples × n_groups), nan where a group has no τ (fewer than two
    members, or x or y constant in it).
    """
    x, y, groups, index = np.asarray(x, float), np.asarray(y, float), np.asarray(groups), np.atleast_2d(index)
    n_resamples, n = index.shape
    first, second = np.triu_indices(n, 1)
    out = np.empty((n_resamples, n_groups))
    chunk = max(1, _PAIRS_PER_CHUNK // max(1, len(first)))
    for start in range(0, n_resamples, chunk):
        rows = index[start : start + chunk]
        g = groups[rows]
        same = g[:, first] == g[:, second]
        sx = np.sign(x[rows][:, first] - x[rows][:, second])[same]
        sy = np.sign(y[rows][:, first] - y[rows][:, second])[same]
        bins = (np.arange(len(rows))[:, None] * n_groups + g[:, first])[same]
        size = len(rows) * n_groups

        def total(weights: np.ndarray) -> np.ndarray:
            return np.bincount(bins, weights=weights, minlength=size).reshape(len(rows), n_groups)

        pairs = total(np.ones_like(sx))
        denominator = np.sqrt((pairs - total(sx == 0)) * (pairs - total(sy == 0)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + len(rows)] = np.where(denominator > 0, total(sx * sy) / denominator, np.nan)
    return out


def _group_ids(hyperparameters: Sequence[dict], vary: str) -> tuple[np.ndarray, int]:
    """Runs that agree on everything but `vary` share a group id."""
    keys = [tuple(sorted((k, repr(v)) for k, v in h.items() if k != vary)) for h in hyperparameters]
    ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    return np.array([ids[key] for key in keys]), len(ids)


def varying(hyperparameters: Sequence[dict], axes: Sequence[str]) -> list[str]:
    """The axes that take at least two values across the runs."""
    return [a for a in axes if len({repr(h.get(a)) for h in hyperparameters}) > 1]


def _interval(samples: np.ndarray) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def correlate(
    measure: np.ndarray,
    gap: np.ndarray,
    hyperparameters: Sequence[dict],
    axes: Sequence[str],
    *,
    name: str = "measure",
    gap_name: str = "gap",
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Correlation:
    """Kendall's τ, ψ_i for each axis in `axes` that varies, and Ψ, each with a bootstrap interval over runs.

    `hyperparameters[r]` holds run r's settings. For ψ_i, runs are grouped by every other key of
    that dict (the seed included, when it is one), so each group varies i alone.
    Runs whose measure or gap is not finite are left out.
    """
    measure, gap = np.asarray(measure, float), np.asarray(gap, float)
    keep = np.isfinite(measure) & np.isfinite(gap)
    measure, gap = measure[keep], gap[keep]
    hyperparameters = [h for h, k in zip(hyperparameters, keep) if k]
    n = len(measure)
    if n < 3:
        raise ValueError(f"{name}: {n} runs with finite values; a rank correlation needs at least 3")
    rng = np.random.default_rng(seed)
    index = np.vstack([np.arange(n), rng.integers(0, n, size=(resamples, n))])  # row 0: the runs themselves
    tau = grouped_tau(measure, gap, np.zeros(n, int), index, 1)[:, 0]
    granulated, counts, per_axis = {}, {}, []
    for axis in varying(hyperparameters, axes):
        ids, n_groups = _group_ids(hyperparameters, axis)
        taus = grouped_tau(measure, gap, ids, index, n_groups)
        counts[axis] = int(np.isfinite(taus[0]).sum())
        if counts[axis] == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # resamples in which no group has a τ
            psi_i = np.nanmean(taus, axis=1)
        granulated[axis] = Estimate(float(psi_i[0]), *_interval(psi_i[1:]))
        per_axis.append(psi_i)
    psi = None
    if per_axis:
        stacked = np.mean(per_axis, axis=0)
        psi = Estimate(float(stacked[0]), *_interval(stacked[1:]))
    return Correlation(name, gap_name, n, Estimate(float(tau[0]), *_interval(tau[1:])), granulated, counts, psi)
