"""Batch sharpness (Andreyev & Beneventano 2024): E_B[g_Bᵀ H_B g_B / ‖g_B‖²] over mini-batches B.

The curvature of each mini-batch's own loss along its own gradient, averaged over mini-batches: the quantity
that, under SGD, settles at 2/η (the edge of stochastic stability) while the full-batch λ1 stays below it. Each
batch of the measurement set is one mini-batch (its size is the measurement set's batch size, so measure with
the training batch size); each takes one gradient and one Hessian-vector product of that batch alone. The mean
comes with its standard error and a 95% Student-t interval over the batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from landscape.engine.objective import Objective
from landscape.engine.progress import Progress
from landscape.inputs.batches import batch_size
from landscape.results import Result
from landscape.statistics import t_halfwidth


@dataclass(frozen=True)
class BatchSharpness(Result):
    """`value`: the mean over batches of g_Bᵀ H_B g_B / ‖g_B‖²; `stderr` and the 95% `ci` over batches (None for
    one batch); `batch_values` each batch's own; `batch_sizes` their samples."""

    value: float
    stderr: float | None
    ci: tuple[float, float] | None
    batch_values: np.ndarray
    batch_sizes: tuple[int, ...]
    n_matvecs: int
    seconds: float


def batch_sharpness(objective: Objective, progress: bool | str = False) -> BatchSharpness:
    """Batch sharpness over the objective's batches (Andreyev & Beneventano 2024), one gradient and one HVP each.

    Args:
        objective: the checkpoint's loss; each of its batches is one mini-batch.
        progress: progress display (True, False or "lines").

    Returns:
        The mean over batches with its standard error and interval, and each batch's value.

    Raises:
        ValueError: a batch whose gradient is zero (it has no direction to take the curvature along).
    """
    start = time.perf_counter()
    values, sizes = [], []
    with Progress(len(objective.batches), "batch sharpness", "batch", progress) as bar:
        for batch in objective.batches:
            alone = objective.restricted([batch])
            g = alone.grad()
            gg = float(g @ g)
            if not gg > 0:
                raise ValueError("batch sharpness: a batch's gradient is zero, so it has no direction to measure along")
            values.append(float(g @ alone.hvp(g)) / gg)
            sizes.append(batch_size(batch))
            bar.update(1)
    samples = np.asarray(values)
    n = len(samples)
    stderr = float(samples.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    half = float(t_halfwidth(samples)) if n > 1 else None
    mean = float(samples.mean())
    return BatchSharpness(
        value=mean,
        stderr=stderr,
        ci=None if half is None else (mean - half, mean + half),
        batch_values=samples,
        batch_sizes=tuple(sizes),
        n_matvecs=n,
        seconds=time.perf_counter() - start,
    )
