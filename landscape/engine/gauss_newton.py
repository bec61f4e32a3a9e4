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

Each product is one jvp and one vjp per batch (torch.func), with H_b applied in output space: for cross-entropy
on class labels in closed form, (diag(p) − ppᵀ)/n per sample, for any other loss as a jvp of the loss's gradient
w.r.t. the outputs; no Jacobian is ever formed. Under torch.distributed each rank sums its
batches and the products are all-reduced, as the Objective's HVPs are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vjp, vmap

from landscape.engine.hvp_paths import linearized
from landscape.engine.objective import ObjectiveError, cross_entropy
from landscape.inputs.batches import targets

if TYPE_CHECKING:
    from landscape.engine.objective import Objective

CURVATURES = ("hessian", "ggn", "fisher")
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CurvatureError(ObjectiveError):
    """The objective cannot define the requested curvature (e.g. no per-sample losses for the empirical Fisher)."""


def output_hessian_product(loss_fn: Callable, outputs: torch.Tensor, targets: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """H_ℓ uᵢ for each uᵢ in U (k, *outputs.shape), H_ℓ = ∇²_f loss_fn(f, targets) at f = outputs (jvp of the gradient).

    For the mean cross-entropy of n samples H_ℓ is block-diagonal with blocks (diag(p) − ppᵀ)/n, p = softmax(f).
    """
    gradient = grad(lambda f: loss_fn(f, targets))
    return vmap(lambda u: jvp(gradient, (outputs,), (u,))[1])(U)


def per_sample_loss_function(loss_fn: Callable) -> PerSampleLoss:
    """(outputs, targets) ↦ the vector of per-sample losses whose mean is `loss_fn(outputs, targets)`.

    The default loss (landscape.engine.objective.cross_entropy, or F.cross_entropy) has them in closed form; any other
    loss is evaluated on one sample at a time (vmap over the leading axis), which is exact for a loss that is a
    mean over samples — FisherOperator checks that the mean of these equals the batch loss.
    """
    if loss_fn is None:
        raise CurvatureError(
            "the empirical Fisher needs per-sample losses, and this objective's loss is not a mean "
            "over samples (a token-level or custom loss); pass per_sample_loss to FisherOperator"
        )
    if loss_fn in (cross_entropy, F.cross_entropy):
        return lambda outputs, targets: F.cross_entropy(outputs, targets, reduction="none")
    return vmap(lambda f, y: loss_fn(f[None], y[None]))


class JacobianSandwich:
    """V ↦ Σ_b s_b · J_bᵀ M_b(J_b vᵢ) for each row vᵢ of V (k, n), over an Objective's batches, all-reduced over ranks.

    J_b is the Jacobian of `function(w, batch)` (model outputs, or per-sample losses) at the objective's point,
    M_b(value, batch, JV) the middle factor in that function's output space, s_b the batch's weight. Per batch the
    function is linearized once (functionalized torch.func.linearize: a traced in-place op would otherwise
    corrupt later products; an eager jvp where it cannot be traced) and its vjp kept, so a product
    costs one tangent pass and one backward. `keep` holds these linearizations for every batch between calls
    (default: when the objective's HVP path keeps a graph for every batch, i.e. the whole set's graphs fit in its
    memory budget); otherwise each call recomputes them, batch by batch.
    """

    def __init__(
        self,
        objective: Objective,
        function: Callable,
        middle: Callable,
        weights: Sequence[float],
        keep: bool | None = None,
        factor: Callable | None = None,
    ) -> None:
        self.objective, self.function, self.middle, self.weights = objective, function, middle, list(weights)
        self.factor = factor  # (value, batch) ↦ per-item factors of the middle (`diagonal`); None: no exact diagonal
        plan = objective.memory_plan
        everything_kept = plan.path == "linearize" or (plan.path == "reuse" and plan.streamed_batches == 0)
        self.keep = everything_kept if keep is None else keep
        self._kept: list[_Linearization] | None = None

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        objective = self.objective
        V = V.to(device=objective.device, dtype=objective.dtype)
        if V.ndim != 2 or V.shape[1] != objective.n_params:
            raise ObjectiveError(f"probe block has shape {tuple(V.shape)}, expected (k, {objective.n_params})")
        if objective.model_dtype != torch.float16:
            return self._products(V)
        # float16: unit rows times the objective's loss scale, so small values do not flush to zero, backed off by
        # halves while the product overflows, as the objective's HVPs are
        norms = V.norm(dim=1, keepdim=True)
        norms = torch.where(norms > 0, norms, 1.0)
        unit = V / norms

        def scaled() -> torch.Tensor:
            scale = objective.loss_scale
            return self._products(unit * scale) * (norms / scale)

        return objective._backed_off(scaled, "generalized Gauss-Newton or Fisher product")

    def _products(self, V: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(V)
        for b, weight in enumerate(self.weights):
            total += weight * self._apply(self._linearization(b), V)
        return self.objective._reduced(total)

    def diagonal(self, chunk_bytes: int = 1 << 26) -> tuple[torch.Tensor, int]:
        """The exact diagonal Σ_b s_b·diag(J_bᵀ M_b J_b), and the vector-Jacobian products it took.

        M_b is block-diagonal over the batch's items, item i's block S_i S_iᵀ (`factor`: S of shape (n_b, d, r) for
        items of d outputs each, column c of S_i the cotangent that is zero outside item i). Then diag(J_bᵀ M_b J_b)
        = Σ_i Σ_c (J_bᵀ S_i e_c)²: one vjp per item and column, n_b·r per batch (r = classes for the GGN of
        cross-entropy, 1 for the empirical Fisher), batched by vmap in chunks of about `chunk_bytes` of output.
        J_b is the whole batch's Jacobian, so items that share batch statistics (train-mode BatchNorm) are exact too.
        """
        if self.factor is None:
            raise CurvatureError("this operator has no per-item factorization of its middle, so no exact diagonal")
        objective = self.objective
        w = objective.w.detach()
        total, n_vjps = torch.zeros_like(w), 0
        for weight, batch in zip(self.weights, objective.batches):
            value, pullback = vjp(lambda w: self.function(w, batch), w)
            S = self.factor(value.detach(), batch)  # (n_b, d, r)
            n_items, d, r = S.shape
            if value.numel() != n_items * d:
                raise CurvatureError(f"the middle's factor covers {n_items * d} outputs of the batch's {value.numel()}")
            cotangents = S.transpose(1, 2).reshape(n_items * r, d)  # row i·r + c: item i's column c
            chunk = max(1, chunk_bytes // (w.numel() * w.element_size()))
            for begin in range(0, n_items * r, chunk):
                rows = torch.arange(begin, min(begin + chunk, n_items * r), device=w.device)
                U = torch.zeros(len(rows), n_items, d, dtype=value.dtype, device=w.device)
                U[torch.arange(len(rows), device=w.device), rows // r] = cotangents[rows]
                JU = vmap(lambda u: pullback(u.reshape(value.shape))[0])(U)
                total += weight * JU.square().sum(0)
                n_vjps += len(rows)
        return objective._reduced(total), n_vjps

    def _linearization(self, b: int) -> _Linearization:
        if not self.keep:
            return self._linearize(b)
        if self._kept is None:
            self._kept = [self._linearize(i) for i in range(len(self.weights))]
        return self._kept[b]

    def _linearize(self, b: int) -> _Linearization:
        batch = self.objective.batches[b]
        w = self.objective.w.detach()

        def fn(w: torch.Tensor) -> torch.Tensor:
            return self.function(w, batch)

        value, pullback = vjp(fn, w)
        middle = partial(self.middle, value.detach(), batch)
        if self.objective.model_dtype == torch.float16:  # torch's float16 forward AD of LayerNorm gives NaN on the CPU
            return _Linearization(_transposed(pullback, value), pullback, middle)
        if self.keep:  # tracing pays off over many products
            return _Linearization(linearized(fn, w), pullback, middle)
        return _Linearization(lambda v: jvp(fn, (w,), (v,))[1], pullback, middle)

    @staticmethod
    def _apply(lin: _Linearization, V: torch.Tensor) -> torch.Tensor:
        """Jᵀ M(J vᵢ) for the rows of V, one probe at a time: faster per probe than vmap over a block on the
        digits MLP and ConvNet (5.4 vs 6.5 and 7.4 vs 8.4 ms for the GGN with 16 probes, one CPU thread)."""
        return torch.stack([lin.pullback(lin.middle(lin.tangent(v)[None])[0])[0] for v in V])


def _transposed(pullback: Callable, value: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """v ↦ J v as the transpose of the linear map u ↦ Jᵀ u (reverse over reverse): one more backward per
    product than forward mode, and no forward-mode kernels."""
    _, transpose = vjp(lambda u: pullback(u)[0], torch.zeros_like(value))
    return lambda v: transpose(v.to(value.dtype))[0]


@dataclass(frozen=True)
class _Linearization:
    tangent: Callable[[torch.Tensor], torch.Tensor]  # v ↦ J v
    pullback: Callable[[torch.Tensor], tuple[torch.Tensor]]  # u ↦ (Jᵀ u,)
    middle: Callable[[torch.Tensor], torch.Tensor]  # J V (k, *value.shape) ↦ M J V


def ggn(objective: Objective, keep: bool | None = None) -> JacobianSandwich:
    """G v = Σ_b (n_b/N)·J_bᵀ H_b J_b v, H_b the Hessian of the batch's mean loss w.r.t. its outputs (n_b its items)."""

    def outputs(w: torch.Tensor, batch) -> torch.Tensor:
        return objective._outputs(w, batch)

    closed_form: dict[int, tuple[torch.Tensor, bool]] = {}  # per batch's labels, checked once: the check syncs CUDA

    def middle(value: torch.Tensor, batch, JV: torch.Tensor) -> torch.Tensor:
        if objective.loss_fn is None:  # a loss over the whole batch (token-level, custom): its mean over the items
            return output_hessian_product(lambda f, b: objective._batch_mean(f, b)[0], value, batch, JV)
        y = targets(batch)
        known = closed_form.get(id(y))
        if known is None or known[0] is not y:
            known = closed_form[id(y)] = (y, objective.loss_fn in (cross_entropy, F.cross_entropy) and _class_indices(value, y))
        if known[1]:
            return _cross_entropy_hessian_product(value, JV)
        return output_hessian_product(objective.loss_fn, value, y, JV)

    def factor(value: torch.Tensor, batch) -> torch.Tensor:
        y = targets(batch) if objective.loss_fn is not None else None
        if y is None or objective.loss_fn not in (cross_entropy, F.cross_entropy) or not _class_indices(value, y):
            raise CurvatureError(
                "the exact GGN diagonal needs cross-entropy on class labels (its loss Hessian in closed form); "
                "estimate the diagonal instead (xdiag or hutchinson)"
            )
        return _cross_entropy_factor(value)

    return JacobianSandwich(objective, outputs, middle, objective.batch_weights, keep, factor)


def empirical_fisher(objective: Objective, per_sample_loss: PerSampleLoss, keep: bool | None = None) -> JacobianSandwich:
    """F v = (1/N) Σ_b J_ℓ,bᵀ J_ℓ,b v, J_ℓ,b the Jacobian of batch b's per-sample losses (each within its batch)."""

    def losses(w: torch.Tensor, batch) -> torch.Tensor:
        return per_sample_loss(objective._outputs(w, batch), targets(batch))

    def identity(value: torch.Tensor, batch, JV: torch.Tensor) -> torch.Tensor:
        return JV

    def unit(value: torch.Tensor, batch) -> torch.Tensor:  # M = I: item i's cotangent is e_i, and Jᵀe_i = g_i
        return torch.ones(len(value), 1, 1, dtype=value.dtype, device=value.device)

    weights = [1 / objective.n_samples] * len(objective.batches)
    return JacobianSandwich(objective, losses, identity, weights, keep, unit)


def _class_indices(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Logits (n, C) with integer labels in [0, C): the case cross-entropy's Hessian has a closed form for."""
    return (
        outputs.ndim == 2
        and targets.ndim == 1
        and not targets.is_floating_point()
        and bool(((targets >= 0) & (targets < outputs.shape[1])).all())
    )


def _cross_entropy_hessian_product(logits: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """(diag(p) − ppᵀ) u / n per sample, p = softmax(logits): the Hessian of mean cross-entropy w.r.t. the logits."""
    p = logits.softmax(dim=1)
    return (p * U - p * (p * U).sum(dim=-1, keepdim=True)) / len(logits)


def _cross_entropy_factor(logits: torch.Tensor) -> torch.Tensor:
    """S_i = (diag(√p) − p√pᵀ)/√n per sample, p = softmax(logits), shape (n, C, C): S_i S_iᵀ = (diag(p) − 2ppᵀ +
    p(Σp)pᵀ)/n = (diag(p) − ppᵀ)/n, the Hessian of mean cross-entropy w.r.t. sample i's logits."""
    p = logits.softmax(dim=1)
    root = p.sqrt()
    return (torch.diag_embed(root) - p[:, :, None] * root[:, None, :]) / math.sqrt(len(logits))


def check_per_sample_loss(objective: Objective, per_sample_loss: PerSampleLoss) -> None:
    """Raise CurvatureError unless the per-sample losses of the first batch average to the objective's batch loss."""
    if not objective.batches:
        return
    first = objective.batches[0]
    y = targets(first)
    with torch.no_grad():
        outputs = objective._outputs(objective.w, first)
        batch = objective._batch_mean(outputs, first)[0]
        try:
            items = per_sample_loss(outputs, y)
        except Exception as error:
            raise CurvatureError(
                f"the empirical Fisher needs per-sample losses and the loss function cannot be evaluated one sample at "
                f"a time ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); pass "
                "per_sample_loss=(outputs, targets) -> losses of shape (n,) to FisherOperator"
            ) from None
    if items.shape != (len(y),):
        raise CurvatureError(
            f"per-sample losses have shape {tuple(items.shape)}, expected ({len(y)},): one loss per "
            "sample; pass per_sample_loss to FisherOperator"
        )
    tolerance = 10 * math.sqrt(torch.finfo(objective.dtype).eps)
    if abs(float(items.mean() - batch)) > tolerance * max(1.0, abs(float(batch))):
        raise CurvatureError(
            f"the mean of the per-sample losses ({float(items.mean()):.6g}) is not the batch loss ({float(batch):.6g}): "
            "the empirical Fisher needs a loss that is a mean over samples; pass per_sample_loss to FisherOperator"
        )
