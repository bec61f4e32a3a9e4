"""`landscape plot`: draw surface files (HDF5 from `landscape surface`) as lines, contours, heatmaps or 3-D → PNG/PDF."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.command_line import print_json
from analysis.plots import SURFACE_KINDS, plot_lines, plot_surfaces, save
from landscape.surfaces.surface import Surface, read_surface

KINDS = ("line", *SURFACE_KINDS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE.h5", help="surface files; several are drawn on one scale")
    parser.add_argument("--kind", choices=KINDS, default=None, help="default: line for 1-D files, contour for 2-D")
    parser.add_argument(
        "--split",
        choices=["train", "test"],
        default=None,
        help="which split to draw (default: every split for lines, train for 2-D kinds)",
    )
    parser.add_argument("--log", action="store_true", help="log-scale loss")
    parser.add_argument("--accuracy", action="store_true", help="accuracy on a second axis (line plots)")
    parser.add_argument("--labels", default=None, help="comma list of labels, one per file (default: file names)")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--out", default=None, help="FILE.png or FILE.pdf (default: the first file with .png)")


def run(args: argparse.Namespace) -> None:
    surfaces = dict(zip(labels_for(args.files, args.labels), (read_surface(f) for f in args.files)))
    kind = choose_kind(surfaces, args.kind)
    for surface in surfaces.values():
        if not surface.complete:
            missing = int((~surface.done).sum())
            print(
                f"landscape plot: warning: {surface.path} is incomplete ({missing} of {surface.done.size} points "
                "missing); plotting what is there",
                file=sys.stderr,
            )
    if kind == "line":
        fig = plot_lines(
            surfaces, splits=[args.split] if args.split else None, log=args.log, accuracy=args.accuracy, title=args.title
        )
    elif args.accuracy:
        raise ValueError("--accuracy applies to line plots (1-D files)")
    else:
        fig = plot_surfaces(surfaces, kind=kind, split=args.split or "train", log=args.log, title=args.title)
    out = save(fig, args.out or Path(args.files[0]).with_suffix(".png"))
    if args.json:
        print_json({"out": str(out), "kind": kind, "files": list(args.files), "labels": list(surfaces)})
    else:
        print(f"wrote {out}")


def labels_for(files: list[str], labels: str | None) -> list[str]:
    """The given comma-separated labels (one per file), else file names (with their folder when names repeat)."""
    if labels is not None:
        names = [label.strip() for label in labels.split(",")]
        if len(names) != len(files):
            raise ValueError(f"--labels has {len(names)} labels for {len(files)} files")
    else:
        names = [Path(f).stem for f in files]
        if len(set(names)) < len(names):
            names = [f"{Path(f).parent.name}/{Path(f).stem}" for f in files]
    if len(set(names)) < len(names):
        raise ValueError("labels must differ; pass --labels a,b,...")
    return names


def choose_kind(surfaces: dict[str, Surface], kind: str | None) -> str:
    """The requested kind (line for 1-D, contour for 2-D by default), refusing mixed dimensions and mismatched kinds."""
    dims = {s.dim for s in surfaces.values()}
    if len(dims) > 1:
        raise ValueError("cannot plot 1-D and 2-D surfaces together; give files of one dimension")
    dim = dims.pop()
    if kind is None:
        return "line" if dim == 1 else "contour"
    if (kind == "line") != (dim == 1):
        expected = "--kind line" if dim == 1 else f"--kind {'|'.join(SURFACE_KINDS)}"
        raise ValueError(f"--kind {kind} cannot draw a {dim}-D surface; use {expected}")
    return kind
