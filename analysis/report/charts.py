"""Matplotlib figures from result data (landscape/ itself never imports matplotlib)."""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Colormap, LogNorm, Normalize, to_hex, to_rgb  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from analysis.measures.registry import is_lower_bound  # noqa: E402
from analysis.measures.text import eigenvalue_label  # noqa: E402
from analysis.report.differences import ci_halfwidth  # noqa: E402
from analysis.report.setup_text import norm_mode  # noqa: E402
from landscape.curvature.blocks import BlockCurvature, PerLayerResult  # noqa: E402
from landscape.curvature.density import Spectrum  # noqa: E402
from landscape.curvature.diagonal import DiagonalResult  # noqa: E402
from landscape.sharpness.perturb import SharpnessCurve  # noqa: E402
from landscape.surfaces.connectivity import Connection  # noqa: E402
from landscape.surfaces.directions import Directions  # noqa: E402
from landscape.surfaces.spread import DEFAULT_BAND, Spread  # noqa: E402
from landscape.surfaces.surface import Surface  # noqa: E402


def save(fig: plt.Figure, path: str | Path) -> Path:
    """Write PNG or PDF (by suffix), creating the folder; close the figure. Under torchrun only rank 0 writes."""
    from landscape.engine import distributed

    path = Path(path)
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_spectral_densities(
    spectra: Mapping[str, Spectrum | Sequence[Spectrum]],
    top_eigenvalues: Mapping[str, list] | None = None,
    *,
    title: str = "Hessian spectral density (SLQ)",
) -> plt.Figure:
    """Overlay SLQ densities on a log scale, marking each run's top eigenvalues from Lanczos (dotted).

    A label may carry several seeds' densities (and a list of top eigenvalues per seed): each seed is
    drawn as its own thinner line in the label's colour, so their spread shows.
    """
    fig, ax = plt.subplots(figsize=(7, 3.8))
    colors = label_colors(list(spectra))
    for label, found in spectra.items():
        runs = [found] if isinstance(found, Spectrum) else list(found)
        tops = (top_eigenvalues or {}).get(label, [])
        per_seed = tops if tops and isinstance(tops[0], (list, tuple)) else [tops]
        name = label + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
        for i, spectrum in enumerate(runs):
            density = np.maximum(np.asarray(spectrum.density), 1e-8)
            ax.plot(
                spectrum.grid,
                density,
                color=colors[label],
                label=name if i == 0 else None,
                lw=1.6 if len(runs) == 1 else 1.0,
                alpha=1.0 if len(runs) == 1 else 0.8,
            )
        for values in per_seed:
            for value in values:
                ax.axvline(value, color=colors[label], ls=":", lw=1.0)
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return fig


def value_scale(ax: plt.Axes, values: Sequence[np.ndarray], which: str) -> None:
    """Axis `which` ("x" or "y") on a log scale where every finite value is positive, else on a symmetric log (sums of
    a Hessian's diagonal, block traces, may be ≤ 0)."""
    finite = np.concatenate(values)
    finite = finite[np.isfinite(finite)]
    log = finite.size and (finite > 0).all()
    axis = ax.xaxis if which == "x" else ax.yaxis
    scale = ax.set_xscale if which == "x" else ax.set_yscale
    if log:
        scale("log")
        plain_log_ticks(axis)
        return
    sizes = np.abs(finite[finite != 0])  # linear within a decade of the smallest, log beyond (at most 4 decades)
    scale("symlog", linthresh=max(10 ** np.floor(np.log10(sizes.min())), 1e-4 * sizes.max()) if sizes.size else 1.0)


def plain_log_ticks(axis: matplotlib.axis.Axis) -> None:
    """Log-axis tick labels as plain numbers (0.2, 0.5, 1, 2) instead of 2×10⁻¹; 2s and 5s only on narrow ranges."""

    def label(value: float, _: int) -> str:
        low, high = sorted(axis.get_view_interval())
        narrow = low > 0 and high / low < 100
        leading = f"{value:.0e}"[0]
        return f"{value:g}" if leading == "1" or (narrow and leading in "25") else ""

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


PREDICTION_NOTE = "dotted: second-order prediction ½·tr(ΣH), Σ = Cov(u)"


