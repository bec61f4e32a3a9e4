"""Every measure by name: the built-in ones, in the order tables list them, and any a user registers.

`register(Measure(...))` is the one line a new measure needs: measure, compare, track and correlate read
`MEASURES` when they build their parsers and when they run, so its name joins --metrics, its rows join the
table, its quantities join compare's differences and correlate's rankings, and its stored results revive.
"""

from __future__ import annotations

from analysis.measures import (
    balls,
    batch_sharpness,
    box,
    critical,
    curvature,
    diagonal,
    fisher_rao,
    noise,
    pac_bayes,
    preconditioned,
    relative_flatness,
)
from analysis.measures.record import Measure
from analysis.measures.text import EPSILON_SHARPNESS
from landscape.results import Quantity, Result

MEASURES: dict[str, Measure] = {}


def register(measure: Measure) -> Measure:
    """Add `measure` (its name must be new); returns it, so a module may keep it under a name."""
    if measure.name in MEASURES:
        raise ValueError(f"a measure named {measure.name!r} is registered already")
    MEASURES[measure.name] = measure
    return measure


def unregister(name: str) -> None:
    """Remove a registered measure (a test's toy measure, after the test)."""
    MEASURES.pop(name)


_BUILT_IN = {
    m.name: m
    for module in (
        curvature,
        noise,
        box,
        balls,
        critical,
        fisher_rao,
        batch_sharpness,
        preconditioned,
        pac_bayes,
        diagonal,
        relative_flatness,
    )
    for m in module.MEASURES
}
for _name in (
    "eig",
    "trace",
    "density",
    "expected-loss",
    "sharpness-curve",
    "eps-sharpness",
    "worst-case",
    "adaptive-worst-case",
    "m-sharpness",
    "adaptive-m-sharpness",
    "average-case",
    "adaptive-average-case",
    "critical-sharpness",
    "fisher-rao",
    "batch-sharpness",
    "preconditioned-sharpness",
    "pac-bayes",
    "pac-bayes-mag",
    "hessian-diagonal",
    "relative-flatness",
):
    register(_BUILT_IN[_name])


def compared_names() -> tuple[str, ...]:
    """The measures compare takes (besides its surfaces)."""
    return tuple(n for n, m in MEASURES.items() if m.compared)


def ranked_names() -> tuple[str, ...]:
    """The measures correlate ranks: compared ones with scalar quantities."""
    return tuple(n for n, m in MEASURES.items() if m.compared and m.scalar)


def shardable_names() -> tuple[str, ...]:
    """The measures --shard can take: the solvers on sharded vectors."""
    return tuple(n for n, m in MEASURES.items() if m.sharded)


def scale_invariant_names() -> tuple[str, ...]:
    """The measures whose value a function-preserving rescaling of two ReLU layers leaves unchanged."""
    return tuple(n for n, m in MEASURES.items() if m.scale_invariant)


def is_scale_invariant(name: str, result: Result) -> bool:
    """Whether this result of measure `name` is scale-invariant: its record says so, and an adaptive ball's η is 0
    (T = |w| + η scales with w only at η = 0)."""
    return MEASURES[name].scale_invariant and getattr(result, "eta", 0.0) == 0


def revive(name: str, stored: Result | dict) -> Result:
    """Measure `name`'s result, typed: a stored one (a results file, a cache) made its type again."""
    return MEASURES[name].revive(stored)


def metric_quantities(name: str, result: Result | dict) -> dict[str, Quantity]:
    """The scalar quantities of one measure's result, by label (empty for a measure with none, e.g. density)."""
    measure = MEASURES[name]
    return {q.label: q for q in measure.quantities(measure.revive(result), name)}


def is_lower_bound(label: str) -> bool:
    """Whether a quantity (by label) is the best loss an ascent found, a lower bound on a maximum, to be shown as such."""
    return label == EPSILON_SHARPNESS or (label in MEASURES and MEASURES[label].lower_bound)
