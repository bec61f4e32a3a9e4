"""Cost of one exact Hessian-vector product, per path, relative to one gradient (measured in one run).

Each (problem, path) runs in its own process so its peak memory is its own, --rounds times
interleaved over the paths; each number is the median over the rounds. Writes
benchmarks/results/hvp.json. Usage: python benchmarks/hvp.py [--problems resnet20,convnet,mlp-digits]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, rss_bytes, seconds_per_call, write_results  # noqa: E402

from landscape.data import MeasurementSet, load_data  # noqa: E402
from landscape.models import model_for_data  # noqa: E402
from landscape.objective import Objective  # noqa: E402

PATHS = ["linearize", "reuse", "fwd-rev", "double-backward", "auto", "pyhessian", "curvlinops"]
PROBES_PER_BLOCK = {"resnet20": 4, "c3": 4}  # batched probes per call; 16 on the small models


def problem(name: str):
    """(model, batches): ResNet-20 and C3 on one CIFAR-shaped batch of 128; ConvNet (128) and MLPs (all 1437) on digits."""
    torch.manual_seed(0)
    if name.endswith("-digits"):
        data = load_data("digits")
        arch, hidden = {"mlp-digits": ("mlp", (100, 100)), "mlp32-digits": ("mlp", (32, 32)),
                        "convnet-digits": ("convnet", None)}[name]
        model, _ = model_for_data(arch, data, **({"hidden": hidden} if hidden else {}))
        # one batch each, so peers that take a single batch (PyHessian's `data=`) see the same data
        n = None if arch == "mlp" else 128
        return model, MeasurementSet("train", n, batch_size=2048 if n is None else n).batches(data)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    model, _ = model_for_data(name, (3, 32, 32), num_classes=10)
    return model, [(x, y)]


def peer_hvp(path: str, model, batches):
    """A matvec closure of a peer library on the same model and data."""
    x, y = batches[0]
    params = [p for p in model.parameters() if p.requires_grad]
    if path == "pyhessian":
        from pyhessian import hessian

        h = hessian(model.eval(), torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        from pyhessian.utils import hessian_vector_product

        def matvec(v):
            chunks = torch.split(v, [p.numel() for p in params])
            return hessian_vector_product(h.gradsH, h.params, [c.view_as(p) for c, p in zip(chunks, params)])

        return matvec
    if path == "curvlinops":
        from curvlinops import HessianLinearOperator

        op = HessianLinearOperator(model.eval(), torch.nn.CrossEntropyLoss(), params, batches, check_deterministic=False)
        return lambda v: op @ v
    raise ValueError(path)


def run_one(name: str, path: str) -> dict:
    """Time forward, gradient and one HVP path in this process."""
    warnings.simplefilter("ignore")
    model, batches = problem(name)
    objective = Objective(model, batches, device="cpu", hvp_method="double-backward")
    forward = seconds_per_call(lambda: objective.evaluate())
    gradient = seconds_per_call(lambda: objective.grad())
    base_rss = rss_bytes()
    v = torch.randn(objective.n_params, generator=torch.Generator().manual_seed(1))
    row = {"problem": name, "path": path, "n_params": objective.n_params, "n_samples": objective.n_samples,
           "forward_s": forward, "gradient_s": gradient}
    if path in ("pyhessian", "curvlinops"):
        try:
            matvec = peer_hvp(path, model, batches)
        except ImportError as error:
            return {**row, "skipped": f"not installed ({error})"}
        hvp = seconds_per_call(lambda: matvec(v))
    else:
        objective = Objective(model, batches, device="cpu", hvp_method=path)
        row["resolved_path"] = objective.hvp_method
        hvp = seconds_per_call(lambda: objective.hvp(v))
        k = PROBES_PER_BLOCK.get(name, 16)
        V = torch.randn(k, objective.n_params)
        block = seconds_per_call(lambda: objective.hvp_batched(V), warmup=1, min_calls=2) / k
        row.update(probes_per_block=k, batched_hvp_s=block, batched_hvp_over_gradient=block / gradient)
    row.update(hvp_s=hvp, hvp_over_gradient=hvp / gradient, peak_extra_mb=(rss_bytes("VmHWM") - base_rss) / 2**20)
    return row


def median_row(runs: list[dict]) -> dict:
    """One row from repeated runs: the median of each number (the largest for peak memory); the first error if any failed."""
    failed = [r for r in runs if "error" in r or "skipped" in r]
    if failed:
        return failed[0]
    row = dict(runs[0], rounds=len(runs))
    for key, value in runs[0].items():
        if isinstance(value, float):
            values = [r[key] for r in runs]
            row[key] = max(values) if key == "peak_extra_mb" else statistics.median(values)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", default="resnet20,c3,convnet-digits,mlp-digits")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--rounds", type=int, default=3, help="runs per (problem, path), interleaved; medians reported")
    parser.add_argument("--update", action="store_true", help="replace only these rows in the existing results file")
    parser.add_argument("--one", nargs=2, metavar=("PROBLEM", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    rows = []
    for name in args.problems.split(","):
        rounds: dict[str, list[dict]] = {}
        for _ in range(args.rounds):  # interleaved, so a busy spell on a shared machine hits every path alike
            for path in args.paths.split(","):
                out = subprocess.run([sys.executable, __file__, "--one", name, path], capture_output=True, text=True)
                rounds.setdefault(path, []).append(json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                                                   else {"problem": name, "path": path,
                                                         "error": out.stderr.strip().splitlines()[-1]})
        for path, runs in rounds.items():
            row = median_row(runs)
            rows.append(row)
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
            print(shown, flush=True)
    if args.update:
        fresh = {(r["problem"], r["path"]) for r in rows}
        old = json.loads((RESULTS / "hvp.json").read_text())["rows"]
        rows = [r for r in old if (r["problem"], r["path"]) not in fresh] + rows
    print("wrote", write_results("hvp", {"rows": rows}))


if __name__ == "__main__":
    main()
