"""`landscape compare`: the same measurements on several checkpoints, with shared probes, noise and directions.

Every checkpoint is measured on the same measurement set with the same seeds, so Lanczos and
trace probes, weight-noise draws and surface directions are common random numbers: differences
between checkpoints are paired, and their confidence intervals are much tighter than those of
independent runs. Checkpoints that share a label (by default: method and batch size) and differ
only in training seed are aggregated, and a difference between methods is only called a
difference when its interval, built from the seed spread, excludes zero.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from analysis.cli.matched_loss import at_train_loss, parse_target
from analysis.cli.measure import (
    add_metric_arguments,
    add_objective_arguments,
    build_objective,
)
from analysis.cli.output import print_json
from analysis.cli.specs import CompareSpec
from analysis.cli.surface import parse_range
from analysis.measures.measurement import measure as measure_objective
from analysis.measures.notes import OptionNote
from analysis.measures.options import MetricSpec
from analysis.measures.registry import compared_names, metric_quantities
from analysis.report.comparison import SURFACES, ComparedCheckpoint, Comparison
from analysis.report.differences import Aggregate, Difference, aggregate, difference, holm, holm_family, verdict
from analysis.report.document import Report
from analysis.report.setup_text import batching, norm_mode, precision, sample_origin
from analysis.report.tables import format_table
from landscape.engine import distributed as ranks
from landscape.engine.progress import working_on
from landscape.inputs.checkpoints import load_checkpoint
from landscape.results import Quantity, to_jsonable
from landscape.surfaces.directions import random_directions
from landscape.surfaces.surface import compute_surface

# compare's own defaults (a cheaper, wider set than measure's: several checkpoints, each measured alike)
COMPARE_DEFAULTS = MetricSpec(
    metrics=("eig", "trace", "sharpness-curve", "surface"), k=3, radius=(0.005, 0.01, 0.02), noise_samples=40, probes=60
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT")
    add_objective_arguments(parser)
    add_metric_arguments(parser, compare_metrics(), COMPARE_DEFAULTS)
    group = parser.add_argument_group("comparison")
    group.add_argument(
        "--labels", help="comma list, one per checkpoint; equal labels = seeds of one method (default: method and batch size)"
    )
    group.add_argument("--out", default="comparison", help="folder for report.md, report.html, results.json and figures")
    group.add_argument("--allow-mixed", action="store_true", help="compare checkpoints of different models or data sets")
    group.add_argument(
        "--baseline",
        default=None,
        metavar="LABEL",
        help="compare every method with this one (default: each method with the first method's optimizer "
        "at its own batch size, e.g. SmoothOut B=2000 with SGD B=2000; same optimizer: with the first)",
    )
    group.add_argument(
        "--at-train-loss",
        default=None,
        metavar="LOSS|matched",
        help="measure each run at its trajectory checkpoint whose recorded train loss is closest to LOSS; "
        "'matched': the lowest loss every run reaches (compares methods at equal train loss)",
    )
    group.add_argument(
        "--surface-range",
        default=CompareSpec.surface_range,
        metavar="START:STOP:NUM",
        help="1-D surface grid (default %(default)s)",
    )
    group.add_argument(
        "--surface2d-range",
        default=CompareSpec.surface2d_range,
        metavar="START:STOP:NUM",
        help="2-D surface grid (default %(default)s)",
    )


def compare_metrics() -> tuple[str, ...]:
    """What compare measures: every registered measure it takes (measures.registry), then its surfaces."""
    return (*compared_names(), *SURFACES)


def checkpoint_label(path: str, meta: dict) -> str:
    """Method, its noise size and batch size from the training config; the run folder's name otherwise."""
    config = meta.get("train")
    if not config:
        return Path(path).resolve().parent.name
    return f"{method_label(config)} B={config['batch_size']}"


