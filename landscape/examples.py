"""A toy problem with known answers, for trying the estimators and for their docstring examples.

`quadratic()` is the least-squares fit of a bias-free linear model y = w·x on two samples,
x = (2, 0) → 2 and x = (0, 1) → 1, at its minimum w = (1, 1). With the mean of the squared errors
as the loss, L(w) = ((2w₀ − 2)² + (w₁ − 1)²)/2, so the Hessian is diag(4, 1) everywhere: λ1 = 4,
tr H = 5, and every quadratic-order prediction (expected loss, worst case, ε-sharpness) is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from landscape.engine.objective import Objective
from landscape.inputs.batches import mean_squared_error


def quadratic() -> Objective:
    """The objective above, in float64 on the CPU, at its minimum (loss 0, Hessian diag(4, 1)).

    Returns:
        An Objective over the model's 2 weights.

    Examples:
        >>> from landscape.examples import quadratic
        >>> objective = quadratic()
        >>> objective.loss(), objective.n_params
        (0.0, 2)
    """
    model = nn.Linear(2, 1, bias=False)
    nn.init.ones_(model.weight)
    x, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0], [1.0]])
    return Objective(model, [(x, y)], loss=mean_squared_error, dtype=torch.float64, device="cpu")
