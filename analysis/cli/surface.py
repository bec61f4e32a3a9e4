"""`landscape surface`: a 1-D or 2-D loss surface around a checkpoint, written to a resumable HDF5 file."""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

from analysis.cli.measure import add_objective_arguments, build_objective
from analysis.cli.output import print_json
from analysis.cli.specs import ObjectiveSpec
from analysis.cli.surface_spread import add_spread_arguments, grid_options, run_spread
from analysis.measures.notes import OptionNote, ResumeNote
from analysis.report.tables import format_table
from landscape.engine.objective import Objective
from landscape.inputs.checkpoints import load_checkpoint
from landscape.surfaces.directions import (
    NORMALIZATIONS,
    ONE_D_POLICIES,
    Directions,
    between,
    checkpoint_plane,
    eigenvector_directions,
    gradient_direction,
    pca_directions,
    random_directions,
)
from landscape.surfaces.surface import Surface, SurfaceError, compute_surface, grid_axis, read_surface

DIRECTION_KINDS = ("random", "eigenvectors", "gradient")
KIND_NAMES = {"random": "random", "eigenvectors": "eigenvector", "gradient": "gradient"}  # option → Directions.kind


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT")
    add_objective_arguments(parser)
    group = parser.add_argument_group("surface")
    group.add_argument(
        "--dim",
        type=int,
        choices=[1, 2],
        default=None,
        help="1 or 2 directions (default 1; 2 with --directions eigenvectors)",
    )
    group.add_argument(
        "--directions",
        default="random",
        choices=DIRECTION_KINDS,
        help="random: filter-normalized Gaussian (default); eigenvectors: the top Hessian eigenvectors by certified "
        "Lanczos; gradient: the normalized gradient (with --dim 2: × the top eigenvector). Eigenvectors and gradient "
        "are unit vectors: a coordinate is a distance in weight space",
    )
    group.add_argument(
        "--max-matvecs",
        type=int,
        default=None,
        metavar="N",
        help="Lanczos budget of Hessian-vector products for --directions eigenvectors|gradient (default: Lanczos's)",
    )
    group.add_argument(
        "--range",
        default=None,
        metavar="START:STOP:NUM",
        help="grid of the first axis (default -1:1:51; -1:2:31 with --between; the trajectory's extent with --pca, the "
        "three checkpoints' with --plane; with eigenvectors or gradient ±√(2/λ), where the quadratic model rises by 1)",
    )
    group.add_argument("--yrange", default=None, metavar="START:STOP:NUM", help="grid of the second axis (default: --range)")
    group.add_argument("--between", metavar="OTHER_CKPT", help="interpolate from CKPT (α=0) to OTHER_CKPT (α=1), BN buffers too")
    group.add_argument(
        "--pca", metavar="TRAJECTORY_DIR", help="plane of the top-2 principal components of the checkpoints in this folder"
    )
    group.add_argument(
        "--plane",
        nargs=2,
        metavar=("B_CKPT", "C_CKPT"),
        help="the plane through CKPT, B_CKPT and C_CKPT (Garipov et al. 2018), orthonormal axes in weight-space distance",
    )
    group.add_argument(
        "--norm", default="filter", choices=NORMALIZATIONS, help="normalization of random directions (default filter)"
    )
    group.add_argument(
        "--bias-bn",
        "--one-d",
        dest="one_d",
        default="ignore",
        choices=ONE_D_POLICIES,
        help="the 1-D tensors (biases, BatchNorm affine) in random directions: ignore (zero, default; Li "
        "et al.'s xignore=biasbn) or copy the weights",
    )
    group.add_argument("--states", action="store_true", help="random directions move BN running statistics too")
    group.add_argument(
        "--direction-seed",
        type=int,
        default=None,
        help="seed of the random directions, or of Lanczos for eigenvectors and gradient (default: --seed)",
    )
    group.add_argument("--test", action="store_true", help="evaluate the whole test split too")
    group.add_argument(
        "--bn-recalibration",
        type=int,
        default=None,
        metavar="K",
        help="re-estimate BN statistics from K train batches at every point",
    )
    group.add_argument("--out", default=None, help="HDF5 file (default: next to CKPT, named after the directions)")
    group.add_argument("--resume", action="store_true", help="finish an interrupted file instead of refusing to overwrite it")
    add_spread_arguments(group)
    group.add_argument(
        "--points-per-call",
        type=points_per_call,
        default="auto",
        metavar="K|auto",
        help="grid points per vmapped forward pass; auto: 1 on a CPU, as many as fit in memory on a GPU (default %(default)s)",
    )


