"""Seeded random probes shared by the estimators: the generator, Rademacher vectors, sphere columns."""

from __future__ import annotations

import numpy as np
import torch

from landscape.operators import LinearOperator


def seeded_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A torch.Generator on `device` (an operator's or an objective's), seeded: same seed, same probes."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return torch.Generator(device=device).manual_seed(int(seed))


def rademacher(generator: torch.Generator, shape: tuple[int, ...], op: LinearOperator) -> torch.Tensor:
    """Random ±1 entries in the operator's dtype and on its device."""
    bits = torch.randint(0, 2, shape, generator=generator, device=op.device)
    return bits.to(op.dtype).mul_(2).sub_(1)


def sphere(generator: torch.Generator, shape: tuple[int, int], op: LinearOperator) -> torch.Tensor:
    """Columns uniform on the sphere of radius √n (normalized Gaussians), on the operator's device."""
    g = torch.randn(shape, generator=generator, dtype=op.dtype, device=op.device)
    return g * (shape[0] ** 0.5 / g.norm(dim=0))
