"""`landscape plot`: draw surface files (HDF5 from `landscape surface`) as lines, contours, heatmaps or 3-D → PNG/PDF,
an interactive 3-D page (--html) or VTK files for ParaView (--vtk); a spread's median with its band."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.cli.output import print_json
from analysis.report.charts import SURFACE_KINDS, plot_lines, plot_spread, plot_surfaces, save
from landscape.surfaces.spread import Spread, is_spread_file, read_spread
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
    parser.add_argument(
        "--out", default=None, help="FILE.png or FILE.pdf, FILE.html with --html (default: the first file with .png/.html)"
    )
    view = parser.add_mutually_exclusive_group()
    view.add_argument(
        "--html",
        action="store_true",
        help="an interactive 3-D page of the 2-D surfaces (one colour scale), plotly.js inlined so it opens offline; "
        "needs the interactive extra (plotly)",
    )
    view.add_argument(
        "--vtk",
        action="store_true",
        help="one VTK structured grid (.vts) per 2-D file, next to it, for ParaView: height = loss, every quantity a point array",
    )


def run(args: argparse.Namespace) -> None:
    surfaces = dict(zip(labels_for(args.files, args.labels), (read_any(f) for f in args.files)))
    spreads = {label: s for label, s in surfaces.items() if isinstance(s, Spread)}
    if spreads and len(spreads) < len(surfaces):
        raise ValueError("cannot plot spreads and single surfaces together; give files of one kind")
    if spreads and next(iter(spreads.values())).dim == 2:  # a spread of planes: its median plane
        surfaces = {label: median_surface(s) for label, s in spreads.items()}
        spreads = {}
    if args.html or args.vtk:
        return write_views(args, surfaces)
    kind = choose_kind(surfaces, args.kind)
    for surface in surfaces.values():
        if not surface.complete:
            missing = int((~surface.done).sum())
            print(
                f"landscape plot: warning: {surface.path} is incomplete ({missing} of {surface.done.size} points "
                "missing); plotting what is there",
                file=sys.stderr,
            )
    if spreads:
        fig = plot_spread(spreads, splits=[args.split] if args.split else None, log=args.log, title=args.title)
    elif kind == "line":
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


def read_any(path: str) -> Surface | Spread:
    """A surface file, or a spread file (`landscape surface --spread`)."""
    return read_spread(path) if is_spread_file(path) else read_surface(path)


def median_surface(spread: Spread) -> Surface:
    """A spread of planes as one surface: the pointwise median loss (and accuracy) over its planes."""
    member = spread.member(0)
    return Surface(
        spread.axes,
        {s: spread.median(s) for s in spread.loss},
        {s: spread.median(s, "accuracy") for s in spread.accuracy},
        spread.done.all(axis=0),
        member.directions,
        spread.metadata,
        spread.path,
    )


def write_views(args: argparse.Namespace, surfaces: dict[str, Surface]) -> None:
    """--html: one interactive page of every surface; --vtk: one .vts file next to each surface file."""
    from analysis.report.surface_views import write_html, write_vts

    if any(s.dim != 2 for s in surfaces.values()):
        raise ValueError(f"--{'html' if args.html else 'vtk'} shows 2-D surfaces; give files from `landscape surface --dim 2`")
    if args.html:
        out = Path(args.out or Path(args.files[0]).with_suffix(".html"))
        written = [write_html(surfaces, out, split=args.split or "train", log=args.log, title=args.title)]
    else:
        if args.out and len(args.files) > 1:
            raise ValueError("--vtk writes one file per surface, next to it; --out names one file, so give one FILE.h5")
        outs = [Path(args.out)] if args.out else [Path(f).with_suffix(".vts") for f in args.files]
        written = [write_vts(s, out, height=args.split or "train") for s, out in zip(surfaces.values(), outs)]
    if args.json:
        print_json({"out": [str(p) for p in written], "kind": "html" if args.html else "vtk", "files": list(args.files)})
    else:
        print("\n".join(f"wrote {p}" for p in written))


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
