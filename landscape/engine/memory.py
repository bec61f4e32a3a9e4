"""Memory: how much a device has free, sizes written for people, and the error when a measurement cannot fit.

Peak memory is predicted before a run starts (Objective.memory_plan), so a measurement that cannot fit fails at
once, in one line naming what it needs, what is free and the option that would fit, instead of being killed by the
kernel hours later or dying in a CUDA out-of-memory traceback.
"""

from __future__ import annotations

import os
import re
import resource

import torch

__all__ = ["InsufficientMemory", "available_bytes", "resident_bytes", "peak_resident_bytes", "parse_size", "format_size"]

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