def parse_range(text: str) -> np.ndarray:
    """'START:STOP:NUM' to the grid axis (NUM evenly spaced values, both ends included)."""
    try:
        start, stop, num = text.split(":")
        return grid_axis(float(start), float(stop), int(num))
    except ValueError as error:
        raise ValueError(f"grid range {text!r}: {error} (expected START:STOP:NUM, e.g. -1:1:51)") from None


def points_per_call(text: str) -> int | str:
    """--points-per-call: a positive integer or 'auto'."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return int(text)


def build_directions(objective: Objective, args: argparse.Namespace) -> Directions:
    """Random, eigenvector, gradient, between-checkpoint, three-checkpoint or PCA directions from the options."""
    chosen = [f"--{n}" for n in ("between", "pca", "plane") if getattr(args, n)]
    chosen += [f"--directions {args.directions}"] if args.directions != "random" else []
    if len(chosen) > 1:
        raise ValueError(f"choose one of {' and '.join(chosen)}")
    if args.dim is not None and (chosen and not chosen[0].startswith("--directions")):
        raise ValueError(f"--dim applies to random, eigenvector and gradient directions, not to {chosen[0]}")
    seed = args.seed if args.direction_seed is None else args.direction_seed
    if args.directions != "random":
        return _computed_directions(objective, args, seed)
    if args.plane:
        b, c = (load_checkpoint(p, trust=args.trust_checkpoint).build_model(_model_spec(objective, args)) for p in args.plane)
        return checkpoint_plane(objective, b, c, (args.checkpoint, *args.plane))
    if args.between:
        other = load_checkpoint(args.between, trust=args.trust_checkpoint)
        return between(objective, other.build_model(_model_spec(objective, args)), label=args.between)
    if args.pca:
        paths = sorted(Path(args.pca).glob("*.pt"))
        if not paths:
            raise ValueError(f"--pca {args.pca}: no checkpoints (*.pt) in that folder")
        models = [load_checkpoint(p, trust=args.trust_checkpoint).build_model(_model_spec(objective, args)) for p in paths]
        return pca_directions(objective, models, [p.name for p in paths])
    dim = args.dim or 1
    return random_directions(objective, dim, seed=seed, normalization=args.norm, one_d=args.one_d, states=args.states)


def _computed_directions(objective: Objective, args: argparse.Namespace, seed: int) -> Directions:
    """Eigenvector or gradient directions; on --resume the file's own (Lanczos is not rerun, nor its rounding)."""
    kind = KIND_NAMES[args.directions]
    dim = args.dim or (2 if kind == "eigenvector" else 1)
    options = {"seed": seed, "max_matvecs": args.max_matvecs}
    path = output_path(args, kind, dim)
    if args.resume and path.exists():
        try:
            stored = read_surface(path).directions
        except SurfaceError:
            stored = None  # compute_surface names what is wrong with the file
        if stored is not None and stored.kind == kind and stored.dim == dim and _recorded(stored, options):
            warnings.warn(ResumeNote(f"{path}: the {kind} directions read back from the file"), stacklevel=2)
            return stored.to(objective.device, objective.dtype)
    if kind == "eigenvector":
        directions = eigenvector_directions(objective, dim, seed=seed, max_matvecs=args.max_matvecs)
    else:
        directions = gradient_direction(objective, dim, seed=seed, max_matvecs=args.max_matvecs)
    if "certified" in directions.spec and not directions.spec["certified"]:
        warnings.warn(
            OptionNote(
                f"Lanczos did not certify the top eigenvector(s) in {directions.spec['n_matvecs']} products: the axes may "
                "not be the sharpest directions (raise --max-matvecs)"
            ),
            stacklevel=2,
        )
    return directions


