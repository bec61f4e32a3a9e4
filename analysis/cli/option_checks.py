"""Command-line options checked before any work, each error naming the option as the user typed it.

The estimators check their own arguments too, but with their own names (n_matvecs, n_samples);
checking here first means `--probes 2` is reported as `--probes`, in one line, before a checkpoint
is even loaded. Checks that need the model (`--k` against the parameter count) run once the
Objective exists (`MetricSpec.check_fits`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch

from landscape.engine import distributed as ranks
from landscape.engine.checks import check_number
from landscape.engine.hvp_paths import COMPILED_HVP, FINITE_DIFFERENCE_HVP, HVP_METHODS
from landscape.engine.memory import parse_size

# dest: smallest allowed value, for every integer option of every command that has it
INT_MINIMUMS = {
    "k": 1,
    "shard_replicas": 1,
    "max_matvecs": 1,
    "max_vectors": 1,
    "density_runs": 1,
    "density_steps": 1,
    "restarts": 0,
    "eps_iters": 1,
    "subspace_dim": 1,
    "bn_recalibration": 1,
    "n_samples": 1,
    "batch_size": 1,
    "max_length": 2,
    "epochs": 1,
    "save_every": 1,
    "lr_reference_batch": 1,
    "ghost_batch_size": 1,
    "seeds": 1,
    "m": 1,
    "ascent_steps": 1,
    "ascent_restarts": 0,
}
PROBE_MINIMUMS = {"xtrace": 4, "hutchpp": 4, "hutchinson": 2}  # matvecs each trace method needs at least
MIN_NOISE_SAMPLES = 4  # two antithetic pairs: the stderr needs at least two


def option(dest: str) -> str:
    """The command-line spelling of an argparse destination: n_samples → --n-samples."""
    return "--" + dest.replace("_", "-")


def validate_arguments(args: argparse.Namespace) -> None:
    """Raise a one-line ValueError naming the first option whose value cannot work."""
    for dest, minimum in INT_MINIMUMS.items():
        value = getattr(args, dest, None)
        if value is not None and value < minimum:
            raise ValueError(f"{option(dest)} must be at least {minimum}, got {value}")
    if getattr(args, "probes", None) is not None:
        minimum = PROBE_MINIMUMS.get(getattr(args, "trace_method", "xtrace"), 2)
        if args.probes < minimum:
            raise ValueError(f"--probes must be at least {minimum} for --trace-method {args.trace_method}, got {args.probes}")
    noise = getattr(args, "noise_samples", None)
    if noise is not None and (noise < MIN_NOISE_SAMPLES or noise % 2):
        raise ValueError(f"--noise-samples must be an even number ≥ {MIN_NOISE_SAMPLES} (antithetic pairs), got {noise}")
    if getattr(args, "tol", None) is not None:
        check_number("--tol", args.tol, allow_zero=True)
    if getattr(args, "eps", None) is not None:
        check_number("--eps", args.eps, allow_zero=False)
    _check_worst_case(args)
    _check_shard(args)
    if getattr(args, "radius", None) is not None:
        parse_radii(args.radius)
    if getattr(args, "metrics", None) is not None:
        metric_names(args)
    if getattr(args, "hvp", None) is not None and args.hvp not in (*HVP_METHODS, COMPILED_HVP, FINITE_DIFFERENCE_HVP):
        raise ValueError(f"--hvp {args.hvp}: use one of {', '.join(HVP_METHODS)}, {COMPILED_HVP} or {FINITE_DIFFERENCE_HVP}")
    if getattr(args, "hvp_memory", None) is not None:
        parse_size(args.hvp_memory)
    if getattr(args, "per_layer", None) is not None:
        per_layer_names(args.per_layer)
    if getattr(args, "per_layer_by", "module") != "module" and not getattr(args, "per_layer", None):
        raise ValueError(f"--per-layer-by {args.per_layer_by} groups the --per-layer blocks: pass --per-layer eig,trace too")
    if getattr(args, "command", None) == "compare" and getattr(args, "curvature", "hessian") != "hessian":
        raise ValueError(
            f"--curvature {args.curvature}: landscape compare measures the Hessian only; "
            f"use landscape measure --curvature {args.curvature} on each checkpoint"
        )
    if getattr(args, "command", None) == "compare" and len(args.checkpoints) < 2:
        raise ValueError(
            f"landscape compare needs at least two checkpoints, got only {args.checkpoints[0]}; "
            "measure one with landscape measure"
        )
    if getattr(args, "device", None):
        check_device(args.device)


def parse_radii(text: str) -> list[float]:
    """--radius as a list of finite radii > 0 (at least one): at radius 0 the loss increase is 0 by definition."""
    radii = []
    for item in (r.strip() for r in text.split(",")):
        if not item:
            continue
        try:
            radius = check_number("--radius", float(item), allow_zero=True)
        except ValueError:
            raise ValueError(
                f"--radius {text!r}: {item!r} is not a finite number > 0; give a comma list such as 0.005,0.01"
            ) from None
        if radius == 0:
            raise ValueError(
                f"--radius {text!r}: a radius of 0 perturbs nothing, so its loss increase is 0 by definition; "
                "give radii > 0, such as 0.005,0.01"
            )
        radii.append(radius)
    if not radii:
        raise ValueError(f"--radius {text!r} names no radius; give a comma list such as 0.005,0.01")
    return radii


def parse_metrics(text: str, choices: Iterable[str], option: str = "--metrics") -> list[str]:
    """--metrics (or `option`) as a list of names from `choices`; an empty list is an error, not a run that measures nothing."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ValueError(f"{option} {text!r} names no metric; choose from {', '.join(choices)}")
    unknown = [m for m in names if m not in choices]
    if unknown:
        raise ValueError(f"{option}: unknown metric {', '.join(unknown)}; choose from {', '.join(choices)}")
    return names


