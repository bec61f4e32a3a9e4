"""Measuring in bfloat16 and float16 against float32: errors of λ1..λ5 and of the trace, and seconds per HVP.

The model runs in the low dtype (forward and both backwards); the solvers stay float32 (landscape.engine.objective).
Each problem is one model and one fixed batch, measured in each dtype with the same Lanczos start and the same
Hutchinson probes (seed 0), so a difference from float32 is the precision's alone:
- resnet20: untrained ResNet-20 (BatchNorm, eval mode) on 64 random CIFAR-shaped inputs with random labels;
- gpt2-2x128, gpt2-4x256: HuggingFace GPT2LMHeadModel from a GPT2Config (40 Adam steps from a seeded init, vocabulary
  4,096), 16 sequences of 64 tokens from a fixed Zipf-like corpus, token cross-entropy.
Per (problem, dtype): the loss; λ1..λ5 by `lanczos` (stop "residual", tol 1e-3, at most --max-matvecs products:
the certified stop's extra check is the same in every dtype and left out for time); Hutchinson's trace (--probes
Rademacher probes); one HVP's relative error against float32 on a fixed unit vector; `self_check`: the relative
difference between two exact paths (fwd-rev against double backward) and between two repeats, which sets
hvp_check_tolerance; seconds per HVP and per gradient (medians of --rounds rounds that call every dtype in turn,
one thread). `--markdown` prints the tables of docs/how-to/precision.md from the results file.

Usage: python benchmarks/precision.py [--problems resnet20,gpt2-2x128,gpt2-4x256] [--dtypes float32,bfloat16,float16]
Writes benchmarks/results/precision.json; a (problem, dtype) not rerun keeps its row, and float32 runs first.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS, write_results  # noqa: E402

from landscape.curvature.spectrum import lanczos  # noqa: E402
from landscape.curvature.trace import hutchinson  # noqa: E402
from landscape.engine.objective import Objective, ObjectiveError  # noqa: E402
from landscape.engine.operators import HessianOperator  # noqa: E402
from landscape.inputs.batches import token_cross_entropy  # noqa: E402
from landscape.inputs.models import model_for_data  # noqa: E402
from landscape.inputs.precision import parse_dtype  # noqa: E402

GPT2 = {"gpt2-2x128": (2, 128, 4), "gpt2-4x256": (4, 256, 4)}  # layers, width, heads
PROBLEMS = ["resnet20", *GPT2]
VOCAB, SEQUENCES, LENGTH = 4096, 16, 64
K = 5
TRAIN_STEPS = 40  # Adam steps (lr 3e-3) on the batch measured: token loss 8.3 → 4.6 on gpt2-2x128


def problem(name: str) -> tuple[torch.nn.Module, list, dict]:
    """(model, batches, Objective keywords) of one problem, the same in every dtype."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "resnet20":
        x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
        model, _ = model_for_data("resnet20", (3, 32, 32), num_classes=10)
        return model.eval(), [(x, y)], {}
    import transformers

    layers, width, heads = GPT2[name]
    config = transformers.GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        vocab_size=VOCAB,
        n_positions=LENGTH,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(config)
    weights = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, SEQUENCES * LENGTH, replacement=True, generator=g).reshape(SEQUENCES, LENGTH)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(TRAIN_STEPS):  # away from the initialization, whose top eigenvalues crowd together
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval(), [batch], {"loss": token_cross_entropy}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure(name: str, dtype_name: str, probes: int, max_matvecs: int) -> tuple[dict, torch.Tensor]:
    """One (problem, dtype) row, and its HVP on the fixed unit vector (for the error against float32)."""
    model, batches, kwargs = problem(name)
    dtype = parse_dtype(dtype_name)
    objective = Objective(model, batches, dtype=dtype, device="cpu", hvp_check=False, **kwargs)
    v = torch.randn(objective.n_params, generator=torch.Generator().manual_seed(1))
    v /= v.norm()
    row: dict = {"n_params": objective.n_params, "solver_dtype": str(objective.dtype).replace("torch.", "")}
    try:
        row["loss"] = objective.loss()
        hv = objective.hvp(v)
    except ObjectiveError as error:
        return {**row, "failed": str(error)}, torch.full_like(v, math.nan)
    paths = {}
    for path in ("double-backward", "fwd-rev"):
        other = Objective(model, batches, dtype=dtype, device="cpu", hvp_check=False, hvp_method=path, **kwargs)
        paths[path] = other.hvp(v)
    row["self_check"] = {
        "fwd_rev_vs_double_backward": relative(paths["fwd-rev"], paths["double-backward"]),
        "repeat": relative(objective.hvp(v), hv),
    }
    began = time.perf_counter()
    eig = lanczos(HessianOperator(objective), K, tol=1e-3, max_matvecs=max_matvecs, seed=0, stop="residual")
    row["eig"] = {
        "values": eig.values.tolist(),
        "error_bounds": eig.error_bounds.tolist(),
        "converged": eig.converged,
        "max_matvecs": max_matvecs,
        "hvps": eig.n_matvecs,
        "seconds": time.perf_counter() - began,
    }
    began = time.perf_counter()
    trace = hutchinson(HessianOperator(objective), probes, seed=0)
    row["trace"] = {
        "estimate": trace.estimate,
        "stderr": trace.stderr,
        "hvps": trace.n_matvecs,
        "seconds": time.perf_counter() - began,
    }
    return row, hv