def plot_sharpness_curves(curves: Mapping[str, Sequence[SharpnessCurve]], *, caption: str = "") -> plt.Figure:
    """Expected-loss increase E[L(w+u)] − L(w) against the noise radius (SmoothOut's C̄(w) − L(w)), log-log.

    `curves` maps a label to the sharpness-curve results of its seeds. Every band is a 95% interval:
    one seed's from its noise draws, several seeds' the Student-t interval of their mean. The dotted line
    is the second-order prediction ½·tr(ΣH) (Σ = Cov(u)), averaged over the same seeds.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = label_colors(list(curves))
    for label, runs in curves.items():
        _draw_sharpness(ax, runs, colors[label], label)
    _sharpness_axes(ax, next(iter(curves.values()))[0])
    _fit_log_range([ax])
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], _prediction_handle()], frameon=False, fontsize=8)
    if caption:
        fig.text(0.01, -0.02, caption, fontsize=7.5, va="top", wrap=True)
    return fig


def plot_sharpness_panels(
    curves: Mapping[str, Sequence[SharpnessCurve]], reference: str, *, title: str = "", columns: int = 3
) -> plt.Figure:
    """One panel per label, each beside the `reference` label (grey), on shared axes: many methods stay readable."""
    others = [label for label in curves if label != reference]
    nrows = -(-len(others) // columns)
    ncols = -(-len(others) // nrows)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows + 0.4), squeeze=False, sharex=True, sharey=True, layout="constrained"
    )
    colors = label_colors(others)
    for ax, label in zip(axes.flat, others):
        _draw_sharpness(ax, curves[reference], "#7f7f7f", reference)
        _draw_sharpness(ax, curves[label], colors[label], label)
        _sharpness_axes(ax, curves[label][0], labels=False)
        ax.legend(frameon=False, fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(others) :]:
        ax.set_visible(False)
    _fit_log_range(list(axes.flat)[: len(others)])
    first = curves[reference][0]
    fig.supxlabel(f"noise radius a ({first.distribution}, {first.scale}); bands: 95% CI; {PREDICTION_NOTE}", fontsize=9)
    fig.supylabel("E[L(w+u)] − L(w)  (nats)", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def _draw_sharpness(ax: plt.Axes, runs: Sequence[SharpnessCurve], color: str, label: str) -> None:
    """Mean curve with its 95% band and the mean second-order prediction (dotted) of one label's seeds."""
    radii = np.asarray(runs[0].radii)
    increase = np.array([r.increase for r in runs])
    mean = increase.mean(axis=0)
    if len(runs) == 1:
        low, high = np.asarray(runs[0].increase_ci).T
    else:
        half = ci_halfwidth(increase)
        low, high = mean - half, mean + half
    ax.plot(radii, mean, "o-", color=color, ms=3.5, label=label + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""))
    # an interval reaching zero or below runs off the bottom of the log axis, which _sharpness_axes sets from the means
    ax.fill_between(radii, np.where(low > 0, low, 1e-30), high, color=color, alpha=0.2, lw=0)
    predictions = [r.prediction for r in runs if r.prediction is not None]
    if predictions:
        ax.plot(radii, np.mean(predictions, axis=0), ":", color=color, lw=1.2)


def _sharpness_axes(ax: plt.Axes, first: SharpnessCurve, labels: bool = True) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain_log_ticks(ax.xaxis)
    plain_log_ticks(ax.yaxis)
    if labels:
        ax.set_xlabel(f"noise radius a ({first.distribution}, {first.scale}); bands: 95% CI")
        ax.set_ylabel("E[L(w+u)] − L(w)  (nats)")
    ax.grid(alpha=0.3, which="both")


def _fit_log_range(axes: Sequence[plt.Axes]) -> None:
    """A y range set by the curves, not the bands: a band whose interval reaches zero runs off the bottom."""
    lines = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for ax in axes for line in ax.lines])
    lines = lines[np.isfinite(lines) & (lines > 0)]
    if not lines.size:
        return
    tops = [c.get_paths()[0].vertices[:, 1].max() for ax in axes for c in ax.collections if c.get_paths()]
    top = min(max([lines.max(), *tops]), lines.max() * 10)
    for ax in axes:
        ax.set_ylim(lines.min() / 3, top * 1.3)


def _prediction_handle() -> Line2D:
    return Line2D([], [], color="black", ls=":", lw=1.2, label=PREDICTION_NOTE)


