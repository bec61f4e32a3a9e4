"""Curvature beyond the Hessian: generalized Gauss-Newton and empirical Fisher products of an Objective, matrix-free.

GGN (Schraudolph 2002; Martens 2020):   G = Σ_b c_b · J_bᵀ H_b J_b
    J_b the Jacobian of batch b's model outputs w.r.t. the flat parameters, H_b = ∇²_f loss_fn(f, y_b) the Hessian
    of the batch's mean loss w.r.t. those outputs, c_b = n_b / N: the Objective's own weighting, so G is the Hessian
    of L = Σ_b c_b ℓ_b with the model linearized at w (G = H for a model linear in w), and G is positive
    semi-definite whenever the loss is convex in the outputs (cross-entropy, squared error).
Empirical Fisher (Kunstner et al. 2019 on what it is and is not):   F = (1/N) Σ_i g_i g_iᵀ
    g_i the gradient of sample i's loss. With train-mode BatchNorm a sample's loss depends on the rest of its
    batch; ℓ_i is then sample i's loss inside its batch (batch statistics from the whole batch), and g_i its
    gradient — what the per-item losses of the objective's own forward pass give.

Each product is one jvp and one vjp per batch (torch.func), with H_b applied in output space as a jvp of the
loss's gradient w.r.t. the outputs; no Jacobian is ever formed. Under torch.distributed each rank sums its
batches and the products are all-reduced, as the Objective's HVPs are.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vjp, vmap

from landscape.objective import ObjectiveError, cross_entropy

if TYPE_CHECKING:
    from landscape.objective import Objective

CURVATURES = ("hessian", "ggn", "fisher")
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CurvatureError(ObjectiveError):
    """The objective cannot define the requested curvature (e.g. no per-sample losses for the empirical Fisher)."""


def output_hessian_product(loss_fn: Callable, outputs: torch.Tensor, targets: torch.Tensor,
                           U: torch.Tensor) -> torch.Tensor:
    """H_ℓ uᵢ for each uᵢ in U (k, *outputs.shape), H_ℓ = ∇²_f loss_fn(f, targets) at f = outputs (jvp of the gradient).

    For the mean cross-entropy of n samples H_ℓ is block-diagonal with blocks (diag(p) − ppᵀ)/n, p = softmax(f).
    """
    gradient = grad(lambda f: loss_fn(f, targets))
    return vmap(lambda u: jvp(gradient, (outputs,), (u,))[1])(U)


def per_sample_loss_function(loss_fn: Callable) -> PerSampleLoss:
    """(outputs, targets) ↦ the vector of per-sample losses whose mean is `loss_fn(outputs, targets)`.

    The default loss (landscape.objective.cross_entropy, or F.cross_entropy) has them in closed form; any other
    loss is evaluated on one sample at a time (vmap over the leading axis), which is exact for a loss that is a
    mean over samples — FisherOperator checks that the mean of these equals the batch loss.
    """
    if loss_fn in (cross_entropy, F.cross_entropy):
        return lambda outputs, targets: F.cross_entropy(outputs, targets, reduction="none")
    return vmap(lambda f, y: loss_fn(f[None], y[None]))


def ggn_products(objective: "Objective", V: torch.Tensor) -> torch.Tensor:
    """G vᵢ for each row vᵢ of V (k, n), summed over this rank's batches and all-reduced over the ranks."""
    V = _probes(objective, V)
    total = torch.zeros_like(V)
    for c, (x, y) in zip(objective.batch_weights, objective.batches):
        def middle(outputs: torch.Tensor, JV: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
            return output_hessian_product(objective.loss_fn, outputs, y, JV)

        total += c * _sandwich(lambda w, x=x: objective._outputs(w, x), objective.w.detach(), V, middle)
    return objective._reduced(total)


def fisher_products(objective: "Objective", V: torch.Tensor, per_sample_loss: PerSampleLoss) -> torch.Tensor:
    """F vᵢ = (1/N) J_ℓᵀ J_ℓ vᵢ for each row vᵢ of V (k, n), J_ℓ the Jacobian of the per-sample losses, all-reduced."""
    V = _probes(objective, V)
    total = torch.zeros_like(V)
    for x, y in objective.batches:
        def losses(w: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            return per_sample_loss(objective._outputs(w, x), y)

        total += _sandwich(losses, objective.w.detach(), V, lambda _, JV: JV)
    return objective._reduced(total) / objective.n_samples


def check_per_sample_loss(objective: "Objective", per_sample_loss: PerSampleLoss) -> None:
    """Raise CurvatureError unless the per-sample losses of the first batch average to the objective's batch loss."""
    if not objective.batches:
        return
    x, y = objective.batches[0]
    with torch.no_grad():
        outputs = objective._outputs(objective.w, x)
        batch = objective.loss_fn(outputs, y)
        try:
            items = per_sample_loss(outputs, y)
        except Exception as error:
            raise CurvatureError(
                f"the empirical Fisher needs per-sample losses and the loss function cannot be evaluated one sample at "
                f"a time ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); pass "
                "per_sample_loss=(outputs, targets) -> losses of shape (n,) to FisherOperator") from None
    if items.shape != (len(y),):
        raise CurvatureError(f"per-sample losses have shape {tuple(items.shape)}, expected ({len(y)},): one loss per "
                             "sample; pass per_sample_loss to FisherOperator")
    tolerance = 10 * math.sqrt(torch.finfo(objective.dtype).eps)
    if abs(float(items.mean() - batch)) > tolerance * max(1.0, abs(float(batch))):
        raise CurvatureError(
            f"the mean of the per-sample losses ({float(items.mean()):.6g}) is not the batch loss ({float(batch):.6g}): "
            "the empirical Fisher needs a loss that is a mean over samples; pass per_sample_loss to FisherOperator")


def _probes(objective: "Objective", V: torch.Tensor) -> torch.Tensor:
    V = V.to(device=objective.device, dtype=objective.dtype)
    if V.ndim != 2 or V.shape[1] != objective.n_params:
        raise ObjectiveError(f"probe block has shape {tuple(V.shape)}, expected (k, {objective.n_params})")
    return V


def _sandwich(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, V: torch.Tensor,
              middle: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Jᵀ M(J vᵢ) for each row vᵢ of V, J = ∂fn/∂w at w: one forward kept for the vjp, one jvp for all probes.

    Probes are batched with vmap; where an op has no batching rule (a custom autograd Function without
    one) they go one at a time.
    """
    value, pullback = vjp(fn, w)
    if len(V) > 1:
        try:
            JV = vmap(lambda v: jvp(fn, (w,), (v,))[1])(V)
            return vmap(pullback)(middle(value, JV))[0]
        except RuntimeError:  # an op without a batching rule
            pass
    return torch.stack([pullback(middle(value, jvp(fn, (w,), (v,))[1][None])[0])[0] for v in V])
