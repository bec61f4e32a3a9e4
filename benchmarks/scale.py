"""GPT-2 configs at scale on this machine: certified λ1 in bounded memory, with the costs a user feels.

Each config (HuggingFace GPT2LMHeadModel built from a config, float32, random init, eval mode) is measured on
16 sequences of 64 tokens drawn from a fixed Zipf-like synthetic corpus (vocabulary 50,257), token cross-entropy,
in its own process so its peak memory is its own:
- seconds per gradient and per HVP (median of a few, after one warm-up) and their ratio;
- `lanczos(k)` with the certified stop and the basis the memory plan allows (analysis.cli.measure.lanczos_vectors, the
  path `landscape measure` takes): the value, certified or not, HVPs, restarts, vectors held, wall time;
- peak resident memory (VmHWM) against the memory plan's prediction (the objective's own memory before the run,
  plus the HVP graph's predicted peak, plus the basis).

Usage: python benchmarks/scale.py [--configs 45m,124m] [--k 1] [--threads 2] [--hvp auto] [--max-vectors N]
Writes benchmarks/results/scale.json (a config not rerun keeps its row).

--end-to-end CONFIG: a user's run of `landscape measure` on a saved random-init checkpoint, as a subprocess (wall
time from launch, its peak resident memory; the report's own `memory` gives the plan's prediction beside it).
Measured: 124m on 4 sequences of 64 tokens, λ1 (60 HVPs), trace and density in 596 s at a 13.8 GiB peak
(0.87× the prediction); see docs/how-to/large-models.md. With 16 sequences an HVP costs 45-60 s here and the
run did not finish in the time a session had.
--end-to-end CONFIG --train-steps N: the checkpoint trained N AdamW steps on fresh synthetic batches first (in a
child process, so the measuring one has the memory). 124m, 200 steps: loss 11.0 → 7.9 in 7 minutes; measured (λ1,
trace, density) in 632 s at a 13.1 GiB peak (see docs/how-to/large-models.md).
--eigenthings CONFIG: hessian-eigenthings' λ1 on the same model and tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS, median_seconds, rss_bytes, write_results  # noqa: E402

CONFIGS = {  # name: (layers, width, heads)
    "45m": (6, 512, 8),  # 45.2M parameters (25.7M of them the tied token embedding)
    "124m": (12, 768, 12),  # GPT-2 small: 124.4M
    "tiny": (2, 64, 2),  # 3.3M, a smoke test of the script
}
from synthetic_corpus import LENGTH, SEQUENCES, VOCAB, corpus  # noqa: E402


def measure(name: str, k: int, hvp_method: str, max_vectors: int | None) -> dict:
    import transformers

    from analysis.measures.solver_memory import lanczos_vectors
    from landscape.curvature.spectrum import lanczos
    from landscape.engine.objective import Objective
    from landscape.engine.operators import HessianOperator
    from landscape.inputs.batches import token_cross_entropy

    layers, width, heads = CONFIGS[name]
    config = transformers.GPT2Config(
        n_layer=layers, n_embd=width, n_head=heads, vocab_size=VOCAB, n_positions=1024, attn_implementation="eager"
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    began = time.perf_counter()
    objective = Objective(model, corpus(), loss=token_cross_entropy, device="cpu", hvp_method=hvp_method)
    setup = time.perf_counter() - began
    n = objective.n_params
    before = rss_bytes()

    gradient = median_seconds(objective.grad, 1)
    v = torch.randn(n, generator=torch.Generator().manual_seed(1))
    hvp = median_seconds(lambda: objective.hvp(v / v.norm()), 1)
    vectors = lanczos_vectors(objective, n, torch.float32, k, None, max_vectors)
    plan = objective.memory_plan
    predicted = before + plan.predicted_peak_bytes + vectors * n * 4
    began = time.perf_counter()
    result = lanczos(HessianOperator(objective), k, max_vectors=vectors, progress="lines")
    seconds = time.perf_counter() - began
    return {
        "config": {"layers": layers, "width": width, "heads": heads, "vocab": VOCAB},
        "parameters": n,
        "tokens": SEQUENCES * LENGTH,
        "threads": torch.get_num_threads(),
        "hvp_method": hvp_method,
        "setup_seconds": setup,
        "gradient_seconds": gradient,
        "hvp_seconds": hvp,
        "hvp_per_gradient": hvp / gradient,
        "eig": {
            "k": k,
            "values": result.values.tolist(),
            "error_bounds": result.error_bounds.tolist(),
            "certified": result.certified,
            "converged": result.converged,
            "hvps": result.n_matvecs,
            "restarts": result.restarts,
            "max_vectors": vectors,
            "stored_vectors": result.stored_vectors,
            "seconds": seconds,
        },
        "memory": {
            "rss_before_bytes": before,
            "hvp_graph_predicted_bytes": plan.predicted_peak_bytes,
            "basis_bytes": vectors * n * 4,
            "predicted_peak_bytes": predicted,
            "measured_peak_bytes": rss_bytes("VmHWM"),
            "measured_over_predicted": rss_bytes("VmHWM") / predicted,
            "available_at_start_bytes": plan.available_bytes,
        },
    }


def eigenthings(name: str, max_iter: int, sequences: int) -> dict:
    """hessian-eigenthings 1.0.0a5 on the same model and tokens: its HessianOperator (autograd HVPs over the whole
    set, HuggingFace's own shifted-label loss) and its lanczos for λ1 with reorthogonalization, `max_iter` HVPs
    (it has no stop of its own beyond that and a convergence flag); seconds per HVP, wall time, peak memory."""
    import transformers
    from hessian_eigenthings import HessianOperator as PeerOperator
    from hessian_eigenthings import lanczos as peer_lanczos

    layers, width, heads = CONFIGS[name]
    batches = corpus(0, sequences)
    failures = {}
    for attention in ("sdpa", "eager"):  # transformers' default first, then the kernel a user would switch to
        config = transformers.GPT2Config(
            n_layer=layers, n_embd=width, n_head=heads, vocab_size=VOCAB, n_positions=1024, attn_implementation=attention
        )
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).eval()
        op = PeerOperator(model, batches, lambda net, batch: net(**batch).loss)  # mean next-token cross-entropy
        v = torch.randn(sum(p.numel() for p in model.parameters()))
        try:
            hvp = median_seconds(lambda: op.matvec(v / v.norm()), 1)
            break
        except RuntimeError as error:
            failures[attention] = str(error).splitlines()[0]
    began = time.perf_counter()
    result = peer_lanczos(op, k=1, max_iter=max_iter, tol=1e-3, which="LA", seed=0, reorthogonalize=True)
    return {
        "attention": attention,
        "failed": failures,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens": sequences * LENGTH,
        "hvp_seconds": hvp,
        "lambda_max": float(result.eigenvalues[0]),
        "converged_flag": bool(result.converged.all()),
        "hvps": max_iter,
        "seconds": time.perf_counter() - began,
        "peak_resident_bytes": rss_bytes("VmHWM"),
    }


CORPUS_MODULE = """
from synthetic_corpus import corpus


def token_batches():
    return {{"train": corpus(0, {sequences}), "test": corpus(1, {sequences})}}
"""


def end_to_end(
    name: str,
    metrics: str,
    k: int,
    probes: int,
    density_steps: int,
    threads: int,
    hvp: str,
    sequences: int,
    max_matvecs: int | None = None,
    train_steps: int = 0,
) -> dict:
    """A user's run: the config saved with save_pretrained (random init, or after `train_steps` AdamW steps on
    the synthetic corpus), then `landscape measure` on it as a subprocess, its wall time from launch and its
    peak resident memory (the child's ru_maxrss)."""
    import resource
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / f"gpt2-{name}"
        # in a child process, so the measuring process below has the machine's memory to itself
        made = subprocess.run(
            [sys.executable, __file__, "--save-into", str(checkpoint), "--train-steps", str(train_steps), "--threads",
             str(threads), "--end-to-end", name],
            capture_output=True, text=True,
        )  # fmt: skip
        if made.returncode:
            return {"failed": f"saving the checkpoint: {made.stderr.strip().splitlines()[-1:]}"}
        training = json.loads(made.stdout.strip().splitlines()[-1])
        (Path(folder) / "scale_corpus.py").write_text(CORPUS_MODULE.format(sequences=sequences))
        command = [
            sys.executable, "-m", "analysis.cli", "measure", str(checkpoint),
            "--data", "scale_corpus:token_batches", "--loss", "token-cross-entropy", "--metrics", metrics,
            "--k", str(k), "--probes", str(probes), "--density-runs", "1", "--density-steps", str(density_steps),
            "--hvp", hvp, "--out", str(Path(folder) / "measure.json"),
        ] + ([] if max_matvecs is None else ["--max-matvecs", str(max_matvecs)])  # fmt: skip
        env = {
            **__import__("os").environ,
            "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": f"{Path(__file__).resolve().parent.parent}:{Path(__file__).resolve().parent}:{folder}",
            "LANDSCAPE_PROGRESS_INTERVAL": "60",
        }
        began = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder)
        seconds = time.perf_counter() - began
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if out.returncode < 0:
            return {"failed": f"killed by signal {-out.returncode} (out of memory?) after {seconds:.0f} s"}
        if out.returncode:
            return {"failed": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
        return {
            "command": " ".join(["landscape", *command[3:]]),
            "sequences": sequences,
            "length": LENGTH,
            "wall_seconds": seconds,
            "peak_resident_bytes": peak,
            "table": out.stdout,
            "report": json.loads((Path(folder) / "measure.json").read_text()),
            "training": training,
        }


TRAIN_SEQUENCES, TRAIN_LR = 4, 3e-4


def train(model: torch.nn.Module, steps: int) -> dict:
    """`steps` AdamW steps (lr TRAIN_LR, linear warm-up over the first tenth) on fresh synthetic batches of
    TRAIN_SEQUENCES × LENGTH tokens (corpus seeds 100, 101, ...: never the measured ones, seeds 0 and 1)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    model.train()
    losses, began = [], time.perf_counter()
    for step in range(steps):
        (batch,) = corpus(100 + step, TRAIN_SEQUENCES, LENGTH)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == steps - 1:
            print(f"train step {step}: loss {losses[-1]:.3f} ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
    model.eval()
    return {
        "steps": steps,
        "sequences": TRAIN_SEQUENCES,
        "length": LENGTH,
        "lr": TRAIN_LR,
        "first_loss": losses[0],
        "last_loss": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": time.perf_counter() - began,
    }


def save_checkpoint(name: str, folder: Path, train_steps: int) -> dict | None:
    """CONFIG's GPT-2 (seed 0), trained `train_steps` steps if any, saved with save_pretrained into `folder`."""
    import transformers

    layers, width, heads = CONFIGS[name]
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=VOCAB, n_positions=1024)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    training = train(model, train_steps) if train_steps else None
    model.save_pretrained(folder)
    return training