def _recorded(directions: Directions, options: dict) -> bool:
    """Whether stored directions were made with these options (Lanczos's seed and budget)."""
    return all(directions.spec.get(k) == v for k, v in options.items())


def grid_axes(directions: Directions, args: argparse.Namespace) -> list[np.ndarray]:
    """The grid: --range/--yrange, else a default per direction kind (PCA: 1.2× the trajectory's extent)."""
    if args.range:
        first = parse_range(args.range)
    elif directions.kind == "plane":
        return _plane_axes(directions, args)
    elif directions.kind in ("eigenvector", "gradient"):
        extent = quadratic_extent(directions)
        first = grid_axis(-extent, extent, 51)
    elif directions.kind == "between":
        first = grid_axis(-1.0, 2.0, 31)
    elif directions.kind == "pca":
        extent = 1.2 * float(np.abs(directions.trajectory).max())
        return (
            [grid_axis(-extent, extent, 21)] * 2
            if args.yrange is None
            else [grid_axis(-extent, extent, 21), parse_range(args.yrange)]
        )
    else:
        first = grid_axis(-1.0, 1.0, 51)
    if directions.dim == 1:
        return [first]
    return [first, parse_range(args.yrange) if args.yrange else first]


def quadratic_extent(directions: Directions) -> float:
    """Half-width of the default grid along unit eigenvector or gradient directions: ±√(2/λ), where the quadratic
    model ½λx² rises by 1 along the first axis (λ its eigenvalue, or the curvature along the gradient, widened to
    hold the minimum along the gradient); 1 where that curvature is not positive."""
    spec = directions.spec
    curvature = spec["eigenvalues"][0] if directions.kind == "eigenvector" else spec["curvature"]
    if not curvature > 0:
        return 1.0
    extent = float(np.sqrt(2.0 / curvature))
    if directions.kind == "gradient":
        extent = max(extent, 2.0 * spec["gradient_norm"] / curvature)
    return float(f"{extent:.3g}")


def _plane_axes(directions: Directions, args: argparse.Namespace) -> list[np.ndarray]:
    """The three checkpoints' extent with a margin of a quarter of the larger side, 31 points an axis (--yrange: y)."""
    coords = np.asarray(directions.trajectory)
    low, high = coords.min(axis=0), coords.max(axis=0)
    margin = 0.25 * float((high - low).max())
    x = grid_axis(low[0] - margin, high[0] + margin, 31)
    return [x, parse_range(args.yrange) if args.yrange else grid_axis(low[1] - margin, high[1] + margin, 31)]


def default_path(checkpoint: str, kind: str, dim: int) -> Path:
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}-surface-{kind}-{dim}d.h5")


def output_path(args: argparse.Namespace, kind: str, dim: int) -> Path:
    """--out, else the default file next to CKPT, named after the kind and number of directions."""
    return Path(args.out) if args.out else default_path(args.checkpoint, kind, dim)


def run(args: argparse.Namespace) -> None:
    spec = ObjectiveSpec.from_args(args)
    objectives = {"train": build_objective(args.checkpoint, spec)}
    if args.test:
        objectives["test"] = build_objective(args.checkpoint, spec.whole("test"))
    if args.spread:
        axis = parse_range(args.range) if args.range else grid_axis(-1.0, 1.0, 51)
        second = parse_range(args.yrange) if args.yrange else axis
        return run_spread(args, objectives, [axis] if (args.dim or 1) == 1 else [axis, second])
    directions = build_directions(objectives["train"], args)
    axes = grid_axes(directions, args)
    path = output_path(args, directions.kind, directions.dim)
    start = time.perf_counter()
    surface = compute_surface(objectives, directions, axes, path=path, **grid_options(args))
    seconds = time.perf_counter() - start
    if args.json:
        print_json({**surface.to_dict(), "seconds": seconds})
    else:
        print(format_surface(surface, seconds))