def default_labels(paths: Sequence[str], metas: Sequence[dict]) -> list[str]:
    """checkpoint_label for each checkpoint, told apart by path where a label would join checkpoints that are not
    seeds of one method: one without a training config (bare state dicts in one folder), or a repeated training seed."""
    labels = [checkpoint_label(p, m) for p, m in zip(paths, metas)]
    shared: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        shared.setdefault(label, []).append(i)
    for label, members in shared.items():
        seeds = [(metas[i].get("train") or {}).get("seed") for i in members]
        if len(members) < 2 or (None not in seeds and len(set(seeds)) == len(seeds)):
            continue
        names = path_tails([paths[i] for i in members])
        for i, name in zip(members, names):
            labels[i] = f"{label} ({name})" if metas[i].get("train") else name
        warnings.warn(
            OptionNote(
                f"{len(members)} checkpoints would share the label {label!r} without being training seeds of one method; "
                f"labelled {', '.join(labels[i] for i in members)} (pass --labels to group seeds)"
            ),
            stacklevel=2,
        )
    return labels


def path_tails(paths: Sequence[str]) -> list[str]:
    """The shortest trailing parts of each path that tell them apart ("a.pt", "run1/final.pt"); #n where none does."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(q) for q in parts) + 1):
        tails = ["/".join(q[-depth:]) for q in parts]
        if len(set(tails)) == len(tails):
            return tails
    return [f"{Path(p).name} #{i}" for i, p in enumerate(paths, 1)]


def method_label(config: dict) -> str:
    """The optimizer and its numeric options from a training config: "smoothout a=0.08"."""
    noise = "".join(f" {k}={v:g}" for k, v in config.get("optimizer_kwargs", {}).items() if isinstance(v, (int, float)))
    return f"{config['optimizer']}{noise}"


def check_compatible(checkpoints: Sequence, allow_mixed: bool) -> None:
    """Refuse checkpoints of different architectures or data sets unless allowed."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        for what, a, b in (("model", first.model_spec, other.model_spec), ("data", first.data_spec, other.data_spec)):
            if a != b and not allow_mixed:
                raise ValueError(
                    f"{first.path} and {other.path} differ in {what} ({_short(a)} vs {_short(b)}); "
                    "pass --allow-mixed to compare them anyway"
                )


def compared_checkpoint(path: str, label: str, meta: dict, spec: CompareSpec) -> ComparedCheckpoint:
    """Accuracy, losses and the chosen metrics of one checkpoint, as quantities with uncertainties: its measures by
    the one measuring function (analysis.measures.measurement.measure), its test split and surfaces beside them."""
    measure = spec.measure
    parallel = ranks.active()  # under torchrun: every measurement data-parallel, surfaces included
    objective = build_objective(path, measure.objective, distributed=parallel, metrics=measure.metrics)
    test = build_objective(path, measure.objective.whole("test"), distributed=parallel)
    asked = measure.metrics.metrics
    measured = measure_objective(
        objective,
        replace(measure.metrics, metrics=tuple(n for n in asked if n not in SURFACES)),
        path,
        setup=objective.describe(),
    )
    held_out = test.evaluate()
    # train loss and gradient norm beside every sharpness number: a minimum's sharpness means little without them
    found = [Quantity("train loss", measured.loss), Quantity("gradient norm", measured.grad_norm)]
    if held_out.accuracy is not None:
        p = held_out.accuracy
        found.append(Quantity("test accuracy", p, math.sqrt(p * (1 - p) / held_out.n_samples)))
    found.append(Quantity("test loss", held_out.loss))
    quantities = {q.label: q for q in found}
    surfaces: dict[str, str] = {}
    for name in asked:
        if name in SURFACES:
            dim = 1 if name == "surface" else 2
            grid = spec.surface_range if dim == 1 else spec.surface2d_range
            seed = measure.metrics.seed
            surface = compute_surface(
                {"train": objective, "test": test},
                random_directions(objective, dim, seed=seed),
                [parse_range(grid)] * dim,
                path=_surface_file(spec.out, objective, seed, grid, dim),
                resume=True,
                progress=measure.metrics.progress,
            )
            surfaces[name] = str(surface.path)
            continue
        quantities.update(metric_quantities(name, measured.metrics[name]))
    return ComparedCheckpoint(
        label=label,
        path=path,
        seed=meta.get("train", {}).get("seed"),
        config=meta.get("train"),
        setup=objective.describe(),
        test_setup=test.describe(),
        quantities=quantities,
        results=measured.metrics,
        surfaces=surfaces,
    )


