"""Relative flatness κ^φ_Tr (Petzka, Kamp, Adilova, Sminchisescu & Boley 2021, "Relative flatness and generalization").

Petzka et al. split a network as f(x) = g(W φ(x)): φ(x) ∈ R^m is the representation some layer produces, W ∈ R^{d×m}
the weight of the layer that takes it, and its row w_s the weights into that layer's neuron s (a torch nn.Linear
weight, d outputs × m inputs). With H_{s,s'} the m×m block of the loss Hessian between rows s and s',

    κ^φ_Tr(w) = Σ_{s,s'} ⟨w_s, w_{s'}⟩ · Tr H_{s,s'}.

Rescaling the layer that produces φ by α > 0 and W by 1/α (a symmetry of ReLU networks) multiplies every ⟨w_s, w_{s'}⟩
by 1/α² and the Hessian block by α², so κ stays; ordinary Hessian measures move by α².

Row-major, W's coordinates are (s, t) ↦ s·m + t, and κ = tr((A ⊗ I_m) H_WW) with A = WWᵀ and H_WW the Hessian
block of W. With A = U Λ Uᵀ and F = U_r Λ_r^{1/2} over the r = rank(A) ≤ min(d, m) nonzero eigenvalues,
A ⊗ I_m = (F ⊗ I_m)(F ⊗ I_m)ᵀ, so κ = tr(B) for B = (F ⊗ I_m)ᵀ H_WW (F ⊗ I_m), a symmetric operator of size r·m:
its exact trace costs r·m Hessian-vector products, and any trace estimator of landscape.curvature.trace gives it with
a standard error for fewer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from landscape.curvature.blocks import BlockOperator
from landscape.curvature.trace import HUTCHINSON_BLOCK, TRACE_MATVEC_MINIMUMS, TraceResult, unit_trace, xtrace
from landscape.engine.checks import check_int
from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator, LinearOperator
from landscape.results import Result

METHODS = ("auto", "exact", "estimate")
EXACT_MATVECS = 1000  # "auto" computes κ exactly up to this many products (or n_matvecs, if more), estimates beyond


@dataclass(frozen=True)
class RelativeFlatness(Result):
    """κ^φ_Tr of the weight `layer` (`shape` d × m): `value` exact (`method` "exact", `stderr` 0) or a trace estimate
    (`method` its estimator) with its `stderr` and 95% `ci`; `rank` of WWᵀ, so the exact value costs rank·m products."""

    value: float
    stderr: float
    ci: tuple[float, float]
    method: str
    layer: str
    shape: tuple[int, int]
    rank: int
    n_matvecs: int
    seconds: float
    seed: int

    @property
    def exact_matvecs(self) -> int:
        """Products the exact value takes: rank(WWᵀ)·m."""
        return self.rank * self.shape[1]


class GramWeightedOperator(LinearOperator):
    """B = (F ⊗ I_m)ᵀ H_WW (F ⊗ I_m) on r·m-vectors, H_WW `op` on W's d·m coordinates (row-major) and F (d, r):
    tr(B) = tr((FFᵀ ⊗ I_m) H_WW), relative flatness for FFᵀ = WWᵀ."""

    def __init__(self, op: LinearOperator, factor: torch.Tensor, m: int) -> None:
        d, r = factor.shape
        if op.shape[0] != d * m:
            raise ValueError(f"the operator has size {op.shape[0]}, not the {d}·{m} coordinates of the weight")
        super().__init__(r * m, op.dtype, op.device)
        self.op, self.m = op, m
        self.factor = factor.to(dtype=op.dtype, device=op.device)

    def products(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[0]
        k, (d, r) = V.shape[0], self.factor.shape
        spread = torch.einsum("dr,krm->kdm", self.factor, V.reshape(k, r, self.m))  # (F ⊗ I_m) v, row by row
        out = self.op.products(spread.reshape(k, d * self.m)).reshape(k, d, self.m)
        return torch.einsum("dr,kdm->krm", self.factor, out).reshape(k, r * self.m)


def default_layer(objective: Objective) -> str:
    """The weight of the last nn.Linear module (in the model's module order) among the measured parameters: the
    classifier head of an MLP or CNN, whose input is the penultimate representation Petzka et al. measure.

    Raises:
        ValueError: no measured nn.Linear weight (name one with layer=).
    """
    measured = set(objective.layout.names)
    linear = [f"{n}.weight" if n else "weight" for n, m in objective.model.named_modules() if isinstance(m, nn.Linear)]
    found = [name for name in linear if name in measured]
    if not found:
        raise ValueError(
            f"the {type(objective.model).__name__} model has no nn.Linear weight among the measured parameters "
            f"(params={objective.param_selection!r}): name a 2-d weight with layer=..."
        )
    return found[-1]


def _weight(objective: Objective, layer: str) -> tuple[torch.Tensor, slice]:
    """The weight W named `layer` at the objective's point, and its slice of the flat vector."""
    slices = objective.layout.slices()
    if layer not in slices:
        weights = [n for n, s in zip(objective.layout.names, objective.layout.shapes) if len(s) == 2]
        known = dict(objective.model.named_parameters())
        why = "is not among the measured parameters" if layer in known else "is not a parameter of the model"
        raise ValueError(
            f"layer={layer!r} {why} (params={objective.param_selection!r}); its 2-d weights: {', '.join(weights) or 'none'}"
        )
    shape = objective.layout.shapes[objective.layout.names.index(layer)]
    if len(shape) != 2:
        raise ValueError(
            f"layer={layer!r} has shape {tuple(shape)}; relative flatness takes a 2-d weight (outputs × inputs), "
            "such as an nn.Linear layer's"
        )
    return objective.w[slices[layer]].reshape(shape), slices[layer]


def relative_flatness(
    objective: Objective,
    layer: str | None = None,
    *,
    method: str = "auto",
    trace: Callable[..., TraceResult] = xtrace,
    n_matvecs: int = 100,
    max_exact: int = EXACT_MATVECS,
    block_size: int = HUTCHINSON_BLOCK,
    hessian: LinearOperator | None = None,
    seed: int = 0,
    progress: bool | str = False,
) -> RelativeFlatness:
    """κ^φ_Tr(w) = Σ_{s,s'} ⟨w_s, w_{s'}⟩ Tr H_{s,s'} of one weight (Petzka et al. 2021), exactly or estimated.

    Args:
        objective: the checkpoint's loss; `layer` must be among its measured parameters.
        layer: the parameter name of W, the weight of the layer that takes the representation φ (rows: its neurons);
            default `default_layer`: the last nn.Linear weight, so φ is the penultimate layer's output.
        method: "exact" (rank(WWᵀ)·m Hessian-vector products), "estimate" (`trace` with `n_matvecs` products) or
            "auto": exact when that takes at most `max_exact` products (and at most `n_matvecs` would not do).
        trace: the trace estimator of the estimate: xtrace (default), hutchpp or hutchinson.
        n_matvecs: the estimate's budget of products.
        max_exact: the most products "auto" spends on the exact value.
        block_size: unit vectors per batched product of the exact value.
        hessian: the Hessian operator to use (default: HessianOperator(objective); a dense one in tests).
        seed: seed of the estimate's probes.
        progress: progress display (True, False or "lines").

    Returns:
        κ with its standard error and interval (zero width when exact), the layer, its rank and the cost.

    Raises:
        ValueError: an unknown method, a layer that is not a measured 2-d weight, W = 0, or a bad budget.

    Examples:
        Least squares L(w) = mean of (wx − y)² over the inputs e_1, e_2 of one neuron w: H = I, so κ = ‖w‖²·Tr I = 2·25:

        >>> from landscape.inputs.batches import mean_squared_error
        >>> model = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[3.0, 4.0]]))
        >>> x, y = torch.eye(2), torch.zeros(2, 1)
        >>> objective = Objective(model, [(x, y)], loss=mean_squared_error, dtype=torch.float64, device="cpu")
        >>> result = relative_flatness(objective)
        >>> result.layer, result.method, round(result.value, 10), result.n_matvecs
        ('weight', 'exact', 50.0, 2)
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose from {', '.join(METHODS)}")
    check_int("max_exact", max_exact, 0)
    start = time.perf_counter()
    layer = default_layer(objective) if layer is None else layer
    weight, part = _weight(objective, layer)
    d, m = weight.shape
    gram = (weight.double() @ weight.double().T).cpu().numpy()
    values, vectors = np.linalg.eigh(gram)
    keep = values > values.max() * max(d, m) * np.finfo(np.float64).eps
    if not keep.any():
        raise ValueError(f"layer={layer!r} is all zeros: its relative flatness is 0 by definition, and nothing to measure")
    factor = torch.as_tensor(vectors[:, keep] * np.sqrt(values[keep]))
    rank = int(keep.sum())
    full = hessian if hessian is not None else HessianOperator(objective)
    op = GramWeightedOperator(BlockOperator(full, part), factor, m)
    exact = method == "exact" or (method == "auto" and (rank * m <= max_exact or rank * m <= n_matvecs))
    if exact:
        found = unit_trace(op, block_size=block_size, progress=progress)
    else:
        smallest = TRACE_MATVEC_MINIMUMS.get(getattr(trace, "__name__", ""), 2)
        check_int("n_matvecs", n_matvecs, smallest)
        found = trace(op, n_matvecs, seed=seed, progress=progress)
    return RelativeFlatness(
        value=found.estimate,
        stderr=found.stderr,
        ci=found.ci,
        method=found.method,
        layer=layer,
        shape=(d, m),
        rank=rank,
        n_matvecs=found.n_matvecs,
        seconds=time.perf_counter() - start,
        seed=int(seed),
    )
