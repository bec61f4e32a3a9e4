"""batch-sharpness: E_B[g_Bᵀ H_B g_B / ‖g_B‖²] over the measurement set's batches (Andreyev & Beneventano 2024)."""

from __future__ import annotations

from analysis.measures.options import MetricSpec
from analysis.measures.record import Measure
from analysis.measures.text import Row
from landscape.curvature.per_batch import BatchSharpness, batch_sharpness
from landscape.engine.objective import Objective
from landscape.results import Quantity


def batch(objective: Objective, spec: MetricSpec) -> BatchSharpness:
    return batch_sharpness(objective, progress=spec.progress)


def batch_rows(r: BatchSharpness, name: str, products: str) -> list[Row]:
    value = f"{r.value:.6g}" + ("" if r.ci is None else f" [95% CI {r.ci[0]:.4g}, {r.ci[1]:.4g}]")
    note = f"mean over {len(r.batch_values)} batches of ≤{max(r.batch_sizes)} samples (--batch-size: use training's)"
    return [("batch sharpness", value, f"{r.n_matvecs} HVPs and gradients, {r.seconds:.1f}s", note)]


def batch_quantities(r: BatchSharpness, name: str) -> list[Quantity]:  # the same batches for every checkpoint: paired
    return [Quantity("batch sharpness", r.value, r.stderr or 0.0, name, tuple(r.batch_values.tolist()))]


MEASURES = (Measure("batch-sharpness", batch, BatchSharpness, batch_rows, batch_quantities),)
