"""critical-sharpness: λ_c = 2/η_c along the gradient-descent update (Kalra et al. 2026), as a bracket."""

from __future__ import annotations

from analysis.measures.options import MetricSpec
from analysis.measures.record import Measure
from analysis.measures.text import Row
from landscape.engine.objective import Objective
from landscape.results import Quantity
from landscape.sharpness.critical import CriticalSharpness, critical_sharpness


def critical(objective: Objective, spec: MetricSpec) -> CriticalSharpness:
    return critical_sharpness(objective, progress=spec.progress)


def critical_rows(r: CriticalSharpness, name: str, products: str) -> list[Row]:
    value = f"{r.value:.6g} [bracket {r.lower:.6g}, {r.upper:.6g}]"
    note = f"2/η_c, η_c the step along −∇L where the loss rises above L(w) (in [{r.eta_low:.4g}, {r.eta_high:.4g}])"
    return [("critical sharpness λ_c", value, f"{r.n_forward} forwards, {r.seconds:.1f}s", note)]


def critical_quantities(r: CriticalSharpness, name: str) -> list[Quantity]:
    # no sampling noise: the bracket's half-width stands in for the uncertainty
    return [Quantity("λ_c", r.value, (r.upper - r.lower) / 2, name)]


MEASURES = (Measure("critical-sharpness", critical, CriticalSharpness, critical_rows, critical_quantities),)