def timings(name: str, dtypes: list[str], rounds: int) -> dict[str, dict]:
    """Seconds per HVP and per gradient in each dtype: medians over `rounds` rounds that call every dtype in turn
    (after one warm-up each), so a load that changes during the run weighs on every dtype alike."""
    model, batches, kwargs = problem(name)
    objectives, calls = {}, {}
    for dtype in dtypes:
        objective = Objective(model, batches, dtype=parse_dtype(dtype), device="cpu", hvp_check=False, **kwargs)
        v = torch.randn(objective.n_params, generator=torch.Generator().manual_seed(1))
        try:
            objective.hvp(v / v.norm())
            objective.grad()
        except ObjectiveError:
            continue
        objectives[dtype] = objective
        calls[dtype] = {"hvp": lambda o=objective, u=v / v.norm(): o.hvp(u), "gradient": objective.grad}
    seconds: dict[str, dict[str, list]] = {d: {"hvp": [], "gradient": []} for d in objectives}
    for _ in range(rounds):
        for dtype, fns in calls.items():
            for what, fn in fns.items():
                began = time.perf_counter()
                fn()
                seconds[dtype][what].append(time.perf_counter() - began)
    return {d: {f"{what}_seconds": statistics.median(t) for what, t in times.items()} for d, times in seconds.items()}


def errors(row: dict, reference: dict, hv: torch.Tensor, reference_hv: torch.Tensor | None) -> dict:
    """Relative errors of a low-precision row against the float32 row (same probes, same start)."""
    if "failed" in row or "failed" in reference:
        return {}
    out = {
        f"lambda{i + 1}": abs(a - b) / abs(b) for i, (a, b) in enumerate(zip(row["eig"]["values"], reference["eig"]["values"]))
    }
    out["trace"] = abs(row["trace"]["estimate"] - reference["trace"]["estimate"]) / abs(reference["trace"]["estimate"])
    if reference_hv is not None:
        out["hvp"] = relative(hv, reference_hv)
    return out


def stored() -> dict:
    path = RESULTS / "precision.json"
    return json.loads(path.read_text()).get("problems", {}) if path.exists() else {}


def markdown(rows: dict) -> str:
    """The docs' tables (docs/how-to/precision.md): relative errors against float32, and seconds per HVP."""
    errors_table = ["| model | parameters | dtype | λ1 | λ2 | λ3 | λ4 | λ5 | trace | one HVP |", "|---" * 10 + "|"]
    times = ["| model | float32 | bfloat16 | float16 |", "|---|---|---|---|"]
    for name, by_dtype in rows.items():
        n = by_dtype.get("float32", {}).get("n_params", 0)
        for dtype in ("bfloat16", "float16"):
            row = by_dtype.get(dtype)
            if row is None:
                continue
            if "failed" in row:
                errors_table.append(f"| {name} | {n:,} | {dtype} | overflow (one-line error) |" + " |" * 6)
                continue
            e = row.get("error_vs_float32", {})
            cells = [f"{e[f'lambda{i}']:.1e}" for i in range(1, K + 1)] + [f"{e['trace']:.1e}", f"{e.get('hvp', math.nan):.1e}"]
            errors_table.append(f"| {name} | {n:,} | {dtype} | " + " | ".join(cells) + " |")
        cells = []
        for dtype in ("float32", "bfloat16", "float16"):
            seconds = by_dtype.get(dtype, {}).get("hvp_seconds")
            failed = "failed" in by_dtype.get(dtype, {})
            cells.append("overflow" if failed else "–" if seconds is None else f"{seconds:.2f} s")
        times.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(errors_table) + "\n\n" + "\n".join(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--probes", type=int, default=30, help="Hutchinson probes (default %(default)s)")
    parser.add_argument("--max-matvecs", type=int, default=300, help="Lanczos's most HVPs (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default %(default)s)")
    parser.add_argument("--markdown", action="store_true", help="print the docs' tables from the results file and stop")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(stored()))
        return
    warnings.simplefilter("ignore")  # transformers' config notes; lanczos's "not certified" (recorded per row)
    dtypes = sorted(args.dtypes.split(","), key=lambda d: d != "float32")  # float32 first: the reference
    for name in args.problems.split(","):
        reference_hv = None
        for dtype in dtypes:
            row, hv = measure(name, dtype, args.probes, args.max_matvecs)
            rows = stored()  # read again: another process may have written other problems meanwhile
            rows.setdefault(name, {})
            if dtype == "float32":
                reference_hv = hv
            elif "float32" in rows[name]:
                row["error_vs_float32"] = errors(row, rows[name]["float32"], hv, reference_hv)
            rows[name][dtype] = row
            print(f"{name} {dtype}: {json.dumps({k: row.get(k) for k in ('loss', 'error_vs_float32', 'failed')})}", flush=True)
            save(rows, args)
        rows = stored()
        for dtype, seconds in timings(name, dtypes, args.rounds).items():
            rows[name][dtype].update(seconds)
            if dtype != "float32" and "float32" in rows[name] and "hvp_seconds" in rows[name]["float32"]:
                rows[name][dtype]["hvp_time_ratio"] = seconds["hvp_seconds"] / rows[name]["float32"]["hvp_seconds"]
            print(f"{name} {dtype}: {seconds}", flush=True)
        save(rows, args)


def save(rows: dict, args: argparse.Namespace) -> None:
    write_results(
        "precision",
        {
            "what": "λ1..λ5 (Lanczos) and Hutchinson trace with the model in bfloat16/float16 against float32; solvers float32",
            "settings": {"k": K, "probes": args.probes, "max_matvecs": args.max_matvecs, "rounds": args.rounds, "seed": 0},
            "problems": rows,
        },
    )


if __name__ == "__main__":
    main()
