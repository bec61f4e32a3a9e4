"""One projected ascent for every worst-case measure: APGD (Croce & Hein 2020) over an ℓ2 or ℓ∞ ball, plain or scaled.

The neighbourhood is {w + A(T ⊙ u) : ‖u‖_p ≤ ρ}. T = 1 gives the worst case of SAM (Foret et al. 2021);
T = |w| + η the adaptive ball of ASAM (Kwon et al. 2021) and Andriushchenko et al. (2023); T = |A⁺w| + 1
with ρ = ε is Keskar et al. (2017)'s box (landscape.sharpness.box). The ascent runs in u, where the
ball is round (or a cube): the gradient there is T ⊙ Aᵀ∇L, the step its sign (ℓ∞) or its direction (ℓ2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from landscape.engine.objective import Objective
from landscape.engine.progress import Progress

NORMS = ("2", "inf")


def norm_name(p: object) -> str:
    """p as "2" or "inf" (2, "2", math.inf, "inf" are accepted); anything else is a one-line ValueError."""
    if isinstance(p, str):
        name = p.strip().lower()
    elif isinstance(p, (int, float, np.integer, np.floating)) and not isinstance(p, bool):
        name = "inf" if p == math.inf else ("2" if p == 2 else repr(p))
    else:
        name = repr(p)
    if name not in NORMS:
        raise ValueError(f"p must be 2 or inf, got {p!r}")
    return name


class Neighbourhood:
    """L(w + A(T ⊙ u)) and its gradient in u for u in the ℓp ball of radius ρ, counting the passes they cost.

    `scale` is T (None: 1), `basis` is A (None: the identity), both in the coordinates u lives in.
    `loss_at`/`grad_at` take the raw perturbation z = T ⊙ u (for optimizers that want the box as bounds).
    """

    def __init__(
        self, objective: Objective, p: str, radius: float, *, scale: torch.Tensor | None = None, basis: torch.Tensor | None = None
    ) -> None:
        self.objective, self.p, self.radius, self.scale, self.basis = objective, norm_name(p), float(radius), scale, basis
        self.w = objective.w
        self.dim = objective.n_params if basis is None else basis.shape[1]
        self.n_forward = self.n_grad = 0

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.dim, dtype=self.w.dtype, device=self.w.device)

    def raw(self, u: torch.Tensor) -> torch.Tensor:
        """z = T ⊙ u."""
        return u if self.scale is None else self.scale * u

    def point(self, u: torch.Tensor) -> torch.Tensor:
        z = self.raw(u)
        return self.w + (z if self.basis is None else self.basis @ z)

    def loss_at(self, z: torch.Tensor) -> float:
        self.n_forward += 1
        return self.objective.loss(self.w + (z if self.basis is None else self.basis @ z))

    def grad_at(self, z: torch.Tensor) -> torch.Tensor:
        """Aᵀ∇L(w + Az)."""
        self.n_grad += 1
        g = self.objective.grad(self.w + (z if self.basis is None else self.basis @ z))
        return g if self.basis is None else self.basis.T @ g

    def loss(self, u: torch.Tensor) -> float:
        return self.loss_at(self.raw(u))

    def grad(self, u: torch.Tensor) -> torch.Tensor:
        """T ⊙ Aᵀ∇L(w + A(T ⊙ u)), the gradient in u."""
        return self.raw(self.grad_at(self.raw(u)))

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """The nearest point of the ball: clipping (ℓ∞) or radial shrinking (ℓ2)."""
        if self.p == "inf":
            return u.clamp(-self.radius, self.radius)
        norm = float(u.norm())
        return u * (self.radius / norm) if norm > self.radius else u

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """The unit step of steepest ascent: sign(g) (+1 where g = 0, so steps reach a vertex) or g/‖g‖₂ (0 if g = 0)."""
        if self.p == "inf":
            return torch.where(g >= 0, 1.0, -1.0).to(g.dtype)
        norm = float(g.norm())
        return g / norm if norm > 0 else torch.zeros_like(g)

    def first_order(self, g: torch.Tensor) -> torch.Tensor:
        """ρ·direction(g): the maximizer of the linear model gᵀu over the ball (the box's corner, SAM's step)."""
        return self.radius * self.direction(g)

    def random(self, generator: torch.Generator) -> torch.Tensor:
        """A uniform point of the ball: of the cube for ℓ∞, of the round ball (radius ρ·U^(1/d)) for ℓ2."""
        options = {"generator": generator, "dtype": self.w.dtype, "device": self.w.device}
        if self.p == "inf":
            return (2 * torch.rand(self.dim, **options) - 1) * self.radius
        g = torch.randn(self.dim, **options)
        r = float(torch.rand(1, **options)) ** (1 / self.dim)
        return g * (self.radius * r / float(g.norm()))


@dataclass(frozen=True)
class Ascent:
    """One start's ascent: the largest loss it visited (a lower bound on the ball's maximum), where, and its cost."""

    best_loss: float
    best: torch.Tensor  # u where best_loss was reached
    iterations: int
    converged: bool  # stopped at a KKT point of the ball before the last iteration


def apgd(nb: Neighbourhood, x: torch.Tensor, n_iter: int) -> Ascent:
    """APGD's ascent (Croce & Hein 2020) in u: projected steps η·ρ·direction(g), momentum 0.75, step halving.

    η = 2 at first (so the first step from u = 0 lands on ρ·direction(∇)); at APGD's checkpoints η halves
    and the iterate returns to the best point when fewer than 75% of the steps since the last checkpoint
    raised the loss, or neither η nor the best loss changed. Stops early where the projected step does
    not move (a KKT point of the ball). Each iteration costs one loss and one gradient evaluation.
    """
    checkpoints = apgd_checkpoints(n_iter)
    tiny = 4 * torch.finfo(x.dtype).eps * nb.radius
    loss = best = nb.loss(x)
    x_best, x_prev, g = x, x, nb.grad(x)
    eta, raised, last, eta_then, best_then = 2.0, 0, 0, 2.0, best
    for k in range(n_iter):
        z = nb.project(x + (eta * nb.radius) * nb.direction(g))
        if torch.equal(z, x) or float((z - x).abs().max()) <= tiny:  # the projected step does not move: KKT
            return Ascent(best, x_best, k, True)
        x_new = z if k == 0 else nb.project(x + 0.75 * (z - x) + 0.25 * (x - x_prev))
        new_loss = nb.loss(x_new)
        raised += new_loss > loss
        x_prev, x, loss = x, x_new, new_loss
        if loss > best:
            x_best, best = x, loss
        if k + 1 in checkpoints:
            if raised < 0.75 * (k + 1 - last) or (eta == eta_then and best == best_then):
                eta /= 2
                x = x_prev = x_best
                loss = best
            raised, last, eta_then, best_then = 0, k + 1, eta, best
        if k + 1 < n_iter:
            g = nb.grad(x)
    return Ascent(best, x_best, n_iter, False)


def apgd_checkpoints(n_iter: int) -> set[int]:
    """APGD's step-size checkpoints ⌈p_j·n⌉: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return {math.ceil(q * n_iter) for q in p[1:]}


@dataclass(frozen=True)
class Starts:
    """Every start's ascent over one neighbourhood, in the order of `kinds`."""

    kinds: tuple[str, ...]
    max_losses: np.ndarray
    iterations: np.ndarray
    converged: tuple[bool, ...]


def maximize(
    nb: Neighbourhood,
    starts: Sequence[tuple[str, torch.Tensor]],
    n_iter: int,
    *,
    ascend: Callable[[Neighbourhood, torch.Tensor, int], Ascent] = apgd,
    progress: Progress | None = None,
) -> Starts:
    """Run `ascend` from each (kind, u0) start; `progress` advances once per start."""
    runs = []
    for _, u0 in starts:
        runs.append(ascend(nb, u0, n_iter))
        if progress is not None:
            progress.update(1)
    return Starts(
        kinds=tuple(kind for kind, _ in starts),
        max_losses=np.array([r.best_loss for r in runs]),
        iterations=np.array([r.iterations for r in runs]),
        converged=tuple(r.converged for r in runs),
    )