def plot_track(
    series: Mapping[str, Sequence[float]], *, stability_line: tuple[float, str] | None = None, title: str = ""
) -> plt.Figure:
    """Each measured quantity against epoch with a ±1.96·stderr band (λ: the Lanczos residual), losses beside them."""
    epoch = np.asarray(series["epoch"])
    measured = [
        n
        for n in series
        if n not in ("epoch", "measured loss")
        and not n.startswith("recorded")
        and not n.endswith(" stderr")
        and n not in ("train loss", "gradient norm")
    ]
    n = len(measured) + 1
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows + 0.4), squeeze=False, sharex=True, layout="constrained"
    )
    panels = list(axes.flat)
    loss_ax = panels[0]
    for name, style in (("recorded train loss", "-"), ("recorded test loss", "--")):
        values = np.asarray(series.get(name, []), dtype=float)
        if values.size and np.isfinite(values).any():
            loss_ax.plot(epoch, values, style, color="black", label=name.replace("recorded ", ""))
    loss_ax.set_yscale("log")
    loss_ax.set_title("loss (recorded by training)", fontsize=10)
    loss_ax.legend(frameon=False, fontsize=8)
    for ax, name in zip(panels[1:], measured):
        values = np.asarray(series[name], dtype=float)
        err = 1.96 * np.nan_to_num(np.asarray(series.get(f"{name} stderr", np.zeros_like(values)), dtype=float))
        ax.plot(epoch, values, "o-", ms=3, color="#1f77b4")
        ax.fill_between(epoch, values - err, values + err, color="#1f77b4", alpha=0.2, lw=0)
        if stability_line is not None and name == eigenvalue_label(1):
            ax.axhline(stability_line[0], color="black", ls="--", lw=1, label=stability_line[1])
            ax.legend(frameon=False, fontsize=8)
        ax.set_title(name, fontsize=10)
    for ax in panels:
        ax.grid(alpha=0.3)
    for ax in panels[n:]:
        ax.set_visible(False)
    fig.supxlabel("epoch; bands: ±1.96 × the estimate's error (λ: Lanczos residual bound)", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def plot_correlation(result: Mapping, *, gap: str | None = None, title: str = "") -> plt.Figure:
    """Each measure against the generalization gap, one panel per measure, one point per run (colour: method,
    marker: batch size), with τ and Ψ and their bootstrap intervals in the panel's title (`landscape correlate`)."""
    gap = gap or result["gaps"][0]
    runs = result["runs"]
    found = {c["measure"]: c for c in result["correlations"] if c["gap"] == gap}
    names = list(found)
    ncols = 2 if len(names) in (2, 4) else min(len(names), 3)
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.4 * nrows + 0.6), squeeze=False, layout="constrained")
    methods = list(dict.fromkeys(str(r["hyperparameters"].get("method")) for r in runs))
    batches = list(dict.fromkeys(r["hyperparameters"].get("batch_size") for r in runs))
    colors = label_colors(methods)
    markers = dict(zip(batches, "os^Dv<>p*"))
    x = np.array([np.nan if r["generalization"][gap] is None else r["generalization"][gap] for r in runs], float)
    for ax, name in zip(axes.flat, names):
        y = np.array([r["measures"][name].value if name in r["measures"] else np.nan for r in runs], float)
        for i, r in enumerate(runs):
            h = r["hyperparameters"]
            ax.scatter(
                x[i],
                y[i],
                color=colors[str(h.get("method"))],
                marker=markers[h.get("batch_size")],
                s=26,
                alpha=0.85,
                edgecolors="none",
            )
        if np.all(y[np.isfinite(y)] > 0) and np.nanmax(y) / np.nanmin(y) > 20:
            ax.set_yscale("log")
        c = found[name]
        psi = "" if c["psi"] is None else f"\nΨ = {c['psi']['value']:+.2f} [{c['psi']['low']:+.2f}, {c['psi']['high']:+.2f}]"
        shown = f"{name} (a lower bound)" if is_lower_bound(name) else name
        ax.set_title(f"{shown}: τ = {c['tau']['value']:+.2f} [{c['tau']['low']:+.2f}, {c['tau']['high']:+.2f}]{psi}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], ls="", marker="o", color=colors[m], label=m) for m in methods]
    if len(batches) > 1:
        handles += [Line2D([], [], ls="", marker=markers[b], color="grey", label=f"B={b}") for b in batches]
    fig.legend(handles=handles, loc="outside right upper", frameon=False, fontsize=8)
    fig.supxlabel(f"generalization gap ({gap}: test − train); brackets: 95% bootstrap interval over runs", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------ method colours
METHOD_COLORS = {
    "sgd": "#1f77b4",
    "smoothout": "#d62728",
    "adasmoothout": "#ff7f0e",
    "ssgd": "#2ca02c",
    "nso": "#9467bd",
    "nrs": "#8c564b",
    "sam": "#e377c2",
    "asam": "#bcbd22",
    "adam": "#17becf",
}
OTHER_COLORS = ("#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d")


def method_of(label: str) -> str | None:
    """The optimizer a label names ("SmoothOut a=0.01" → smoothout, "S-SGD" → ssgd), None if none."""
    for word in re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", label.lower()):
        for candidate in (word, word.replace("-", ""), *word.split("-")):
            if candidate in METHOD_COLORS:
                return candidate
    return None


def method_color(label: str) -> str | None:
    """The fixed colour of the optimizer a label names, the same in every figure and report; None if none."""
    method = method_of(label)
    return None if method is None else METHOD_COLORS[method]


def label_colors(labels: Sequence[str]) -> dict[str, str]:
    """A distinct colour per label: its method's colour (a darker, then lighter shade for repeats), else a spare one."""
    colors, repeats, spare = {}, Counter(), itertools.cycle(OTHER_COLORS)
    for label in labels:
        method = method_of(label)
        if method is None:
            colors[label] = next(spare)
        else:
            colors[label] = _shade(METHOD_COLORS[method], repeats[method])
            repeats[method] += 1
    return colors


def _shade(color: str, k: int) -> str:
    """The k-th variant of a colour: itself, then alternately darker and lighter, further each round."""
    if k == 0:
        return color
    amount = min(0.4 * ((k + 1) // 2), 0.8)
    target = np.zeros(3) if k % 2 else np.ones(3)
    return to_hex((1 - amount) * np.asarray(to_rgb(color)) + amount * target)


# ------------------------------------------------------------------ loss surfaces
SURFACE_KINDS = ("contour", "filled", "heatmap", "surface3d")
SPLIT_STYLES = {"train": "-", "test": "--"}


def describe_measurement(surface: Surface) -> str:
    """One line naming the data, the samples of each split, the batch size, BN mode and dtype of a surface."""
    splits = surface.metadata.get("splits", {})
    first = next(iter(splits.values()), {})
    data = first.get("data", {})
    measurement = first.get("measurement", {})
    batch = measurement.get("batch_size") or max(first.get("batch_sizes", [0]))
    recalibration = surface.metadata.get("bn_recalibration")
    parts = [
        data.get("spec") if isinstance(data, dict) else data,
        ", ".join(f"{s} {d.get('n_samples')}" for s, d in splits.items())
        + " samples"
        + (f" (subset, seed {measurement.get('seed')})" if measurement.get("subset") else ""),
        f"batch {batch}" if batch else None,
        norm_mode(first) if "mode" in first else None,
        f"BN recalibrated from {recalibration} batches" if recalibration else None,
        first.get("dtype"),
    ]
    return " · ".join(str(p) for p in parts if p)


def plot_lines(
    surfaces: Mapping[str, Surface | Sequence[Surface]],
    *,
    splits: Sequence[str] | None = None,
    log: bool = False,
    accuracy: bool = False,
    title: str | None = None,
) -> plt.Figure:
    """Overlay labelled 1-D surfaces: method colours, train solid and test dashed, accuracy on a twin axis.

    A label may carry several seeds' surfaces on one grid: their mean is drawn with a band of the 95%
    Student-t interval of the mean.
    """
    seeds = {label: [s] if isinstance(s, Surface) else list(s) for label, s in surfaces.items()}
    surfaces = {label: runs[0] for label, runs in seeds.items()}
    _check_dims(surfaces, 1)
    kinds = {s.directions.kind for s in surfaces.values()}
    if len(kinds) > 1:
        raise ValueError(f"cannot overlay 1-D surfaces along different kinds of direction ({', '.join(sorted(kinds))})")
    colors = label_colors(list(surfaces))
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    twin = ax.twinx() if accuracy else None
    used = []
    for label, surface in surfaces.items():
        for split in _splits(surface, label, splits):
            used.append(split)
            style = {
                "color": colors[label],
                "ls": SPLIT_STYLES.get(split, ":"),
                "marker": None if all(s.complete for s in seeds[label]) else ".",
            }
            losses = np.array([_loss(s, split, label, log) for s in seeds[label]])
            ax.plot(surface.axes[0], losses.mean(axis=0), lw=1.8, **style)
            if len(losses) > 1:
                half = ci_halfwidth(losses)
                low = losses.mean(axis=0) - half
                ax.fill_between(
                    surface.axes[0],
                    np.where(low > 0, low, np.nan) if log else low,
                    losses.mean(axis=0) + half,
                    color=colors[label],
                    alpha=0.18,
                    lw=0,
                )
            if twin is not None:
                twin.plot(
                    surface.axes[0], np.mean([s.accuracy[split] for s in seeds[label]], axis=0), lw=1.0, alpha=0.45, **style
                )
    surface = next(iter(surfaces.values()))
    if surface.directions.kind == "between":  # several seeds: no one pair of checkpoints to name
        _mark_endpoints(ax, surfaces if all(len(runs) == 1 for runs in seeds.values()) else {})
    ax.set_yscale("log" if log else "linear")
    if log:
        plain_log_ticks(ax.yaxis)
    ax.set_xlabel(axis_label(surface.directions, 0))
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if twin is not None:
        twin.set_ylabel("accuracy (faint lines)")
        twin.set_ylim(0, 1.02)
        ax.set_zorder(twin.get_zorder() + 1)  # the legend in front of the accuracy lines
        ax.patch.set_visible(False)
    n = {len(runs) for runs in seeds.values()}
    band = f"mean of {n.pop()} seeds, band: 95% CI" if n != {1} and len(n) == 1 else None
    ax.legend(handles=_legend_handles(colors, dict.fromkeys(used), accuracy, band), frameon=False, fontsize=8)
    _titles(fig, surfaces, title)
    return fig


def plot_spread(
    spreads: Mapping[str, Spread],
    *,
    splits: Sequence[str] | None = None,
    log: bool = False,
    quantiles: tuple[float, float] = DEFAULT_BAND,
    title: str | None = None,
) -> plt.Figure:
    """The median curve over each spread's N random directions with the band between two quantiles (10–90% by
    default), faint lines for the members, so one lucky direction no longer decides the figure."""
    _check_dims(spreads, 1)
    colors = label_colors(list(spreads))
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    used = []
    for label, spread in spreads.items():
        for split in _splits(spread, label, splits):
            used.append(split)
            _loss(spread, split, label, log)
            style = {"color": colors[label], "ls": SPLIT_STYLES.get(split, ":")}
            x = spread.axes[0]
            for curve in spread.loss[split]:
                ax.plot(x, curve, lw=0.6, alpha=0.3, **style)
            low, high = spread.band(split, quantiles=quantiles)
            ax.fill_between(x, low, high, color=colors[label], alpha=0.18, lw=0)
            ax.plot(x, spread.median(split), lw=2.0, **style)
    ax.set_yscale("log" if log else "linear")
    if log:
        plain_log_ticks(ax.yaxis)
    first = next(iter(spreads.values()))
    ax.set_xlabel(f"{axis_label(first.member(0).directions, 0)} (each of the {first.n})")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    n = {s.n for s in spreads.values()}
    band = f"median of {'/'.join(map(str, sorted(n)))} directions, band {quantiles[0]:.0%}–{quantiles[1]:.0%}"
    ax.legend(handles=_legend_handles(colors, dict.fromkeys(used), False, band), frameon=False, fontsize=8)
    _titles(fig, spreads, title)
    return fig


def plot_surfaces(
    surfaces: Mapping[str, Surface],
    *,
    kind: str = "contour",
    split: str = "train",
    log: bool = False,
    levels: int = 15,
    title: str | None = None,
    columns: int = 3,
) -> plt.Figure:
    """2-D surfaces on one colour scale and one set of contour levels, origin and PCA path marked.

    At most `columns` panels a row, so each stays readable at a page's width (an HTML report, a paper column).
    """
    if kind not in SURFACE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(SURFACE_KINDS)}")
    _check_dims(surfaces, 2)
    grids = {label: _loss(s, split, label, log) for label, s in surfaces.items()}
    norm, contour_levels = shared_scale(list(grids.values()), log, levels)
    projection = {"projection": "3d"} if kind == "surface3d" else {}
    nrows = -(-len(surfaces) // max(1, columns))
    ncols = -(-len(surfaces) // nrows)  # balanced rows: four panels are 2x2, five are 3+2
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.4 * ncols + 1.4, 4.0 * nrows + 0.2), squeeze=False, layout="constrained", subplot_kw=projection
    )
    panels = list(axes.flat)
    for ax, (label, surface) in zip(panels, surfaces.items()):
        mappable = _draw(ax, surface, grids[label], kind, norm, contour_levels, log)
        ax.set_title(label if len(surfaces) > 1 else f"{split} loss", fontsize=10)
    for ax in panels[len(surfaces) :]:
        ax.set_visible(False)
    bar = fig.colorbar(
        mappable, ax=panels, shrink=0.85 if nrows == 1 else 0.6, label=f"{split} loss" + (" (log scale)" if log else "")
    )
    ticks = round_levels(norm.vmin, norm.vmax, 6, log)
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    bar.minorticks_off()
    _titles(fig, surfaces, title)
    return fig


def shared_scale(grids: Sequence[np.ndarray], log: bool, levels: int) -> tuple[Normalize, np.ndarray]:
    """One colour norm and one set of contour levels spanning the finite values of every grid."""
    finite = np.concatenate([g[np.isfinite(g)] for g in grids])
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        high = low + max(abs(low), 1.0) * 1e-6
    norm = LogNorm(low, high) if log else Normalize(low, high)
    return norm, np.concatenate([[low], round_levels(low, high, levels, log), [high]])


def round_levels(low: float, high: float, n: int, log: bool) -> np.ndarray:
    """At most about n round numbers strictly between low and high: 1-2-5 style steps, or 1…9 × 10^k on a log scale."""
    if not log:
        ticks = MaxNLocator(n, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
        return ticks[(ticks > low) & (ticks < high)]
    decades = np.arange(np.floor(np.log10(low)), np.ceil(np.log10(high)) + 1)
    for mantissas in (range(1, 10), (1, 1.5, 2, 3, 5, 7), (1, 2, 5), (1, 3), (1,)):
        ticks = np.array([m * 10.0**d for d in decades for m in mantissas])
        ticks = ticks[(ticks > low) & (ticks < high)]
        if len(ticks) <= n:
            break
    if len(ticks) < 3:  # a span within one step of 1…9 × 10^k (2.28 to 2.49): linear steps, else the plot is blank
        return round_levels(low, high, n, log=False)
    return ticks


def axis_label(directions: Directions, i: int) -> str:
    """What coordinate i measures: a normalized random direction, α between two checkpoints, a PCA component, a
    Hessian eigenvector, the gradient, or an axis of the plane through three checkpoints (weight-space distance)."""
    if directions.kind == "between":
        return "α (0 = A, 1 = B)"
    if directions.kind == "pca":
        ratio = directions.spec.get("explained_variance_ratio", [])
        share = f" ({ratio[i]:.1%} of variance)" if i < len(ratio) else ""
        return f"PC{i + 1}{share}"
    if directions.kind == "eigenvector":
        values = directions.spec.get("eigenvalues", [])
        known = "λ = " if directions.spec.get("certified") else "λ ≈ "
        return f"Hessian eigenvector {i + 1}" + (f" ({known}{values[i]:.3g})" if i < len(values) else "")
    if directions.kind == "gradient":
        return "along the gradient (distance)" if i == 0 else "top Hessian eigenvector ⊥ gradient (distance)"
    if directions.kind == "plane":
        names = [_short_path(n) for n in directions.labels] or ["A", "B", "C"]
        return f"towards {names[1]} (distance)" if i == 0 else f"towards {names[2]}, ⊥ (distance)"
    if directions.kind == "random":
        normalization = directions.spec.get("normalization", "filter")
        name = "random direction" if normalization == "none" else f"{normalization}-normalized random direction"
        return name if directions.dim == 1 else f"{name} {i + 1}"
    return f"direction {i + 1}"


def _check_dims(surfaces: Mapping[str, Surface], dim: int) -> None:
    """Refuse an empty mapping and surfaces of the wrong dimension."""
    if not surfaces:
        raise ValueError("no surfaces to plot")
    for label, surface in surfaces.items():
        if surface.dim != dim:
            raise ValueError(f"{label} is a {surface.dim}-D surface; this plot takes {dim}-D surfaces")


def _splits(surface: Surface, label: str, splits: Sequence[str] | None) -> list[str]:
    """The requested splits (all of the surface's by default), refusing ones the surface lacks."""
    for split in splits or ():
        if split not in surface.loss:
            raise ValueError(f"{label} has no {split} split (it has {', '.join(surface.loss)})")
    return list(splits) if splits else list(surface.loss)


def _loss(surface: Surface, split: str, label: str, log: bool) -> np.ndarray:
    """The loss grid of one split, NaN where not computed; refuses empty grids, and values ≤ 0 on a log scale."""
    _splits(surface, label, [split])
    values = np.asarray(surface.loss[split], dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError(f"{label} has no computed {split} loss yet")
    if log and finite.min() <= 0:
        raise ValueError(f"{label}: the {split} loss reaches {finite.min():g}, which a log scale cannot show")
    return values


def _draw(
    ax: plt.Axes, surface: Surface, values: np.ndarray, kind: str, norm: Normalize, levels: np.ndarray, log: bool
) -> ScalarMappable:
    """One panel of a 2-D surface; returns what the shared colour bar describes."""
    x, y = np.meshgrid(*surface.axes, indexing="ij")
    z = np.ma.masked_invalid(values)
    cmap = plt.get_cmap("viridis")
    ax.set_xlabel(axis_label(surface.directions, 0))
    ax.set_ylabel(axis_label(surface.directions, 1))
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    if kind == "surface3d":
        return _draw_3d(ax, surface, z, norm, cmap, log)
    if kind == "contour":
        mappable = ax.contour(x, y, z, levels=levels, norm=norm, cmap=cmap, linewidths=1.2)
        ax.clabel(mappable, levels[1:-1:2], fmt="%g", fontsize=7)
    elif kind == "filled":
        mappable = ax.contourf(x, y, z, levels=levels, norm=norm, cmap=cmap)
    else:
        mappable = ax.pcolormesh(x, y, z, norm=norm, cmap=cmap, shading="nearest")
    if surface.directions.kind == "plane":  # weight-space distances on both axes: the triangle's true shape
        _mark_checkpoints(ax, surface.directions)
        ax.set_aspect("equal", adjustable="box")
    elif surface.directions.trajectory is not None:
        _overlay_trajectory(ax, surface.directions)
    ax.plot(0, 0, marker="*", color="black", mec="white", ms=12, ls="none", label="origin", zorder=5)
    return mappable


def _draw_3d(ax: plt.Axes, surface: Surface, z: np.ma.MaskedArray, norm: Normalize, cmap: Colormap, log: bool) -> ScalarMappable:
    """A 3-D surface with shared colours and heights (log₁₀ loss on a log scale), the origin drawn on top."""
    x, y = np.meshgrid(*surface.axes, indexing="ij")
    height = np.log10(z) if log else z
    ax.computed_zorder = False  # the origin marker stays visible in front of the surface
    ax.plot_surface(x, y, height, facecolors=cmap(norm(z)), rstride=1, cstride=1, linewidth=0, shade=False, zorder=1)
    i, j = (int(np.abs(a).argmin()) for a in surface.axes)
    ax.scatter(
        [surface.axes[0][i]],
        [surface.axes[1][j]],
        [height[i, j]],
        color="black",
        edgecolor="white",
        marker="*",
        s=120,
        depthshade=False,
        zorder=5,
    )
    ax.set_zlim(*(np.log10([norm.vmin, norm.vmax]) if log else (norm.vmin, norm.vmax)))  # shared heights
    ax.set_zlabel("log₁₀ loss" if log else "loss", fontsize=9)
    ax.set_box_aspect(None, zoom=0.85)  # room for the axis labels inside the panel
    ax.zaxis.set_major_locator(MaxNLocator(5))
    ax.tick_params(labelsize=7, pad=1)
    for axis in (ax.xaxis, ax.yaxis):
        axis.label.set_fontsize(8)
    return ScalarMappable(norm, cmap)


def _overlay_trajectory(ax: plt.Axes, directions: Directions) -> None:
    """The training trajectory in the plane of its PCA directions, first and last checkpoints named."""
    path = np.asarray(directions.trajectory)
    ax.plot(path[:, 0], path[:, 1], color="#d62728", lw=1.5, marker="o", ms=3.5, label="trajectory")
    names = directions.labels or ("start", "end")
    for (px, py), name, offset in ((path[0], names[0], (6, 6)), (path[-1], names[-1], (6, -12))):
        ax.annotate(
            name,
            (px, py),
            xytext=offset,
            textcoords="offset points",
            fontsize=8,
            color="#d62728",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7},
        )


def _mark_checkpoints(ax: plt.Axes, directions: Directions) -> None:
    """The three checkpoints of a plane (Garipov et al. 2018), each marked and named at its coordinates."""
    names = [_short_path(n) for n in directions.labels] or ["A", "B", "C"]
    for (px, py), name in zip(np.asarray(directions.trajectory), names):
        ax.plot(px, py, marker="o", color="#d62728", mec="white", ms=8, ls="none", zorder=4)
        ax.annotate(
            name,
            (px, py),
            xytext=(7, 5),
            textcoords="offset points",
            fontsize=8,
            color="#d62728",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7},
            zorder=7,
        )


def _mark_endpoints(ax: plt.Axes, surfaces: Mapping[str, Surface]) -> None:
    """Dotted lines at α = 0 and α = 1, labelled A and B (with the checkpoints' names when there is one curve)."""
    names = ("A", "B")
    if len(surfaces) == 1:
        surface = next(iter(surfaces.values()))
        first = next(iter(surface.metadata.get("splits", {}).values()), {})
        a, b = first.get("checkpoint"), surface.directions.spec.get("other")
        names = tuple(f"{n} = {_short_path(p)}" if p else n for n, p in zip(names, (a, b)))
    for alpha in (0.0, 1.0):
        ax.axvline(alpha, color="black", ls=":", lw=1)
    ax.secondary_xaxis("top").set_xticks([0.0, 1.0], labels=names, fontsize=8)


def _short_path(path: str) -> str:
    """The last two parts of a path (run/final.pt), enough to tell runs apart."""
    return "/".join(Path(path).parts[-2:])


def _legend_handles(colors: Mapping[str, str], splits: Iterable[str], accuracy: bool, band: str | None = None) -> list[Line2D]:
    """One entry per label (its colour) and one per split (its line style), plus the accuracy lines' look."""
    handles = [Line2D([], [], color=c, lw=2, label=label) for label, c in colors.items()]
    if band:
        handles.append(Line2D([], [], color="#999999", lw=6, alpha=0.4, label=band))
    handles += [Line2D([], [], color="black", ls=SPLIT_STYLES.get(s, ":"), label=s) for s in splits]
    if accuracy:
        handles.append(Line2D([], [], color="black", alpha=0.45, lw=1, label="accuracy (right axis)"))
    return handles


def _titles(fig: plt.Figure, surfaces: Mapping[str, Surface], title: str | None) -> None:
    """The optional title on top; below the figure, the measurement set (per label when they differ)."""
    if title:
        fig.suptitle(title)
    captions = {label: describe_measurement(s) for label, s in surfaces.items()}
    lines = set(captions.values())
    caption = lines.pop() if len(lines) == 1 else "\n".join(f"{k}: {v}" for k, v in captions.items())
    fig.supxlabel(caption, fontsize=8, color="#444444")


# ------------------------------------------------------------------ per-layer curvature
def _or_nan(block: BlockCurvature | None, name: str) -> float:
    """A block's measured value, NaN where the block or the value is missing (no bar drawn)."""
    value = None if block is None else getattr(block, name)
    return np.nan if value is None else value


PER_LAYER_PANELS = (
    ("lambda1", "residual", 1.0, "λ1 of each block (± Lanczos residual)"),
    ("trace", "trace_stderr", 1.96, "trace of each block (± 1.96 stderr)"),
)


def plot_per_layer(results: Mapping[str, PerLayerResult]) -> plt.Figure:
    """λ1 and trace of each parameter block (`landscape measure --per-layer`), checkpoints side by side.

    `results` maps a checkpoint label to its per-layer result: grouped bars, one colour per label, one panel
    per measured quantity, log y (symmetric log where a value is ≤ 0), error bars from each estimate's uncertainty.
    """
    labels = list(results)
    blocks = list(dict.fromkeys(b.name for r in results.values() for b in r.blocks))
    rows = {label: {b.name: b for b in r.blocks} for label, r in results.items()}
    panels = [p for p in PER_LAYER_PANELS if any(getattr(b, p[0]) is not None for r in results.values() for b in r.blocks)]
    colors = label_colors(labels)
    x, width = np.arange(len(blocks)), 0.8 / len(labels)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(max(4.0, 0.5 + 0.35 * len(blocks) * len(labels)) * len(panels), 3.8),
        squeeze=False,
        layout="constrained",
    )
    for ax, (key, error_key, factor, title) in zip(axes.flat, panels):
        values = []
        for i, label in enumerate(labels):
            found = [rows[label].get(name) for name in blocks]
            value = np.array([_or_nan(b, key) for b in found], float)
            error = factor * np.array([_or_nan(b, error_key) for b in found], float)
            ax.bar(
                x + (i - (len(labels) - 1) / 2) * width,
                value,
                width,
                yerr=error,
                color=colors[label],
                label=label,
                capsize=2,
                error_kw={"lw": 0.8},
            )
            values.append(value)
        value_scale(ax, values, "y")
        tilted = max(map(len, blocks)) > 6
        ax.set_xticks(x, blocks, rotation=30 if tilted else 0, ha="right" if tilted else "center")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(
        *axes.flat[0].get_legend_handles_labels(), loc="outside upper center", ncols=len(labels), frameon=False, fontsize=8
    )
    fig.supxlabel("parameter block (a module's own parameters)", fontsize=9)
    return fig


def _block_numbers(block: BlockCurvature) -> str:
    """λ1 and trace of one block as a panel title spells them: λ1 = 3.21, tr = 45.6 ± 1.2 (stderr); an uncertified
    λ1 as the lower bound it is (≥)."""
    parts = []
    if block.lambda1 is not None:
        trusted = block.converged and block.certified is not False
        parts.append(f"λ1 {'=' if trusted else '≥'} {block.lambda1:.4g}")
    if block.trace is not None:
        parts.append(f"tr = {block.trace:.4g} ± {block.trace_stderr:.2g}")
    return ", ".join(parts)


def plot_block_spectra(
    results: Mapping[str, PerLayerResult] | PerLayerResult, *, columns: int | None = None, curvature: str = "Hessian"
) -> plt.Figure:
    """Small multiples of the per-block spectral densities (`landscape measure --per-layer density`): one panel per
    block, its SLQ density on a log scale (as `plot_spectral_densities` draws the whole model's), λ1 dotted, and
    λ1 and the trace (± stderr) in the panel's title; several checkpoints share each panel, one colour each, a
    title line each (led by the label, or its number where the label is long) and one legend for the figure.
    `columns`: panels per row (None: all of them up to three blocks, else about √blocks).

    Each panel has its own eigenvalue axis: blocks differ by orders of magnitude (Zhang et al. 2024 on the block
    heterogeneity of transformer Hessians).
    """
    results = {"": results} if isinstance(results, PerLayerResult) else dict(results)
    names = list(dict.fromkeys(b.name for r in results.values() for b in r.blocks if b.density is not None))
    if not names:
        raise ValueError("no block has a spectral density: measure them with --per-layer density (per_layer's 'density')")
    rows = {label: {b.name: b for b in r.blocks} for label, r in results.items()}
    single = len(results) == 1
    colors = {label: "C0" for label in results} if single else label_colors(list(results))
    short = {
        label: label if len(label) <= 12 else label.split(":")[0] if label[:1].isdigit() else str(i)
        for i, label in enumerate(results, 1)
    }
    columns = min(columns or (len(names) if len(names) <= 3 else math.ceil(math.sqrt(len(names)))), len(names))
    nrows = -(-len(names) // columns)
    height = 2.6 + (0.15 if single else 0.15 * len(results))
    fig, axes = plt.subplots(nrows, columns, figsize=(3.8 * columns, height * nrows + 0.8), squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, names):
        found = {label: rows[label][name] for label in results if name in rows[label]}
        lines = [f"{name} ({next(iter(found.values())).n_params:,} params)"]
        lines += [(f"{short[label]}: " if not single else "") + _block_numbers(block) for label, block in found.items()]
        ax.set_title("\n".join(lines), fontsize=8.5)
        for label, block in found.items():
            if block.density is None:
                continue
            spectrum = block.density
            ax.plot(spectrum.grid, np.maximum(np.asarray(spectrum.density), 1e-8), color=colors[label], lw=1.3, label=label)
            if block.lambda1 is not None:
                ax.axvline(block.lambda1, color=colors[label], ls=":", lw=1.0)
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-6)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(4))
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    first_result = next(iter(results.values()))
    what = {"role": "each role's parameters, all layers together", "module": "each module's own parameters"}
    fig.suptitle(
        f"{curvature} spectral density of {what.get(first_result.grouping, 'each parameter block')} (SLQ)\n"
        "dotted: λ1 (Lanczos); tr: trace ± standard error",
        fontsize=10,
    )
    if not single:
        legend = [Line2D([], [], color=colors[label], lw=1.5, label=label) for label in results]
        fig.legend(handles=legend, loc="outside lower center", ncols=min(len(results), 3), frameon=False, fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("density", fontsize=9)
    for i, ax in enumerate(axes.flat[: len(names)]):
        if i + columns >= len(names):  # nothing drawn below it
            ax.set_xlabel("eigenvalue of the block", fontsize=9)
    return fig


# ------------------------------------------------------------------ diagonal per tensor
def plot_diagonal(results: Mapping[str, DiagonalResult]) -> plt.Figure:
    """Each parameter tensor's sum of the curvature's diagonal (`landscape measure --metrics hessian-diagonal`) as
    horizontal bars, ± 1.96 stderr, the checkpoints side by side (one colour each); log x where every sum is positive,
    else symmetric log."""
    labels = list(results)
    names = list(dict.fromkeys(b.name for r in results.values() for b in r.tensors))
    colors = label_colors(labels) if len(labels) > 1 else {labels[0]: "C0"}
    y, height = np.arange(len(names)), 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(6.4, 1.0 + 0.32 * len(names) * max(1, len(labels) * 0.7)), layout="constrained")
    values = []
    for i, label in enumerate(labels):
        found = {b.name: b for b in results[label].tensors}
        value = np.array([found[n].sum if n in found else np.nan for n in names], float)
        error = 1.96 * np.array([found[n].stderr if n in found else np.nan for n in names], float)
        offset = (i - (len(labels) - 1) / 2) * height
        ax.barh(y + offset, value, height, xerr=error, color=colors[label], label=label, capsize=2, error_kw={"lw": 0.8})
        values.append(value)
    value_scale(ax, values, "x")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()  # the flat vector's order, top down
    ax.grid(axis="x", alpha=0.3)
    first = next(iter(results.values()))
    what = {"hessian": "Hessian", "ggn": "GGN", "fisher": "empirical Fisher"}.get(first.curvature or "", "curvature")
    how = {"xdiag": "XDiag", "hutchinson": "Hutchinson", "exact": "exact"}.get(first.method, first.method)
    ax.set_xlabel(f"sum of the {what} diagonal over the tensor ({how}; ± 1.96 stderr)", fontsize=9)
    if len(labels) > 1:
        fig.legend(
            *ax.get_legend_handles_labels(), loc="outside upper center", ncols=min(len(labels), 3), frameon=False, fontsize=8
        )
    return fig


# ------------------------------------------------------------------ mode connectivity
CURVE_NAMES = {"bezier": "Bézier", "chain": "chain"}


def plot_connectivity(
    connections: Mapping[str, Sequence[Connection]],
    *,
    splits: Sequence[str] = ("train", "test"),
    log: bool = True,
    title: str | None = None,
) -> plt.Figure:
    """Loss along the straight line (dashed) and along the trained curve (solid) between two checkpoints, one panel
    per split (Garipov et al. 2018, Fig. 2). A label may carry several pairs (seeds): their mean with a band of the
    95% t-interval; the legend gives each path's barrier, mean ± half-width over the pairs."""
    colors = label_colors(list(connections))
    fig, axes = plt.subplots(1, len(splits), figsize=(5.4 * len(splits), 4.8), layout="constrained", squeeze=False)
    for ax, split in zip(axes[0], splits):
        handles = []
        for label, runs in connections.items():
            for name, ls in (("line", "--"), ("curve", "-")):
                paths = [getattr(c, name) for c in runs]
                t, losses = paths[0].t, np.array([p.loss[split] for p in paths])
                mean = losses.mean(axis=0)
                ax.plot(t, mean, color=colors[label], ls=ls, lw=1.8)
                if len(losses) > 1:
                    half = ci_halfwidth(losses)
                    low = mean - half
                    ax.fill_between(
                        t, np.where(low > 0, low, np.nan) if log else low, mean + half, color=colors[label], alpha=0.18, lw=0
                    )
                barriers = [p.barrier(split) for p in paths]
                spread = f" ± {ci_halfwidth(barriers):.2g}" if len(barriers) > 1 else ""
                what = "line" if name == "line" else CURVE_NAMES.get(runs[0].kind, runs[0].kind)
                handles.append(
                    Line2D(
                        [],
                        [],
                        color=colors[label],
                        ls=ls,
                        lw=1.8,
                        label=f"{label}, {what}: {np.mean(barriers):.3g}{spread}",
                    )
                )
        ax.set_yscale("log" if log else "linear")
        if log:
            plain_log_ticks(ax.yaxis)
        ax.set_xlabel("t (0: first seed's checkpoint, 1: second's)")
        ax.set_ylabel(f"{split} loss")
        ax.grid(alpha=0.3)
        ax.legend(
            handles=handles,
            title="barrier (max loss − the worse end's)",
            title_fontsize=7.5,
            frameon=False,
            fontsize=7.5,
            ncols=2,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
        )
    if title:
        fig.suptitle(title)
    first = next(iter(connections.values()))[0]
    s = first.settings
    n = {len(runs) for runs in connections.values()}
    pairs = f"{n.pop()} pair(s) of training seeds per method" + (", mean and 95% t-band" if max(n | {1}) > 1 else "")
    bn = f", BN re-estimated at each point from {s['bn_recalibration']} batches" if s["bn_recalibration"] else ""
    fig.supxlabel(
        f"{pairs}; {CURVE_NAMES.get(first.kind, first.kind)} bend trained {s['epochs']} epochs ({s['optimizer']}, lr {s['lr']:g}, t ~ U(0, 1) per step)"
        f"{bn}",
        fontsize=8,
        color="#444444",
    )
    return fig