def _surface_file(out: Path, objective, seed: int, grid: str, dim: int) -> Path:
    """A file name unique to the checkpoint and every setting the surface depends on, so reruns resume it."""
    settings = [objective.describe(), seed, grid]
    key = hashlib.sha256(json.dumps(to_jsonable(settings), sort_keys=True).encode()).hexdigest()[:16]
    return out / "surfaces" / f"{Path(objective.metadata['checkpoint']).parent.name}-{key}-{dim}d.h5"


def compare(paths: Sequence[str], spec: CompareSpec) -> Comparison:
    """Measure every checkpoint alike, group seeds, and compute differences against the first group."""
    choices = compare_metrics()
    unknown = [m for m in spec.measure.metrics.metrics if m not in choices]
    if unknown:
        raise ValueError(f"unknown metric {', '.join(unknown)}; choose from {', '.join(choices)}")
    checkpoints = [load_checkpoint(p, trust=spec.measure.objective.trust_checkpoint) for p in paths]
    check_compatible(checkpoints, spec.allow_mixed)
    labels = list(spec.labels) if spec.labels else default_labels(paths, [c.meta for c in checkpoints])
    if len(labels) != len(paths):
        raise ValueError(f"--labels has {len(labels)} names for {len(paths)} checkpoints")
    chosen, target = list(paths), None
    if spec.at_train_loss:
        points, target = at_train_loss(list(paths), parse_target(spec.at_train_loss))
        chosen = [p.path for p in points]
    spec.out.mkdir(parents=True, exist_ok=True)
    members = []
    for i, (p, label, c) in enumerate(zip(chosen, labels, checkpoints), 1):
        with working_on(f"checkpoint {i}/{len(chosen)} {p}"):  # which checkpoint each progress line is about
            members.append(compared_checkpoint(p, label, c.meta, spec))
    if target is not None:
        members = [
            replace(m, at_train_loss={"target": target, "run": str(given), "epoch": p.epoch, "recorded_train_loss": p.train_loss})
            for m, given, p in zip(members, paths, points)
        ]
    groups: dict[str, list[ComparedCheckpoint]] = {}
    for m in members:
        groups.setdefault(m.label, []).append(m)
    names = tuple(dict.fromkeys(n for m in members for n in m.quantities))
    against = baselines({g: ms[0].config for g, ms in groups.items()}, spec.baseline)
    return Comparison(
        checkpoints=tuple(members),
        groups={g: {n: aggregate(ms, n) for n in names} for g, ms in groups.items()},
        baseline=next(iter(groups)) if spec.baseline is None else spec.baseline,
        baselines=against,
        differences={g: {n: difference(groups[b], groups[g], n) for n in names} for g, b in against.items()},
        quantities=names,
        at_train_loss=target,
        settings=spec.settings(),
    )


def baselines(configs: dict[str, dict | None], chosen: str | None = None) -> dict[str, str]:
    """For each group but its baseline, the group it is compared with.

    `chosen`: that group for all. Otherwise a method other than the first group's optimizer is compared
    with the first group's optimizer at its own batch size (a flat-minimum method against plain SGD with
    the same batch), and a run of the first group's optimizer with the first group (large vs small batch).
    Groups without a training config are compared with the first group.
    """
    labels = list(configs)
    if chosen is not None:
        if chosen not in configs:
            raise ValueError(f"--baseline {chosen!r} is not one of the labels: {', '.join(labels)}")
        return {g: chosen for g in labels if g != chosen}
    first = labels[0]
    reference = configs[first] or {}
    out = {}
    for g in labels[1:]:
        config = configs[g] or {}
        same_batch = [
            h
            for h in labels
            if (configs[h] or {}).get("optimizer") == reference.get("optimizer")
            and (configs[h] or {}).get("batch_size") == config.get("batch_size")
        ]
        differs = config.get("optimizer") != reference.get("optimizer")
        out[g] = same_batch[0] if differs and same_batch and reference else first
    return out


def format_value(agg: Aggregate | None) -> str:
    if agg is None:
        return ""
    n = f" (n={agg.n})" if agg.n > 1 else ""
    return f"{agg.mean:.4g} ± {agg.spread:.2g}{n}"


