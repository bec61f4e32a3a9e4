"""relative-flatness: κ^φ_Tr = Σ_{s,s'} ⟨w_s, w_{s'}⟩ Tr H_{s,s'} of one weight (Petzka et al. 2021), exact or estimated."""

from __future__ import annotations

from analysis.measures.curvature import TRACE_METHODS
from analysis.measures.options import MetricSpec
from analysis.measures.record import Measure
from analysis.measures.solver_memory import hutchinson_block, sketch_fits, vector_bytes
from analysis.measures.text import Row, pm
from landscape.curvature.relative import EXACT_MATVECS, RelativeFlatness, relative_flatness
from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator
from landscape.results import Quantity


def relative(objective: Objective, spec: MetricSpec) -> RelativeFlatness:
    """The exact value in blocks of unit vectors that fit in memory, or the --trace-method estimate where it fits."""
    hessian = HessianOperator(objective)
    n, size = hessian.shape[0], vector_bytes(hessian)
    if spec.relative_flatness_method != "estimate":
        block = hutchinson_block(objective, n, size, EXACT_MATVECS)
    else:
        block = 1
        if spec.trace_method == "hutchinson":
            block = hutchinson_block(objective, n, size, spec.probes)
        else:
            sketch_fits(objective, spec.trace_method, spec.probes, n, size)
    return relative_flatness(
        objective,
        spec.relative_flatness_layer,
        method=spec.relative_flatness_method,
        trace=TRACE_METHODS[spec.trace_method],
        n_matvecs=spec.probes,
        block_size=block,
        hessian=hessian,
        seed=spec.seed,
        progress=spec.progress,
    )


def relative_rows(r: RelativeFlatness, name: str, products: str) -> list[Row]:
    d, m = r.shape
    if r.method == "exact":
        value, how = f"{r.value:.6g}", "exact"
    else:
        value = f"{pm(r.value, r.stderr)} [95% CI {r.ci[0]:.4g}, {r.ci[1]:.4g}]"
        how = f"{r.method} estimate (exact: {r.exact_matvecs} HVPs, --relative-flatness-method exact)"
    note = f"W = {r.layer} ({d}×{m}, rank {r.rank}), φ its input; {how}"
    return [("relative flatness κ^φ_Tr", value, f"{r.n_matvecs} HVPs, {r.seconds:.1f}s", note)]


def relative_quantities(r: RelativeFlatness, name: str) -> list[Quantity]:
    return [Quantity("κ^φ_Tr", r.value, r.stderr, name)]


MEASURES = (
    Measure(
        "relative-flatness",
        relative,
        RelativeFlatness,
        relative_rows,
        relative_quantities,
        options=("relative_flatness_layer", "relative_flatness_method", "trace_method", "probes"),
        scale_invariant=True,
    ),
)
