"""Data-parallel training throughput: `landscape train` in one process against `torchrun --nproc_per_node 2`.

Every run is a real CLI process (torchrun's for two ranks) on CIFAR-shaped data (an .npz of random
3×32×32 images, 10 classes), one thread per process. Per (model, method, processes) it reports
- samples per second of the training steps (the log's `train_seconds`: steps only, all ranks' samples),
- the whole command's wall time, start-up and per-epoch evaluation included,
- peak resident memory of the largest process,
in interleaved rounds (one process, two processes, one, two, ...) with medians, on this shared machine.
A last table gives the step memory of `--accumulate K` against the whole batch (ResNet-20, batch 512).
Writes benchmarks/results/train_parallel.json.
Usage: python benchmarks/train_parallel.py [--rounds 3] [--samples 2048] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = [("c3", "sgd"), ("resnet20", "sgd"), ("c3", "sam"), ("c3", "smoothout")]


def cifar_shaped(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x=rng.standard_normal((n, 3, 32, 32)).astype(np.float32),
        y=rng.integers(0, 10, n),
        x_test=rng.standard_normal((256, 3, 32, 32)).astype(np.float32),
        y_test=rng.integers(0, 10, 256),
    )
    return path


def landscape_command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "analysis.cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "analysis.cli"]


def one_run(data: Path, model: str, method: str, nproc: int, out: Path, epochs: int, extra: list[str]) -> dict:
    """One `landscape train` process tree: its wall time, its peak RSS, and the last epoch's step throughput."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [
        "train",
        "--data",
        f"npz:{data}",
        "--model",
        model,
        "--optimizer",
        method,
        "--batch-size",
        "128",
        "--lr",
        "0.01",
        "--epochs",
        str(epochs),
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]
    started = time.perf_counter()
    process = subprocess.Popen(
        landscape_command(nproc) + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    peak = 0
    while process.poll() is None:
        peak = max([peak, *(peak_rss(pid) for pid in descendants(process.pid))])
        time.sleep(0.5)  # VmHWM is a high-water mark: rare polls miss nothing but the last half second
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(process.stderr.read().strip().splitlines()[-1])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    n = len(np.load(data)["y"])
    return {"samples_per_s": n / log[-1]["train_seconds"], "wall_s": wall, "peak_rss_mb": peak / 2**20}


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun's workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def peak_rss(pid: int) -> int:
    """A process's peak resident memory (VmHWM) in bytes; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def throughput(data: Path, rounds: int, epochs: int, cases: list[tuple[str, str]]) -> list[dict]:
    rows = []
    for model, method in cases:
        runs: dict[int, list[dict]] = {1: [], 2: []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(rounds):
                for nproc in (1, 2):
                    runs[nproc].append(one_run(data, model, method, nproc, Path(tmp) / f"{nproc}-{r}", epochs, []))
        row = {"model": model, "method": method}
        for nproc, results in runs.items():
            row[f"samples_per_s_{nproc}"] = statistics.median(x["samples_per_s"] for x in results)
            row[f"wall_s_{nproc}"] = statistics.median(x["wall_s"] for x in results)
            row[f"peak_rss_mb_{nproc}"] = max(x["peak_rss_mb"] for x in results)  # of the largest process
        row["speedup"] = row["samples_per_s_2"] / row["samples_per_s_1"]
        row["per_round_speedup"] = [b["samples_per_s"] / a["samples_per_s"] for a, b in zip(runs[1], runs[2])]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def accumulation_memory(quick: bool) -> list[dict]:
    """Peak RSS of one training step of ResNet-20 at batch 512 (256 quick), whole and in K micro-batches, each in a
    fresh process."""
    batch = 256 if quick else 512
    code = (
        "import resource, torch, torch.nn.functional as F\n"
        "from landscape.inputs.models import model_for_data\nfrom landscape.training.optim import make_optimizer\n"
        "torch.manual_seed(0); m, _ = model_for_data('resnet20', (3, 32, 32), num_classes=10)\n"
        f"x = torch.randn({batch}, 3, 32, 32); y = torch.randint(0, 10, ({batch},))\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "opt = make_optimizer('sgd', m, lr=0.01, accumulate=K)\nopt.step(m, x, y, F.cross_entropy)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    rows = []
    for k in (1, 2, 4, 8):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, "-c", code.replace("accumulate=K", f"accumulate={k}")],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        rows.append({"model": "resnet20", "batch_size": batch, "accumulate": k, "step_peak_mb": float(done.stdout.split()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one round of C3 SGD on 256 samples, for tests")
    parser.add_argument("--out", default=None, help="result name (default train_parallel; --quick: not written)")
    args = parser.parse_args(argv)
    cases = CASES[:1] if args.quick else CASES
    with tempfile.TemporaryDirectory() as tmp:
        data = cifar_shaped(Path(tmp) / "cifar_shaped.npz", 256 if args.quick else args.samples)
        payload = {
            "setup": {
                "samples": 256 if args.quick else args.samples,
                "batch_size": 128,
                "epochs": args.epochs,
                "rounds": 1 if args.quick else args.rounds,
                "threads_per_process": 1,
                "cores": os.cpu_count(),
            },
            "throughput": throughput(data, 1 if args.quick else args.rounds, args.epochs, cases),
            "accumulation": accumulation_memory(args.quick),
        }
    if not args.quick or args.out:
        print("wrote", write_results(args.out or "train_parallel", payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
