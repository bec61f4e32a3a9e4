"""Cost of one exact Hessian-vector product, per path, relative to one gradient (measured in one run).

Three tables, each written into benchmarks/results/hvp.json (a table not rerun keeps its rows):
- `paths`: one batch per problem; HVP ÷ gradient per path, side by side with PyHessian and curvlinops;
- `large`: ResNet-20 on 2,048 CIFAR-shaped samples in batches of 128: steady-state HVP ÷ gradient
  over the whole set, predicted and measured peak memory per path, against PyHessian's data-loader HVP;
- `short`: wall time of a whole short run as a user starts it (process start-up included):
  `landscape measure --metrics eig` against PyHessian's `eigenvalues(top_n=5)` on the digits models;
- `base`: absolute milliseconds, one process per problem, of a plain `loss.backward()` (zero_grad, forward,
  loss, backward, grads flattened), the Objective's gradient, its HVP (auto) and PyHessian's HVP on the same model
  and batch, called in turn for --rounds interleaved rounds; medians of every call. Each problem runs twice, under
  glibc's default allocator settings and with freed memory kept in the heap (NO_TRIM), one thread each.
In `paths`, each (problem, path) runs in its own process so its peak memory is its own, --rounds times interleaved
over the paths; each number is the median over the rounds.
Usage: python benchmarks/hvp.py [--tables paths,large,short,base] [--problems resnet20,convnet-digits,mlp-digits]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, rss_bytes, seconds_per_call, write_results  # noqa: E402

from landscape.engine.memory import parse_size  # noqa: E402
from landscape.engine.objective import Objective  # noqa: E402
from landscape.inputs.checkpoints import save_checkpoint  # noqa: E402
from landscape.inputs.data import MeasurementSet, load_data  # noqa: E402
from landscape.inputs.models import model_for_data  # noqa: E402

PATHS = ["linearize", "reuse", "fwd-rev", "double-backward", "auto", "pyhessian", "curvlinops"]
PROBES_PER_BLOCK = {"resnet20": 4, "c3": 4}  # batched probes per call; 16 on the small models


def problem(name: str):
    """(model, batches): ResNet-20 and C3 on one CIFAR-shaped batch of 128; ConvNet (128, or 1024) and MLPs (all 1437) on digits."""
    torch.manual_seed(0)
    if name.endswith("-digits"):
        data = load_data("digits")
        arch, hidden = {
            "mlp-digits": ("mlp", (100, 100)),
            "mlp32-digits": ("mlp", (32, 32)),
            "convnet-digits": ("convnet", None),
            "convnet1024-digits": ("convnet", None),  # the side-by-side run with PyHessian: 1,024 samples in one batch
        }[name]
        model, _ = model_for_data(arch, data, **({"hidden": hidden} if hidden else {}))
        # one batch each, so peers that take a single batch (PyHessian's `data=`) see the same data
        n = None if arch == "mlp" else int(name.removeprefix("convnet").removesuffix("-digits") or 128)
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
    row = {
        "problem": name,
        "path": path,
        "n_params": objective.n_params,
        "n_samples": objective.n_samples,
        "forward_s": forward,
        "gradient_s": gradient,
    }
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


LARGE_PATHS = ["auto", "double-backward", "linearize", "pyhessian"]
LARGE_SAMPLES, LARGE_BATCH, LARGE_BUDGET = 2048, 128, "8GiB"


def large_problem() -> tuple[torch.nn.Module, list]:
    """ResNet-20 and LARGE_SAMPLES seeded CIFAR-shaped samples in batches of LARGE_BATCH."""
    torch.manual_seed(0)
    model, _ = model_for_data("resnet20", (3, 32, 32), num_classes=10)
    g = torch.Generator().manual_seed(0)
    return model, [
        (torch.randn(LARGE_BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (LARGE_BATCH,), generator=g))
        for _ in range(LARGE_SAMPLES // LARGE_BATCH)
    ]


def run_large(path: str) -> dict:
    """Steady-state HVP over the whole large set by one path (auto within LARGE_BUDGET), its first call and its peak.

    The products run first, so the peak is measured from a clean start; the gradient is timed afterwards.
    """
    warnings.simplefilter("ignore")
    model, batches = large_problem()
    row = {"problem": f"resnet20 x {LARGE_SAMPLES}", "path": path, "n_samples": LARGE_SAMPLES, "batch_size": LARGE_BATCH}
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(1))
    base = rss_bytes()
    if path == "pyhessian":
        try:
            from pyhessian import hessian
        except ImportError as error:
            return {**row, "skipped": f"not installed ({error})"}
        h = hessian(model.eval(), torch.nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
        chunks = [c.view_as(p) for c, p in zip(torch.split(v, [p.numel() for p in h.params]), h.params)]
        matvec = lambda: h.dataloader_hv_product(chunks)  # noqa: E731
    else:
        budget = parse_size(LARGE_BUDGET) if path == "auto" else None
        try:
            objective = Objective(model, batches, device="cpu", hvp_method=path, hvp_check=False, graph_memory_budget=budget)
        except ValueError as error:  # the plan does not fit: the one-line refusal is the result
            return {**row, "refused": str(error)}
        plan = objective.memory_plan
        row.update(kept_batches=plan.kept_batches, n_batches=plan.n_batches, predicted_peak_mb=plan.predicted_peak_bytes / 2**20)
        matvec = lambda: objective.hvp(v)  # noqa: E731
    start = time.perf_counter()
    matvec()
    row["first_hvp_s"] = time.perf_counter() - start
    hvp = seconds_per_call(matvec, warmup=0, min_seconds=0, min_calls=2)
    row["peak_extra_mb"] = (rss_bytes("VmHWM") - base) / 2**20
    if "predicted_peak_mb" in row:
        row["measured_over_predicted"] = row["peak_extra_mb"] / row["predicted_peak_mb"]
    gradient = Objective(model, batches, device="cpu", hvp_method="double-backward", hvp_check=False).grad
    row["gradient_s"] = seconds_per_call(gradient, warmup=1, min_seconds=0, min_calls=2)
    row.update(hvp_s=hvp, hvp_over_gradient=hvp / row["gradient_s"])
    return row


SHORT_PROBLEMS = {
    "mlp-digits": ("mlp", {"hidden": [100, 100]}),
    "mlp32-digits": ("mlp", {"hidden": [32, 32]}),
    "convnet-digits": ("convnet", {}),
}
# PyHessian at its cheapest: the data as saved tensors (no data-set code at start-up), all of it in one batch
PYHESSIAN_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from pyhessian import hessian
from landscape.inputs.models import model_from_spec
checkpoint = torch.load(sys.argv[1], weights_only=True)
model = model_from_spec(checkpoint["model_spec"])
model.load_state_dict(checkpoint["state_dict"])
x, y = torch.load(sys.argv[2], weights_only=True)
h = hessian(model.eval(), torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
values, _ = h.eigenvalues(top_n=5)
print(max(values))
"""


