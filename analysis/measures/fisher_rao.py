"""fisher-rao: the Fisher–Rao norm ⟨w, F w⟩ of the measured weights (Liang et al. 2019), F the empirical Fisher."""

from __future__ import annotations

from analysis.measures.options import MetricSpec
from analysis.measures.record import Measure
from analysis.measures.text import Row
from landscape.curvature.fisher_rao import FisherRaoNorm, fisher_rao_norm
from landscape.engine.objective import Objective
from landscape.results import Quantity


def fisher_rao(objective: Objective, spec: MetricSpec) -> FisherRaoNorm:
    return fisher_rao_norm(objective)


def fisher_rao_rows(r: FisherRaoNorm, name: str, products: str) -> list[Row]:
    note = f"exact on the measurement set, F = (1/N)·Σ gᵢgᵢᵀ over {r.n_params} parameters"
    return [("Fisher–Rao norm ⟨w, Fw⟩", f"{r.value:.6g}", f"{r.n_matvecs} Fisher product, {r.seconds:.1f}s", note)]


def fisher_rao_quantities(r: FisherRaoNorm, name: str) -> list[Quantity]:
    return [Quantity("⟨w, Fw⟩", r.value, 0.0, name)]  # exact on the measurement set: no sampling error


MEASURES = (Measure("fisher-rao", fisher_rao, FisherRaoNorm, fisher_rao_rows, fisher_rao_quantities, scale_invariant=True),)
