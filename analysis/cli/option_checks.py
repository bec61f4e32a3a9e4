"""Command-line options checked before any work, each error naming the option as the user typed it.

The estimators check their own arguments too, but with their own names (n_matvecs, n_samples);
checking here first means `--probes 2` is reported as `--probes`, in one line, before a checkpoint
is even loaded. Checks that need the model (`--k` against the parameter count) run once the
Objective exists (each measure's `check`, analysis/measures/).
"""

from __future__ import annotations

import argparse

import torch

from analysis.measures.options import (
    NOISE_SAMPLES_MINIMUM,
    int_minimums,
    parse_metrics,
    parse_radii,
    per_layer_names,
    probe_minimum,
)
from analysis.measures.registry import shardable_names
from landscape.engine import distributed as ranks
from landscape.engine.checks import check_number
from landscape.engine.hvp_paths import COMPILED_HVP, FINITE_DIFFERENCE_HVP, HVP_METHODS
from landscape.engine.memory import parse_size

# dest: smallest allowed value, for every integer option of every command that has it
INT_MINIMUMS = {
    **int_minimums(),  # the metric options': in their MetricSpec fields
    "shard_replicas": 1,
    "n_samples": 1,
    "batch_size": 1,
    "max_length": 2,
    "epochs": 1,
    "save_every": 1,
    "lr_reference_batch": 1,
    "ghost_batch_size": 1,
    "seeds": 1,
}


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
        minimum = probe_minimum(getattr(args, "trace_method", "xtrace"))
        if args.probes < minimum:
            raise ValueError(f"--probes must be at least {minimum} for --trace-method {args.trace_method}, got {args.probes}")
    noise = getattr(args, "noise_samples", None)
    if noise is not None and (noise < NOISE_SAMPLES_MINIMUM or noise % 2):
        raise ValueError(f"--noise-samples must be an even number ≥ {NOISE_SAMPLES_MINIMUM} (antithetic pairs), got {noise}")
    if getattr(args, "tol", None) is not None:
        check_number("--tol", args.tol, allow_zero=True)
    if getattr(args, "eps", None) is not None:
        check_number("--eps", args.eps, allow_zero=False)
    if getattr(args, "pac_bayes_target", None) is not None:
        check_number("--pac-bayes-target", args.pac_bayes_target, allow_zero=False)
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
    shardable = shardable_names()
    other = [m for m in metric_names(args) if m not in shardable]
    if other:
        raise ValueError(f"--shard measures {', '.join(shardable)}; drop {', '.join(other)} from --metrics")


def metric_names(args: argparse.Namespace) -> list[str]:
    """--metrics as a list of names the command takes (its parser records them as `metric_choices`; at least one)."""
    return parse_metrics(args.metrics, args.metric_choices)


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
