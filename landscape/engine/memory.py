"""Memory: how much a device has free, sizes written for people, and the plan that keeps an Objective's HVPs in it.

Peak memory is predicted before a run starts (`plan_memory`, an Objective's `memory_plan`): how many gradient graphs
the `reuse` path keeps, and the peak the chosen HVP path adds, from the bytes autograd saves for one gradient graph
(`saved_graph_bytes`). A measurement that cannot fit fails at once, in one line naming what it needs, what is free
and the option that would fit, instead of being killed by the kernel hours later or dying in a CUDA out-of-memory
traceback.
"""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from landscape.engine import finite_difference as fd
from landscape.engine.hvp_paths import FINITE_DIFFERENCE_HVP
from landscape.results import Result

__all__ = [
    "InsufficientMemory",
    "MemoryPlan",
    "plan_memory",
    "saved_graph_bytes",
    "available_bytes",
    "resident_bytes",
    "peak_resident_bytes",
    "parse_size",
    "format_size",
]

_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 10**3,
    "KIB": 2**10,
    "M": 2**20,
    "MB": 10**6,
    "MIB": 2**20,
    "G": 2**30,
    "GB": 10**9,
    "GIB": 2**30,
    "T": 2**40,
    "TB": 10**12,
    "TIB": 2**40,
}


class InsufficientMemory(ValueError):
    """A measurement needs more memory than the device has free (a one-line error at the command line)."""


def parse_size(text: str | float | int) -> int:
    """Bytes from '8GiB', '512MB', '2G', '1e9' or a number (binary units for K/M/G/T without B)."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size: write e.g. 8GiB, 512MB or 2G")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """'1.2 GiB', '340 MiB', '12 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