def short_checkpoint(name: str, folder: Path) -> Path:
    """A freshly initialised digits model saved as a toolkit checkpoint (the same weights for every tool)."""
    arch, kwargs = SHORT_PROBLEMS[name]
    torch.manual_seed(0)
    data = load_data("digits")
    model, spec = model_for_data(arch, data, **kwargs)
    torch.save((data.x_train, data.y_train), folder / f"{name}.data.pt")
    return save_checkpoint(
        folder / f"{name}.pt", model, model_spec=spec, data_spec={"spec": "digits", "seed": 0, "normalize": None}
    )


def run_short(name: str, tool: str, checkpoint: Path) -> dict:
    """Wall time of one whole process, start-up included, and the λ1 it reports."""
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    if tool == "pyhessian":
        command = [sys.executable, "-c", PYHESSIAN_SCRIPT, str(checkpoint), str(checkpoint.with_suffix(".data.pt"))]
    else:
        landscape = Path(sys.executable).with_name("landscape")
        command = [
            str(landscape),
            "measure",
            str(checkpoint),
            "--metrics",
            "eig",
            "--k",
            "5",
            "--json",
            "--quiet",
            *(["--hvp", tool.split(":")[1]] if ":" in tool else []),
        ]
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        return {"problem": name, "tool": tool, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    if tool == "pyhessian":
        lambda1, products = float(out.stdout.strip().splitlines()[-1]), None
    else:
        eig = json.loads(out.stdout)[0]["metrics"]["eig"]
        lambda1, products = eig["values"][0], eig["n_matvecs"]
    return {"problem": name, "tool": tool, "wall_s": seconds, "lambda1": lambda1, "n_hvps": products}


def short_table(problems: list[str], rounds: int) -> list[dict]:
    tools = ["landscape", "landscape:linearize", "pyhessian"]
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        checkpoints = {name: short_checkpoint(name, Path(folder)) for name in problems}
        for _ in range(rounds):  # interleaved: a busy spell hits every tool alike
            for name in problems:
                for tool in tools:
                    runs.setdefault((name, tool), []).append(run_short(name, tool, checkpoints[name]))
    rows = []
    for results in runs.values():
        ok = [r for r in results if "error" not in r]
        row = (
            dict(results[0], rounds=len(results))
            if not ok
            else {
                **ok[0],
                "rounds": len(ok),
                "wall_s": statistics.median(r["wall_s"] for r in ok),
                "wall_s_min": min(r["wall_s"] for r in ok),
            }
        )
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def large_table(rounds: int) -> list[dict]:
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for path in LARGE_PATHS:
            out = subprocess.run([sys.executable, __file__, "--one-large", path], capture_output=True, text=True)
            runs.setdefault(path, []).append(
                json.loads(out.stdout.strip().splitlines()[-1])
                if out.returncode == 0
                else {"path": path, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
            )
    rows = []
    for results in runs.values():
        row = median_row(results)
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def paths_table(problems: list[str], paths: list[str], rounds: int) -> list[dict]:
    rows = []
    for name in problems:
        rounds_of: dict[str, list[dict]] = {}
        for _ in range(rounds):  # interleaved, so a busy spell on a shared machine hits every path alike
            for path in paths:
                out = subprocess.run([sys.executable, __file__, "--one", name, path], capture_output=True, text=True)
                rounds_of.setdefault(path, []).append(
                    json.loads(out.stdout.strip().splitlines()[-1])
                    if out.returncode == 0
                    else {"problem": name, "path": path, "error": out.stderr.strip().splitlines()[-1]}
                )
        for runs in rounds_of.values():
            row = median_row(runs)
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


BASE_PROBLEMS = "resnet20,c3,convnet-digits,convnet1024-digits,mlp-digits,mlp32-digits"


def run_base(name: str, rounds: int) -> dict:
    """Milliseconds per call of a plain backward, our gradient, our HVP and PyHessian's HVP, in interleaved rounds.

    `plain_gradient` is what PyHessian and a training loop pay for a gradient: model.zero_grad(), forward,
    torch.nn.CrossEntropyLoss, loss.backward(), then the .grad tensors concatenated into one vector (the form ours
    returns). `pyhessian_hvp` is the product PyHessian's eigenvalues() and trace() take on one batch: one backward
    through the create_graph gradient kept at construction, its result left as a list of tensors (not flattened).
    Every call is timed on its own; each number is the median over all calls of its kind. Page faults per call
    (minor faults, from getrusage) are recorded, since glibc handing large buffers back to the kernel and faulting
    them in again is the largest noise between runs of the same product.
    """
    warnings.simplefilter("ignore")
    model, batches = problem(name)
    (x, y), params = batches[0], [p for p in model.parameters() if p.requires_grad]
    objective = Objective(model, batches, device="cpu")
    v = torch.randn(objective.n_params, generator=torch.Generator().manual_seed(1))
    criterion = torch.nn.CrossEntropyLoss()
    model.eval()

    def plain_gradient() -> torch.Tensor:
        model.zero_grad()
        criterion(model(x), y).backward()
        return torch.cat([p.grad.reshape(-1) for p in params])

    row = {"problem": name, "n_params": objective.n_params, "n_samples": objective.n_samples, "rounds": rounds}
    calls = {"plain_gradient": plain_gradient, "gradient": objective.grad, "hvp": lambda: objective.hvp(v)}
    try:
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product
    except ImportError as error:
        row["pyhessian"] = f"not installed ({error})"
    else:
        h = hessian(model, criterion, data=(x, y), cuda=False)
        pieces = [c.view_as(p) for c, p in zip(torch.split(v, [p.numel() for p in params]), params)]
        calls["pyhessian_hvp"] = lambda: hessian_vector_product(h.gradsH, h.params, pieces)
    row["max_gradient_difference"] = float((objective.grad() - plain_gradient()).abs().max())  # the same numbers
    times: dict[str, list[float]] = {key: [] for key in calls}
    faults: dict[str, int] = dict.fromkeys(calls, 0)
    repeats = 1 if name in PROBES_PER_BLOCK else 3
    for fn in calls.values():  # warm-up: first-use allocations, the HVP's kept graph
        fn()
        fn()
    for _ in range(rounds):  # interleaved: a busy spell hits every call alike
        for key, fn in calls.items():
            for _ in range(repeats):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
                faults[key] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for key, values in times.items():
        row[f"{key}_ms"] = 1e3 * statistics.median(values)
        row[f"{key}_faults"] = faults[key] / len(values)
    row["gradient_over_plain"] = row["gradient_ms"] / row["plain_gradient_ms"]
    row["hvp_over_gradient"] = row["hvp_ms"] / row["gradient_ms"]
    if "pyhessian_hvp_ms" in row:
        row["hvp_over_pyhessian"] = row["hvp_ms"] / row["pyhessian_hvp_ms"]
        row["pyhessian_hvp_over_plain"] = row["pyhessian_hvp_ms"] / row["plain_gradient_ms"]
    return row


# glibc's default: a freed block above the (dynamic) mmap threshold, or more than twice it free at the heap's top,
# goes back to the kernel, and the next product faults it in again page by page. Whether it does depends on what
# else happens to be alive at the heap's top (a plain backward's .grad tensors, kept between calls, pin it), so the
# same computation costs 10-90% more in one harness than in another. "no-trim" keeps freed memory in the heap.
NO_TRIM = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def base_table(problems: list[str], rounds: int) -> list[dict]:
    rows = []
    for allocator, env in (("glibc default", {}), ("no-trim", NO_TRIM)):
        for name in problems:
            out = subprocess.run(
                [sys.executable, __file__, "--one-base", name, str(rounds)],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            )
            row = (
                json.loads(out.stdout.strip().splitlines()[-1])
                if out.returncode == 0
                else {"problem": name, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
            )
            rows.append({"allocator": allocator, **row})
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tables", default="paths,large,short", help="which tables to run (default %(default)s)")
    parser.add_argument("--problems", default="resnet20,c3,convnet-digits,mlp-digits")
    parser.add_argument("--short-problems", default="mlp-digits,mlp32-digits,convnet-digits")
    parser.add_argument("--base-problems", default=BASE_PROBLEMS)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--rounds", type=int, default=3, help="runs per (problem, path), interleaved; medians reported")
    parser.add_argument("--update", action="store_true", help="replace only these rows of the paths table")
    parser.add_argument("--one", nargs=2, metavar=("PROBLEM", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--one-large", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--one-base", nargs=2, metavar=("PROBLEM", "ROUNDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_base:
        print(json.dumps(run_base(args.one_base[0], int(args.one_base[1]))))
        return
    if args.one or args.one_large:
        print(json.dumps(run_one(*args.one) if args.one else run_large(args.one_large)))
        return
    tables = args.tables.split(",")
    previous = json.loads((RESULTS / "hvp.json").read_text()) if (RESULTS / "hvp.json").exists() else {}
    results = {key: previous.get(key, []) for key in ("rows", "large", "short", "base")}
    if "paths" in tables:
        rows = paths_table(args.problems.split(","), args.paths.split(","), args.rounds)
        if args.update:
            fresh = {(r["problem"], r["path"]) for r in rows}
            rows = [r for r in results["rows"] if (r["problem"], r["path"]) not in fresh] + rows
        results["rows"] = rows
    if "large" in tables:
        results["large"] = large_table(args.rounds)
    if "short" in tables:
        results["short"] = short_table(args.short_problems.split(","), max(args.rounds, 3))
    if "base" in tables:
        results["base"] = base_table(args.base_problems.split(","), max(args.rounds, 5))
    print("wrote", write_results("hvp", results))


if __name__ == "__main__":
    main()
