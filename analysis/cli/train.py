"""`landscape train`: command-line front of landscape.training.loop."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from analysis.cli.key_values import parse_options
from analysis.cli.output import print_json
from analysis.report.tables import format_table
from landscape.inputs.checkpoints import load_checkpoint
from landscape.training.loop import AMP_MODES, LR_SCALINGS, LR_SCHEDULES, TrainConfig, train
from landscape.training.presets import PRESETS, apply_preset
from landscape.training.train_tracking import TRACKED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # options left out stay None: TrainConfig's defaults fill them, or --recipe's settings
    parser.add_argument(
        "--recipe",
        "--preset",
        dest="preset",
        metavar="NAME",
        help="named training recipe filling every option not given on the command line: "
        + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()),
    )
    parser.add_argument("--data", default=None, help="data spec (default digits)")
    parser.add_argument("--data-seed", type=int, default=None, help="seed of the train/test split")
    parser.add_argument("--model", default=None, help="model name or module:factory (default mlp)")
    parser.add_argument("--model-opt", action="append", metavar="KEY=VALUE", help="model option, e.g. hidden=(64,64)")
    parser.add_argument("--optimizer", default=None, help="sgd, adam, smoothout, adasmoothout, ssgd, nso, nrs, sam, asam")
    parser.add_argument(
        "--opt", action="append", metavar="KEY=VALUE", help="method option, e.g. a=0.02 (SmoothOut), rho=0.05 (SAM)"
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=None,
        help="the method's perturbation size: a (smoothout), sigma (ssgd, nso), radius (nrs), rho (sam, asam)",
    )
    parser.add_argument(
        "--ghost-batch-size", type=int, default=None, help="split each batch into chunks of this size (fresh noise per chunk)"
    )
    parser.add_argument(
        "--clip-grad-norm", type=float, default=None, help="clip the global gradient norm (SmoothOut's reference: 5.0)"
    )
    parser.add_argument(
        "--base", default=None, choices=["sgd", "adam"], help="base optimizer the method steps with (default sgd)"
    )
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--momentum", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed of initialization, shuffling and noise")
    parser.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES)
    parser.add_argument(
        "--lr-milestones", default=None, help="epochs where the step schedule multiplies lr by --lr-gamma, e.g. 81,122"
    )
    parser.add_argument("--lr-gamma", type=float, default=None)
    parser.add_argument(
        "--lr-warmup-epochs",
        type=int,
        default=None,
        metavar="N",
        help="a first phase of N epochs at lr × --lr-warmup-factor (default 0: none)",
    )
    parser.add_argument("--lr-warmup-factor", type=float, default=None, help="the first phase's lr multiple (default 1)")
    parser.add_argument("--lr-scaling", default=None, choices=LR_SCALINGS, help="large-batch learning-rate scaling")
    parser.add_argument("--lr-reference-batch", type=int, default=None)
    parser.add_argument("--save-every", type=int, default=None, help="write a trajectory checkpoint every N epochs")
    parser.add_argument(
        "--validation",
        type=int,
        default=None,
        metavar="N",
        help="hold out N training samples (seeded by --data-seed) and log their loss and accuracy, for tuning",
    )
    parser.add_argument(
        "--track-every",
        type=int,
        default=None,
        metavar="N",
        help="measure the Hessian's λ1 (and what --track adds) of the training loss every N epochs, "
        "warm-started, into log.jsonl with its cost (default 0: off)",
    )
    parser.add_argument(
        "--track",
        default=None,
        metavar="eig[,...]",
        help=f"what --track-every measures, a comma list of {', '.join(TRACKED)} (default eig; "
        "preconditioned-sharpness needs --base adam and starts after the first epoch)",
    )
    parser.add_argument(
        "--track-samples",
        type=int,
        default=None,
        help="training samples the tracked curvature is measured on (default 1000, a fixed seeded subset)",
    )
    parser.add_argument(
        "--accumulate",
        type=int,
        default=None,
        metavar="K",
        help="split each batch into K micro-batches run one after another, gradients summed: the "
        "same step as the whole batch in 1/K of the activation memory (default 1; a noisy "
        "method draws fresh noise per micro-batch)",
    )
    parser.add_argument(
        "--amp",
        default=None,
        choices=AMP_MODES,
        help="mixed-precision forward passes: bf16, or fp16 with loss scaling (default none)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default cuda when present); under torchrun cuda means each rank's own GPU (LOCAL_RANK)",
    )
    parser.add_argument("--out", required=True, help="run directory for checkpoints, trajectory and log")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")


NOISE_OPTION = {
    "smoothout": "a",
    "adasmoothout": "a",
    "ssgd": "sigma",
    "nso": "sigma",
    "nrs": "radius",
    "sam": "rho",
    "asam": "rho",
}


def method_options(args: argparse.Namespace, optimizer: str | None = None) -> dict:
    """--opt KEY=VALUE pairs plus the named shortcuts --noise, --ghost-batch-size and --clip-grad-norm.

    `optimizer` is the method --noise belongs to (default --optimizer).
    """
    options = parse_options(args.opt)
    optimizer = optimizer or args.optimizer
    if args.noise is not None:
        if optimizer not in NOISE_OPTION:
            raise ValueError(f"--noise has no meaning for optimizer {optimizer!r}")
        options[NOISE_OPTION[optimizer]] = args.noise
    for key in ("ghost_batch_size", "clip_grad_norm"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return options


# TrainConfig fields whose option is not --field-name with the value as parsed
DERIVED = {"model_kwargs", "optimizer_kwargs", "lr_milestones", "recipe"}


def given_settings(args: argparse.Namespace) -> dict:
    """The TrainConfig settings given on the command line (an option left out is None), method options aside."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in DERIVED and getattr(args, f.name, None) is not None
    }
    if args.model_opt is not None:
        given["model_kwargs"] = parse_options(args.model_opt)
    if args.lr_milestones is not None:
        given["lr_milestones"] = tuple(int(m) for m in args.lr_milestones.split(",") if m.strip())
    return given


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: the options given, then --recipe's settings, then TrainConfig's defaults."""
    settings = given_settings(args)
    if args.preset is not None:
        settings = apply_preset(args.preset, settings)
    explicit = method_options(args, settings.get("optimizer", TrainConfig.optimizer))
    settings["optimizer_kwargs"] = {**settings.get("optimizer_kwargs", {}), **explicit}  # explicit options win
    return TrainConfig(**settings)


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    from landscape.engine.objective import default_device

    final = train(config, args.out, resume=args.resume, progress=args.progress, device=args.device or default_device())
    metrics = final_metrics(final)
    if args.json:
        print_json({"final": str(final), "config": config.to_dict(), "metrics": metrics})
    else:
        print(f"wrote {final} (trajectory in {final.parent / 'trajectory'}, log in {final.parent / 'log.jsonl'})")
        print(
            format_table(
                ["split", "loss", "accuracy"],
                [
                    (split, f"{metrics[f'{split}_loss']:.4f}", f"{metrics[f'{split}_accuracy']:.4f}")
                    for split in ("train", "test")
                    if f"{split}_loss" in metrics
                ],
            )
        )


def final_metrics(final: Path) -> dict:
    """Train and test loss and accuracy of the final weights (eval mode), as the trainer stored them in final.pt."""
    stored = load_checkpoint(final).meta.get("metrics", {})
    return {k: stored[k] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy") if k in stored}
