"""Real torch.distributed process groups for tests: gloo ranks spawned on this machine, one thread each."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from landscape.engine import distributed as ranks

ROOT = Path(__file__).resolve().parents[1]


def process_env(**extra) -> dict:
    """The environment for a process a test starts: one thread, this checkout importable, `extra` on top."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def torchrun(nproc: int) -> list[str]:
    """`torchrun --standalone --nproc_per_node NPROC --no-python`, to put before a command."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "--no-python"]


def free_port() -> int:
    """A TCP port nobody listens on now, for a group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, world: int, work: Callable[[], Any], out: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LANDSCAPE_DIST_TIMEOUT="60",
    )
    torch.set_num_threads(1)
    assert ranks.init_from_env("cpu")
    try:
        torch.save(work(), out / f"rank{rank}.pt")
    finally:
        ranks.shutdown()


def run_on_ranks(work: Callable[[], Any], out: Path, world: int = 2) -> list:
    """`work()` on every rank of a fresh `world`-process gloo group (a module-level function, or a partial of one);
    each rank's result, in rank order (saved through `out`)."""
    mp.spawn(_rank_main, args=(free_port(), world, work, Path(out)), nprocs=world, join=True)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
