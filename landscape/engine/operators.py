"""Linear operators on flat parameter vectors: the Hessian, GGN or empirical Fisher of an Objective, or a dense matrix.

Estimators (spectrum.py, trace.py) only use `matvec`, `products`, `shape`, `dtype`
and `device`, so they run on a HessianOperator, a GGNOperator, a FisherOperator and on
a DenseOperator in tests alike.

Probe blocks are ROWS, everywhere in the engine: `products(V)` takes V of shape (k, n), one probe
vᵢ per row, and returns the (k, n) block whose row i is A vᵢ (for a symmetric A that is V A, so a
block of rows needs no transposes: Objective.hvp_batched, the GGN/Fisher products, the Lanczos
basis and the trace estimators' probes and bases all hold one vector per row). `matvec(v)` is the
single-vector case, v of shape (n,). The one place that meets the column convention of scipy
(A @ X for X of shape (n, k)) is `LinearOperator.to_scipy`, which transposes there, once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from landscape.engine.gauss_newton import (
    CURVATURES,
    PerSampleLoss,
    check_per_sample_loss,
    empirical_fisher,
    ggn,
    per_sample_loss_function,
)
from landscape.engine.inner import LOCAL, InnerProduct

if TYPE_CHECKING:
    import scipy.sparse.linalg as spla

    from landscape.engine.objective import Objective


class LinearOperator:
    """A symmetric linear operator on vectors of length `n` (torch tensors).

    `inner` sums the dot products of its vectors: LOCAL for whole vectors; for an operator on sharded parameters,
    each rank holds `length` entries of every vector and `inner` sums partial products over the ranks.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, inner: InnerProduct = LOCAL) -> None:
        self.shape = (n, n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_matvecs = 0
        self.inner = inner

    @property
    def length(self) -> int:
        """Entries of each vector held in this process: n, or this rank's share of a sharded vector."""
        return getattr(self.inner, "length", self.shape[0])

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """A @ v for a vector of shape (n,)."""
        return self.products(v.reshape(1, -1)).reshape(-1)

    def products(self, V: torch.Tensor) -> torch.Tensor:
        """A vᵢ for each row vᵢ of a block of probes V of shape (k, n): the (k, n) block of products (rows)."""
        raise NotImplementedError

    def exact_diagonal(self) -> tuple[torch.Tensor, int]:
        """diag(A) exactly, and the backward passes it took, where the operator has a cheaper way than n products
        (a dense matrix; the GGN and the Fisher through their factors); else a ValueError."""
        raise ValueError(
            f"{type(self).__name__} has no exact diagonal cheaper than {self.shape[0]} products; estimate it (xdiag, hutchinson)"
        )

    def to_scipy(self) -> spla.LinearOperator:
        """A float64 scipy LinearOperator view, for cross-checks with scipy.sparse.linalg."""
        import scipy.sparse.linalg as spla  # here, not at the top: ~0.5 s that the CLI's start-up should not pay

        def apply(x: np.ndarray) -> np.ndarray:
            # scipy hands a vector (n,) or columns (n, k): the one transpose to and from the engine's rows
            X = torch.as_tensor(np.asarray(x).reshape(self.shape[0], -1), dtype=self.dtype, device=self.device)
            return self.products(X.T).T.double().cpu().numpy().reshape(np.shape(x))

        return spla.LinearOperator(self.shape, matvec=apply, matmat=apply, rmatvec=apply, dtype=np.float64)


class DenseOperator(LinearOperator):
    """A dense symmetric matrix as an operator (ground truth in tests, small problems)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def products(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[0]
        return V @ self.matrix.T  # row i: A vᵢ

    def exact_diagonal(self) -> tuple[torch.Tensor, int]:
        return self.matrix.diagonal().clone(), 0


class HessianOperator(LinearOperator):
    """H = ∇²L(w) of an Objective at its point, applied through exact Hessian-vector products."""

    def __init__(self, objective: Objective) -> None:
        super().__init__(objective.n_params, objective.dtype, objective.device, getattr(objective, "inner", LOCAL))
        self.objective = objective

    def products(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[0]
        return self.objective.hvp_batched(V)


class GGNOperator(LinearOperator):
    """G = Σ_b (n_b/N)·J_bᵀ H_b J_b, the generalized Gauss-Newton matrix of an Objective (Schraudolph 2002).

    One jvp and one vjp of the model per batch, the loss Hessian applied in output space (landscape.engine.gauss_newton);
    `keep`: hold each batch's linearization between products (default: when the objective's HVP path keeps a graph).
    """

    def __init__(self, objective: Objective, keep: bool | None = None) -> None:
        super().__init__(objective.n_params, objective.dtype, objective.device)
        self.objective = objective
        self.sandwich = ggn(objective, keep)

    def products(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[0]
        return self.sandwich(V)

    def exact_diagonal(self) -> tuple[torch.Tensor, int]:
        """(1/N)·Σ_i Σ_c (J_iᵀ S_i e_c)², S_i S_iᵀ the cross-entropy Hessian of sample i: N·C backward passes."""
        return self.sandwich.diagonal()


class FisherOperator(LinearOperator):
    """F = (1/N) Σ_i g_i g_iᵀ, the empirical Fisher of an Objective (g_i: gradient of sample i's loss in its batch).

    `per_sample_loss(outputs, targets)` gives the losses whose mean is the objective's batch loss; by default
    closed-form for cross-entropy, else the loss evaluated one sample at a time (checked on the first batch).
    """

    def __init__(self, objective: Objective, per_sample_loss: PerSampleLoss | None = None, keep: bool | None = None) -> None:
        super().__init__(objective.n_params, objective.dtype, objective.device)
        self.objective = objective
        self.per_sample_loss = per_sample_loss or per_sample_loss_function(objective.loss_fn)
        check_per_sample_loss(objective, self.per_sample_loss)
        self.sandwich = empirical_fisher(objective, self.per_sample_loss, keep)

    def products(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[0]
        return self.sandwich(V)

    def exact_diagonal(self) -> tuple[torch.Tensor, int]:
        """(1/N)·Σ_i g_i², from N backward passes (one per sample's loss)."""
        return self.sandwich.diagonal()


def curvature_operator(objective: Objective, curvature: str = "hessian") -> LinearOperator:
    """The operator of `curvature` (hessian, ggn or fisher) on an Objective."""
    kinds = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": FisherOperator}
    if curvature not in kinds:
        raise ValueError(f"unknown curvature {curvature!r}; use one of {', '.join(CURVATURES)}")
    return kinds[curvature](objective)


class DiagonalScaledOperator(LinearOperator):
    """D·A·D for a diagonal D = diag(d): e.g. tr(DHD), the curvature that weight-scaled noise sees (SmoothOut)."""

    def __init__(self, op: LinearOperator, diagonal: torch.Tensor) -> None:
        if diagonal.shape != (op.shape[0],):
            raise ValueError(f"diagonal has shape {tuple(diagonal.shape)}, expected ({op.shape[0]},)")
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op
        self.diagonal = diagonal.to(dtype=op.dtype, device=op.device)

    def products(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[0]
        return self.diagonal * self.op.products(self.diagonal * V)
