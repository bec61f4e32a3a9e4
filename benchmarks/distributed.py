"""Scale-out on torch.distributed: 1 vs N processes (one thread each) for Lanczos top-5 and a 2-D surface.

Lanczos runs on a data-parallel Objective (batches sharded, every HVP all-reduced); the surface
shards grid points (landscape.surfaces.surface). Each configuration is its own job: a plain process for
N = 1, `torchrun --standalone --nproc_per_node N` otherwise. Also writes the on-paper scaling to
N GPUs from the measured per-HVP compute time and all-reduce size. Writes
benchmarks/results/distributed.json. Usage: python benchmarks/distributed.py [--quick] [--problem c3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_results  # noqa: E402  (also sets one thread per process)

from landscape.curvature.spectrum import lanczos  # noqa: E402
from landscape.engine import distributed as ranks  # noqa: E402
from landscape.engine.objective import Objective  # noqa: E402
from landscape.engine.operators import HessianOperator  # noqa: E402
from landscape.inputs.data import MeasurementSet, load_data  # noqa: E402
from landscape.inputs.models import model_for_data  # noqa: E402
from landscape.surfaces.directions import random_directions  # noqa: E402
from landscape.surfaces.surface import compute_surface, grid_axis  # noqa: E402

# Assumed interconnects for the on-paper model: NCCL ring all-reduce moves 2(N−1)/N × bytes per rank.
LINKS = {
    "nvlink-node": {"bus_bandwidth_GBps": 100.0, "latency_us": 20.0},
    "infiniband-100G": {"bus_bandwidth_GBps": 10.0, "latency_us": 50.0},
}
PAPER_RANKS = (1, 2, 4, 8, 16, 32, 64)


def problem(name: str, n_samples: int | None) -> tuple[torch.nn.Module, list]:
    """(model, batches of 256): the digits ConvNet (~10k parameters) or C3 (~1.8M) on seeded CIFAR-shaped data."""
    torch.manual_seed(0)
    if name == "convnet-digits":
        data = load_data("digits")
        model, _ = model_for_data("convnet", data)
        return model, MeasurementSet("train", n_samples, batch_size=256).batches(data)
    g = torch.Generator().manual_seed(0)
    n = n_samples or 2048
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    model, _ = model_for_data("c3", (3, 32, 32), num_classes=10)
    return model, list(zip(x.split(256), y.split(256)))


def lanczos_job(args: argparse.Namespace) -> dict:
    """Top-5 Lanczos on this rank's shard, every HVP all-reduced; plus steady-state HVP and all-reduce times."""
    model, batches = problem(args.problem, args.n_samples)
    objective = Objective(model, ranks.shard(batches), device="cpu", distributed=ranks.active())
    v = torch.randn(objective.n_params, generator=torch.Generator().manual_seed(1))
    hvp_s = median_seconds(lambda: objective.hvp(v), args.calls)
    buffer = torch.zeros(objective.n_params, dtype=objective.dtype)
    allreduce_s = median_seconds(lambda: ranks.all_reduce_sum(buffer), 20) if ranks.active() else 0.0
    start = time.perf_counter()
    result = lanczos(HessianOperator(objective), 5, tol=args.tol, max_matvecs=300, seed=0)
    seconds = time.perf_counter() - start
    return {
        "n_params": objective.n_params,
        "n_samples": objective.n_samples,
        "n_batches": objective.n_batches,
        "hvp_method": objective.hvp_method,
        "allreduce_bytes_per_hvp": objective.n_params * objective.w.element_size(),
        "hvp_s": hvp_s,
        "allreduce_s": allreduce_s,
        "lanczos_s": seconds,
        "n_matvecs": result.n_matvecs,
        "s_per_matvec": seconds / result.n_matvecs,
        "values": result.values.tolist(),
        "converged": result.converged,
    }


def surface_job(args: argparse.Namespace) -> dict:
    """A grid×grid filter-normalized surface; grid points are split over the ranks, each on the whole set."""
    model, batches = problem(args.problem, args.n_samples)
    objective = Objective(model, batches, device="cpu")
    directions = random_directions(objective, 2, seed=0)
    axis = grid_axis(-1, 1, args.grid)
    start = time.perf_counter()
    surface = compute_surface(objective, directions, [axis, axis])
    seconds = time.perf_counter() - start
    return {
        "points": args.grid**2,
        "n_samples": objective.n_samples,
        "seconds": seconds,
        "points_per_s": args.grid**2 / seconds,
        "loss": surface.loss["train"].tolist(),
    }


JOBS = {"lanczos": lanczos_job, "surface": surface_job}


def worker(args: argparse.Namespace) -> None:
    """One process of a job: join torchrun's group if launched by it; rank 0 prints the JSON row."""
    joined = ranks.init_from_env("cpu")
    try:
        row = {"world_size": ranks.world_size(), **JOBS[args.one](args)}
        if ranks.is_main():
            print(json.dumps(row), flush=True)
    finally:
        if joined:
            ranks.shutdown()


