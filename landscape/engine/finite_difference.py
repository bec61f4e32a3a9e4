"""Finite-difference Hessian-vector products: the central difference of two gradients, its step and its error.

H v ≈ (∇L(w + h v̂) − ∇L(w − h v̂)) / (2h) · ‖v‖ with v̂ = v/‖v‖ takes first-order gradients only, so it passes
through forwards that have no second derivative (fused attention kernels, custom autograd Functions) and through
sharded engines whose gradient collectives leave the autograd graph: Granziol et al. (2026, spectra of
foundation models) and pytorch-hessian-eigenthings 1.0 take such shard-local products under FSDP.

Error model (Nocedal & Wright, Numerical Optimization, 2nd ed., §8.1): the central difference D(h) has truncation
error h²/6·M, M the size of the third derivative along v̂, and rounding error about σ/h, σ the noise of a gradient;
h = (3σ/M)^{1/3} minimizes their sum. Each product carries Richardson's comparison with the step 2h as its error
estimate: D(h) − D(2h) = −3·(h²/6·M) + (rounding of both), which exceeds the error of D(h) whichever term leads.
Pure functions of tensors and floats (norms are given, so a sharded caller sums them over its ranks first).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from landscape.engine.inner import LOCAL, InnerProduct
from landscape.results import Result

STEP_RANGE = 8.0  # the error model moves the default step by at most this factor either way
# n-vectors a product holds beside one first-order gradient's graph: the unit probe, the point w ± h v̂, the gradient
# being summed and one batch's, the other side's gradient, and the finished step's difference
HELD_VECTORS = 6


def default_step(w_norm: float, dtype: torch.dtype) -> float:
    """h₀ = ε^{1/3}·max(‖w‖, 1): a step of relative size ε^{1/3}, where central differences balance (N&W §8.1)."""
    return torch.finfo(dtype).eps ** (1 / 3) * max(w_norm, 1.0)


def central_difference(g_plus: torch.Tensor, g_minus: torch.Tensor, h: float) -> torch.Tensor:
    """(g(w + h v̂) − g(w − h v̂)) / 2h: H v̂ up to h²/6 times the third derivative along v̂ (built in g_plus's memory)."""
    return g_plus.sub_(g_minus).div_(2 * h)


def third_derivative_scale(difference_norm: float, h: float) -> float:
    """M ≈ 2‖D(2h) − D(h)‖/h², from D(2h) − D(h) = 3·h²/6·M (rounding makes it an overestimate)."""
    return 2 * difference_norm / h**2


def gradient_noise(grad_norm: float, w_norm: float, curvature: float, dtype: torch.dtype) -> float:
    """σ, the rounding noise of one gradient: ε‖g‖ for the gradient itself, ε‖w‖·‖H v̂‖ for the displaced point."""
    return torch.finfo(dtype).eps * (grad_norm + w_norm * curvature)


def optimal_step(noise: float, third: float, default: float) -> float:
    """h = (3σ/M)^{1/3}, minimizing h²M/6 + σ/h; kept within STEP_RANGE of `default` (the default where M = 0)."""
    if not (third > 0 and math.isfinite(third)) or not noise > 0:
        return default
    h = (3 * noise / third) ** (1 / 3)
    return min(max(h, default / STEP_RANGE), default * STEP_RANGE)


def model_step(
    difference_norm: float, product_norm: float, h: float, grad_norm: float, w_norm: float, dtype: torch.dtype
) -> float:
    """The error model's step for one direction, from its differences at h: M from ‖D(2h) − D(h)‖, σ from ‖g‖ and
    ‖w‖·‖D(h)‖ (`gradient_noise`), h' = (3σ/M)^{1/3} within STEP_RANGE of h."""
    third = third_derivative_scale(difference_norm, h)
    return optimal_step(gradient_noise(grad_norm, w_norm, product_norm, dtype), third, h)


def richardson_error(d_h: torch.Tensor, d_2h: torch.Tensor) -> torch.Tensor:
    """Per row, ‖D(h) − D(2h)‖: the error estimate of D(h) (rows of (k, n) blocks; a shard's part of the squares
    is `richardson_error_squares`)."""
    return richardson_error_squares(d_h, d_2h).sqrt()


def richardson_error_squares(d_h: torch.Tensor, d_2h: torch.Tensor) -> torch.Tensor:
    """Per row, ‖D(h) − D(2h)‖², summable over shards before the square root."""
    return (d_h - d_2h).double().square().sum(dim=-1)


def check_tolerance(estimated_relative_error: float, dtype: torch.dtype) -> float:
    """Relative difference from an exact product that a finite-difference product may show: twice its estimated
    error (the estimate itself is a difference of noisy terms) plus 10ε for the exact product's own rounding."""
    return 2 * estimated_relative_error + 10 * torch.finfo(dtype).eps


@dataclass(frozen=True)
class FiniteDifferenceErrors(Result):
    """The step of the finite-difference path and the largest error it estimated over the products taken so far.

    `step` is the first step the error model chose; each probe's Richardson difference sets the next probe's step,
    and a probe that asks for under half its own step is taken again at the smaller one (`n_refined` of them).
    `min_step` and `max_step` are the extremes used.
    `max_error` is per unit probe (‖D(h) − D(2h)‖ for ‖v‖ = 1): an eigenvalue or Rayleigh quotient of the products
    moves by about that much (Weyl's inequality, the error read as a perturbation of H); `max_relative_error` is
    the largest ‖error‖/‖H v‖.
    """

    step: float
    min_step: float = math.inf
    max_step: float = 0.0
    n_refined: int = 0
    n_products: int = 0
    max_error: float = 0.0
    max_relative_error: float = 0.0

    def added(
        self, errors: torch.Tensor, probe_norms: torch.Tensor, product_norms: torch.Tensor, steps: list[float], n_refined: int
    ) -> FiniteDifferenceErrors:
        """This record with one block's per-row absolute errors and steps counted in (zero probes count as exact)."""
        unit = torch.where(probe_norms > 0, errors / probe_norms.clamp_min(1e-300), torch.zeros_like(errors))
        relative = torch.where(product_norms > 0, errors / product_norms.clamp_min(1e-300), unit)
        return FiniteDifferenceErrors(
            step=self.step,
            min_step=min([self.min_step, *steps]),
            max_step=max([self.max_step, *steps]),
            n_refined=self.n_refined + n_refined,
            n_products=self.n_products + len(errors),
            max_error=max(self.max_error, float(unit.max()) if len(unit) else 0.0),
            max_relative_error=max(self.max_relative_error, float(relative.max()) if len(relative) else 0.0),
        )

    def combined(self, other: FiniteDifferenceErrors) -> FiniteDifferenceErrors:
        """This record and `other`'s together (a resumed run's products and the interrupted run's)."""
        return FiniteDifferenceErrors(
            step=self.step,
            min_step=min(self.min_step, other.min_step),
            max_step=max(self.max_step, other.max_step),
            n_refined=self.n_refined + other.n_refined,
            n_products=self.n_products + other.n_products,
            max_error=max(self.max_error, other.max_error),
            max_relative_error=max(self.max_relative_error, other.max_relative_error),
        )

    def describe(self) -> str:
        retaken = f", {self.n_refined} taken again at a smaller one" if self.n_refined else ""
        return (
            f"central differences, steps {self.min_step:.2g} to {self.max_step:.2g}{retaken}: estimated error ≤ {self.max_error:.2g} per unit probe "
            f"({self.max_relative_error:.2g} relative; largest of {self.n_products} products)"
        )


class CentralDifferences:
    """H vᵢ ≈ D(h)·‖vᵢ‖ for the rows vᵢ of a block, with each row's error estimate ‖D(h) − D(2h)‖·‖vᵢ‖.

    `gradient(point)` gives this process's part of ∇L at a point: `reduce` sums it over data-parallel ranks that
    hold other batches (the identity by default), and `inner` sums dot products over ranks that hold other
    pieces of every vector (sharded parameters). The first step comes from a pilot at `default_step` along the
    first nonzero probe (`model_step`, with ‖g‖ and ‖w‖ for σ); each probe's own differences set the next probe's
    step (successive probes of a solver are alike), and a probe that asks for under half the step it was taken at
    (one concentrated on a few weights, whose third derivative is larger) is taken again at the smaller one.
    """

    def __init__(
        self,
        gradient: Callable[[torch.Tensor], torch.Tensor],
        w: torch.Tensor,
        dtype: torch.dtype,
        *,
        inner: InnerProduct = LOCAL,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.gradient, self.w, self.dtype, self.inner = gradient, w, dtype, inner
        self.reduce = reduce if reduce is not None else (lambda t: t)
        self.step: float | None = None
        self.scales = (0.0, 0.0)  # ‖g‖ and ‖w‖, for the noise σ
        self.errors: FiniteDifferenceErrors | None = None

    def products(self, V: torch.Tensor, record: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(the block of products, each row's estimated error); `record` counts them into `errors`."""
        norms = self.inner.row_norms(V.double())
        products = torch.zeros_like(V)
        squares = torch.zeros(len(V), dtype=torch.float64, device=V.device)
        steps, retaken = [], 0
        for i, (v, norm) in enumerate(zip(V, norms.tolist())):
            if norm == 0:
                continue
            u = v / norm
            if self.step is None:
                self.step = self._pilot(u)
                self.errors = FiniteDifferenceErrors(step=self.step)
            h = self.step
            for _ in range(3):  # the step the last probe asked for, then at most two smaller ones
                d_h, d_2h = self.reduce(self.differences(u, (h, 2 * h)))
                squares[i] = self.inner.reduce(richardson_error_squares(d_h, d_2h))
                self.step = model_step(float(squares[i].sqrt()), float(self.inner.norm(d_h)), h, *self.scales, self.dtype)
                if self.step >= h / 2:
                    break
                h, retaken = self.step, retaken + 1
            products[i] = d_h.mul_(norm)
            steps.append(h)
        errors = squares.sqrt() * norms
        if record and self.errors is not None:
            self.errors = self.errors.added(errors, norms, self.inner.row_norms(products.double()), steps, retaken)
        return products, errors

    def differences(self, u: torch.Tensor, steps: tuple[float, ...]) -> torch.Tensor:
        """This process's part of the central difference along the unit vector u at each of `steps`, as rows."""
        return torch.stack([central_difference(self.gradient(self.w + h * u), self.gradient(self.w - h * u), h) for h in steps])

    def _pilot(self, u: torch.Tensor) -> float:
        """The first step: `model_step` from the differences at h₀ = `default_step` along u."""
        w_norm = float(self.inner.norm(self.w.double()))
        h0 = default_step(w_norm, self.dtype)
        pilot = self.reduce(torch.cat([self.differences(u, (h0, 2 * h0)), self.gradient(self.w)[None]]))
        d_h, d_2h, gradient = pilot.double()
        self.scales = (float(self.inner.norm(gradient)), w_norm)
        return model_step(float(self.inner.norm(d_2h - d_h)), float(self.inner.norm(d_h)), h0, *self.scales, self.dtype)
