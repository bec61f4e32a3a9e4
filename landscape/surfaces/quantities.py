"""What a surface evaluates at each grid point besides loss and accuracy: a name → per-point function registry.

Loss and accuracy come from one forward pass over the measurement set per point (batched by
landscape.engine.batched_points). Every other quantity is a `PointQuantity`: a function of the
objective at the point (`SurfacePoint`), with its cost declared in passes over the measurement set,
so a surface file can record what each point cost. `grad-norm`, ‖∇L(w)‖₂, is built in: one forward and
one backward pass per point on top of the loss's forward, about three times a loss-only surface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from landscape.engine.objective import Objective

BUILT_IN = ("loss", "accuracy")  # always evaluated: one forward pass gives both


class QuantityError(ValueError):
    """An unknown or badly registered per-point quantity."""


@dataclass(frozen=True)
class SurfacePoint:
    """The objective at one grid point: weights `w`, the buffers that point replaces (BN statistics), its coordinates."""

    objective: Objective
    w: torch.Tensor
    buffers: dict[str, torch.Tensor] | None
    coords: tuple[float, ...]


@dataclass(frozen=True)
class PointQuantity:
    """A scalar evaluated at each grid point, and what one evaluation costs in passes over the measurement set."""

    function: Callable[[SurfacePoint], float]
    forward_passes: float
    backward_passes: float
    description: str = ""


def grad_norm(point: SurfacePoint) -> float:
    """‖∇L(w)‖₂ at the point, by autograd over the whole measurement set (the point's BN statistics included)."""
    return float(point.objective.grad(point.w, point.buffers).double().norm())


QUANTITIES: dict[str, PointQuantity] = {
    "grad-norm": PointQuantity(grad_norm, 1.0, 1.0, "‖∇L(w)‖₂ over the measurement set: one forward and one backward pass"),
}


def register_quantity(
    name: str,
    function: Callable[[SurfacePoint], float],
    *,
    forward_passes: float = 1.0,
    backward_passes: float = 0.0,
    description: str = "",
) -> PointQuantity:
    """Make `name` available to `compute_surface(..., quantities=[..., name])` and `--quantities`.

    Args:
        name: the quantity's name in files and on the command line (lowercase, no '/' or ',').
        function: the scalar at a point, from a `SurfacePoint` (objective, weights, buffers, coordinates).
        forward_passes: forward passes over the measurement set one evaluation costs (recorded per point).
        backward_passes: backward passes over the measurement set one evaluation costs.
        description: one line for listings.

    Returns:
        PointQuantity: what was registered.

    Raises:
        QuantityError: a name that is built in, empty or holds '/' or ','.

    Examples:
        >>> from landscape.examples import quadratic
        >>> q = register_quantity("weight-norm", lambda p: float(p.w.norm()), forward_passes=0)
        >>> round(q.function(SurfacePoint(quadratic(), quadratic().w, None, (0.0,))), 4)
        1.4142
        >>> del QUANTITIES["weight-norm"]
    """
    if not name or "/" in name or "," in name or name != name.strip():
        raise QuantityError(f"a quantity's name must be non-empty, without '/', ',' or outer spaces; got {name!r}")
    if name in BUILT_IN:
        raise QuantityError(f"{name!r} is built in (one forward pass gives loss and accuracy); choose another name")
    QUANTITIES[name] = PointQuantity(function, float(forward_passes), float(backward_passes), description)
    return QUANTITIES[name]


def extra_quantities(names: Sequence[str]) -> tuple[str, ...]:
    """The registered quantities among `names` (loss and accuracy are always evaluated), in order, refusing unknown ones."""
    extras = []
    for name in names:
        if name in BUILT_IN or name in extras:
            continue
        if name not in QUANTITIES:
            known = ", ".join((*BUILT_IN, *QUANTITIES))
            raise QuantityError(f"unknown quantity {name!r}; use one of {known} (or register_quantity a new one)")
        extras.append(name)
    return tuple(extras)