def update_results(section: str, name: str, row: dict) -> None:
    """benchmarks/results/scale.json with `row` as `section`'s entry `name`, every other entry kept."""
    path = RESULTS / "scale.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    kept = {k: v for k, v in previous.items() if k != "machine"}
    write_results("scale", {**kept, "sequences": SEQUENCES, "length": LENGTH, section: {**kept.get(section, {}), name: row}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hvp", default="auto", help="the Objective's HVP path (auto keeps the gradient graph if it fits)")
    parser.add_argument("--max-vectors", type=int, help="Lanczos's vectors (default: what the memory plan allows)")
    parser.add_argument("--max-matvecs", type=int, help="Lanczos's HVP budget, for --end-to-end (default: measure's)")
    parser.add_argument("--end-to-end", metavar="CONFIG", help="run `landscape measure` on a saved checkpoint of CONFIG")
    parser.add_argument("--metrics", default="eig,trace,density", help="for --end-to-end")
    parser.add_argument("--probes", type=int, default=8, help="trace HVPs, for --end-to-end")
    parser.add_argument("--density-steps", type=int, default=12, help="for --end-to-end")
    parser.add_argument("--sequences", type=int, default=SEQUENCES, help=f"sequences of {LENGTH} tokens, for --end-to-end")
    parser.add_argument("--train-steps", type=int, default=0, help="for --end-to-end: AdamW steps before measuring")
    parser.add_argument("--eigenthings", metavar="CONFIG", help="hessian-eigenthings' λ1 on CONFIG's model and tokens")
    parser.add_argument("--max-iter", type=int, default=30, help="hessian-eigenthings' HVPs, for --eigenthings")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: measure this config, print JSON
    parser.add_argument("--save-into", help=argparse.SUPPRESS)  # a child process: save --end-to-end's checkpoint
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.save_into:
        print(json.dumps(save_checkpoint(args.end_to_end, Path(args.save_into), args.train_steps)))
        return
    if args.one:
        print(json.dumps(measure(args.one, args.k, args.hvp, args.max_vectors)))
        return
    path = RESULTS / "scale.json"
    rows = json.loads(path.read_text()).get("configs", {}) if path.exists() else {}
    if args.eigenthings:
        run = eigenthings(args.eigenthings, args.max_iter, args.sequences)
        print(json.dumps(run))
        update_results("eigenthings", args.eigenthings, run)
        return
    if args.end_to_end:
        run = end_to_end(
            args.end_to_end,
            args.metrics,
            args.k,
            args.probes,
            args.density_steps,
            args.threads,
            args.hvp,
            args.sequences,
            args.max_matvecs,
            args.train_steps,
        )
        print(run.get("table") or run["failed"])
        update_results("end_to_end", args.end_to_end + (f"-trained{args.train_steps}" if args.train_steps else ""), run)
        return
    for name in args.configs.split(","):
        began = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "--one", name, "--k", str(args.k), "--threads", str(args.threads), "--hvp", args.hvp]
            + ([] if args.max_vectors is None else ["--max-vectors", str(args.max_vectors)]),
            capture_output=True,
            text=True,
        )
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            errors = [line for line in out.stderr.strip().splitlines() if not line.startswith("lanczos:")]
            rows[name] = {"failed": errors[-1] if errors else f"exit {out.returncode} (killed: out of memory?)"}
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process_seconds"] = time.perf_counter() - began
        rows[name] = row
        e, m = row["eig"], row["memory"]
        print(
            f"{name}: {row['parameters']:,} parameters; gradient {row['gradient_seconds']:.1f} s, HVP {row['hvp_seconds']:.1f} s "
            f"({row['hvp_per_gradient']:.2f}x); λ1 {e['values'][0]:.5g} ± {e['error_bounds'][0]:.2g} certified={e['certified']} "
            f"in {e['hvps']} HVPs, {e['restarts']} restarts in {e['stored_vectors']}/{e['max_vectors']} vectors, "
            f"{e['seconds']:.0f} s; peak {m['measured_peak_bytes'] / 2**30:.1f} GiB "
            f"(predicted {m['predicted_peak_bytes'] / 2**30:.1f}, ratio {m['measured_over_predicted']:.2f}); "
            f"process {row['process_seconds']:.0f} s"
        )
    for name, row in rows.items():
        update_results("configs", name, row)


if __name__ == "__main__":
    main()
