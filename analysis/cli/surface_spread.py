"""`landscape surface CKPT --spread N`: the curve (or plane) along N random directions in one file, and
`--quantities`: what each point of any surface records. Options and output; the work is landscape.surfaces.spread."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from analysis.cli.output import print_json
from analysis.report.tables import format_table
from landscape.engine.objective import Objective
from landscape.surfaces.quantities import BUILT_IN, QUANTITIES
from landscape.surfaces.spread import DEFAULT_BAND, DEFAULT_DIRECTIONS, SharpnessRadius, Spread, compute_spread, sharpness_radius


def add_spread_arguments(group: argparse._ArgumentGroup) -> None:
    """--spread [N], --rise and --quantities on the `surface` command's option group."""
    group.add_argument(
        "--spread",
        type=direction_count,
        nargs="?",
        const=DEFAULT_DIRECTIONS,
        default=None,
        metavar="N",
        help="the curve (plane with --dim 2) along N random directions, seeds --direction-seed … +N−1, in one file: "
        f"median, 10–90%% band and the sharpness radius (N: {DEFAULT_DIRECTIONS} when omitted)",
    )
    group.add_argument(
        "--rise",
        type=float,
        default=0.1,
        metavar="DELTA",
        help="with --spread: the sharpness radius is where the loss first exceeds L0 + DELTA (default %(default)s)",
    )
    group.add_argument(
        "--quantities",
        type=quantity_list,
        default=",".join(BUILT_IN),  # argparse passes a string default through `type` too
        metavar="LIST",
        help="what each point records, comma-separated: loss,accuracy (always) and any of "
        f"{', '.join(QUANTITIES)}; grad-norm costs a forward and a backward pass more per point (default %(default)s)",
    )


def direction_count(text: str) -> int:
    """--spread N: at least 2 (a spread of one direction is one surface)."""
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 2, got {text!r}")
    return int(text)


def quantity_list(text: str) -> tuple[str, ...]:
    """--quantities: comma-separated names, loss and accuracy always among them."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [n for n in names if n not in BUILT_IN and n not in QUANTITIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown quantity {unknown[0]!r}; use {', '.join((*BUILT_IN, *QUANTITIES))}")
    return tuple(dict.fromkeys((*BUILT_IN, *names)))


def grid_options(args: argparse.Namespace) -> dict:
    """The options every grid of `landscape surface` takes from the command line (a surface's and a spread's)."""
    return {
        "resume": args.resume,
        "bn_recalibration": args.bn_recalibration,
        "progress": args.progress,
        "points_per_call": args.points_per_call,
        "quantities": args.quantities,
    }


def run_spread(args: argparse.Namespace, objectives: dict[str, Objective], axes: list[np.ndarray]) -> None:
    """`--spread N`: N random directions' curves (or planes) on the grid `axes` into one file, then the median, band
    and sharpness radius."""
    if getattr(args, "between", None) or getattr(args, "pca", None) or getattr(args, "plane", None):
        raise ValueError("--spread draws random directions; it cannot be combined with --between, --pca or --plane")
    if getattr(args, "directions", "random") != "random":
        raise ValueError(f"--spread draws random directions; it cannot be combined with --directions {args.directions}")
    dim = len(axes)
    seed = args.seed if args.direction_seed is None else args.direction_seed
    checkpoint = Path(args.checkpoint)
    path = Path(args.out) if args.out else checkpoint.with_name(f"{checkpoint.stem}-spread-{dim}d-n{args.spread}.h5")
    start = time.perf_counter()
    spread = compute_spread(
        objectives,
        axes,
        n=args.spread,
        seed=seed,
        normalization=args.norm,
        one_d=args.one_d,
        states=args.states,
        path=path,
        **grid_options(args),
    )
    seconds = time.perf_counter() - start
    radii = {split: sharpness_radius(spread, args.rise, split) for split in spread.loss}
    if args.json:
        print_json({**spread.to_dict(), "sharpness_radius": {s: r.to_dict() for s, r in radii.items()}, "seconds": seconds})
    else:
        print(format_spread(spread, radii, seconds))


def format_spread(spread: Spread, radii: dict[str, SharpnessRadius], seconds: float) -> str:
    """The file, the members, and per split the loss at the origin and the sharpness radius: median [IQR]."""
    grid = " × ".join(f"[{a[0]:g}, {a[-1]:g}] in {len(a)}" for a in spread.axes)
    what = "curves" if spread.dim == 1 else "planes"
    lines = [
        f"{spread.path}: {spread.n} random {what} (seeds {spread.seeds[0]}…{spread.seeds[-1]}), grid {grid}, "
        f"{int(spread.done.sum())}/{spread.done.size} points in {seconds:.1f}s; `landscape plot` draws the median "
        f"and the {DEFAULT_BAND[0]:.0%}–{DEFAULT_BAND[1]:.0%} band",
        "sharpness radius over the "
        + (f"{spread.n} directions: |α| where the loss first exceeds L0 + Δ" if spread.dim == 1 else "")
        + (f"{spread.n} planes: √(area/π) of the origin's sublevel set L ≤ L0 + Δ" if spread.dim == 2 else ""),
    ]
    rows = [
        (
            split,
            f"{r.loss_at_origin:.6g}",
            f"{r.rise:g}",
            f"{r.median:.4g}",
            f"[{r.q25:.4g}, {r.q75:.4g}]",
            f"{r.n_censored} of {spread.n}" if r.n_censored else "none",
        )
        for split, r in radii.items()
    ]
    lines.append(format_table(["split", "loss at origin", "Δ", "radius (median)", "IQR", "beyond the grid"], rows))
    return "\n".join(lines)