def format_surface(surface: Surface, seconds: float) -> str:
    """Where the file is, the grid, and the loss at the centre and at the grid's minimum, per split."""
    d = surface.directions
    grid = " × ".join(f"[{a[0]:g}, {a[-1]:g}] in {len(a)}" for a in surface.axes)
    lines = [
        f"{surface.path}: {d.kind} {surface.dim}-D surface, grid {grid}, "
        f"{int(surface.done.sum())}/{surface.done.size} points in {seconds:.1f}s"
    ]
    if d.kind == "pca":
        ratios = ", ".join(f"{r:.1%}" for r in d.spec["explained_variance_ratio"])
        lines.append(f"explained variance of the two components: {ratios}")
    if "eigenvalues" in d.spec:
        values = ", ".join(f"{v:.6g}" for v in d.spec["eigenvalues"])
        certified = "certified" if d.spec["certified"] else "NOT certified"
        lines.append(f"top Hessian eigenvalue(s) {values} ({certified}, {d.spec['n_matvecs']} Hessian-vector products)")
    if d.kind == "gradient":
        lines.append(f"gradient norm {d.spec['gradient_norm']:.6g}, curvature along it {d.spec['curvature']:.6g}")
    if d.kind == "plane":
        where = ", ".join(f"{name} at ({x:.4g}, {y:.4g})" for name, (x, y) in zip(d.labels, d.trajectory))
        lines.append(f"checkpoints in the plane (weight-space distance): {where}")
    rows = []
    for split, loss in surface.loss.items():
        centre = _value_at_origin(surface, loss)
        i = np.unravel_index(np.nanargmin(loss), loss.shape)
        where = ", ".join(f"{a[k]:.3g}" for a, k in zip(surface.axes, i))
        acc = surface.accuracy[split][i]
        rows.append(
            (
                split,
                f"{centre:.6g}" if centre is not None else "not on grid",
                f"{loss[i]:.6g} at ({where})",
                "" if np.isnan(acc) else f"{acc:.4f}",
                f"{np.nanmax(loss):.6g}",
            )
        )
    lines.append(format_table(["split", "loss at origin", "min loss", "accuracy there", "max loss"], rows))
    for name, per_split in surface.quantities.items():
        at_origin = ", ".join(
            f"{s} {_value_at_origin(surface, v):.6g}" for s, v in per_split.items() if _value_at_origin(surface, v) is not None
        )
        lines.append(
            f"{name}: {at_origin or 'origin not on the grid'} at the origin; range {np.nanmin(list(per_split.values())):.6g} to {np.nanmax(list(per_split.values())):.6g}"
        )
    if surface.cost and np.isfinite(surface.cost["seconds"]).any():
        lines.append(
            f"per point: {np.nanmedian(surface.cost['seconds']) * 1e3:.3g} ms (median), "
            f"{np.nanmax(surface.cost['forwards']):g} forward and {np.nanmax(surface.cost['backwards']):g} backward passes "
            "over the measurement sets"
        )
    return "\n".join(lines)


def _value_at_origin(surface: Surface, values: np.ndarray) -> float | None:
    index = []
    for axis in surface.axes:
        hits = np.flatnonzero(axis == 0.0)
        if not len(hits):
            return None
        index.append(int(hits[0]))
    return float(values[tuple(index)])


def _model_spec(objective: Objective, args: argparse.Namespace) -> dict | None:
    """The origin's model spec when --model was given, so the other (bare) checkpoints are built alike."""
    return objective.metadata["model_spec"] if args.model else None
