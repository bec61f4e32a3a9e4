"""`measure`: the one function that measures a checkpoint's Objective, and `Measurement`, what it returns.

Results stay typed from the estimator to the table: a `Measurement` holds each measure's Result, and becomes
a dict only when written as JSON (`to_dict`); `from_dict` makes a stored one (a results file being resumed)
typed again, each result by its measure's record.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from analysis.measures.notes import ResumeNote
from analysis.measures.options import MetricSpec
from analysis.measures.registry import MEASURES, is_scale_invariant
from analysis.measures.solver_memory import ProcessMemory, free_beside_hvps, process_memory
from landscape.curvature.blocks import PerLayerResult, parameter_blocks, per_layer
from landscape.engine.finite_difference import FiniteDifferenceErrors
from landscape.engine.hvp_check import HVPCheck
from landscape.engine.inner import LOCAL
from landscape.engine.memory import MemoryPlan
from landscape.engine.objective import Objective
from landscape.engine.operators import curvature_operator
from landscape.results import Result, to_jsonable

# a Measurement's own keys in its JSON; any other key is what a command recorded beside it (`context`)
_FIELDS = ("checkpoint", "setup", "loss", "accuracy", "grad_norm", "n_params", "metrics", "seconds")
_DIAGNOSTICS = ("hvp_check", "hvp_memory", "memory", "hvp_error")
_DIAGNOSTIC_TYPES = dict(zip(_DIAGNOSTICS, (HVPCheck, MemoryPlan, ProcessMemory, FiniteDifferenceErrors)))
_DERIVED = ("scale_invariant",)  # written from the results for a reader of the JSON, derived again when read back


@dataclass(frozen=True)
class Measurement:
    """One checkpoint's measurement: the set it was measured on (`setup`), loss, accuracy, gradient norm and each
    measure's typed result (`metrics`, in --metrics order), the per-layer curvature if asked, the seconds spent
    (over resumed runs too), the HVP path's self-check, its memory plan, the process's memory and the
    finite-difference errors (each typed; the JSON adds the plan's and the errors' one-line summaries, and
    `scale_invariant`: the measures whose values a function-preserving rescaling of ReLU layers leaves as they are),
    and `context`: what a command records beside it (track: the epoch and the
    checkpoint's recorded metrics; correlate: the generalization gaps)."""

    checkpoint: str
    setup: dict
    loss: float
    accuracy: float | None
    grad_norm: float
    n_params: int
    metrics: dict[str, Result] = field(default_factory=dict)
    seconds: float = 0.0
    per_layer: PerLayerResult | None = None
    hvp_check: HVPCheck | None = None
    hvp_memory: MemoryPlan | None = None
    memory: ProcessMemory | None = None
    hvp_error: FiniteDifferenceErrors | None = None
    context: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON a results file and --json hold (context's keys at the top level, as commands wrote them)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _FIELDS}
        out["metrics"] = {name: result.to_dict() for name, result in self.metrics.items()}
        out.update({name: getattr(self, name).to_dict() for name in _DIAGNOSTICS if getattr(self, name) is not None})
        for name in ("hvp_memory", "hvp_error"):  # one line a reader of the JSON sees, as the table prints it
            if name in out:
                out[name]["summary"] = getattr(self, name).describe()
        if self.per_layer is not None:
            out["per_layer"] = self.per_layer.to_dict()
        out["scale_invariant"] = [name for name, result in self.metrics.items() if is_scale_invariant(name, result)]
        return to_jsonable({**out, **self.context})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        """A stored measurement, each result typed again by its measure (unknown measures are refused by name)."""
        unknown = [name for name in data["metrics"] if name not in MEASURES]
        if unknown:
            raise ValueError(f"results of unknown measures {', '.join(unknown)} in a stored measurement of {data['checkpoint']}")
        per_layer = data.get("per_layer")
        return cls(
            **{name: data[name] for name in _FIELDS if name != "metrics"},
            metrics={name: MEASURES[name].revive(result) for name, result in data["metrics"].items()},
            per_layer=None if per_layer is None else PerLayerResult.from_dict(per_layer),
            **{name: None if data.get(name) is None else kind.from_dict(data[name]) for name, kind in _DIAGNOSTIC_TYPES.items()},
            context={k: v for k, v in data.items() if k not in (*_FIELDS, *_DIAGNOSTICS, *_DERIVED, "per_layer")},
        )

    def with_context(self, **values: Any) -> Measurement:
        return replace(self, context={**self.context, **values})


def measure_blocks(objective: Objective, spec: MetricSpec) -> PerLayerResult:
    """--per-layer: λ1, trace and density of each block (by module or by role) of the curvature
    (landscape.curvature.blocks)."""
    from analysis.measures.curvature import TRACE_METHODS

    return per_layer(
        curvature_operator(objective, spec.curvature),
        parameter_blocks(objective.model, objective.layout, spec.per_layer_by),
        list(spec.per_layer),
        tol=spec.tol,
        max_matvecs=spec.max_matvecs,
        trace=TRACE_METHODS[spec.trace_method],
        n_probes=spec.probes,
        density_runs=spec.density_runs,
        density_steps=spec.density_steps,
        free_bytes=free_beside_hvps(objective),
        seed=spec.seed,
        progress=spec.progress,
        grouping=spec.per_layer_by,
    )


def check_fits(spec: MetricSpec, params: str, n_params: int, n_samples: int | None = None) -> None:
    """Each chosen measure's options that must fit the model (--k and --subspace-dim at most the parameters
    measured, selected by --params `params`; --m at most the `n_samples` measured)."""
    for name in spec.metrics:
        check = MEASURES[name].check if name in MEASURES else None  # compare's surfaces are not measures
        if check is not None:
            check(spec, params, n_params, n_samples)


def measure(
    objective: Objective,
    spec: MetricSpec,
    checkpoint: str,
    *,
    previous: Measurement | None = None,
    saved: Callable[[Measurement], None] | None = None,
    setup: dict | None = None,
) -> Measurement:
    """Loss, accuracy, gradient norm and the chosen measures of one checkpoint's `objective`.

    `previous` is this checkpoint's measurement from an interrupted run: its results are kept, only the missing
    ones computed. `saved(measurement)` is called once the loss is known and after each measure. `setup`: what
    the objective was measured on, as describe() gives it (default: the objective's own, with the curvature).
    """
    start = time.perf_counter()
    if previous is None:
        evaluation = objective.evaluate()
        found = Measurement(
            checkpoint=checkpoint,
            setup=setup or {**objective.describe(), "curvature": spec.curvature},
            loss=evaluation.loss,
            accuracy=evaluation.accuracy,
            grad_norm=float(getattr(objective, "inner", LOCAL).norm(objective.grad())),
            n_params=objective.n_params,
        )
    else:
        found = previous
    spent = found.seconds  # by earlier, interrupted runs
    earlier = previous.hvp_error if previous is not None else None  # their finite-difference errors

    def save(current: Measurement) -> Measurement:
        changes: dict[str, Any] = {"seconds": spent + time.perf_counter() - start}
        if objective.hvp_check_result is not None:  # the path the HVPs took, after the run-time self-check
            changes["setup"] = {**current.setup, "hvp_method": objective.hvp_method}
            changes["hvp_check"] = objective.hvp_check_result
            changes["hvp_memory"] = objective.memory_plan
            changes["memory"] = process_memory(objective, list(current.metrics.values()))
        if objective.hvp_error is not None:  # finite differences: the steps taken and the largest error estimated
            errors = objective.hvp_error
            changes["hvp_error"] = errors.combined(earlier) if earlier is not None else errors
        current = replace(current, **changes)
        if saved is not None:
            saved(current)
        return current

    found = save(found)
    computed = []
    for name in spec.metrics:
        if name not in found.metrics:
            result = MEASURES[name].run(objective, spec)
            found = save(replace(found, metrics={**found.metrics, name: result}))
            computed.append(name)
    if spec.per_layer and found.per_layer is None:
        found = save(replace(found, per_layer=measure_blocks(objective, spec)))
        computed.append("per_layer")
    if previous is not None:  # a resumed table looks like a fresh one: say which numbers are from the file
        asked: Iterable[str] = (*spec.metrics, *(["per_layer"] if spec.per_layer else []))
        kept = ["loss", *(n for n in asked if n not in computed)]
        now = f"; computed now: {', '.join(computed)}" if computed else "; nothing recomputed"
        warnings.warn(ResumeNote(f"{checkpoint}: {', '.join(kept)} read back from the results file{now}"), stacklevel=2)
    return replace(found, metrics={name: found.metrics[name] for name in spec.metrics})