def launch(job: str, world: int, args: argparse.Namespace) -> dict:
    """Run one job on `world` processes, one thread each; returns rank 0's row."""
    options = [
        "--one",
        job,
        "--problem",
        args.problem,
        "--grid",
        str(args.grid),
        "--tol",
        str(args.tol),
        "--calls",
        str(args.calls),
    ] + (["--n-samples", str(args.n_samples)] if args.n_samples else [])
    launcher = (
        [sys.executable]
        if world == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(launcher + [__file__] + options, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{job} on {world} processes failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def paper_scaling(hvp_s: float, nbytes: int, n_batches: int) -> dict:
    """t_N = t_compute·⌈B/N⌉/B + t_allreduce, t_allreduce = latency + 2(N−1)/N·bytes/bandwidth (ring), per assumed link.

    Ranks hold whole batches, so the slowest holds ⌈B/N⌉ of the B batches: no gain past N = B.
    """
    model = {}
    for link, spec in LINKS.items():
        bandwidth, latency = spec["bus_bandwidth_GBps"] * 1e9, spec["latency_us"] * 1e-6
        rows = []
        for n in PAPER_RANKS:
            allreduce = 0.0 if n == 1 else latency + 2 * (n - 1) / n * nbytes / bandwidth
            t = hvp_s * math.ceil(n_batches / n) / n_batches + allreduce
            rows.append({"ranks": n, "hvp_s": t, "allreduce_s": allreduce, "speedup": hvp_s / t, "efficiency": hvp_s / (n * t)})
        model[link] = {**spec, "rows": rows, "min_compute_s_for_90pct_at_8": 9 * 8 * (latency + 2 * 7 / 8 * nbytes / bandwidth)}
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="convnet-digits", choices=["convnet-digits", "c3"])
    parser.add_argument(
        "--n-samples", type=int, default=None, help="measurement set size (default: all 1437 digits; 2048 for c3)"
    )
    parser.add_argument("--grid", type=int, default=11, help="surface points per axis (default 11)")
    parser.add_argument("--tol", type=float, default=1e-3, help="Lanczos tolerance (default 1e-3)")
    parser.add_argument("--calls", type=int, default=10, help="timed HVP calls (default 10)")
    parser.add_argument("--world", type=int, default=2, help="processes to compare with one (default 2)")
    parser.add_argument("--quick", action="store_true", help="a small run that checks the benchmark works")
    parser.add_argument("--one", choices=list(JOBS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        worker(args)
        return
    if args.quick:
        args.n_samples, args.grid, args.calls = args.n_samples or 512, min(args.grid, 7), min(args.calls, 3)
    rows = {job: {w: launch(job, w, args) for w in (1, args.world)} for job in JOBS}
    one, many = rows["lanczos"][1], rows["lanczos"][args.world]
    s1, sN = rows["surface"][1], rows["surface"][args.world]
    surfaces_identical = s1.pop("loss") == sN.pop("loss")  # the grids themselves are not stored
    summary = {
        "lanczos_speedup_wall": one["lanczos_s"] / many["lanczos_s"],
        "lanczos_speedup_per_matvec": one["s_per_matvec"] / many["s_per_matvec"],
        "lanczos_efficiency_per_matvec": one["s_per_matvec"] / (args.world * many["s_per_matvec"]),
        "hvp_speedup": one["hvp_s"] / many["hvp_s"],
        "max_eigenvalue_rel_diff": float(np.max(np.abs(np.subtract(one["values"], many["values"])) / np.abs(one["values"]))),
        "surface_speedup": sN["points_per_s"] / s1["points_per_s"],
        "surface_target_speedup": 1.6,
        "surfaces_identical": surfaces_identical,
    }
    for name, value in summary.items():
        print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    payload = {
        "quick": args.quick,
        "problem": args.problem,
        "world": args.world,
        "threads_per_process": 1,
        "load_average_at_end": os.getloadavg(),
        "rows": {job: list(r.values()) for job, r in rows.items()},
        "summary": summary,
        "paper_scaling": paper_scaling(one["hvp_s"], one["allreduce_bytes_per_hvp"], one["n_batches"]),
        "note": "timed on a shared machine unless stated otherwise; paper_scaling uses the 1-process HVP time "
        "as t_compute (CPU, one thread): divide it by the GPU speedup for GPU estimates "
        "(min_compute_s_for_90pct_at_8 is the per-HVP compute time 8 ranks need for 90% efficiency)",
    }
    if args.quick:
        print("quick run: results not written")
        return
    name = "distributed" if args.problem == "convnet-digits" else f"distributed-{args.problem}"
    print("wrote", write_results(name, payload))


if __name__ == "__main__":
    main()
