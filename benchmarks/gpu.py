"""The GPU benchmark: one prepared script for a session that is lent a device (≤ 6 minutes on one H200).

Sections, each recorded on its own (a failure is an error string in its place, the rest still runs):
  hvp      HVP ÷ gradient per Objective path (landscape.engine.hvp_paths.HVP_METHODS, "compiled" included where
           present) and PyHessian's hessian_vector_product where importable, on ResNet-20 and ResNet-44 at
           batch 128 and 512 (CIFAR-shaped random data), with the run-time self-check and peak memory per row;
  train    seconds per training step per method (sgd, sam, smoothout, nso) with AMP off, bf16 and fp16, ResNet-20 at
           batch 128, as a ratio to float32 SGD, with peak memory;
  lanczos  top-5 Lanczos wall time on a 10,000-sample CIFAR-shaped set (ResNet-20, batches of 256, `auto`);
  lm       GPT-2 medium (355M) and a 1.3B config (benchmarks/causal_lm.py, plain PyTorch) on 8 sequences of 128
           tokens, each whole and sharded by FSDP2 on the one device (ShardedObjective: finite-difference HVPs):
           seconds per gradient and per HVP, certified λ1 in the bounded basis the memory plan allows (its HVP
           budget cut to the time left, and said), peak memory;
  surface  grid points per second at 1 and 16 points per call on the digits MLP and ConvNet
           (benchmarks/surface.py's points_per_second, where it exists), and a 51×51 ResNet-20 plane
           on CIFAR-shaped inputs with as many points per call as fit.
Times are medians over several calls after warm-up calls, with torch.cuda.synchronize around each;
peak memory is torch.cuda.max_memory_allocated, reset before each row. A global time guard stops
starting rows before the budget and the file is rewritten after every row, so a killed run keeps
what it finished. Writes benchmarks/results/gpu.json (or --out).

Usage: python benchmarks/gpu.py [--device cuda] [--smoke] [--out FILE] [--budget SECONDS]
--smoke: tiny sizes, for checking the script on a CPU in under a minute (python benchmarks/gpu.py --smoke --device cpu).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, rss_bytes  # noqa: E402

from landscape.curvature.spectrum import lanczos  # noqa: E402
from landscape.engine import hvp_paths  # noqa: E402
from landscape.engine.hvp_paths import HVP_METHODS  # noqa: E402
from landscape.engine.objective import Objective  # noqa: E402
from landscape.engine.operators import HessianOperator  # noqa: E402
from landscape.inputs.models import model_for_data  # noqa: E402

COMPILED = getattr(hvp_paths, "COMPILED_HVP", None)  # the torch.compile'd path, where the Objective has one
PATHS = [*HVP_METHODS, *([COMPILED] if COMPILED and COMPILED not in HVP_METHODS else [])]

FULL = {
    "budget_s": 330.0,  # the guard: no row starts after this; the H200 limit is 6 minutes
    "hvp_budget_s": 120.0,  # the hvp section stops starting rows after this, so the others get their turn
    "train_budget_s": 40.0,
    "train_model": "resnet20",
    "train_batch": 128,
    "train_methods": ["sgd", "sam", "smoothout", "nso"],
    "lanczos_budget_s": 80.0,
    "shape": [3, 32, 32],  # CIFAR-shaped random inputs, 10 classes
    "hvp_models": ["resnet20", "resnet44"],
    "hvp_batches": [128, 512],
    "probes_per_block": 4,
    "lanczos_samples": 10_000,
    "lanczos_batch_size": 256,
    "lanczos_model": "resnet20",
    "lanczos_max_matvecs": 300,  # measure's default budget for k = 5; cut to what the time left allows
    "lm_budget_s": 140.0,
    "lm_configs": ["gpt2-medium", "1.3b"],
    "lm_sequences": 8,
    "lm_length": 128,
    "lm_vocab": 50257,
    "surface_problems": ["mlp-digits", "convnet-digits"],
    "surface_points_per_call": [1, 16],
    "surface_points": 256,
    "plane": {"problem": "resnet20", "points": 51},  # a 51×51 filter-normalized plane, points per call: auto
    "calls": 5,
}
SMOKE = {
    **FULL,
    "budget_s": 60.0,
    "hvp_budget_s": 30.0,
    "lanczos_budget_s": 8.0,
    "train_budget_s": 8.0,
    "train_model": "convnet",
    "train_batch": 8,
    "train_methods": ["sgd", "sam"],
    "shape": [3, 8, 8],
    "hvp_models": ["convnet"],
    "hvp_batches": [4],
    "probes_per_block": 2,
    "lanczos_samples": 16,
    "lanczos_batch_size": 8,
    "lanczos_model": "convnet",
    "lanczos_max_matvecs": 6,
    "lm_budget_s": 12.0,  # the sharded row's finite-difference Lanczos never certifies: it runs to the time left
    "lm_configs": ["smoke"],
    "lm_sequences": 2,
    "lm_length": 16,
    "lm_vocab": 100,
    "surface_points_per_call": [1, 4],
    "surface_points": 8,
    "plane": {"problem": "convnet-digits", "points": 5},
    "calls": 2,
}


class Clock:
    """Seconds since the start, and whether a row may still start before a deadline."""

    def __init__(self, budget: float) -> None:
        self.start, self.budget = time.perf_counter(), budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self, until: float | None = None) -> float:
        return min(self.budget, until if until is not None else self.budget) - self.elapsed()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 2,
    calls: int = 5,
    min_seconds: float = 0.2,
    max_seconds: float = 10.0,
) -> float:
    """Median wall time of `fn` after `warmup` calls, each call between two synchronizations."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < calls or (time.perf_counter() - began < min_seconds and len(times) < 50):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - began > max_seconds and len(times) >= 2:
            break
    return statistics.median(times)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    """Peak allocated CUDA memory since the last reset (MiB); on the CPU the process's peak RSS (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_bytes("VmHWM") / 2**20


def error_text(error: BaseException) -> str:
    """One line: the exception's type and first line (the full traceback goes to stderr)."""
    traceback.print_exc(file=sys.stderr)
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:300]}"


