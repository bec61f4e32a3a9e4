"""Views of a 2-D surface people can turn: an interactive 3-D HTML page (plotly) and a VTK file for ParaView.

Plotly is a well-kept library whose WebGL surface works in any browser, offline when its script is
inlined: hand-written WebGL would be ours to keep working. It is an optional extra
(`pip install 'landscape[interactive]'`); without it `--html` says so in one line. The VTK file is the
XML StructuredGrid format (.vts), written here by hand: it is plain text, and needs no vtk package.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from landscape.surfaces.surface import Surface

PLOTLY_MISSING = "the interactive 3-D view needs plotly: pip install 'landscape[interactive]' (or pip install plotly)"
COLORSCALE = "Viridis"  # the matplotlib figures' colour map


def plotly_available() -> bool:
    """Whether plotly can be imported (the `interactive` extra)."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        return False
    return True


def shared_range(surfaces: Mapping[str, Surface], split: str, log: bool) -> tuple[float, float]:
    """One (low, high) over the finite values of every surface, the colour and height range they share (log₁₀ on a
    log scale); the same span `analysis.report.charts.shared_scale` gives the matplotlib figures."""
    from analysis.report.charts import _loss, shared_scale

    norm, _ = shared_scale([_loss(s, split, label, log) for label, s in surfaces.items()], log, 2)
    low, high = float(norm.vmin), float(norm.vmax)
    return (float(np.log10(low)), float(np.log10(high))) if log else (low, high)


def surface_figure(surfaces: Mapping[str, Surface], *, split: str = "train", log: bool = False, title: str | None = None):
    """A plotly figure with one 3-D surface per label side by side, on one colour scale and one height range.

    Args:
        surfaces: {label: 2-D Surface}.
        split: which split's loss.
        log: heights and colours in log₁₀ loss.
        title: the page's title (default: the labels).

    Returns:
        Figure: a plotly.graph_objects.Figure.

    Raises:
        ImportError: plotly is not installed (the message says how to install it).
        ValueError: no surfaces, a 1-D surface, or a split a surface lacks.
    """
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError as error:
        raise ImportError(PLOTLY_MISSING) from error
    from analysis.report.charts import _check_dims, _loss, axis_label

    _check_dims(surfaces, 2)
    low, high = shared_range(surfaces, split, log)
    n = len(surfaces)
    fig = make_subplots(rows=1, cols=n, specs=[[{"type": "scene"}] * n], subplot_titles=list(surfaces) if n > 1 else None)
    for i, (label, surface) in enumerate(surfaces.items()):
        values = _loss(surface, split, label, log)
        z = np.log10(values) if log else values
        fig.add_trace(
            go.Surface(
                # plain lists: the page holds the numbers as text (plotly would pack arrays as base64 binary)
                x=surface.axes[0].tolist(),
                y=surface.axes[1].tolist(),
                z=np.where(np.isfinite(z), z, np.nan).T.tolist(),  # plotly's z[j][i] is at (x[i], y[j])
                cmin=low,
                cmax=high,
                colorscale=COLORSCALE,
                showscale=i == 0,
                colorbar={"title": {"text": ("log₁₀ " if log else "") + f"{split} loss"}},
                name=label,
                hovertemplate="(%{x:.3g}, %{y:.3g}): %{z:.5g}<extra>" + html.escape(label) + "</extra>",
            ),
            row=1,
            col=i + 1,
        )
        scene = {
            "xaxis": {"title": {"text": axis_label(surface.directions, 0)}},
            "yaxis": {"title": {"text": axis_label(surface.directions, 1)}},
            "zaxis": {"title": {"text": ("log₁₀ " if log else "") + "loss"}, "range": [low, high]},
            "aspectmode": "cube",
            "camera": {"eye": {"x": 1.7, "y": -1.7, "z": 1.1}},  # further out than plotly's default: labels in view
        }
        fig.update_layout({f"scene{i + 1 if i else ''}": scene})
    fig.update_layout(
        title={"text": title or ", ".join(surfaces)},
        height=600,
        autosize=True,  # the page's (or the report's) width
        margin={"l": 10, "r": 10, "t": 60, "b": 10},
    )
    return fig


