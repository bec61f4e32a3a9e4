"""Linear operators on flat parameter vectors: the Hessian of an Objective, or a dense matrix.

Estimators (spectrum.py, trace.py) only use `matvec`, `matmat`, `shape`, `dtype`
and `device`, so they run on a HessianOperator and on a DenseOperator in tests alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse.linalg as spla
import torch

if TYPE_CHECKING:
    from landscape.objective import Objective


class LinearOperator:
    """A symmetric linear operator on vectors of length `n` (torch tensors)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = (n, n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """A @ v for a vector of shape (n,)."""
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """A @ V for a block of probes of shape (n, k)."""
        raise NotImplementedError

    def to_scipy(self) -> spla.LinearOperator:
        """A float64 scipy LinearOperator view, for cross-checks with scipy.sparse.linalg."""

        def apply(x: np.ndarray) -> np.ndarray:
            X = torch.as_tensor(np.asarray(x).reshape(self.shape[0], -1), dtype=self.dtype, device=self.device)
            return self.matmat(X).double().cpu().numpy().reshape(np.shape(x))

        return spla.LinearOperator(self.shape, matvec=apply, matmat=apply, rmatvec=apply, dtype=np.float64)


class DenseOperator(LinearOperator):
    """A dense symmetric matrix as an operator (ground truth in tests, small problems)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator needs a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[1]
        return self.matrix @ V


class HessianOperator(LinearOperator):
    """H = ∇²L(w) of an Objective at its point, applied through exact Hessian-vector products."""

    def __init__(self, objective: "Objective") -> None:
        super().__init__(objective.n_params, objective.dtype, objective.device)
        self.objective = objective

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[1]
        return self.objective.hvp_batched(V.T).T


class DiagonalScaledOperator(LinearOperator):
    """D·A·D for a diagonal D = diag(d): e.g. tr(DHD), the curvature that weight-scaled noise sees (SmoothOut)."""

    def __init__(self, op: LinearOperator, diagonal: torch.Tensor) -> None:
        if diagonal.shape != (op.shape[0],):
            raise ValueError(f"diagonal has shape {tuple(diagonal.shape)}, expected ({op.shape[0]},)")
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op
        self.diagonal = diagonal.to(dtype=op.dtype, device=op.device).reshape(-1, 1)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[1]
        return self.diagonal * self.op.matmat(self.diagonal * V)
