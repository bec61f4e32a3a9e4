"""The Hessian-vector product paths of an Objective, each a function `(objective, V) → H V` chosen by name in HVP_PATHS.

Each takes the probes as the rows of V (k, n) and returns this rank's share of H vᵢ for each row (Objective.hvp_batched
sums the ranks and runs the self-check, landscape.engine.hvp_check). Exact paths compute H v at the cost of a few
gradients without forming H (Pearlmutter 1994, "Fast exact multiplication by the Hessian", Neural Computation 6):

- `double-backward`: reverse over reverse, each batch's create_graph gradient rebuilt per call (least memory);
- `reuse` (what `auto` picks): double backward through the gradient graphs kept by the memory plan
  (landscape.engine.memory.plan_memory), the other batches' rebuilt per call;
- `linearize`: forward over reverse, the gradient linearized once (torch.func.linearize) and replayed per probe;
- `fwd-rev`: forward over reverse, probes batched with vmap;
- `compiled`: forward over reverse compiled by torch.compile, for GPUs (benchmarks/gpu.py).

One path is approximate: `finite-difference`, central differences of first-order gradients with an error estimate
per product (Nocedal & Wright, Numerical Optimization, §8.1; landscape.engine.finite_difference), for models
without a second derivative.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from landscape.engine import finite_difference as fd
from landscape.inputs.batches import Batch

if TYPE_CHECKING:
    from landscape.engine.objective import Objective

HVP_METHODS = ("auto", "reuse", "linearize", "fwd-rev", "double-backward")
COMPILED_HVP = "compiled"  # torch.compile'd forward-over-reverse: for GPUs, measured by benchmarks/gpu.py
FINITE_DIFFERENCE_HVP = "finite-difference"  # central differences of gradients: approximate, with an error estimate
TORCH_FUNC_METHODS = ("linearize", "fwd-rev", "compiled")  # traced by torch.func: a model it cannot trace is one error


def double_backward(objective: Objective, V: torch.Tensor) -> torch.Tensor:
    """Double backward, rebuilding each batch's gradient graph per call (least memory: one batch's graph)."""
    return streamed_hvp(objective, V, objective.batches, objective.batch_weights)


def streamed_hvp(objective: Objective, V: torch.Tensor, batches: Sequence[Batch], weights: Sequence[float]) -> torch.Tensor:
    """Σ_b c_b H_b V over `batches`, each batch's create_graph gradient built and dropped in turn."""
    out = torch.zeros_like(V)
    for c, batch in zip(weights, batches):
        w = objective.w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(objective._batch_loss(w, batch), w, create_graph=True)
        out += c * backward_rows(objective, g, w, V, retain_graph=False)
    return out


def reuse(objective: Objective, V: torch.Tensor) -> torch.Tensor:
    """Double backward through the gradient graph of the batches kept (memory_plan), the rest rebuilt per call.

    The kept batches' weighted gradients are summed into one graph built on the first call, so each
    product is one backward pass through it; batches beyond the budget are streamed as double backward.
    """
    kept = objective.memory_plan.kept_batches
    if objective._cache is None or objective._cache[0] != "reuse":
        w = objective.w.detach().requires_grad_(True)
        g = None
        for c, batch in zip(objective.batch_weights[:kept], objective.batches[:kept]):
            g = weighted_add(g, c, torch.autograd.grad(objective._batch_loss(w, batch), w, create_graph=True)[0])
        objective._cache = ("reuse", w, g)
    _, w, g = objective._cache
    out = backward_rows(objective, g, w, V, retain_graph=True) if kept else torch.zeros_like(V)
    if kept < len(objective.batches):
        out += streamed_hvp(objective, V, objective.batches[kept:], objective.batch_weights[kept:])
    return out


def backward_rows(objective: Objective, g: torch.Tensor, w: torch.Tensor, V: torch.Tensor, retain_graph: bool) -> torch.Tensor:
    """Rows of ∂(g·vᵢ)/∂w for the rows vᵢ of V.

    On a GPU in one batched backward (is_grads_batched); on a CPU one row at a time, which measures
    faster there (benchmarks/hvp.py: 1.5 against 2.6 gradients per product on the digits MLP). Some
    double-backward formulas have no vmap rule (GroupNorm's, in torch 2.13): their rows go one at a time.
    """
    if len(V) > 1 and objective._batch_probes and objective.device.type != "cpu":
        try:
            return objective._unscaled(torch.autograd.grad(g, w, V, retain_graph=True, is_grads_batched=True)[0])
        except RuntimeError:
            objective._batch_probes = False
    last = len(V) - 1  # ∂(g·v)/∂w of the scalar g·v: the same product as grad_outputs=v, without the import of
    # torch's symbolic-shape machinery that a tensor grad_outputs triggers (0.4 s of a short run's start-up)
    rows = [torch.autograd.grad(g @ v, w, retain_graph=retain_graph or i < last)[0] for i, v in enumerate(V)]
    return objective._unscaled(rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows))  # one probe: its row


def gradient_function(objective: Objective) -> Callable[[torch.Tensor], torch.Tensor]:
    """w ↦ this rank's share of ∇L(w) by torch.func.grad, which forward-mode AD can pass through."""

    def gradient(w: torch.Tensor) -> torch.Tensor:
        return objective._unscaled(objective._weighted_sum(lambda batch: torch.func.grad(objective._batch_loss)(w, batch)))

    return gradient


