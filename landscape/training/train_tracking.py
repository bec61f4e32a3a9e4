"""Curvature tracked during training: λ1, the Hessian trace, critical, batch and preconditioned sharpness of the
training loss every few steps.

Progressive sharpening and the edge of stability (Cohen et al. 2021) are read off λ1 over training.
Each measurement builds an Objective on fixed batches (eval mode, the training model as it is now,
never its gradients or random state), and Lanczos starts from the previous measurement's top
eigenvector (`landscape.curvature.spectrum.WarmStart`, residual stopping rule). The trace, when asked,
is XTrace with fixed probes. Critical sharpness (Kalra et al. 2026) takes about 30 forward passes along −∇L;
batch sharpness (Andreyev & Beneventano 2024) re-cuts the tracked samples into batches of the training batch
size; preconditioned sharpness λ1(P⁻¹H) (Cohen et al. 2022) reads P from the optimizer passed to `measure`,
warm-started like λ1, and is left out before the optimizer's first step and while its learning rate is 0 (a schedule's
last step). `landscape train --track-every N` uses it, and so can one's own loop
(`from landscape import CurvatureTracker`; docs/how-to/track-training.md): an Objective built once is a
copy of the weights of that moment, so measuring as training goes on takes a fresh one each time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from landscape.curvature.per_batch import batch_sharpness
from landscape.curvature.preconditioned import preconditioned_sharpness, preconditioner_of
from landscape.curvature.spectrum import WarmStart
from landscape.curvature.trace import xtrace
from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator
from landscape.inputs.batches import Batch, Loss
from landscape.sharpness.critical import critical_sharpness

TRACKED = ("eig", "trace", "critical-sharpness", "batch-sharpness", "preconditioned-sharpness")


@dataclass
class CurvatureTracker:
    """Measures one model repeatedly on fixed batches; keeps the last top eigenvector for the next warm start.

    `measure(model)` after every N optimizer steps gives λ1 of the loss over `batches` at the weights of that
    moment (and the trace, with "trace" in `measures`, and the others of TRACKED); `loss` as for Objective (class
    cross-entropy by default). `batch_size`: the training batch size batch sharpness cuts the samples into.
    """

    batches: list[Batch]
    measures: tuple[str, ...] = ("eig",)
    tol: float = 1e-3
    trace_matvecs: int = 30
    seed: int = 0
    device: torch.device | str = "cpu"
    distributed: bool = False  # `batches` is this rank's shard; products are summed over the ranks
    loss: Loss | None = None
    batch_size: int | None = None
    warm: WarmStart = field(default_factory=WarmStart, repr=False)

    def __post_init__(self) -> None:
        unknown = [m for m in self.measures if m not in TRACKED]
        if unknown or not self.measures:
            raise ValueError(f"measures={tuple(self.measures)!r}: name one or more of {', '.join(TRACKED)}")
        if self.distributed and "batch-sharpness" in self.measures:
            raise ValueError("batch sharpness is not tracked data-parallel: each rank would hold pieces of every batch")
        if "batch-sharpness" in self.measures:
            self.training_batches = _recut(self.batches, self.batch_size)

    def measure(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """λ1 of `model` as it is now, with its Lanczos residual (and the others asked), the HVPs spent and the seconds.

        Keys: lambda1, lambda1_residual, lambda1_hvps; trace, trace_stderr; critical_sharpness,
        critical_sharpness_forwards; batch_sharpness, batch_sharpness_stderr; preconditioned_sharpness,
        preconditioned_sharpness_residual, preconditioned_threshold (once `optimizer` has stepped, at a learning rate
        above 0); track_hvps,
        track_seconds.
        """
        began = time.perf_counter()
        # double backward: a fresh Objective each time, where tracing a linearized gradient would cost more than it saves
        objective = Objective(
            model,
            self.batches,
            loss=self.loss,
            device=self.device,
            hvp_method="double-backward",
            hvp_check=False,
            distributed=self.distributed,
        )
        op = HessianOperator(objective)
        out: dict = {}
        hvps = 0
        if "eig" in self.measures:
            eig = self.warm.lanczos(op, 1, tol=self.tol, seed=self.seed)
            out.update(lambda1=float(eig.values[0]), lambda1_residual=float(eig.residuals[0]), lambda1_hvps=int(eig.n_matvecs))
            hvps += eig.n_matvecs
        if "trace" in self.measures:
            trace = xtrace(op, self.trace_matvecs, seed=self.seed)
            out.update(trace=float(trace.estimate), trace_stderr=float(trace.stderr))
            hvps += trace.n_matvecs
        if "critical-sharpness" in self.measures:
            critical = critical_sharpness(objective)
            out.update(critical_sharpness=critical.value, critical_sharpness_forwards=critical.n_forward)
        if "batch-sharpness" in self.measures:
            per_batch = batch_sharpness(
                Objective(
                    model,
                    self.training_batches,
                    loss=self.loss,
                    device=self.device,
                    hvp_method="double-backward",
                    hvp_check=False,
                )
            )
            out.update(batch_sharpness=per_batch.value, batch_sharpness_stderr=per_batch.stderr)
            hvps += per_batch.n_matvecs
        # P and the threshold 2/η·(…) exist once the optimizer has stepped, and while its learning rate is not 0
        stepping = optimizer is not None and optimizer.state and all(g["lr"] > 0 for g in optimizer.param_groups)
        if "preconditioned-sharpness" in self.measures and stepping:
            adaptive = preconditioned_sharpness(
                objective,
                preconditioner_of(optimizer, model),
                tol=self.tol,
                seed=self.seed,
                warm_start=self.warm.named("preconditioned-sharpness"),
            )
            out.update(
                preconditioned_sharpness=adaptive.value,
                preconditioned_sharpness_residual=float(adaptive.spectrum.residuals[0]),
                preconditioned_threshold=adaptive.threshold,
            )
            hvps += adaptive.spectrum.n_matvecs
        out.update(track_hvps=int(hvps), track_seconds=time.perf_counter() - began)
        return out


def _recut(batches: list[Batch], size: int | None) -> list[Batch]:
    """The (inputs, labels) batches' samples again, in batches of `size` (None: as they are); a last short one kept."""
    if size is None:
        return batches
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]
