"""Critical sharpness (Kalra et al. 2026): λ_c = 2/η_c, η_c the smallest step along the update at which the loss rises.

Along the gradient-descent update w − η∇L, the loss first falls and then, past η_c, rises above L(w). On a
quadratic, L(w − η g) − L(w) = −η gᵀg + ½η² gᵀHg, so η_c = 2 gᵀg / gᵀHg and λ_c = gᵀHg / gᵀg: the curvature
along the gradient, which the learning rate η must keep below 2/η for a step to descend. On a network it takes
only forward passes: a step that doubles until the loss rises, then bisection of the bracket. The result is
that bracket, an interval that holds λ_c whatever the noise of a sampled estimate would be: the loss at the
lower step is at most L(w), at the upper step above it. Where the loss rises, falls and rises again along the
line, the bracket holds a crossing the doubling found, the first one only if no rise lies between two doublings.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from landscape.engine.checks import check_int, check_number
from landscape.engine.inner import LOCAL
from landscape.engine.objective import Objective
from landscape.engine.progress import Progress
from landscape.results import Result


@dataclass(frozen=True)
class CriticalSharpness(Result):
    """λ_c = 2/η_c along −∇L: `value` from the bracket's geometric middle, `lower` = 2/η_high and `upper` = 2/η_low
    bound it (L(w − η_low g) ≤ L(w) < L(w − η_high g)); `grad_norm` ‖g‖ of the measured loss; `loss` L(w)."""

    value: float
    lower: float
    upper: float
    eta_low: float
    eta_high: float
    loss: float
    grad_norm: float
    n_forward: int
    seconds: float
    rtol: float


def critical_sharpness(
    objective: Objective,
    *,
    rtol: float = 1e-3,
    max_doublings: int = 60,
    progress: bool | str = False,
) -> CriticalSharpness:
    """λ_c = 2/η_c along the gradient-descent update (Kalra et al. 2026), bracketed to a relative width `rtol`.

    Args:
        objective: the loss and its gradient at the checkpoint's weights.
        rtol: stop bisecting when η_high/η_low ≤ 1 + rtol (λ_c's bracket is as narrow, relatively).
        max_doublings: the most times the first step is doubled (or halved) to bracket the rise.
        progress: progress display (True, False or "lines").

    Returns:
        The bracket and its middle, with the forward passes spent.

    Raises:
        ValueError: a zero gradient (no update direction), or no rise within the doublings.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from landscape.inputs.batches import mean_squared_error
        >>> model = nn.Linear(2, 1, bias=False)  # L(w) = ((2w₀)² + w₁²)/2: Hessian diag(4, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 0.0]]))  # the gradient lies along eigenvalue 4
        >>> x, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0], [0.0]])
        >>> objective = Objective(model, [(x, y)], loss=mean_squared_error, dtype=torch.float64, device="cpu")
        >>> round(critical_sharpness(objective).value, 2)
        4.0
    """
    rtol = check_number("rtol", rtol, allow_zero=False)
    check_int("max_doublings", max_doublings, 1)
    start = time.perf_counter()
    w = objective.w
    g = objective.grad()
    grad_norm = float(getattr(objective, "inner", LOCAL).norm(g))  # a sharded rank's piece counts once
    if not grad_norm > 0 or not math.isfinite(grad_norm):
        raise ValueError(f"critical sharpness needs a nonzero, finite gradient to step along; its norm is {grad_norm:g}")
    loss0 = objective.loss()
    n_forward = 1

    def rises(eta: float) -> bool:
        nonlocal n_forward
        n_forward += 1
        return objective.loss(w - eta * g) > loss0

    # the first step moves the loss by ≈ η‖g‖², far above the rounding of L(w) in the objective's precision
    eps = torch.finfo(objective.dtype).eps
    eta = 1e3 * eps * max(abs(loss0), 1.0) / grad_norm**2
    with Progress(2 * max_doublings, "critical sharpness", "forward", progress) as bar:
        low = high = None
        for _ in range(max_doublings):
            bar.update(1)
            if rises(eta):
                high = eta
                break
            low, eta = eta, 2 * eta
        if high is None:
            raise ValueError(
                f"the loss did not rise along the gradient up to a step of {low:g} ({max_doublings} doublings): "
                f"critical sharpness is below {2 / low:g}"
            )
        if low is None:  # it rose at the first step: halve until it does not
            for _ in range(max_doublings):
                bar.update(1)
                eta /= 2
                if not rises(eta):
                    low = eta
                    break
                high = eta
            if low is None:
                raise ValueError(f"the loss rose along the gradient at every step down to {eta:g}: no descent to bracket")
        while high / low > 1 + rtol:
            bar.update(1)
            middle = math.sqrt(low * high)
            if rises(middle):
                high = middle
            else:
                low = middle
    eta_c = math.sqrt(low * high)
    return CriticalSharpness(
        value=2 / eta_c,
        lower=2 / high,
        upper=2 / low,
        eta_low=low,
        eta_high=high,
        loss=loss0,
        grad_norm=grad_norm,
        n_forward=n_forward,
        seconds=time.perf_counter() - start,
        rtol=rtol,
    )
