"""Shared benchmark helpers: steady-state timing, peak memory, result files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# One thread: ratios measured in one process stay meaningful on a shared 2-core machine, where a
# second busy process makes torch's multi-threaded kernels spin and slows them 10-50x.
torch.set_num_threads(1)


def seconds_per_call(fn: Callable[[], object], *, warmup: int = 2, min_seconds: float = 1.0, min_calls: int = 5) -> float:
    """Median wall time of `fn` after `warmup` calls (steady state, as inside an iterative solver)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def median_seconds(fn: Callable[[], object], calls: int) -> float:
    """Median wall time over a FIXED number of calls after one warm-up (under torch.distributed every rank must make
    the same collectives; on big models a few calls are all there is time for)."""
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_bytes(field: str = "VmRSS") -> int:
    """Resident (VmRSS) or peak resident (VmHWM) memory of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path
