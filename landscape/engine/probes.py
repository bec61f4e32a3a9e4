"""Seeded random probes shared by the estimators: the generator, Rademacher vectors, blocks of probe rows.

A block of probes is a (k, n) tensor, one probe per row, as the operators' `products` take it.
The block helpers fill it from the generator coordinate by coordinate (the first entry of every
probe, then the second, ...), the order the trace estimators have always drawn in, so a seed
gives the same probes, and the same estimates, as it did when the blocks were columns. (Lanczos and
SLQ draw their start rows probe by probe, `rademacher(generator, (k, n), op)`, as they always have.)
A sharded operator's probes come through its inner product (landscape.engine.inner.ShardedInnerProduct.random):
each rank's piece of the very probes one process draws, or pieces drawn on each rank alone.
"""

from __future__ import annotations

import numpy as np
import torch

from landscape.engine.operators import LinearOperator


def seeded_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A torch.Generator on `device` (an operator's or an objective's), seeded: same seed, same probes."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return torch.Generator(device=device).manual_seed(int(seed))


def rademacher(generator: torch.Generator, shape: tuple[int, ...], op: LinearOperator) -> torch.Tensor:
    """Random ±1 entries in the operator's dtype and on its device."""
    bits = torch.randint(0, 2, shape, generator=generator, device=op.device)
    return bits.to(op.dtype).mul_(2).sub_(1)


def rademacher_rows(generator: torch.Generator, k: int, op: LinearOperator) -> torch.Tensor:
    """k Rademacher probes as the rows of a (k, n) block, in the operator's dtype and on its device."""
    # drawn coordinate-major: see the module docstring
    return op.inner.random(generator, lambda g, n: rademacher(g, (n, k), op).T, op.shape[0])


def sphere_rows(generator: torch.Generator, k: int, op: LinearOperator) -> torch.Tensor:
    """k probes uniform on the sphere of radius √n (normalized Gaussians) as the rows of a (k, n) block."""
    n = op.shape[0]

    def draw(g: torch.Generator, m: int) -> torch.Tensor:
        return torch.randn((m, k), generator=g, dtype=op.dtype, device=op.device).T  # coordinate-major, as above

    rows = op.inner.random(generator, draw, n)
    return rows * (n**0.5 / op.inner.row_norms(rows)[:, None])
