"""The scalar quantities of each measure, typed, and the one place their labels are spelled.

A measure's result (an `EigResult`, a `SharpnessCurve`, ...) gives one or more `Quantity`s, each a value with
its uncertainty and label: compare's tables and differences, track's time series and correlate's rankings
read these. Dispatch is on the result's type; `metric` names the measure where one type serves several
(expected-loss and average-case both give an `ExpectedLoss`).
"""

from __future__ import annotations

from functools import singledispatch
from typing import Any

import numpy as np

from landscape.curvature.density import Spectrum
from landscape.curvature.spectrum import EigResult
from landscape.curvature.trace import TraceResult
from landscape.results import Quantity, Result
from landscape.sharpness.balls import MSharpness, WorstCase
from landscape.sharpness.box import EpsilonSharpness
from landscape.sharpness.perturb import ExpectedLoss, SharpnessCurve

# the result type of each metric of `landscape measure` (and compare, track, correlate)
METRIC_RESULTS: dict[str, type[Result]] = {
    "eig": EigResult,
    "trace": TraceResult,
    "density": Spectrum,
    "expected-loss": ExpectedLoss,
    "sharpness-curve": SharpnessCurve,
    "eps-sharpness": EpsilonSharpness,
    "worst-case": WorstCase,
    "adaptive-worst-case": WorstCase,
    "m-sharpness": MSharpness,
    "adaptive-m-sharpness": MSharpness,
    "average-case": ExpectedLoss,
    "adaptive-average-case": ExpectedLoss,
}


def noise_increase_label(radius: float) -> str:
    """The sharpness curve's quantity at radius a: E[L(w+u)] − L(w), u ~ U[−a, a]: "ΔL a=0.02"."""
    return f"ΔL a={radius:g}"


def eigenvalue_label(i: int) -> str:
    """The i-th (1-based) Lanczos eigenvalue: "λ1"."""
    return f"λ{i}"


EPSILON_SHARPNESS = "ε-sharpness"
LOWER_BOUND_RESULTS = (EpsilonSharpness, WorstCase, MSharpness)  # an ascent's best: a lower bound on a maximum


def is_lower_bound(label: str) -> bool:
    """Whether a quantity (by label) is the best loss an ascent found, a lower bound on a maximum, to be shown as such."""
    return label == EPSILON_SHARPNESS or METRIC_RESULTS.get(label) in LOWER_BOUND_RESULTS


def as_result(metric: str, result: Result | dict) -> Result:
    """`metric`'s result, typed: a stored one (a results file, a cache) made its type again."""
    return result if isinstance(result, Result) else METRIC_RESULTS[metric].from_dict(result)


def metric_quantities(metric: str, result: Result | dict) -> dict[str, Quantity]:
    """The scalar quantities of one metric's result, by label (empty for a measure with none, e.g. density)."""
    return {q.label: q for q in quantities(as_result(metric, result), metric)}


@singledispatch
def quantities(result: Any, metric: str) -> list[Quantity]:
    """The scalar quantities a result gives; none for types without any (a spectral density)."""
    return []


@quantities.register
def _(result: EigResult, metric: str) -> list[Quantity]:  # the Lanczos residual bounds each value
    return [
        Quantity(eigenvalue_label(i), float(v), float(r), metric)
        for i, (v, r) in enumerate(zip(result.values, result.residuals), 1)
    ]


@quantities.register
def _(result: TraceResult, metric: str) -> list[Quantity]:
    return [Quantity("trace", result.estimate, result.stderr, metric)]


@quantities.register
def _(result: SharpnessCurve, metric: str) -> list[Quantity]:  # the same noise draws for every checkpoint: paired
    return [
        Quantity(
            noise_increase_label(float(p.radius)),
            p.increase,
            p.stderr,
            metric,
            tuple((np.asarray(p.samples) - p.clean_loss).tolist()),
        )
        for p in result.points
    ]


@quantities.register
def _(result: EpsilonSharpness, metric: str) -> list[Quantity]:
    # a best-of-starts maximum has no standard error: how much the start mattered stands in
    return [Quantity(EPSILON_SHARPNESS, result.value, result.spread, metric)]


@quantities.register
def _(result: WorstCase, metric: str) -> list[Quantity]:
    return [Quantity(metric, result.value, result.spread, metric)]


@quantities.register
def _(result: MSharpness, metric: str) -> list[Quantity]:  # the same batches for every checkpoint: paired per batch
    return [Quantity(metric, result.value, result.stderr or 0.0, metric, tuple(np.asarray(result.batch_values).tolist()))]


@quantities.register
def _(result: ExpectedLoss, metric: str) -> list[Quantity]:
    if metric == "expected-loss":  # measure's single-radius row; compare's quantity is the sharpness curve's
        return []
    samples = tuple((np.asarray(result.samples) - result.clean_loss).tolist())  # the same draws for every checkpoint
    return [Quantity(metric, result.increase, result.stderr, metric, samples)]
