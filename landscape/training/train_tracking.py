"""Curvature tracked during training: λ1 (and optionally the Hessian trace) of the training loss every few steps.

Progressive sharpening and the edge of stability (Cohen et al. 2021) are read off λ1 over training.
Each measurement builds an Objective on fixed batches (eval mode, the training model as it is now,
never its gradients or random state), and Lanczos starts from the previous measurement's top
eigenvector (`landscape.curvature.spectrum.WarmStart`, residual stopping rule). The trace, when asked,
is XTrace with fixed probes. `landscape train --track-every N` uses it, and so can one's own loop
(`from landscape import CurvatureTracker`; docs/how-to/track-training.md): an Objective built once is a
copy of the weights of that moment, so measuring as training goes on takes a fresh one each time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from landscape.curvature.spectrum import WarmStart
from landscape.curvature.trace import xtrace
from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator
from landscape.inputs.batches import Batch, Loss

TRACKED = ("eig", "trace")


@dataclass
class CurvatureTracker:
    """Measures one model repeatedly on fixed batches; keeps the last top eigenvector for the next warm start.

    `measure(model)` after every N optimizer steps gives λ1 of the loss over `batches` at the weights of that
    moment (and the trace, with "trace" in `measures`); `loss` as for Objective (class cross-entropy by default).
    """

    batches: list[Batch]
    measures: tuple[str, ...] = ("eig",)
    tol: float = 1e-3
    trace_matvecs: int = 30
    seed: int = 0
    device: torch.device | str = "cpu"
    distributed: bool = False  # `batches` is this rank's shard; products are summed over the ranks
    loss: Loss | None = None
    warm: WarmStart = field(default_factory=WarmStart, repr=False)

    def __post_init__(self) -> None:
        unknown = [m for m in self.measures if m not in TRACKED]
        if unknown or not self.measures:
            raise ValueError(f"measures={tuple(self.measures)!r}: name one or more of {', '.join(TRACKED)}")

    def measure(self, model: nn.Module) -> dict:
        """λ1 of `model` as it is now, with its Lanczos residual (and the trace ± stderr), the HVPs spent and the seconds.

        Keys: lambda1, lambda1_residual, lambda1_hvps (and trace, trace_stderr), track_hvps, track_seconds.
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
        out.update(track_hvps=int(hvps), track_seconds=time.perf_counter() - began)
        return out