SHARD_METRICS = ("eig", "trace", "density")  # what --shard measures: the solvers on sharded vectors


def _check_shard(args: argparse.Namespace) -> None:
    """--shard: under torchrun, every parameter, the Hessian's eig, trace and density, by finite differences."""
    replicas = getattr(args, "shard_replicas", 1)
    if not getattr(args, "shard", False):
        if replicas != 1 or getattr(args, "shard_probes", "whole") != "whole":
            raise ValueError("--shard-replicas and --shard-probes set how a model is sharded: add --shard")
        return
    if not ranks.launched():
        raise ValueError(
            "--shard splits the parameters over the ranks of a torchrun job: run torchrun --nproc_per_node N ... --shard"
        )
    if ranks.launched_world_size() % replicas:
        raise ValueError(f"--shard-replicas {replicas} must divide the {ranks.launched_world_size()} ranks")
    if args.params != "all":
        raise ValueError(f"--shard measures every parameter: drop --params {args.params}")
    if args.hvp not in ("auto", FINITE_DIFFERENCE_HVP):
        raise ValueError(f"--shard takes its HVPs by finite differences (FSDP2 allows no double backward): drop --hvp {args.hvp}")
    if getattr(args, "curvature", "hessian") != "hessian" or getattr(args, "per_layer", None):
        raise ValueError("--shard measures the whole Hessian: drop --curvature and --per-layer")
    other = [m for m in metric_names(args) if m not in SHARD_METRICS]
    if other:
        raise ValueError(f"--shard measures {', '.join(SHARD_METRICS)}; drop {', '.join(other)} from --metrics")


def metric_names(args: argparse.Namespace) -> list[str]:
    """--metrics as a list of names the command takes (its parser records them as `metric_choices`; at least one)."""
    return parse_metrics(args.metrics, args.metric_choices)


def per_layer_names(text: str) -> list[str]:
    """--per-layer as a list of eig, trace and density (at least one)."""
    from landscape.curvature.blocks import PER_LAYER_METRICS

    return parse_metrics(text, PER_LAYER_METRICS, "--per-layer")


def check_device(name: str) -> None:
    """--device names a device this machine has (a CUDA device only where CUDA is available)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:
            raise ValueError(
                f"--device {name}: not available on this machine ({str(error).splitlines()[0]}); use --device cpu"
            ) from None


def _check_worst_case(args: argparse.Namespace) -> None:
    """--rho, --p and --eta of worst-case, m- and average-case sharpness."""
    if getattr(args, "rho", None) is not None:
        check_number("--rho", args.rho, allow_zero=False)
    if getattr(args, "p", None) is not None and args.p.strip().lower() not in ("2", "inf"):
        raise ValueError(f"--p must be 2 or inf, got {args.p}")
    if getattr(args, "eta", None) is not None:
        check_number("--eta", args.eta, allow_zero=True)
        metrics = metric_names(args) if getattr(args, "metrics", None) is not None else []
        if args.eta > 0 and "adaptive-average-case" in metrics:
            raise ValueError(
                f"--eta {args.eta:g}: adaptive-average-case scales its noise by |w| alone (η = 0); "
                "measure it in a run without --eta"
            )
