"""`Measure`: everything the toolkit knows of one measure, in one record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from analysis.measures.options import MetricSpec
from analysis.measures.text import Row
from landscape.engine.objective import Objective
from landscape.results import Quantity, Result


def no_quantities(result: Any, name: str) -> list[Quantity]:
    """A measure without scalar quantities (a spectral density): compare draws it, correlate cannot rank it."""
    return []


@dataclass(frozen=True)
class Measure:
    """One measure of `landscape measure` (and compare, track and correlate).

    name: its --metrics name. run(objective, spec): the estimator on one checkpoint's Objective, with the options
    of `spec` it reads (listed in `options`, MetricSpec's field names), returning a `result`-typed Result.
    rows(result, name, products): its rows of measure's table (quantity, value ± uncertainty, cost, note;
    `products` names the curvature's matrix-vector products). quantities(result, name): the scalar quantities
    compare, track and correlate read. check(spec, params, n_params, n_samples): options that must fit the model,
    run once the Objective exists. lower_bound: its values are the best an ascent found. compared: compare and
    correlate take it. sharded: --shard can measure it. scale_invariant: its value stays (to rounding, or within its
    uncertainty where it samples) when a ReLU layer is scaled by α > 0 and the next by 1/α, a change that leaves the
    network's function as it is (tests/test_scale_invariance.py checks every measure that says so).
    """

    name: str
    run: Callable[[Objective, MetricSpec], Result]
    result: type[Result]
    rows: Callable[[Any, str, str], list[Row]]
    quantities: Callable[[Any, str], list[Quantity]] = no_quantities
    options: tuple[str, ...] = ()
    check: Callable[[MetricSpec, str, int, int | None], None] | None = None
    lower_bound: bool = False
    compared: bool = True
    sharded: bool = False
    scale_invariant: bool = False

    @property
    def scalar(self) -> bool:
        """Whether it gives scalar quantities (correlate ranks only those)."""
        return self.quantities is not no_quantities

    def revive(self, stored: Result | dict) -> Result:
        """A stored result (a results file, a cache) made its type again."""
        return stored if isinstance(stored, Result) else self.result.from_dict(stored)
