"""`landscape connect`: train a Bézier curve or polygonal chain between two checkpoints, against the straight line.

Mode connectivity (Garipov et al. 2018; Draxler et al. 2018): the loss along the trained curve and along the line,
with BN statistics re-estimated at every point, written to a resumable HDF5 file; several pairs (or curve seeds)
give the mean barrier with its t-interval.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from analysis.cli.measure import add_objective_arguments, build_objective
from analysis.cli.output import print_json
from analysis.cli.specs import ObjectiveSpec
from analysis.report.tables import format_table
from landscape.inputs.checkpoints import load_checkpoint
from landscape.surfaces.connectivity import (
    CURVES,
    OPTIMIZERS,
    BarrierInterval,
    Connection,
    CurveTraining,
    barrier_interval,
    connect,
)

DEFAULTS = CurveTraining()
TRAIN_BATCH_SIZE = 128
POINTS = 21


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="CKPT_A CKPT_B: the curve's two ends; more pairs (A1 B1 A2 B2 …) give the mean barrier with its interval",
    )
    add_objective_arguments(parser)
    group = parser.add_argument_group("curve")
    group.add_argument("--curve", default=DEFAULTS.curve, choices=CURVES, help="the curve's shape (default %(default)s)")
    group.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="epochs of the bend's training (default %(default)s)")
    group.add_argument("--optimizer", default=DEFAULTS.optimizer, choices=OPTIMIZERS, help="(default %(default)s)")
    group.add_argument(
        "--lr",
        type=float,
        default=DEFAULTS.lr,
        help="learning rate: constant for half the epochs, then down to 1%% of it at 90%% (default %(default)s)",
    )
    group.add_argument("--momentum", type=float, default=DEFAULTS.momentum, help="SGD's momentum (default %(default)s)")
    group.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="on the bend (default %(default)s)")
    group.add_argument(
        "--train-batch-size",
        type=int,
        default=TRAIN_BATCH_SIZE,
        help="minibatch of the bend's training, over the whole train split (default %(default)s)",
    )
    group.add_argument(
        "--points", type=int, default=POINTS, help="evaluated points per path, both ends included (default %(default)s)"
    )
    group.add_argument(
        "--bn-batches",
        type=int,
        default=None,
        metavar="K",
        help="re-estimate BN statistics at each point from K batches of the measured train set (default: all of it)",
    )
    group.add_argument(
        "--curve-seeds",
        type=int,
        default=1,
        metavar="N",
        help="train N curves per pair, seeds --seed … --seed+N−1 (the t draws and minibatch order) (default %(default)s)",
    )
    group.add_argument(
        "--out",
        default=None,
        metavar="F.h5",
        help="HDF5 file (default: next to CKPT_A); several curves: F-<pair>-s<seed>.h5 beside it",
    )
    group.add_argument("--resume", action="store_true", help="finish an interrupted file instead of refusing to overwrite it")


def pairs_of(checkpoints: list[str]) -> list[tuple[str, str]]:
    """CKPT_A CKPT_B [A2 B2 …] as (A, B) pairs."""
    if len(checkpoints) % 2:
        raise ValueError(
            f"give checkpoints in pairs (A B, or A1 B1 A2 B2 …), got {len(checkpoints)}: {checkpoints[-1]} has no partner"
        )
    return list(zip(checkpoints[::2], checkpoints[1::2]))


def output_path(args: argparse.Namespace, pair: int, seed: int, several: bool) -> Path:
    """--out, or A-connect-B-<curve>.h5 next to A; with several curves a suffix per pair and seed."""
    a, b = pairs_of(args.checkpoints)[pair]
    path = Path(args.out) if args.out else Path(a).with_name(f"{Path(a).stem}-connect-{Path(b).stem}-{args.curve}.h5")
    return path.with_name(f"{path.stem}-{pair}-s{seed}{path.suffix}") if several else path


def run(args: argparse.Namespace) -> None:
    pairs = pairs_of(args.checkpoints)
    if args.curve_seeds < 1:
        raise ValueError(f"--curve-seeds must be at least 1, got {args.curve_seeds}")
    for name in ("train_batch_size", "points"):
        if getattr(args, name) < (3 if name == "points" else 1):
            raise ValueError(
                f"--{name.replace('_', '-')} must be at least {3 if name == 'points' else 1}, got {getattr(args, name)}"
            )
    spec = ObjectiveSpec.from_args(args)
    several = len(pairs) * args.curve_seeds > 1
    connections = []
    for i, (a, b) in enumerate(pairs):
        objectives = {"train": build_objective(a, spec), "test": build_objective(a, spec.whole("test"))}
        train = build_objective(a, replace(spec.whole("train"), mode="train", batch_size=args.train_batch_size))
        model_spec = objectives["train"].metadata["model_spec"] if args.model else None
        other = load_checkpoint(b, trust=args.trust_checkpoint).build_model(model_spec)
        for seed in range(args.seed, args.seed + args.curve_seeds):
            training = CurveTraining(args.curve, args.epochs, args.optimizer, args.lr, args.momentum, args.weight_decay, seed)
            connections.append(
                connect(
                    objectives,
                    other,
                    training=training,
                    train=train,
                    points=args.points,
                    bn_batches=args.bn_batches,
                    path=output_path(args, i, seed, several),
                    resume=args.resume,
                    progress=args.progress,
                    label=b,
                )
            )
    intervals = [
        barrier_interval(connections, path=path, split=split) for split in ("train", "test") for path in ("line", "curve")
    ]
    if args.json:
        print_json({"pairs": pairs, "connections": [c.to_dict() for c in connections], "barriers": intervals})
    else:
        print(format_connections(pairs, connections, intervals if several else []))


def format_connections(pairs: list[tuple[str, str]], connections: list[Connection], intervals: list[BarrierInterval]) -> str:
    """Straight line against the trained curve per split: highest loss, both barriers, accuracy there; the cost."""
    lines = []
    for connection in connections:
        s = connection.settings
        steps, seconds = connection.n_steps, float(connection.training_seconds.sum())
        bn = f"BN re-estimated at each point from {s['bn_recalibration']} batches" if s["bn_recalibration"] else "no BN"
        a, b = (connection.metadata["splits"]["train"].get("checkpoint", "A"), connection.metadata["other"]["label"])
        lines.append(
            f"{a} → {b}: {connection.kind} curve, seed {s['seed']}, {s['epochs']} epochs ({steps} steps, {seconds:.1f}s "
            f"training), {s['points']} points per path, {bn} → {connection.path}"
        )
        rows = []
        for split in connection.line.loss:
            for name, path in (("straight line", connection.line), (f"{connection.kind} curve", connection.curve)):
                worst = path.worst(split)
                rows.append(
                    (
                        split,
                        name,
                        f"{path.max_loss(split):.4g} at t={path.t[worst]:.2f}",
                        f"{path.barrier(split):.4g}",
                        f"{path.barrier(split, 'interpolated'):.4g}",
                        _accuracy(path.accuracy_at_worst(split)),
                        f"{float(path.seconds.sum()):.1f}s",
                    )
                )
        headers = ["split", "path", "max loss", "barrier", "above the chord", "accuracy there", "evaluation"]
        lines.append(format_table(headers, rows))
    if intervals:
        rows = [
            (
                i.split,
                "straight line" if i.path == "line" else f"{connections[0].kind} curve",
                f"{i.mean:.4g} ± {i.halfwidth:.2g}" if len(i.values) > 1 else f"{i.mean:.4g}",
                str(len(i.values)),
            )
            for i in intervals
        ]
        lines.append(
            f"barrier over {len(pairs)} pair(s) × {len(connections) // len(pairs)} curve seed(s) (mean ± 95% t-interval):"
        )
        lines.append(format_table(["split", "path", "barrier", "n"], rows))
    lines.append("barrier: max loss − the worse end's loss; above the chord: max of loss − ((1−t)·L(A) + t·L(B))")
    return "\n".join(lines)


def _accuracy(value: float) -> str:
    return "" if value != value else f"{value:.4f}"
