"""Cost of one GGN-vector and one empirical-Fisher-vector product against an HVP (default path) and a gradient.

Each round is one process per problem that times, in that process, a gradient, an HVP by the Objective's
default path (`auto`), a GGN product and a Fisher product (linearizations kept, the default where a kept
graph fits), and a GGN product recomputing its linearization (the memory-lean mode, taken where the HVP
path is double backward); single probes and per probe of a block. Rounds are interleaved over the
problems; each number is the median over rounds. Peak memory: one more process per (problem, product),
the resident-memory high-water mark above the set-up's. Writes benchmarks/results/ggn.json.
Usage: python benchmarks/ggn.py [--problems mlp-digits,convnet-digits,resnet20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rss_bytes, seconds_per_call, write_results  # noqa: E402
from hvp import PROBES_PER_BLOCK, problem  # noqa: E402

from landscape.engine.objective import Objective  # noqa: E402
from landscape.engine.operators import FisherOperator, GGNOperator, HessianOperator  # noqa: E402

PROBLEMS = ["mlp-digits", "convnet-digits", "resnet20"]
PRODUCTS = ["ggn", "fisher", "ggn-recompute", "hvp"]  # the HVP last: its kept graph is the largest


def operator(name: str, objective: Objective):
    return {
        "hvp": lambda: HessianOperator(objective),
        "ggn": lambda: GGNOperator(objective),
        "fisher": lambda: FisherOperator(objective),
        "ggn-recompute": lambda: GGNOperator(objective, keep=False),
    }[name]()


def time_round(name: str) -> dict:
    """Seconds of a gradient and of each product in this one process (single probe, and per probe of a block)."""
    warnings.simplefilter("ignore")
    model, batches = problem(name)
    objective = Objective(model, batches, device="cpu", hvp_check=False)
    v = torch.randn(objective.n_params, generator=torch.Generator().manual_seed(1))
    k = PROBES_PER_BLOCK.get(name, 16)
    V = torch.randn(k, objective.n_params, generator=torch.Generator().manual_seed(2))  # k probes, as rows
    row = {
        "problem": name,
        "n_params": objective.n_params,
        "n_samples": objective.n_samples,
        "hvp_path": objective.hvp_method,
        "probes_per_block": k,
        "forward_s": seconds_per_call(lambda: objective.evaluate()),
        "gradient_s": seconds_per_call(lambda: objective.grad()),
    }
    for product in PRODUCTS:
        op = operator(product, objective)
        start = time.perf_counter()
        op.matvec(v)  # the first product pays the set-up (linearization, tracing)
        row[f"{product}_first_s"] = time.perf_counter() - start
        row[f"{product}_s"] = seconds_per_call(lambda: op.matvec(v))
        row[f"{product}_block_s"] = seconds_per_call(lambda: op.products(V), warmup=1, min_calls=2) / k
        del op
    for product in PRODUCTS:
        row[f"{product}_over_gradient"] = row[f"{product}_s"] / row["gradient_s"]
        row[f"{product}_over_hvp"] = row[f"{product}_s"] / row["hvp_s"]
        row[f"{product}_block_over_gradient"] = row[f"{product}_block_s"] / row["gradient_s"]
    return row


def peak_memory(name: str, product: str) -> dict:
    """Resident-memory high-water mark of two products above what the set-up and a gradient reached (MiB)."""
    warnings.simplefilter("ignore")
    model, batches = problem(name)
    objective = Objective(model, batches, device="cpu", hvp_check=False)
    objective.grad()
    base = max(rss_bytes("VmHWM"), rss_bytes())
    v = torch.randn(objective.n_params, generator=torch.Generator().manual_seed(1))
    op = operator(product, objective)
    op.matvec(v)
    op.matvec(v)
    return {"problem": name, "product": product, "peak_extra_mb": (rss_bytes("VmHWM") - base) / 2**20}


def _subprocess(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_row(runs: list[dict]) -> dict:
    """The median of every timing over the rounds; the first error if a round failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    row = dict(runs[0], rounds=len(runs))
    for key, value in runs[0].items():
        if isinstance(value, float):
            row[key] = statistics.median(r[key] for r in runs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--rounds", type=int, default=3, help="processes per problem, interleaved; medians reported")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--memory", nargs=2, metavar=("PROBLEM", "PRODUCT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(time_round(args.one)))
        return
    if args.memory:
        print(json.dumps(peak_memory(*args.memory)))
        return
    names = args.problems.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.rounds):  # interleaved, so a busy spell on a shared machine hits every problem alike
        for name in names:
            runs[name].append(_subprocess("--one", name))
            print(name, {k: round(v, 3) for k, v in runs[name][-1].items() if k.endswith("over_gradient")}, flush=True)
    rows = [median_row(r) for r in runs.values()]
    if not args.no_memory:
        for row in (r for r in rows if "error" not in r):
            for product in PRODUCTS:
                row[f"{product}_peak_extra_mb"] = _subprocess("--memory", row["problem"], product).get("peak_extra_mb")
            print(row["problem"], {k: v for k, v in row.items() if k.endswith("_mb")}, flush=True)
    path = write_results(
        "ggn",
        {
            "rows": rows,
            "note": "CPU, one thread; *_s: median seconds per product (block: per probe of a block of probes_per_block); "
            "*_first_s: the first product, set-up included; ratios to the gradient and to the default-path HVP "
            "measured in the same process, then the median over rounds; peak_extra_mb: resident high-water mark "
            "of two products above the set-up's and a gradient's, one process per product",
        },
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
