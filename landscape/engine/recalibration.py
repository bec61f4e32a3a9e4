"""BatchNorm recalibration at perturbed weights: which inputs re-estimate the running statistics at each point.

Used by the perturbation measures (expected loss, sharpness curves) and by surfaces with `bn_recalibration=k`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from landscape.engine import distributed as ranks
from landscape.engine.checks import check_int
from landscape.engine.objective import Objective
from landscape.inputs.batches import Batch


def recalibration_inputs(
    objective: Objective, bn_recalibration: int, batches: Sequence[Batch] | None = None
) -> list[torch.Tensor]:
    """The inputs BN statistics are re-estimated from at each perturbed point: the first k batches.

    A data-parallel objective gathers the first k batches of the whole measurement set from the
    ranks that hold them, so every rank re-estimates the statistics one process would.
    """
    check_int("bn_recalibration", bn_recalibration, 1)
    if objective.mode != "eval":
        raise ValueError("bn_recalibration needs an eval-mode objective: in train mode BN already uses batch statistics")
    available = objective.n_batches if batches is None else len(batches)
    if available < bn_recalibration:
        raise ValueError(f"bn_recalibration = {bn_recalibration} batches, but only {available} are available")
    if batches is None and objective.distributed:
        local = [_inputs(b) for b in objective.batches]
        return [x.to(objective.device) for x in ranks.unshard(local, bn_recalibration)]
    return [_inputs(b) for b in list(objective.batches if batches is None else batches)[:bn_recalibration]]


def _inputs(batch: Batch):
    """What the model takes from a batch: x of an (x, y) pair, the batch itself (a dict of keyword arguments) else."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch
