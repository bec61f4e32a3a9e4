"""SLQ in bounded memory: full reorthogonalization against the three-term recurrence at a realistic n.

The operator: the Hessian (float32, CPU, exact HVPs) of an untrained MLP 784-1024-1024-10 (n = 1,863,690) on
128 random inputs with random labels. Both recurrences run `slq_density`'s defaults (4 runs × 60 steps, seed 0),
each in a fresh process, one thread: wall time, the n-vectors the recurrence holds (`Spectrum.stored_vectors`) and
the peak resident memory above what the process held after building the operator and one warm-up product of 4
rows (/proc VmHWM, so the HVPs' own working memory is in the baseline). Then how far apart the two results are:
the L1 distance of the densities, the spectral moments Σ w θ^p (p = 0..4, relative to the full run's) and the
largest node; and the default's choice at this n (2 GiB of vectors) and with 1 GiB free.

Usage: python benchmarks/density.py  (about 3-6 minutes on one core). Writes benchmarks/results/density.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rss_bytes, write_results  # noqa: E402

from landscape.curvature.density import default_reorthogonalize, slq_density  # noqa: E402
from landscape.engine.objective import Objective  # noqa: E402
from landscape.engine.operators import HessianOperator  # noqa: E402
from landscape.inputs.models import MLP  # noqa: E402

HIDDEN, SAMPLES, RUNS, STEPS = (1024, 1024), 128, 4, 60


def operator() -> HessianOperator:
    torch.manual_seed(0)
    model = MLP(input_shape=(1, 28, 28), num_classes=10, hidden=HIDDEN)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(SAMPLES, 1, 28, 28, generator=g), torch.randint(0, 10, (SAMPLES,), generator=g))]
    return HessianOperator(Objective(model, batches, device="cpu"))


def one(reorthogonalize: str) -> dict:
    """One recurrence in this process: its result, time and the peak memory above the operator's own."""
    op = operator()
    op.products(torch.ones(RUNS, op.shape[0]))  # the HVPs' working memory, into the baseline
    baseline = rss_bytes("VmHWM")
    start = time.perf_counter()
    spectrum = slq_density(op, n_runs=RUNS, n_steps=STEPS, seed=0, reorthogonalize=reorthogonalize)
    seconds = time.perf_counter() - start
    n = op.shape[0]
    return {
        "n": n,
        "reorthogonalization": spectrum.reorthogonalization,
        "stored_vectors": spectrum.stored_vectors,
        "stored_gb": spectrum.stored_vectors * n * 4 / 1e9,
        "peak_rss_above_operator_gb": (rss_bytes("VmHWM") - baseline) / 1e9,
        "seconds": seconds,
        "n_matvecs": spectrum.n_matvecs,
        "grid": spectrum.grid.tolist(),
        "density": spectrum.density.tolist(),
        "nodes": spectrum.nodes.tolist(),
        "weights": spectrum.weights.tolist(),
    }


def compare(full: dict, none: dict) -> dict:
    grid, density = np.array(full["grid"]), np.array(full["density"])
    other = np.interp(grid, np.array(none["grid"]), np.array(none["density"]))
    moments = {}
    for p in range(5):
        a = (np.array(full["weights"]) * np.array(full["nodes"]) ** p).sum(1)
        b = (np.array(none["weights"]) * np.array(none["nodes"]) ** p).sum(1)
        moments[p] = float(np.max(np.abs(a - b) / np.abs(a)))
    return {
        "density_l1": float(np.trapezoid(np.abs(density - other), grid)),
        "moment_relative_difference": moments,
        "largest_node": [float(np.max(full["nodes"])), float(np.max(none["nodes"]))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", choices=("full", "none"), help="(internal) run one recurrence, print JSON")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    runs = {}
    for reorthogonalize in ("full", "none"):
        done = subprocess.run([sys.executable, __file__, "--one", reorthogonalize], capture_output=True, text=True, check=True)
        runs[reorthogonalize] = json.loads(done.stdout.splitlines()[-1])
        shown = {k: v for k, v in runs[reorthogonalize].items() if k not in ("grid", "density", "nodes", "weights")}
        print(reorthogonalize, shown, flush=True)
    n = runs["full"]["n"]
    payload = {
        "problem": f"Hessian of MLP 784-{'-'.join(map(str, HIDDEN))}-10, {SAMPLES} random samples, float32, CPU",
        "n_runs": RUNS,
        "n_steps": STEPS,
        "runs": {k: {key: v for key, v in r.items() if key not in ("grid", "density")} for k, r in runs.items()},
        "agreement": compare(runs["full"], runs["none"]),
        "default_choice": {
            "no_free_bytes": default_reorthogonalize(n, RUNS, STEPS),
            "free_bytes_1GiB": default_reorthogonalize(n, RUNS, STEPS, free_bytes=2**30),
        },
    }
    print(json.dumps({k: payload[k] for k in ("agreement", "default_choice")}, indent=1))
    print("wrote", write_results("density", payload))


if __name__ == "__main__":
    main()