def write_html(surfaces: Mapping[str, Surface], path: str | Path, **options) -> Path:
    """A self-contained HTML page of `surface_figure` (plotly.js inlined: it opens offline); returns its path."""
    fig = surface_figure(surfaces, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, full_html=True, default_width="100%")
    return path


def html_fragment(surfaces: Mapping[str, Surface], **options) -> str:
    """The figure as a <div> with plotly.js inlined, for embedding in a report page."""
    return surface_figure(surfaces, **options).to_html(full_html=False, include_plotlyjs=True)


def add_interactive_view(report, surfaces: Mapping[str, Surface], out: Path, name: str, caption: str, **options) -> None:
    """Embed the interactive 3-D view of `surfaces` in `report` (analysis.report.document.Report) and write it as `out/name`
    for the Markdown's link; without plotly, one line in the report saying how to get it."""
    if not plotly_available():
        report.paragraph(f"Interactive 3-D view left out: {PLOTLY_MISSING}.")
        return
    from landscape.engine import distributed

    if distributed.is_main():  # under torchrun the other ranks computed the same figure
        write_html(surfaces, Path(out) / name, **options)
    report.interactive(name, html_fragment(surfaces, **options), caption)


def write_vts(surface: Surface, path: str | Path, *, height: str = "train") -> Path:
    """The surface as a VTK XML StructuredGrid (.vts) for ParaView, written by hand (no vtk package).

    Points are (α, β, loss of the `height` split), so the file opens as the 3-D surface; every split's
    loss, accuracy and extra quantities, and each point's cost, are point arrays to colour by. Points
    not computed or diverged keep NaN in the arrays and sit at the largest finite height, with
    `computed` = 0 there.

    Args:
        surface: a 2-D surface.
        path: the .vts file.
        height: which split's loss is the height.

    Returns:
        Path: the file.

    Raises:
        ValueError: a 1-D surface, a split it lacks, or no computed point.
    """
    if surface.dim != 2:
        raise ValueError(f"a VTK structured grid holds a 2-D surface; {surface.path or 'this surface'} is {surface.dim}-D")
    if height not in surface.loss:
        raise ValueError(f"no {height} split (the surface has {', '.join(surface.loss)})")
    loss = np.asarray(surface.loss[height], dtype=float)
    finite = np.isfinite(loss)
    if not finite.any():
        raise ValueError(f"{surface.path or 'the surface'} has no computed point yet")
    nx, ny = loss.shape
    x, y = np.meshgrid(*surface.axes, indexing="ij")
    z = np.where(finite, loss, loss[finite].max())
    # VTK orders points with x fastest, then y: Fortran order of the (x, y) arrays
    points = np.stack([x.ravel("F"), y.ravel("F"), z.ravel("F")], axis=1)
    arrays = {f"{s}_loss": v for s, v in surface.loss.items()}
    arrays.update({f"{s}_accuracy": v for s, v in surface.accuracy.items()})
    arrays.update({f"{s}_{q}": v for q, per in surface.quantities.items() for s, v in per.items()})
    arrays.update({f"cost_{k}": v for k, v in surface.cost.items()})
    arrays["computed"] = (surface.done & finite).astype(np.float64)
    extent = f"0 {nx - 1} 0 {ny - 1} 0 0"
    lines = [
        '<?xml version="1.0"?>',
        '<VTKFile type="StructuredGrid" version="1.0" byte_order="LittleEndian">',
        f'  <StructuredGrid WholeExtent="{extent}">',
        f'    <Piece Extent="{extent}">',
        f"      <PointData Scalars={quoteattr(f'{height}_loss')}>",
    ]
    for name, values in arrays.items():
        lines.append(f'        <DataArray type="Float64" Name={quoteattr(name)} format="ascii">')
        lines.append("          " + " ".join(_number(v) for v in np.asarray(values, dtype=float).ravel("F")))
        lines.append("        </DataArray>")
    lines += [
        "      </PointData>",
        "      <Points>",
        '        <DataArray type="Float64" NumberOfComponents="3" format="ascii">',
        *("          " + " ".join(_number(c) for c in p) for p in points),
        "        </DataArray>",
        "      </Points>",
        "    </Piece>",
        "  </StructuredGrid>",
        "</VTKFile>",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _number(value: float) -> str:
    """A float in full precision (repr), NaN and ±inf as VTK's readers spell them."""
    if np.isnan(value):
        return "nan"
    if np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(float(value))
