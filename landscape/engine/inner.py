"""Inner products of vectors that may be held in pieces over the ranks of a process group.

A solver (Lanczos, Hutchinson, SLQ) sees vectors as flat tensors. When the parameters are sharded
(FSDP2's `fully_shard`), each rank holds only its piece of every vector, so a dot product or a norm is a
local partial sum, summed over the ranks: the global reduction of distributed Krylov methods (as in
distributed stochastic Lanczos quadrature, Granziol et al. 2025, HessFormer). `LOCAL`, the default, is a
whole vector in one process: every reduction is the identity, so single-process solvers run as before.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
import torch.distributed as dist

Draw = Callable[[torch.Generator, int], torch.Tensor]  # (generator, vector length) → random vectors along the last dim


class InnerProduct:
    """Dot products, norms and Gram matrices of whole vectors (one process): `reduce` is the identity."""

    sharded = False

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of a partial sum taken on this rank's pieces (here: the partial sum itself)."""
        return partial

    def norm(self, v: torch.Tensor) -> torch.Tensor:
        """‖v‖ of a vector (n,)."""
        return v.norm()

    def row_norms(self, V: torch.Tensor) -> torch.Tensor:
        """‖vᵢ‖ of each row of a block (k, n)."""
        return V.norm(dim=1)

    def piece(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece (along the last dimension) of vectors drawn whole; the vectors themselves here."""
        return full

    def random(self, generator: torch.Generator, draw: Draw, n: int) -> torch.Tensor:
        """Random vectors of length n by `draw`, as this process holds them (here: whole, from `generator`)."""
        return draw(generator, n)


LOCAL = InnerProduct()


class ShardedInnerProduct(InnerProduct):
    """Vectors split over the ranks of `group` as the concatenation of index ranges `pieces` of the whole
    vector: (start, length) pairs, in the order this rank stores them. Partial sums are all-reduced.

    Random vectors (`random`) are drawn whole on every rank and cut to the pieces (`draws="whole"`: exactly one
    process's probes, one transient whole vector per draw), or each rank draws only its pieces from a generator of
    its own, seeded by one draw of the shared generator (`draws="pieces"`: the same distribution, other numbers,
    no whole vector anywhere)."""

    sharded = True

    def __init__(self, pieces: list[tuple[int, int]], group: dist.ProcessGroup | None = None, draws: str = "whole") -> None:
        if draws not in ("whole", "pieces"):
            raise ValueError(f"draws={draws!r}: use 'whole' (one process's probes) or 'pieces' (no whole vector)")
        self.pieces = pieces
        self.group = group
        self.draws = draws
        self.length = sum(length for _, length in pieces)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        total = partial.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def norm(self, v: torch.Tensor) -> torch.Tensor:
        return self.reduce(v @ v).clamp_min(0).sqrt()

    def row_norms(self, V: torch.Tensor) -> torch.Tensor:
        return self.reduce((V * V).sum(dim=1)).clamp_min(0).sqrt()

    def piece(self, full: torch.Tensor) -> torch.Tensor:
        return torch.cat([full[..., start : start + length] for start, length in self.pieces], dim=-1)

    def random(self, generator: torch.Generator, draw: Draw, n: int) -> torch.Tensor:
        if self.draws == "whole":
            return self.piece(draw(generator, n))
        # one draw of the shared generator on every rank keeps it in step everywhere; the pieces themselves make the
        # streams of different ranks distinct (and replicas, which hold the same pieces, alike) and reproducible
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        own = torch.Generator(device=generator.device).manual_seed((seed + zlib.crc32(repr(self.pieces).encode())) % 2**63)
        return draw(own, self.length)
