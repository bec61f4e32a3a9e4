"""Uncertainty of a comparison: one method's value over seeds, and the difference between two methods.

A difference between methods is called only when its 95% interval excludes zero: paired over
training seeds when both methods ran the same seeds (same initial weights and batch order), Welch's
interval over seeds when both have several others, the pooled seed spread when one
has, and with one checkpoint each the paired noise draws (common random numbers) or the two
estimators' own errors, which say whether two checkpoints differ, not whether two methods do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from landscape.results import Quantity, Result
from landscape.statistics import (
    CONFIDENCE,
    holm,
    paired,
    t_halfwidth,
    t_quantile,
    two_sided_p,
    welch,
)

# The math lives in landscape.statistics; these names stay importable from here for the reports.
ci_halfwidth = t_halfwidth  # 95% Student-t half-width of the mean over seeds (at least two values)
__all__ = ["CONFIDENCE", "Aggregate", "Difference", "aggregate", "ci_halfwidth", "difference", "holm", "holm_family", "verdict"]


@dataclass(frozen=True)
class Aggregate(Result):
    """One method's value of a quantity: one seed's estimate ± its stderr, or the mean ± std over n seeds."""

    mean: float
    spread: float
    n: int
    kind: str  # "stderr" (one seed) or "std over seeds"


@dataclass(frozen=True)
class Difference(Result):
    """other − baseline of one quantity, with its 95% interval, what the interval is built from, and its p-value.

    `seeds`: the interval comes from the spread over training seeds (a difference between methods); otherwise
    from one checkpoint each (a difference between two checkpoints). `holm_p`: the p-value after Holm's
    correction over the family the difference was tested in, once a report has set it.
    """

    diff: float
    halfwidth: float
    unpaired_halfwidth: float | None  # what independent draws or unshared seeds would give, where pairing was used
    basis: str
    relative: float | None  # diff / |baseline|
    relative_halfwidth: float | None
    significant: bool
    seeds: bool
    p_value: float
    holm_p: float | None = None


class Member(Protocol):
    """A measured checkpoint as the statistics read it (report.comparison's ComparedCheckpoint)."""

    seed: int | None
    quantities: dict[str, Quantity]


def _quantities(members: Sequence[Member], name: str) -> list[Quantity]:
    """The members' Quantity `name`, where measured."""
    return [m.quantities[name] for m in members if name in m.quantities]


def aggregate(members: Sequence[Member], name: str) -> Aggregate | None:
    """One method's value of a quantity: the estimate ± its own stderr for one seed, mean ± std over seeds."""
    found = _quantities(members, name)
    if not found:
        return None
    values = np.array([q.value for q in found])
    if len(found) == 1:
        return Aggregate(float(values[0]), found[0].stderr, 1, "stderr")
    return Aggregate(float(values.mean()), float(values.std(ddof=1)), len(found), "std over seeds")


def difference(baseline: Sequence[Member], other: Sequence[Member], name: str) -> Difference | None:
    """other − baseline with a 95% interval and a two-sided p-value.

    Paired t over shared training seeds, Welch over unshared seeds, the one multi-seed group's spread, paired draws for single runs (Student t), else
    the two estimators' errors (normal).
    """
    a, b = _quantities(baseline, name), _quantities(other, name)
    if not a or not b:
        return None
    va, vb = np.array([q.value for q in a]), np.array([q.value for q in b])
    diff = float(vb.mean() - va.mean())
    unpaired = None
    pairs = _paired_by_seed(baseline, other, name)
    if len(a) > 1 and len(b) > 1:
        test = welch(va, vb)
        df, se, basis = test.df, test.stderr, f"seed spread (Welch, {len(a)} vs {len(b)} seeds)"
        if pairs is not None:  # the same seeds start both methods from the same weights and batch order
            unpaired = test.halfwidth
            test = paired(*pairs)
            df, se, basis = test.df, test.stderr, f"paired over {len(pairs[0])} shared training seeds"
    elif len(a) > 1 or len(b) > 1:
        seeds = va if len(a) > 1 else vb
        df, se = len(seeds) - 1, seeds.std(ddof=1) * math.sqrt(1 / len(a) + 1 / len(b))
        basis = f"seed spread of the {len(seeds)}-seed group"
    elif a[0].samples is not None and b[0].samples is not None and len(a[0].samples) == len(b[0].samples):
        test = paired(np.asarray(a[0].samples), np.asarray(b[0].samples))
        df, se = test.df, test.stderr
        basis = "paired over shared noise draws or batches (one seed each)"
        unpaired = t_quantile(df) * math.hypot(a[0].stderr, b[0].stderr)  # the same quantile, independent draws
    else:
        df, se, basis = None, math.hypot(a[0].stderr, b[0].stderr), "estimator error (one seed each)"
    half = (t_quantile(df) if df is not None else 1.96) * se
    scale = abs(float(va.mean()))
    return Difference(
        diff,
        half,
        unpaired,
        basis,
        diff / scale if scale else None,
        half / scale if scale else None,
        abs(diff) > half,
        len(a) > 1 or len(b) > 1,
        two_sided_p(diff, se, df),
    )


def _paired_by_seed(baseline: Sequence[Member], other: Sequence[Member], name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The two groups' values in seed order when both hold the same (two or more, distinct) training seeds."""

    def by_seed(members: Sequence[Member]) -> dict | None:
        seeds = [m.seed for m in members]
        if None in seeds or len(set(seeds)) != len(seeds) or any(name not in m.quantities for m in members):
            return None
        return {m.seed: q.value for m, q in zip(members, _quantities(members, name))}

    a, b = by_seed(baseline), by_seed(other)
    if a is None or b is None or set(a) != set(b) or len(a) < 2:
        return None
    seeds = sorted(a)
    return np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])


def verdict(d: Difference) -> str:
    """Whether a difference clears the seed spread; with one seed per method, only whether the two checkpoints differ."""
    if d.seeds:
        return "yes" if d.significant else "no"
    return "one seed: checkpoints differ" if d.significant else "one seed: within noise"


def holm_family(n_tests: int, family: str) -> str:
    """A caption's words on which tests Holm's correction is over: one comparison in two tables can get two adjusted p."""
    return (
        f"Holm-adjusted p controls the family-wise error over a family of {n_tests} tests (Holm 1979): {family}; "
        "the same comparison in a table with another family has another adjusted p"
    )
