"""Curvature tracked during training: λ1 (and optionally the Hessian trace) of the training loss every few epochs.

Progressive sharpening and the edge of stability (Cohen et al. 2021) are read off λ1 over training.
Each measurement builds an Objective on a fixed subset of the training split (eval mode, the
training model itself, never its gradients or random state), and Lanczos starts from the previous
measurement's top eigenvector (`landscape.curvature.spectrum.WarmStart`, residual stopping rule). The trace, when asked, is XTrace with fixed probes.
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

TRACKED = ("eig", "trace")


@dataclass
class CurvatureTracker:
    """Measures one model repeatedly on fixed batches; keeps the last top eigenvector for the next warm start."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    measures: tuple[str, ...] = ("eig",)
    tol: float = 1e-3
    trace_matvecs: int = 30
    seed: int = 0
    device: torch.device | str = "cpu"
    distributed: bool = False  # `batches` is this rank's shard; products are summed over the ranks
    warm: WarmStart = field(default_factory=WarmStart, repr=False)

    def __post_init__(self) -> None:
        unknown = [m for m in self.measures if m not in TRACKED]
        if unknown or not self.measures:
            raise ValueError(f"--track takes a comma list of {', '.join(TRACKED)}; got {','.join(self.measures) or 'nothing'}")

    def measure(self, model: nn.Module) -> dict:
        """λ1 with its Lanczos residual (and the trace ± stderr), the HVPs spent and the seconds taken."""
        began = time.perf_counter()
        # double backward: a fresh Objective each time, where tracing a linearized gradient would cost more than it saves
        objective = Objective(
            model, self.batches, device=self.device, hvp_method="double-backward", hvp_check=False, distributed=self.distributed
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