def format_difference(d: Difference | None) -> str:
    if d is None:
        return ""
    text = f"{d.diff:+.3g} [{d.diff - d.halfwidth:+.3g}, {d.diff + d.halfwidth:+.3g}]"
    if d.relative is not None:
        text += f" ({d.relative:+.0%} ± {d.relative_halfwidth:.0%})"
    return text


def comparison_tables(result: Comparison) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(headers, rows) of the value table and of the difference table."""
    names = result.quantities
    value_rows = [[g, *[format_value(agg[n]) for n in names]] for g, agg in result.groups.items()]
    shown = [(g, n, diffs[n]) for g, diffs in result.differences.items() for n in names if diffs[n] is not None]
    adjusted = holm([d.p_value for _, _, d in shown])  # the whole table is one family of tests
    diff_rows = []
    for (g, n, d), p_holm in zip(shown, adjusted):
        basis = d.basis + ("" if d.unpaired_halfwidth is None else f"; unpaired it would be ±{d.unpaired_halfwidth:.2g}")
        diff_rows.append([g, result.baselines[g], n, format_difference(d), verdict(d), f"{d.p_value:.2g} / {p_holm:.2g}", basis])
    return (
        ["method", *names],
        value_rows,
        [
            "method",
            "vs",
            "quantity",
            "difference [95% CI] (relative)",
            "clears seed spread?",
            f"p / Holm-adjusted p ({len(shown)} tests)",
            "interval from",
        ],
        diff_rows,
    )


def run(args: argparse.Namespace) -> None:
    spec = CompareSpec.from_args(args)
    result = compare(args.checkpoints, spec)
    if not ranks.is_main():
        return
    out = spec.out
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    report = build_report(result, out)
    md, page = report.write(out)
    if args.json:
        print_json(result.to_dict())
        return
    h1, r1, h2, r2 = comparison_tables(result)
    print(format_table(h1, r1))
    print()
    print(format_table(h2, r2))
    print(f"\nreport: {md} and {page} (figures in {out}/)")


def make_figures(result: Comparison, out: Path) -> list[tuple[str, str]]:
    """The comparison figures in `out`, as (file name, caption); one colour per method throughout."""
    from analysis.report.charts import (
        plot_lines,
        plot_sharpness_curves,
        plot_spectral_densities,
        plot_surfaces,
        save,
    )
    from landscape.surfaces.surface import read_surface

    members = result.checkpoints
    seeds = result.members()
    firsts = {label: cs[0] for label, cs in seeds.items()}  # surfaces: the first seed of each label, so the figures stay readable
    several = len(firsts) < len(members)
    which = " (first seed of each method)" if several else ""
    m = members[0].setup["measurement"]
    where = f"{m['split']} split, {m['n_samples']} samples of {members[0].setup['data']['spec']}"
    figures = []
    bands = " Several seeds: their mean, band: 95% CI of the mean over seeds." if several else ""
    if all("surface" in c.surfaces for c in members):
        fig = plot_lines({label: [read_surface(c.surfaces["surface"]) for c in cs] for label, cs in seeds.items()}, log=True)
        figures.append(
            (
                save(fig, out / "surface-1d.png").name,
                f"Loss along one filter-normalized random direction (seed {result.settings['seed']}, the same "
                f"Gaussian draw for every checkpoint); train solid, test dashed; cross-entropy, log scale.{bands}",
            )
        )
    if all("surface2d" in c.surfaces for c in members):
        fig = plot_surfaces(
            {label: read_surface(c.surfaces["surface2d"]) for label, c in firsts.items()}, kind="contour", log=True
        )
        figures.append(
            (
                save(fig, out / "surface-2d.png").name,
                f"Train loss on a filter-normalized random plane ({where}){which}; one shared colour scale and level set.",
            )
        )
    if all("sharpness-curve" in c.results for c in members):
        curves = {label: [c.results["sharpness-curve"] for c in cs] for label, cs in seeds.items()}
        figures.append(
            (
                save(plot_sharpness_curves(curves), out / "sharpness.png").name,
                f"Expected loss increase under uniform weight noise of radius a ({where}); bands: 95% CI "
                "(one seed: over its noise draws; several: Student-t over seeds); dotted: the second-order prediction "
                "½·tr(ΣH), Σ the covariance of the noise, averaged over the same seeds.",
            )
        )
    if all("density" in c.results for c in members):
        tops = {label: [c.results["eig"].values for c in cs if "eig" in c.results] for label, cs in seeds.items()}
        fig = plot_spectral_densities({label: [c.results["density"] for c in cs] for label, cs in seeds.items()}, tops)
        figures.append(
            (
                save(fig, out / "spectra.png").name,
                f"Hessian spectral density by stochastic Lanczos quadrature ({where}), every seed as its own line; "
                "dotted: Lanczos top eigenvalues of each seed.",
            )
        )
    return figures


def build_report(result: Comparison, out: Path) -> Report:
    """The Markdown/HTML report: setup, value table, difference table, figures, and how to read them."""
    first = result.checkpoints[0]
    setup, m = first.setup, first.setup["measurement"]
    report = Report("Flatness comparison")
    report.paragraph(
        f"Measured on {m['n_samples']} samples of the {m['split']} split of {setup['data']['spec']} "
        f"({batching(setup)}), {norm_mode(setup)}, {precision(setup)}, "
        f"parameters: {setup['params']} ({setup['n_params']}). Test quantities use the whole test split "
        f"({first.test_setup['n_samples']} samples). Probes, noise draws and surface directions share seed "
        f"{result.settings['seed']} across checkpoints (common random numbers)."
    )
    if sample_origin(setup):
        report.paragraph(f"The {m['split']} split: {sample_origin(setup)}.")
    if result.at_train_loss is not None:
        report.paragraph(
            f"At matched train loss: each run is measured at its trajectory checkpoint whose recorded train loss "
            f"is closest to {result.at_train_loss:.4g} (the epoch column), not at the end of training."
        )
        report.table(
            ["label", "checkpoint", "training seed", "epoch", "recorded train loss"],
            [
                [c.label, c.path, str(c.seed), str(c.at_train_loss["epoch"]), f"{c.at_train_loss['recorded_train_loss']:.4g}"]
                for c in result.checkpoints
            ],
        )
    else:
        report.table(["label", "checkpoint", "training seed"], [[c.label, c.path, str(c.seed)] for c in result.checkpoints])
    h1, r1, h2, r2 = comparison_tables(result)
    report.heading("Values")
    report.table(
        h1,
        r1,
        "One seed: estimate ± its standard error (λ: Lanczos residual bound; accuracy: binomial; "
        "ε-sharpness, worst case: best of the starts ± best − worst, a lower bound on the maximum; m-sharpness: "
        "a mean of such lower bounds). "
        "Several seeds: mean ± standard deviation over seeds (n). ΔL a=r: E[L(w+u)] − L(w), u ~ U[−r, r] "
        "per weight (train split, cross-entropy nats).",
    )
    report.heading("Differences")
    report.table(
        h2,
        r2,
        "95% intervals. A method difference is called only when its interval, built from the spread "
        "over training seeds, excludes zero; with one seed per method the interval reflects estimator "
        "noise only and says whether these two checkpoints differ, not whether the methods do; there "
        "the interval from shared noise draws is printed beside the one independent draws would give. "
        "Each method is compared with the baseline in the 'vs' column (by default plain SGD at its own batch size). "
        "p: two-sided, from the same t (or normal) statistic as the interval. "
        + holm_family(len(r2), "every row of this table: each quantity of each comparison")
        + ". With many rows, read a difference as established only where the adjusted p is small.",
    )
    figures = make_figures(result, out)
    if figures:
        report.heading("Figures")
        for name, caption in figures:
            report.figure(name, caption)
    if all("surface2d" in c.surfaces for c in result.checkpoints):
        from analysis.report.surface_views import add_interactive_view
        from landscape.surfaces.surface import read_surface

        surfaces = {label: read_surface(cs[0].surfaces["surface2d"]) for label, cs in result.members().items()}
        caption = "The same planes in 3-D, one colour scale and height range: drag to turn, scroll to zoom."
        add_interactive_view(report, surfaces, out, "surface-2d.html", caption, log=True)
    return report


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True) if value is not None else "none"
    return text if len(text) <= 60 else text[:57] + "..."