def fwd_rev(objective: Objective, V: torch.Tensor) -> torch.Tensor:
    """Forward-over-reverse: jvp of the gradient, probes batched with vmap."""
    gradient = gradient_function(objective)
    w = objective.w.detach()

    def one(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(gradient, (w,), (v,))[1]

    if len(V) > 1 and objective._batch_probes:
        try:
            return torch.func.vmap(one)(V)
        except RuntimeError:  # an op without a vmap rule (a custom autograd Function): one probe at a time
            objective._batch_probes = False
    return torch.stack([one(v) for v in V])


def compiled(objective: Objective, V: torch.Tensor) -> torch.Tensor:
    """Forward-over-reverse per batch, compiled by torch.compile (inductor) on first use of each batch shape.

    For GPUs (curvlinops reports 8× → 1.8× a gradient for a ResNet-18 there); on a CPU compiling ResNet-20
    takes ~90 s and the product still costs ~3 gradients (benchmarks/hvp.py), so `auto` never picks it.
    """
    if objective._cache is None or objective._cache[0] != "compiled":

        def product(w: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
            return objective._unscaled(torch.func.jvp(lambda u: torch.func.grad(objective._batch_loss)(u, batch), (w,), (v,))[1])

        # static shapes: a recompile (another model, or the last, smaller batch) would otherwise go dynamic, and
        # jvp's dual tensors cannot take symbolic sizes in torch 2.13
        objective._cache = ("compiled", torch.compile(product, dynamic=False))
    product, w = objective._cache[1], objective.w.detach()
    return torch.stack([objective._weighted_sum(lambda batch: product(w, v, batch)) for v in V])


def linearize(objective: Objective, V: torch.Tensor) -> torch.Tensor:
    """Forward-over-reverse with the primal pass linearized once and reused (torch.func.linearize, functionalized)."""
    if objective._cache is None or objective._cache[0] != "linearize":
        objective._cache = ("linearize", linearized(gradient_function(objective), objective.w.detach()))
    jvp_fn = objective._cache[1]
    return torch.stack([jvp_fn(v) for v in V])


def linearized(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """v ↦ J_fn(w) v, from one trace of `fn` at w (torch.func.linearize), replayed for every v.

    Functionalized first: a traced in-place op (`out += h`, ReLU(inplace=True)) otherwise writes into the
    graph's saved constants, so every product after the first came out wrong. A function that
    functionalization cannot trace (a custom autograd Function, in torch 2.13) gets an eager jvp per
    product instead: slower, never wrong.
    """
    with warnings.catch_warnings():  # torch.fx const folding warns about its own graph attributes
        warnings.simplefilter("ignore", UserWarning)
        try:
            return torch.func.linearize(torch.func.functionalize(fn), w)[1]
        except RuntimeError as error:
            if "functionaliz" not in str(error).lower():
                raise
    return lambda v: torch.func.jvp(fn, (w,), (v,))[1]


def finite_difference(objective: Objective, V: torch.Tensor, record: bool = True) -> torch.Tensor:
    """H vᵢ ≈ (g(w + h v̂ᵢ) − g(w − h v̂ᵢ))/2h·‖vᵢ‖ from first-order gradients, summed over the ranks; each row's
    error estimate ‖D(h) − D(2h)‖·‖vᵢ‖ (Richardson) goes to `last_hvp_errors` and, if `record`, to `hvp_error`.

    Four gradients per probe, fused attention kernels allowed; the step rule is fd.CentralDifferences's
    (Nocedal & Wright §8.1, landscape.engine.finite_difference).
    """
    if objective.hvp_error is None:  # a fresh record: a step of its own (a restricted copy starts here too)
        objective._differences = fd.CentralDifferences(
            lambda w: first_order_gradient(objective, w), objective.w, objective.model_dtype, reduce=objective._reduced
        )
    products, objective.last_hvp_errors = objective._differences.products(V, record)
    objective.hvp_error = objective._differences.errors
    return products


def first_order_gradient(objective: Objective, w: torch.Tensor) -> torch.Tensor:
    """This rank's share of ∇L(w) by plain autograd, with any attention kernel (no second derivative is taken)."""
    w = w.detach().requires_grad_(True)
    total = torch.zeros_like(w)
    objective._any_attention = True
    try:
        for c, batch in zip(objective.batch_weights, objective.batches):
            total.add_(torch.autograd.grad(objective._batch_loss(w, batch), w)[0], alpha=c)
    finally:
        objective._any_attention = False
    return objective._unscaled(total)


def weighted_add(total: torch.Tensor | None, c: float, g: torch.Tensor) -> torch.Tensor:
    """total + c·g, with total None before the first batch; the only batch's weight is 1 and multiplies nothing."""
    if total is None:
        return g if c == 1 else c * g
    return total + c * g


# every path by the name `hvp_method` gives it (`auto` is `reuse`); looked up at each product, so a test can swap one
HVP_PATHS: dict[str, Callable[..., torch.Tensor]] = {
    "reuse": reuse,
    "double-backward": double_backward,
    "linearize": linearize,
    "fwd-rev": fwd_rev,
    COMPILED_HVP: compiled,
    FINITE_DIFFERENCE_HVP: finite_difference,
}
