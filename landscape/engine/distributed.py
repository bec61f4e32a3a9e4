"""torch.distributed under torchrun: the process group from the environment, rank helpers, batch sharding.

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1 we
join its group (gloo on CPU, NCCL on CUDA) with a timeout, so a rank that dies or hangs turns
into an error on the others instead of a job that waits forever.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

TIMEOUT_ENV = "LANDSCAPE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds a collective may wait for the other ranks

T = TypeVar("T")
R = TypeVar("R")


def launched() -> bool:
    """True in a process started by torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_world_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    """True when a process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the group (0 when not distributed)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or not distributed): the one process that prints and writes files."""
    return rank() == 0


def timeout() -> float:
    """Seconds a collective waits for the other ranks: $LANDSCAPE_DIST_TIMEOUT, default 300."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT))
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):  # also refuses nan
        raise ValueError(f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds")
    return seconds


def local_device(device: torch.device | str) -> torch.device:
    """This rank's GPU (cuda:LOCAL_RANK) for a CUDA device given without an index; other devices unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_from_env(device: torch.device | str) -> bool:
    """Join torchrun's process group (NCCL for a CUDA `device`, else gloo); False when not launched or already joined."""
    if not launched() or active():
        return False
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout()))
    return True


def barrier() -> None:
    """Wait until every rank gets here (no-op when not distributed)."""
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if one is initialised, once every rank is done (so none tears down under another)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's whole batches, round-robin: batches[rank::world] (whole batches keep BN batch statistics)."""
    return list(batches[rank() :: world_size()])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all ranks, in place; every rank gets the same bits."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj` (picklable; tensors on the CPU), in rank order."""
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def unshard(local: Sequence[T], count: int) -> list[T]:
    """The first `count` items of the list `shard` split, on every rank (gathered from their ranks; tensors on the CPU)."""
    world = world_size()
    parts = all_gather([t.cpu() if isinstance(t, torch.Tensor) else t for t in local[: -(-count // world)]])
    return [parts[j % world][j // world] for j in range(count)]


def map_split(
    items: Sequence[T], work: Callable[[T], R], *, contiguous: bool = False, done: Callable[[R], None] | None = None
) -> list[R]:
    """`work` on every item, the items split over the ranks; every rank gets all results, in item order.

    Round-robin by default; `contiguous` gives each rank one block of consecutive items (so work that
    carries state from one item to the next, such as a warm start, keeps most of it). Ranks work in
    lockstep rounds of one item each: after each round the results are gathered and `done(result)`
    is called on every rank for each finished item, in item order, so rank 0 can save them as they come.
    Results must be picklable. Without a process group: a plain loop.
    """
    world, me = world_size(), rank()
    block = -(-len(items) // world) if contiguous else 1
    owner = [(i // block) if contiguous else (i % world) for i in range(len(items))]
    mine = [i for i in range(len(items)) if owner[i] == me]
    rounds = max(owner.count(r) for r in range(world)) if items else 0
    results: list = [None] * len(items)
    for step in range(rounds):
        local = (mine[step], work(items[mine[step]])) if step < len(mine) else None
        for finished in all_gather(local) if world > 1 else [local]:
            if finished is not None:
                results[finished[0]] = finished[1]
                if done is not None:
                    done(finished[1])
    return results


def is_failure(error: BaseException) -> bool:
    """A collective that failed because another rank died, hung past the timeout or could not be reached."""
    return isinstance(error, dist.DistError) or (
        active() and isinstance(error, RuntimeError) and bool(re.search(r"gloo|nccl", str(error), re.IGNORECASE))
    )


def failure_message(error: BaseException) -> str:
    """One line for a failed collective: the backend's reason without its source location, and where to look."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [""])[0])
    reason = reason.split(". This is typically")[0].rstrip(".") or type(error).__name__
    where = f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}"
    return f"{reason} ({where}: another rank died, or hung longer than {TIMEOUT_ENV}={timeout():g} s; see its log)"