def available_bytes(device: torch.device | str) -> int:
    """Memory a new allocation can take on `device` now.

    CUDA: free memory as the driver reports it, plus what PyTorch's caching allocator holds unused.
    CPU: the kernel's MemAvailable (free memory plus reclaimable caches), capped by this process's
    address-space limit (ulimit -v) less what it has mapped already.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    available = _meminfo_available()
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        available = min(available, max(0, soft - _mapped_bytes()))
    return available


def resident_bytes(device: torch.device | str) -> int:
    """What this process holds now: on CUDA the tensors allocated on `device`, on a CPU its resident set (VmRSS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _proc_kib("/proc/self/status", "VmRSS") or 0


def peak_resident_bytes(device: torch.device | str) -> int:
    """The most this process has held: torch.cuda.max_memory_allocated on CUDA, the peak resident set (VmHWM) on a
    CPU, where it is what the kernel's out-of-memory killer counts."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _proc_kib("/proc/self/status", "VmHWM") or 0


@dataclass(frozen=True)
class MemoryPlan(Result):
    """What the HVP path keeps in memory, and the peak it is predicted to add to what the objective holds already.

    `reuse` keeps the create_graph gradient of the first `kept_batches` batches (as many as fit in `budget_bytes`)
    and rebuilds the others' per product (`streamed`). Predictions come from the bytes autograd saves for a gradient
    graph, measured on slices of the first batch (Objective._graph_size_model), times the factors in GRAPH_OVERHEAD.
    """

    path: str
    kept_batches: int
    n_batches: int
    kept_bytes: int
    predicted_peak_bytes: int
    budget_bytes: int
    available_bytes: int
    resident_bytes: int = 0  # what the process held when the plan was made (weights, data, the objective's copies)

    @property
    def streamed_batches(self) -> int:
        return self.n_batches - self.kept_batches

    def describe(self) -> str:
        kept = (
            f"gradient graphs of {self.kept_batches}/{self.n_batches} batches kept ({format_size(self.kept_bytes)})"
            if self.path == "reuse"
            else self.path
        )
        return f"{kept}; predicted peak {format_size(self.predicted_peak_bytes)} of {format_size(self.available_bytes)} free"


# Measured peak ÷ autograd's saved bytes (benchmarks/hvp.py memory table, benchmarks/scale.py): a kept graph holds
# its saved tensors; building or streaming one adds the backward's work space, and so does a product through kept
# graphs (GPT-2 configs: peak resident memory 3.7-4.1× the saved bytes with the graph kept; ResNet-20 less, where
# this predicts 0.78-1.03× the measured peak); linearize's functionalized trace keeps every intermediate of forward
# and backward (8.3× on ResNet-20); forward-over-reverse holds tangents.
GRAPH_OVERHEAD = {"kept": 1.0, "transient": 2.5, "linearize": 9.0, "fwd-rev": 2.5}
WORKSPACE_BYTES = 40 * 2**20  # allocator arenas and autograd's first use: the whole peak of the digits MLP's HVPs


def saved_graph_bytes(loss: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, exclude: Iterable[torch.Tensor]) -> float:
    """Distinct bytes autograd saves for one create_graph gradient of `loss` at `w`, the storages of `exclude` (the
    weights and the batch, which exist anyway) left out."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided and t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in excluded:
                saved[storage.data_ptr()] = storage.nbytes()
        return t

    w = w.detach().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # also inside evaluate
        torch.autograd.grad(loss(w), w, create_graph=True)
    return float(sum(saved.values()))


def plan_memory(
    path: str,
    device: torch.device,
    batch_items: Sequence[int],
    graph_size: tuple[float, float],
    *,
    budget: float | None,
    vector_bytes: int,
    sequence_length: int = 0,
) -> MemoryPlan:
    """How many batches `reuse` keeps, the predicted peak of HVP `path`, and a one-line refusal if it cannot fit.

    `batch_items`: the items of each batch; `graph_size`: the (fixed, per-item) bytes autograd saves for one batch's
    gradient graph; `budget`: the bytes kept graphs may take (default: half the free memory); `vector_bytes`: one
    parameter-sized vector's; `sequence_length`: the longest token sequence (0: none), for the advice on refusal.
    """
    free = available_bytes(device)
    budget = int(budget if budget is not None else 0.5 * free)
    fixed, per_item = graph_size
    sizes = [fixed + per_item * n for n in batch_items]
    largest = max(sizes, default=0.0)
    transient = GRAPH_OVERHEAD["transient"] * largest
    kept, kept_bytes = 0, 0.0
    if path == "reuse":
        room = min(budget, free - transient - WORKSPACE_BYTES)  # kept graphs never crowd out a streamed batch
        for size in sizes:
            if kept_bytes + GRAPH_OVERHEAD["kept"] * size > room:
                break
            kept, kept_bytes = kept + 1, kept_bytes + GRAPH_OVERHEAD["kept"] * size
        peak = kept_bytes + transient
    elif path == "linearize":
        peak = GRAPH_OVERHEAD["linearize"] * sum(sizes) + transient
    elif path == "fwd-rev":
        peak = GRAPH_OVERHEAD["fwd-rev"] * sum(sizes)
    elif path == FINITE_DIFFERENCE_HVP:
        # one first-order gradient graph at a time (no create_graph: double backward's transient graph bounds it)
        # plus the n-vectors fd.CentralDifferences holds (fd.HELD_VECTORS)
        peak = transient + fd.HELD_VECTORS * vector_bytes
    else:  # double backward, and compiled forward-over-reverse: one batch at a time
        peak = transient
    plan = MemoryPlan(
        path=path,
        kept_batches=kept,
        n_batches=len(sizes),
        kept_bytes=int(kept_bytes),
        predicted_peak_bytes=int(peak + WORKSPACE_BYTES),
        budget_bytes=budget,
        available_bytes=int(free),
        resident_bytes=resident_bytes(device),
    )
    if plan.predicted_peak_bytes > free:
        raise InsufficientMemory(_memory_advice(plan, device, largest, graph_size, max(batch_items, default=1), sequence_length))
    return plan


def _memory_advice(
    plan: MemoryPlan, device: torch.device, largest: float, graph_size: tuple[float, float], items: int, length: int
) -> str:
    """One line: what the path needs, what is free, and the options that would fit."""
    need, free = format_size(plan.predicted_peak_bytes), format_size(plan.available_bytes)
    fixed, per_item = (GRAPH_OVERHEAD["transient"] * b for b in graph_size)
    fitting = int((0.8 * plan.available_bytes - WORKSPACE_BYTES - fixed) / per_item) if per_item else 0
    options = []
    if plan.path in ("linearize", "fwd-rev") and GRAPH_OVERHEAD["transient"] * largest <= plan.available_bytes:
        options.append("hvp_method='auto' (keeps what fits, streams the rest)")
    if GRAPH_OVERHEAD["transient"] * largest > plan.available_bytes or not options:
        if length and per_item:  # per item cost grows at least linearly with the length (attention: squared)
            shorter = int(length * (0.8 * plan.available_bytes - WORKSPACE_BYTES - fixed) / (per_item * items))
            if 2 <= shorter < length:
                options.append(f"max_length={shorter}")
        if plan.path != FINITE_DIFFERENCE_HVP and length:
            options.append(f"hvp_method={FINITE_DIFFERENCE_HVP!r} (gradients only: no second-order graph, fused attention)")
        options.append(
            f"batch_size={max(fitting, 1)} or smaller"
            if fitting >= 1
            else "a smaller model or a larger device (not even one sample's gradient graph fits)"
        )
    return f"not enough memory on {device}: HVPs by {plan.path} need about {need} but {free} is free; use {' or '.join(options)}"


def _meminfo_available() -> int:
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _mapped_bytes() -> int:
    """This process's virtual size (what ulimit -v counts)."""
    return _proc_kib("/proc/self/status", "VmSize") or 0


def _proc_kib(path: str, field: str) -> int | None:
    """A `field:  N kB` line of a /proc file, in bytes; None where the file or field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
