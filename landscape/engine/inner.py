"""Inner products of vectors that may be held in pieces over the ranks of a process group.

A solver (Lanczos, Hutchinson, SLQ) sees vectors as flat tensors. When the parameters are sharded
(FSDP2's `fully_shard`), each rank holds only its piece of every vector, so a dot product or a norm is a
local partial sum, summed over the ranks: the global reduction of distributed Krylov methods (as in
distributed stochastic Lanczos quadrature, Granziol et al. 2025, HessFormer). `LOCAL`, the default, is a
whole vector in one process: every reduction is the identity, so single-process solvers run as before.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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


LOCAL = InnerProduct()


class ShardedInnerProduct(InnerProduct):
    """Vectors split over the ranks of `group` as the concatenation of index ranges `pieces` of the whole
    vector: (start, length) pairs, in the order this rank stores them. Partial sums are all-reduced."""

    sharded = True

    def __init__(self, pieces: list[tuple[int, int]], group: dist.ProcessGroup | None = None) -> None:
        self.pieces = pieces
        self.group = group
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
