"""Data-parallel training steps over torchrun's process group: one gradient all-reduce per step.

Every rank holds the same weights, takes its contiguous share of each global batch, and makes all the
passes its method needs on that share (perturbed points, ghost batches, micro-batches) with its own
noise. The gradients it combines are weighted by n_chunk / N, N the global batch, so one summing
all-reduce gives the global batch's gradient, which every rank then descends identically. This is
the arithmetic of torch's DistributedDataParallel, done once per step after the method's last pass
instead of in backward hooks: the methods take their gradients with `torch.autograd.grad`, several
times per step, and DDP would all-reduce each of those passes (SAM's ascent gradient included, unless
its forward and backward both sit in `no_sync`, davda54/sam #25, #78). BatchNorm running statistics,
moved by each rank's share, are averaged after every step so that all ranks keep the same buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from landscape.engine import distributed

# rank r's noise seed is seed + r·stride mod 2³², within the 32 bits the CPU generator (mt19937) keeps of a
# seed (a stride of 2³² would give every rank the same stream); rank 0 keeps the one-process stream
RANK_SEED_STRIDE = 0x9E3779B1


def rank_seed(seed: int, rank: int) -> int:
    """The noise seed of `rank` in a run seeded `seed` (rank 0: `seed` itself)."""
    return seed if rank == 0 else (seed + rank * RANK_SEED_STRIDE) % (1 << 32)


class GradientSync:
    """The collectives of one data-parallel training step, over the active process group."""

    def __init__(self) -> None:
        if not distributed.active():
            raise RuntimeError("data-parallel training needs an initialised process group: launch with torchrun")
        self.rank, self.world_size = distributed.rank(), distributed.world_size()

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch of indices (a rank may get none)."""
        return batch.tensor_split(self.world_size)[self.rank]

    def global_count(self, local: int, device: torch.device) -> int:
        """Samples in the global batch: the ranks' shares summed."""
        count = torch.tensor([float(local)], device=device, dtype=torch.float64)
        return int(distributed.all_reduce_sum(count).item())

    def sum_gradients(
        self, loss: torch.Tensor, grads: list[torch.Tensor | None], params: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """(Σ loss, Σ grads) over the ranks, in one all-reduce of a flat buffer.

        A gradient stays None only where it is None on every rank (a rank with no samples has none).
        """
        present = torch.tensor([float(g is not None) for g in grads], device=params[0].device)
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1).to(params[0].dtype) for g, p in zip(grads, params)]
            + [loss.detach().reshape(1).to(params[0].device, params[0].dtype), present.to(params[0].dtype)]
        )
        distributed.all_reduce_sum(flat)
        out: list[torch.Tensor | None] = []
        offset = 0
        for p, here in zip(params, flat[-len(params) :].tolist()):  # views of the summed buffer: no copy
            out.append(flat[offset : offset + p.numel()].view_as(p) if here > 0 else None)
            offset += p.numel()
        return flat[offset], out

    def broadcast_module(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)

    def average_buffers(self, model: nn.Module) -> None:
        """Floating-point buffers (BatchNorm running statistics) averaged over the ranks; integer counters agree already."""
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])  # one all-reduce, not one per BatchNorm layer
        distributed.all_reduce_sum(flat).div_(self.world_size)
        offset = 0
        with torch.no_grad():
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
