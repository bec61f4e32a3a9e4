"""Preconditioned sharpness λ1(P⁻¹H): the curvature an adaptive optimizer sees (Cohen et al. 2022).

Adam, AdamW, RMSprop and Adagrad step w ← w − η·P⁻¹·u with a diagonal preconditioner P read from their state
(Adam: P = √v̂ + ε, v̂ the bias-corrected second moment; RMSprop: √v + ε; Adagrad: √(Σg²) + ε) and u the
gradient or its momentum. On a quadratic with P frozen, the update is stable only while the largest eigenvalue
of P⁻¹H stays below a threshold that depends on the momentum: 2/η without momentum, (2 + 2β)/η with heavy-ball
momentum β (RMSprop's), and (2 + 2β1)/(η(1 − β1)) with Adam's averaged momentum β1, 38/η at β1 = 0.9. Cohen,
Ghorbani, Krishnan, Agarwal, Medapati, Badura, Suo, Cardoze, Nado, Dahl & Gilmer (2022, "Adaptive gradient
methods at the edge of stability") observed that full-batch Adam drives λ1(P⁻¹H) up to that threshold and
holds it there, as gradient descent does λ1(H) at 2/η.

P⁻¹H is not symmetric, but it is similar to D·H·D with D = P^(-1/2), which is: the two share their eigenvalues.
So λ1(P⁻¹H) is Lanczos's top eigenvalue of D·H·D, certified by the same rule as λ1 (landscape.curvature.spectrum).
Weight decay is left out of the operator: coupled decay (Adam's) adds λ·P⁻¹ to it, decoupled decay (AdamW's)
shrinks w by ηλ outside the preconditioner; the result records the decay so a reader can add it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from landscape.curvature.spectrum import EigResult, WarmStart, lanczos
from landscape.engine.objective import Objective
from landscape.engine.operators import DiagonalScaledOperator, HessianOperator, LinearOperator
from landscape.results import Result

MOMENTUM_STYLES = ("none", "heavy-ball", "averaged")  # u = g; u ← βu + g; u ← βu + (1 − β)g (Adam's)


@dataclass(frozen=True)
class OptimizerSettings(Result):
    """What sets an adaptive optimizer's stability threshold, read from its state: its kind, step size η, momentum β
    with its style ("none", "heavy-ball" or "averaged"), ε, weight decay and step count (Adam's bias correction)."""

    optimizer: str
    lr: float
    momentum: float
    momentum_style: str
    eps: float
    weight_decay: float
    step: int

    @property
    def threshold(self) -> float:
        """The largest λ1(P⁻¹H) the update is stable at on a quadratic with P frozen (Cohen et al. 2022)."""
        beta = self.momentum
        if self.momentum_style == "averaged":
            return (2 + 2 * beta) / (self.lr * (1 - beta))
        if self.momentum_style == "heavy-ball":
            return (2 + 2 * beta) / self.lr
        return 2 / self.lr


@dataclass(frozen=True)
class Preconditioner:
    """The diagonal P an adaptive optimizer divides its step by (`diagonal`, per parameter name: √v̂ + ε for Adam),
    with the settings that give its threshold."""

    diagonal: dict[str, torch.Tensor]
    settings: OptimizerSettings

    @property
    def threshold(self) -> float:
        return self.settings.threshold

    def flat(self, objective: Objective) -> torch.Tensor:
        """P as one vector in the objective's parameter layout (every measured parameter must have its entry)."""
        missing = [n for n in objective.layout.names if n not in self.diagonal]
        if missing:
            raise ValueError(
                f"the optimizer state has no entry for {len(missing)} measured parameter(s) ({', '.join(missing[:3])}): "
                "measure only the parameters the optimizer trained (params=...)"
            )
        return objective.layout.flatten({n: self.diagonal[n] for n in objective.layout.names}).to(objective.dtype)


def preconditioner_from_state(
    state: dict, names: Sequence[str] | None = None, shapes: dict[str, torch.Size] | None = None
) -> Preconditioner:
    """P from a torch optimizer's `state_dict()` (Adam, AdamW, RMSprop or Adagrad).

    The state numbers parameters in the order they were given to the optimizer. Their names come from the state's
    own "param_names" (torch keeps them for an optimizer built over `named_parameters()`; toolkit checkpoints
    write them) or else from `names`, in that order (e.g. the model's trainable `named_parameters()`). `shapes`, by
    name, are checked against the state's.
    """
    groups, per_param = state.get("param_groups"), state.get("state")
    if not isinstance(groups, list) or not isinstance(per_param, dict):
        raise ValueError("not a torch optimizer state_dict (it needs 'state' and 'param_groups')")
    indices = [i for g in groups for i in g["params"]]
    if all("param_names" in g for g in groups):
        names = [n for g in groups for n in g["param_names"]]
    elif len(groups) > 1:  # e.g. decay and no-decay groups: the order is the groups', not the model's
        raise ValueError(
            f"the optimizer state has {len(groups)} parameter groups and no parameter names, so which entry is which "
            "parameter is unknown; build the optimizer over model.named_parameters() (torch keeps the names) or save "
            "one group"
        )
    if names is None or len(indices) != len(names):
        raise ValueError(
            f"the optimizer state holds {len(indices)} parameters and the model {len(names or ())} trainable ones: it was "
            "not built over this model's parameters"
        )
    if len({(g.get("lr"), _momentum(g)) for g in groups}) > 1:
        raise ValueError("the optimizer state's parameter groups differ in lr or momentum: one threshold cannot describe them")
    group = groups[0]
    diagonal, step, first = {}, 0, None
    for name, index in zip(names, indices):
        entry = per_param.get(index, per_param.get(str(index)))
        if not entry:
            raise ValueError(f"the optimizer state has no statistics for {name}: it has not taken a step")
        first = first or entry
        d, step = _diagonal(entry, group)
        if shapes is not None and name in shapes and d.shape != shapes[name]:
            raise ValueError(f"the optimizer state's {name} has shape {tuple(d.shape)}, the model's {tuple(shapes[name])}")
        diagonal[name] = d
    kind, beta, style = _kind(first, group)
    settings = OptimizerSettings(
        kind, float(group["lr"]), beta, style, float(group.get("eps", 0.0)), float(group.get("weight_decay", 0.0)), step
    )
    return Preconditioner(diagonal, settings)


def has_stepped(state: dict | None) -> bool:
    """Whether an optimizer state_dict (None: none kept) holds statistics, i.e. its optimizer has taken a step."""
    return bool(state and state.get("state"))


def _momentum(group: dict) -> float:
    return float(group["betas"][0]) if "betas" in group else float(group.get("momentum", 0.0))


def _kind(entry: dict, group: dict) -> tuple[str, float, str]:
    if "exp_avg_sq" in entry:
        name = "adamw" if group.get("decoupled_weight_decay") else "adam"
        return name, float(group["betas"][0]), "averaged"
    if "square_avg" in entry:
        beta = float(group.get("momentum", 0.0))
        return "rmsprop", beta, "heavy-ball" if beta else "none"
    return "adagrad", 0.0, "none"


def _diagonal(entry: dict, group: dict) -> tuple[torch.Tensor, int]:
    step = int(float(entry.get("step", 0)))
    eps = float(group.get("eps", 0.0))
    if "exp_avg_sq" in entry:  # Adam/AdamW: denominator √(v/(1 − β2^t)) + ε, amsgrad's running maximum if kept
        v = entry.get("max_exp_avg_sq") if group.get("amsgrad") else entry["exp_avg_sq"]
        if step < 1:
            raise ValueError("the Adam state has step 0: no second moment yet")
        v = v.double() / (1 - float(group["betas"][1]) ** step)
        return v.sqrt() + eps, step
    if "square_avg" in entry:  # RMSprop: √v + ε, centred: √(v − ḡ²) + ε
        v = entry["square_avg"].double()
        if group.get("centered"):
            v = v - entry["grad_avg"].double().square()
        return v.sqrt() + eps, step
    if "sum" in entry:  # Adagrad
        return entry["sum"].double().sqrt() + eps, step
    raise ValueError(f"unsupported optimizer state (keys {', '.join(sorted(entry))}): use Adam, AdamW, RMSprop or Adagrad")


def preconditioner_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> Preconditioner:
    """P of a live optimizer built over `model`'s trainable parameters (in `named_parameters()` order)."""
    named = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(id(p) not in named for p in params):
        raise ValueError("the optimizer holds parameters that are not the model's")
    return preconditioner_from_state(
        optimizer.state_dict(), [named[id(p)] for p in params], {named[id(p)]: p.shape for p in params}
    )


@dataclass(frozen=True)
class PreconditionedSharpness(Result):
    """The top eigenvalues of P⁻¹H (`spectrum`, certified as λ1's are), the optimizer's settings and threshold."""

    spectrum: EigResult
    settings: OptimizerSettings
    threshold: float
    seconds: float

    @property
    def value(self) -> float:
        """λ1(P⁻¹H)."""
        return float(self.spectrum.values[0])

    @property
    def ratio(self) -> float:
        """λ1(P⁻¹H) over the stability threshold: about 1 at the adaptive edge of stability."""
        return self.value / self.threshold


def preconditioned_operator(op: LinearOperator, preconditioner: torch.Tensor) -> DiagonalScaledOperator:
    """D·A·D with D = P^(-1/2): symmetric, with the eigenvalues of P⁻¹A (P a positive diagonal, as one vector)."""
    if not bool((preconditioner > 0).all()) or not bool(torch.isfinite(preconditioner).all()):
        raise ValueError(
            "the preconditioner must be finite and positive (an optimizer state with ε = 0 and a zero second moment?)"
        )
    return DiagonalScaledOperator(op, preconditioner.rsqrt())


def preconditioned_sharpness(
    objective: Objective,
    preconditioner: Preconditioner,
    *,
    k: int = 1,
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    max_vectors: int | None = None,
    seed: int = 0,
    progress: bool | str = False,
    warm_start: WarmStart | None = None,
) -> PreconditionedSharpness:
    """λ1..λk of P⁻¹H at the objective's weights (Cohen et al. 2022), with the optimizer's stability threshold.

    Args:
        objective: the loss at the checkpoint's weights; H is its Hessian over the measured parameters.
        preconditioner: P and the optimizer's hyperparameters (`preconditioner_from_state`, `preconditioner_of`).
        k: how many of the largest eigenvalues.
        tol: the relative residual tolerance (Lanczos's certified stop).
        max_matvecs: the budget of Hessian-vector products (as `lanczos`'s).
        max_vectors: the vectors Lanczos may hold (as `lanczos`'s).
        seed: the Gaussian start's seed.
        progress: progress display (True, False or "lines").
        warm_start: start from the previous call's top vector (`landscape track`).

    Returns:
        The certified top eigenvalues of P^(-1/2)·H·P^(-1/2) and the threshold (2 + 2β1)/(η(1 − β1)) etc.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.5, -0.5]]))
        >>> x, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.zeros(2, 1)
        >>> objective = Objective(model, [(x, y)], loss_fn=nn.MSELoss(), dtype=torch.float64, device="cpu")
        >>> adam = OptimizerSettings("adam", lr=0.01, momentum=0.9, momentum_style="averaged", eps=0.0, weight_decay=0.0, step=10)
        >>> P = Preconditioner({"weight": torch.tensor([[4.0, 1.0]])}, adam)
        >>> result = preconditioned_sharpness(objective, P)  # H = diag(4, 1), P⁻¹H = diag(1, 1)
        >>> round(result.value, 6), round(result.threshold, 6)
        (1.0, 3800.0)
    """
    start = time.perf_counter()
    op = preconditioned_operator(HessianOperator(objective), preconditioner.flat(objective))
    options = dict(tol=tol, max_matvecs=max_matvecs, max_vectors=max_vectors, seed=seed, progress=progress)
    spectrum = warm_start.lanczos(op, k, **options) if warm_start is not None else lanczos(op, k, **options)
    threshold = preconditioner.threshold
    if not math.isfinite(threshold):
        settings = preconditioner.settings
        raise ValueError(f"the optimizer's threshold is not finite (lr {settings.lr}, momentum {settings.momentum})")
    return PreconditionedSharpness(spectrum, preconditioner.settings, threshold, time.perf_counter() - start)
