"""The Fisher–Rao norm ⟨w, F w⟩ (Liang, Poggio, Rakhlin & Stokes 2019), F the empirical Fisher of the measured loss.

Liang et al. propose it as a capacity measure that rescaling a ReLU network's layers cannot change. For a
bias-free ReLU network of L layers the output is homogeneous of degree L in the weights, so ⟨w, ∇_w ℓ⟩ =
L·⟨∂ℓ/∂f, f⟩ and ⟨w, F w⟩ = L²·(1/N)·Σ_i ⟨∂ℓ_i/∂f_i, f_i⟩²; tests/test_fisher_rao.py checks that identity.
Here F is the empirical Fisher (1/N)·Σ_i g_i g_iᵀ of landscape.engine.operators.FisherOperator, so the norm is
exact on the measurement set at the cost of one Fisher-vector product.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from landscape.engine.objective import Objective
from landscape.engine.operators import FisherOperator, LinearOperator
from landscape.results import Result


@dataclass(frozen=True)
class FisherRaoNorm(Result):
    """`value` = ⟨w, F w⟩ over the measured parameters, exact on the measurement set (one product, `n_matvecs`)."""

    value: float
    n_params: int
    n_matvecs: int
    seconds: float


def fisher_rao_norm(objective: Objective, fisher: LinearOperator | None = None) -> FisherRaoNorm:
    """⟨w, F w⟩ at the objective's weights (Liang et al. 2019), F the empirical Fisher (or the operator given).

    Args:
        objective: the checkpoint's loss; w are its measured parameters.
        fisher: the Fisher operator to use (default: FisherOperator(objective)).

    Returns:
        The norm, exact on the measurement set.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 2, bias=False)
        >>> batches = [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))]
        >>> objective = Objective(model, batches, dtype=torch.float64, device="cpu")
        >>> fisher_rao_norm(objective).value >= 0
        True
    """
    start = time.perf_counter()
    op = fisher if fisher is not None else FisherOperator(objective)
    w = objective.w.to(op.dtype)
    value = float(w @ op.matvec(w))
    return FisherRaoNorm(value, objective.n_params, 1, time.perf_counter() - start)
