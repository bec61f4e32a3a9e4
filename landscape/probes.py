"""Seeded random probes and argument checks shared by the estimators."""

from __future__ import annotations

import numpy as np
import torch

from landscape.operators import LinearOperator


def seeded_generator(op: LinearOperator, seed: int) -> torch.Generator:
    """A torch.Generator on the operator's device, seeded: same seed, same probes."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return torch.Generator(device=op.device).manual_seed(int(seed))


def rademacher(generator: torch.Generator, shape: tuple[int, ...], op: LinearOperator) -> torch.Tensor:
    """Random ±1 entries in the operator's dtype and on its device."""
    bits = torch.randint(0, 2, shape, generator=generator, device=op.device)
    return bits.to(op.dtype).mul_(2).sub_(1)


def sphere(generator: torch.Generator, shape: tuple[int, int], op: LinearOperator) -> torch.Tensor:
    """Columns uniform on the sphere of radius √n (normalized Gaussians), on the operator's device."""
    g = torch.randn(shape, generator=generator, dtype=op.dtype, device=op.device)
    return g * (shape[0] ** 0.5 / g.norm(dim=0))


def check_int(name: str, value: int, minimum: int) -> None:
    """Raise a ValueError naming `name` unless `value` is an integer ≥ `minimum`."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