SHAPE = tuple(FULL["shape"])  # set from the settings in main


def cifar_like(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


def model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    net, _ = model_for_data(name, SHAPE, num_classes=10)
    return net


# ----------------------------------------------------------------------------------------- train
def train_section(settings: dict, device: torch.device, clock: Clock, save: Callable[[], None], rows: list) -> None:
    """Seconds per optimizer step per method and mixed-precision mode (landscape.training.optim, ResNet-20 at batch 128), the
    ratio to float32 SGD, peak memory, and the loss after the timed steps (a finite loss: the mode trains)."""
    import torch.nn.functional as F

    from landscape.training.optim import make_optimizer

    x, y = (t.to(device) for t in cifar_like(settings["train_batch"], seed=3))
    deadline = settings["train_budget_s"] + clock.elapsed()
    for method in settings["train_methods"]:
        for amp in ("none", "bf16", "fp16"):
            if clock.left(deadline) < 5:
                rows.append({"method": method, "amp": amp, "skipped": "time budget"})
                continue
            row: dict = {"model": settings["train_model"], "batch": settings["train_batch"], "method": method, "amp": amp}
            try:
                reset_memory(device)
                net = model(settings["train_model"]).to(device).train()
                opt = make_optimizer(method, net, lr=0.01, momentum=0.9, amp=amp)
                row["step_s"] = median_seconds(lambda: opt.step(net, x, y, F.cross_entropy), device, calls=settings["calls"])
                row["loss"] = float(opt.step(net, x, y, F.cross_entropy)[0])
                row["peak_mb"] = peak_mb(device)
                del net, opt
            except Exception as error:  # noqa: BLE001
                row["error"] = error_text(error)
            rows.append(row)
            print("train:", json.dumps(row), flush=True)
            save()
    sgd = next((r["step_s"] for r in rows if r.get("method") == "sgd" and r.get("amp") == "none" and "step_s" in r), None)
    for row in rows:
        if sgd and "step_s" in row:
            row["over_sgd_float32"] = row["step_s"] / sgd


# ----------------------------------------------------------------------------------------- hvp
def pyhessian_matvec(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """PyHessian's product (Yao et al. 2020) on the same model and batch: a create_graph gradient kept, then
    hessian_vector_product per probe; ImportError where PyHessian is not installed."""
    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product

    net = net.to(device).eval()
    h = hessian(net, torch.nn.CrossEntropyLoss(), data=(x.to(device), y.to(device)), cuda=device.type == "cuda")
    sizes = [p.numel() for p in h.params]

    def matvec(v: torch.Tensor):
        return hessian_vector_product(h.gradsH, h.params, [c.view_as(p) for c, p in zip(v.split(sizes), h.params)])

    return matvec


def hvp_rows(settings: dict, device: torch.device, clock: Clock, save: Callable[[], None], rows: list) -> None:
    """One row per (model, batch, path): seconds per gradient and per HVP, their ratio, setup time, peak memory."""
    paths = [*PATHS, "pyhessian"]
    deadline = settings["hvp_budget_s"]
    for batch in settings["hvp_batches"]:
        for name in settings["hvp_models"]:
            base = {"model": name, "batch": batch}
            if clock.left(deadline) < 10:
                rows.append({**base, "skipped": "time budget"})
                continue
            try:
                net = model(name)
                x, y = cifar_like(batch)
                reset_memory(device)
                reference = Objective(net, [(x, y)], device=device, hvp_method="double-backward", hvp_check=False)
                forward = median_seconds(lambda: reference.evaluate(), device, calls=settings["calls"])
                gradient = median_seconds(lambda: reference.grad(), device, calls=settings["calls"])
                base.update(n_params=reference.n_params, forward_s=forward, gradient_s=gradient, gradient_peak_mb=peak_mb(device))
                del reference
            except Exception as error:  # noqa: BLE001 - recorded, the other rows still run
                rows.append({**base, "error": error_text(error)})
                save()
                continue
            for path in paths:
                if clock.left(deadline) < 8:
                    rows.append({**base, "path": path, "skipped": "time budget"})
                    continue
                if path == COMPILED and settings["smoke"]:
                    rows.append({**base, "path": path, "skipped": "smoke run (torch.compile takes minutes on a CPU)"})
                    continue
                rows.append(hvp_row(base, path, net, x, y, device, settings))
                print(json.dumps(rows[-1]), flush=True)
                save()


def hvp_row(
    base: dict, path: str, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, settings: dict
) -> dict:
    row = {**base, "path": path}
    objective = matvec = None
    try:
        reset_memory(device)
        n = base["n_params"]
        v = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
        began = time.perf_counter()
        if path == "pyhessian":
            try:
                matvec = pyhessian_matvec(model(base["model"]), x, y, device)
            except ImportError as error:
                return {**row, "skipped": f"not installed ({error})"}
            matvec(v)
        else:
            objective = Objective(net, [(x, y)], device=device, hvp_method=path)
            objective.hvp(v)  # the first product: tracing/compiling and the run-time self-check
        synchronize(device)
        row["first_call_s"] = time.perf_counter() - began
        if objective is not None:
            row["resolved_path"] = objective.hvp_method
            check = objective.hvp_check_result
            row["hvp_check"] = None if check is None else check.to_dict()
            matvec = objective.hvp
        hvp = median_seconds(lambda: matvec(v), device, warmup=1, calls=settings["calls"])
        row.update(hvp_s=hvp, hvp_over_gradient=hvp / base["gradient_s"], peak_mb=peak_mb(device))
        if objective is not None:
            k = settings["probes_per_block"]
            V = torch.randn(k, n, generator=torch.Generator().manual_seed(2)).to(device)
            block = median_seconds(lambda: objective.hvp_batched(V), device, warmup=1, calls=2) / k
            row.update(
                probes_per_block=k,
                batched_hvp_s=block,
                batched_hvp_over_gradient=block / base["gradient_s"],
                batched_peak_mb=peak_mb(device),
            )
    except Exception as error:  # noqa: BLE001 - an out-of-memory error or a failed trace is this row's result
        row["error"] = error_text(error)
        row["peak_mb"] = peak_mb(device)
    finally:
        del objective, matvec
        reset_memory(device)
    return row


# ------------------------------------------------------------------------------------- lanczos
def lanczos_section(settings: dict, device: torch.device, clock: Clock) -> dict:
    """Top-5 Lanczos (tol 1e-3, `auto` HVP path, measure's defaults) on a CIFAR-shaped set, its budget cut to the time left."""
    n, size = settings["lanczos_samples"], settings["lanczos_batch_size"]
    x, y = cifar_like(n, seed=3)
    batches = list(zip(x.split(size), y.split(size)))
    net = model(settings["lanczos_model"])
    section_end = clock.elapsed() + settings["lanczos_budget_s"]
    out: dict = {"model": settings["lanczos_model"], "n_samples": n, "batch_size": size, "k": 5, "tol": 1e-3}
    for method in ("auto", "double-backward"):
        reset_memory(device)
        try:
            began = time.perf_counter()
            objective = Objective(net, batches, device=device, hvp_method=method)
            op = HessianOperator(objective)
            v = torch.ones(objective.n_params, device=device)
            op.matvec(v)  # setup: the self-check, a trace where the path keeps one
            synchronize(device)
            setup = time.perf_counter() - began
            per_matvec = median_seconds(lambda: op.matvec(v), device, warmup=0, calls=2)
            affordable = int(max(0.0, clock.left(section_end) - 3) / per_matvec)
            budget = max(5, min(settings["lanczos_max_matvecs"], affordable))
            synchronize(device)
            began = time.perf_counter()
            result = lanczos(op, 5, tol=1e-3, max_matvecs=budget, seed=0)
            synchronize(device)
            out.update(
                hvp_method=method,
                resolved_path=objective.hvp_method,
                setup_s=setup,
                seconds_per_matvec=per_matvec,
                seconds=time.perf_counter() - began,
                n_matvecs=result.n_matvecs,
                max_matvecs=budget,
                budget_cut_by_time=budget < settings["lanczos_max_matvecs"],
                converged=result.converged,
                values=[float(v) for v in result.values],
                residuals=[float(r) for r in result.residuals],
                peak_mb=peak_mb(device),
            )
            return out
        except Exception as error:  # noqa: BLE001 - out of memory on `auto`: recorded, then double backward
            out[f"{method}_error"] = error_text(error)
        finally:
            objective = op = None
            reset_memory(device)
        if clock.left() < 20:
            break
    return out


# ------------------------------------------------------------------------------------------ lm
def lm_section(settings: dict, device: torch.device, clock: Clock, save: Callable[[], None], rows: list) -> None:
    """Causal LMs at scale (benchmarks/causal_lm.py): gradient and HVP seconds, then certified λ1 in the bounded basis
    analysis.measures.solver_memory.lanczos_vectors allows, its HVP budget cut to the section's time left (recorded as such)."""
    from causal_lm import CONFIGS as LM_CONFIGS
    from causal_lm import CausalLM, token_batch

    from analysis.measures.solver_memory import lanczos_vectors
    from landscape.curvature.spectrum import default_max_matvecs
    from landscape.inputs.batches import token_cross_entropy

    section_end = clock.elapsed() + settings["lm_budget_s"]
    for name, sharded in [(name, sharded) for name in settings["lm_configs"] for sharded in (False, True)]:
        row: dict = {"config": name, "sharded": sharded, "sequences": settings["lm_sequences"], "length": settings["lm_length"]}
        if clock.left(section_end) < 10:
            rows.append({**row, "skipped": "time budget"})
            continue
        reset_memory(device)
        try:
            torch.manual_seed(0)
            layers, width, heads = LM_CONFIGS[name]
            net = CausalLM(layers, width, heads, vocab=settings["lm_vocab"]).to(device)
            batch = token_batch(settings["lm_sequences"], settings["lm_length"], settings["lm_vocab"], device=str(device))
            began = time.perf_counter()
            if sharded:  # FSDP2 on this one device (`landscape measure --shard` under torchrun): finite-difference HVPs
                from landscape.engine.sharded import ShardedObjective

                single_rank_group(device)
                objective = ShardedObjective(net, [batch], loss=token_cross_entropy, device=device)
            else:
                objective = Objective(net, [batch], loss=token_cross_entropy, device=device)
            op = HessianOperator(objective)
            v = torch.randn(objective.n_params, device=device)
            op.matvec(v)  # the self-check, and the kept graph where the plan keeps one
            synchronize(device)
            row.update(parameters=objective.n_params, hvp_method=objective.hvp_method, setup_s=time.perf_counter() - began)
            row["gradient_s"] = median_seconds(lambda: objective.grad(), device, warmup=1, calls=2)
            row["hvp_s"] = median_seconds(lambda: op.matvec(v), device, warmup=0, calls=2)
            row["hvp_over_gradient"] = row["hvp_s"] / row["gradient_s"]
            vectors = lanczos_vectors(objective, objective.n_params, torch.float32, 1, None, None)
            default = default_max_matvecs(objective.n_params, 1)
            budget = max(5, min(default, int(max(0.0, clock.left(section_end) - 5) / row["hvp_s"])))
            began = time.perf_counter()
            result = lanczos(op, 1, tol=1e-3, max_matvecs=budget, max_vectors=vectors, seed=0)
            synchronize(device)
            row.update(
                lambda_max=float(result.values[0]),
                error_bound=float(result.error_bounds[0]),
                certified=bool(result.certified),
                n_matvecs=result.n_matvecs,
                max_matvecs=budget,
                budget_cut_by_time=budget < default,
                max_vectors=vectors,
                restarts=result.restarts,
                lanczos_s=time.perf_counter() - began,
                peak_mb=peak_mb(device),
            )
        except Exception as error:  # noqa: BLE001 - out of memory on the larger config: recorded, the rest runs
            row["error"] = error_text(error)
        finally:
            objective = op = net = None
            reset_memory(device)
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        save()


def single_rank_group(device: torch.device) -> None:
    """A torch.distributed group of this process alone (NCCL on CUDA, else gloo), for FSDP2 on one device."""
    import torch.distributed as dist

    if not dist.is_initialized():
        import os

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


# ------------------------------------------------------------------------------------- surface
def surface_section(settings: dict, device: torch.device, clock: Clock, save: Callable[[], None], out: dict) -> dict | str:
    """Points per second from benchmarks/surface.py's points_per_second(problem, device, points_per_call, n_points),
    filled into `out` row by row (saved after each); a string where the function does not exist."""
    import surface as surface_benchmark  # benchmarks/surface.py

    if not hasattr(surface_benchmark, "points_per_second"):
        return "not available (benchmarks/surface.py has no points_per_second yet)"
    rows = out.setdefault("rows", [])
    for name in settings["surface_problems"]:
        for per_call in settings["surface_points_per_call"]:
            row = {"problem": name, "points_per_call": per_call}
            if clock.left() < 5:
                rows.append({**row, "skipped": "time budget"})
                continue
            reset_memory(device)
            try:
                result = surface_benchmark.points_per_second(name, str(device), per_call, settings["surface_points"])
                row.update(result if isinstance(result, dict) else {"points_per_second": result})
                row["peak_mb"] = peak_mb(device)
            except Exception as error:  # noqa: BLE001
                row["error"] = error_text(error)
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
            save()
    plane = settings["plane"]
    if clock.left() < 5:
        out["plane"] = {"skipped": "time budget"}
    else:
        reset_memory(device)
        try:
            out["plane"] = surface_benchmark.points_per_second(plane["problem"], str(device), "auto", plane["points"], dim=2)
            out["plane"]["peak_mb"] = peak_mb(device)
        except Exception as error:  # noqa: BLE001
            out["plane"] = {"error": error_text(error)}
        print(json.dumps(out["plane"], default=str), flush=True)
        save()
    for name in settings["surface_problems"]:
        speeds = {r["points_per_call"]: r.get("points_per_second") for r in rows if r["problem"] == name}
        one, many = speeds.get(1), speeds.get(max(settings["surface_points_per_call"]))
        if isinstance(one, (int, float)) and isinstance(many, (int, float)) and one > 0:
            out.setdefault("speedup_batched_over_one", {})[name] = many / one
    return out


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, on a CPU in under a minute")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json", help="results file (default %(default)s)")
    parser.add_argument("--budget", type=float, default=None, help="seconds after which no row starts (default 330; smoke 50)")
    args = parser.parse_args(argv)
    settings = {**(SMOKE if args.smoke else FULL), "smoke": args.smoke}
    if args.budget is not None:
        settings["budget_s"] = args.budget
    device = torch.device(args.device)
    global SHAPE
    SHAPE = tuple(settings["shape"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: CUDA is not available here; use --device cpu (with --smoke to check the script)", file=sys.stderr
        )
        return 2
    warnings.simplefilter("ignore")
    clock = Clock(settings["budget_s"])
    payload: dict = {
        "what": "HVP ÷ gradient per path (ResNet-20/44, batch 128/512), training step per method and AMP mode, Lanczos top-5 wall time on 10,000 CIFAR-shaped "
        "samples, surface points per second, peak memory per row; medians after warm-up, synchronized",
        "settings": {
            "device": str(device),
            **settings,
            "hvp_paths": PATHS,
            "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        },
        "hvp": {"rows": []},
        "train": {"rows": []},
        "lanczos": "not run yet",
        "lm": {"rows": []},
        "surface": "not run yet",
        "complete": False,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        payload["seconds"] = clock.elapsed()
        text = json.dumps({"machine": machine(), **payload}, indent=2, default=str) + "\n"
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)

    save()
    try:
        hvp_rows(settings, device, clock, save, payload["hvp"]["rows"])
    except Exception as error:  # noqa: BLE001
        payload["hvp"]["error"] = error_text(error)
    save()
    try:
        train_section(settings, device, clock, save, payload["train"]["rows"])
    except Exception as error:  # noqa: BLE001
        payload["train"]["error"] = error_text(error)
    save()
    try:
        payload["lanczos"] = lanczos_section(settings, device, clock) if clock.left() > 15 else "skipped: time budget"
    except Exception as error:  # noqa: BLE001
        payload["lanczos"] = {"error": error_text(error)}
    print("lanczos:", json.dumps(payload["lanczos"], default=str), flush=True)
    save()
    try:
        lm_section(settings, device, clock, save, payload["lm"]["rows"])
    except Exception as error:  # noqa: BLE001
        payload["lm"]["error"] = error_text(error)
    save()
    try:
        payload["surface"] = {"rows": []}
        payload["surface"] = surface_section(settings, device, clock, save, payload["surface"])
    except Exception as error:  # noqa: BLE001
        payload["surface"] = {"error": error_text(error)}
    payload["complete"] = True
    save()
    print(f"wrote {args.out} in {clock.elapsed():.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
