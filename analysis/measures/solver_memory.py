"""How many parameter-sized vectors each solver may hold, from the Objective's memory plan, refused in one line
where even the fewest do not fit; and the process's predicted peak beside the one measured."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from analysis.measures.notes import OptionNote
from landscape.curvature.spectrum import default_max_matvecs, default_max_vectors, minimum_vectors
from landscape.curvature.trace import HUTCHINSON_BLOCK, TRACE_MATVEC_MINIMUMS, trace_vectors
from landscape.engine.memory import InsufficientMemory, format_size, peak_resident_bytes
from landscape.engine.objective import Objective
from landscape.results import Result

# n-vectors a solver allocates beside the vectors it counts: Lanczos's product, its remainder and a second
# Gram–Schmidt pass; its check's recurrence (start, last two vectors, product, its projection) and the deflation's
# temporaries. Measured peaks: tests/test_solver_memory.py
SOLVER_TEMPORARIES = 8


def vector_bytes(op) -> int:
    """Bytes one solver vector of `op` takes in this process (sharded: this rank's entries)."""
    return op.length * torch.finfo(op.dtype).bits // 8


def free_beside_hvps(objective: Objective) -> int:
    """Memory the HVPs' predicted peak leaves free (the memory plan), for the solvers' vectors."""
    plan = objective.memory_plan
    return max(plan.available_bytes - plan.predicted_peak_bytes, 0)


def free_for_vectors(objective: Objective, size: int) -> int:
    """Bytes left for a solver's counted n-vectors (of `size` bytes): what the HVPs' predicted peak leaves free, less
    the solver's temporaries."""
    return free_beside_hvps(objective) - SOLVER_TEMPORARIES * size


def refuse_unless_fits(objective: Objective, solver: str, vectors: int, n: int, size: int, advice: str) -> None:
    """One line (InsufficientMemory) if `vectors` n-vectors of `solver` do not fit beside the HVPs' own peak."""
    free = free_for_vectors(objective, size)
    if vectors * size <= free:
        return
    raise InsufficientMemory(
        f"not enough memory on {objective.device}: {solver} holds {vectors} vectors of {n:,} parameters "
        f"({format_size(vectors * size)}) beside the HVPs' {format_size(objective.memory_plan.predicted_peak_bytes)}, "
        f"and {format_size(max(free, 0))} is left; use {advice}, a smaller --batch-size or a larger device"
    )


def lanczos_vectors(
    objective: Objective, n: int, dtype, k: int, max_matvecs: int | None, max_vectors: int | None, length: int | None = None
) -> int:
    """How many n-vectors Lanczos may hold (`max_vectors`, or what the memory plan leaves free); one line if even
    the fewest it can restart in do not fit beside the HVPs' own peak. `length`: the entries of each vector this
    process holds (sharded: its rank's share; default all n)."""
    size = (length or n) * torch.finfo(dtype).bits // 8
    k = min(k, n)
    budget = max_matvecs or default_max_matvecs(n, k)
    free = free_for_vectors(objective, size)
    # default_max_vectors sizes a vector by all n entries: the free bytes scaled to match a rank's share
    vectors = max_vectors or default_max_vectors(n, k, budget, dtype, max(free, 0) * n // (length or n))
    fit = int(0.9 * free) // size
    advice = f"--max-vectors {fit} (more restarts)" if fit >= minimum_vectors(k) else "a smaller --k"
    refuse_unless_fits(objective, "Lanczos", vectors, n, size, advice)
    return vectors


def hutchinson_block(objective: Objective, n: int, size: int, probes: int) -> int:
    """Probes per block of Hutchinson's estimator: HUTCHINSON_BLOCK, or fewer where the memory plan leaves less (said
    in a note: the probes are drawn a block at a time, so they differ from the default blocks')."""
    refuse_unless_fits(objective, "Hutchinson's estimator", trace_vectors("hutchinson", 1, n), n, size, "fewer parameters")
    fit = max(free_for_vectors(objective, size), 0) // size
    block = max(min(HUTCHINSON_BLOCK, probes, fit // trace_vectors("hutchinson", 1, n)), 1)
    if block < min(HUTCHINSON_BLOCK, probes):
        warnings.warn(
            OptionNote(
                f"Hutchinson's estimator takes blocks of {block} probes, not {HUTCHINSON_BLOCK}, to fit in memory; its "
                "probes, drawn a block at a time, differ from a run with the default blocks"
            ),
            stacklevel=3,
        )
    return block


def sketch_fits(objective: Objective, method: str, probes: int, n: int, size: int) -> None:
    """Refuse, in one line naming the fewer --probes that would fit, a sketching trace estimate (xtrace, hutchpp)
    whose vectors do not fit beside the HVPs."""
    fit = max(free_for_vectors(objective, size), 0) // size
    smallest = TRACE_MATVEC_MINIMUMS[method]
    fewer = next((p for p in range(probes, smallest - 1, -1) if trace_vectors(method, p, n) <= fit), None)
    advice = f"--probes {fewer}" if fewer else "--trace-method hutchinson"
    refuse_unless_fits(objective, f"{method} with {probes} probes", trace_vectors(method, probes, n), n, size, advice)


def held_vectors(result: Result, n: int) -> int:
    """The most n-vectors a measured metric's solver held, temporaries included: its own count and
    SOLVER_TEMPORARIES, or a trace estimator's count (from its method and products), which includes its own."""
    stored = getattr(result, "stored_vectors", None)
    if stored:
        return stored + SOLVER_TEMPORARIES
    method, products = getattr(result, "method", None), getattr(result, "n_matvecs", None)
    if method in TRACE_MATVEC_MINIMUMS and products:
        return trace_vectors(method, products, n)
    return 0


@dataclass(frozen=True)
class ProcessMemory(Result):
    """The process's peak memory as the plan predicts it (what it held when planning, the HVPs' predicted peak, the
    most vectors a solver held and its temporaries) beside the peak measured (VmHWM; on CUDA the allocator's)."""

    resident_at_plan_bytes: int
    solver_vectors: int
    predicted_peak_bytes: int
    measured_peak_bytes: int
    measured_over_predicted: float | None


def process_memory(objective: Objective, results: list[Result]) -> ProcessMemory:
    """The plan's prediction for this process, with the solvers that ran (`results`), beside the peak so far."""
    plan = objective.memory_plan
    size = objective.n_params * torch.finfo(objective.dtype).bits // 8
    vectors = max((held_vectors(r, objective.n_params) for r in results), default=0)
    predicted = plan.resident_bytes + plan.predicted_peak_bytes + vectors * size
    measured = peak_resident_bytes(objective.device)
    return ProcessMemory(plan.resident_bytes, vectors, predicted, measured, measured / predicted if predicted else None)
