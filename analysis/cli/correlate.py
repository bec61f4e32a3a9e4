"""`landscape correlate RUNS...`: does a sharpness measure predict the generalization gap across a sweep of runs?

Jiang et al. (2019), "Fantastic generalization measures and where to find them", and Andriushchenko
et al. (2023), "A modern look at the relationship between sharpness and generalization". Every run is
measured alike (one measurement set, one seed: shared probes and noise), its generalization gap taken
on the whole train and test splits, and each measure ranked against the gap by Kendall's τ and by
Jiang's granulated τ (analysis/report/rank_correlation.py), with bootstrap intervals over runs. The measurements
are saved as they finish (measurements.json, the `landscape measure --out` format), so a killed run
resumes. Under torchrun the runs are split over the ranks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from analysis.cli.compare import method_label
from analysis.cli.matched_loss import at_train_loss, parse_target
from analysis.cli.measure import (
    add_metric_arguments,
    add_objective_arguments,
    build_objective,
    measure_checkpoint,
)
from analysis.cli.output import print_json
from analysis.cli.results_file import ResultsFile
from analysis.cli.specs import CorrelateSpec, MeasureSpec, ObjectiveSpec
from analysis.measures.measurement import Measurement
from analysis.measures.options import MetricSpec
from analysis.measures.registry import metric_quantities, ranked_names
from analysis.report.document import Report
from analysis.report.rank_correlation import Correlation, correlate, varying
from analysis.report.tables import format_table
from landscape.engine import distributed as ranks
from landscape.engine.progress import working_on
from landscape.inputs.checkpoints import load_checkpoint
from landscape.results import to_jsonable

# the measures correlate ranks unless --metrics says otherwise: the classic curvature and perturbation ones, the
# scale-invariant and bound-based ones (relative flatness estimated from the same 60 probes, so it costs what the
# trace does), and critical sharpness (about 30 forward passes)
CORRELATE_DEFAULTS = MetricSpec(
    metrics=(
        "eig",
        "trace",
        "sharpness-curve",
        "eps-sharpness",
        "critical-sharpness",
        "fisher-rao",
        "relative-flatness",
        "pac-bayes",
        "pac-bayes-mag",
    ),
    k=1,
    radius=(0.02,),
    noise_samples=40,
    probes=60,
    relative_flatness_method="estimate",
)
GAPS = {"error": "test error − train error", "loss": "test loss − train loss"}
# hyperparameters a sweep may vary, from each run's training config; `epochs` is left out by default because recipes
# tie it to the batch size (varying one alone would leave no group)
AXES = ("method", "batch_size", "lr", "momentum", "weight_decay", "epochs")
DEFAULTS = CorrelateSpec(MeasureSpec())  # the correlation's own defaults (its metrics': CORRELATE_DEFAULTS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_objective_arguments(parser)
    add_metric_arguments(parser, ranked_names(), CORRELATE_DEFAULTS)
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="`landscape train` run folders (their final.pt) or checkpoint files; at least 3"
    )
    group = parser.add_argument_group("correlation")
    group.add_argument("--measures", dest="metrics", help="the same as --metrics")
    group.add_argument(
        "--gap",
        default=",".join(DEFAULTS.gaps),
        help="generalization gaps, comma list: error (test − train error), loss (test − train loss) (default %(default)s)",
    )
    group.add_argument(
        "--axes",
        default=",".join(DEFAULTS.axes),
        help=f"hyperparameters for the granulated τ, those of {','.join(AXES)} that vary across the runs "
        "(default %(default)s); runs are grouped by the others and their training seed",
    )
    group.add_argument(
        "--at-train-loss",
        default=None,
        metavar="LOSS|matched",
        help="measure each run at its trajectory checkpoint whose recorded train loss is closest to LOSS "
        "(Jiang et al. stop every run at one train loss); 'matched': the lowest loss every run reaches",
    )
    group.add_argument(
        "--resamples", type=int, default=DEFAULTS.resamples, help="bootstrap resamples over runs (default %(default)s)"
    )
    group.add_argument(
        "--out",
        default=str(DEFAULTS.out),
        help="folder for measurements.json (resumable), correlation.json, correlation.md and correlation.png",
    )


def run_paths(runs: list[str]) -> list[str]:
    """A run folder's final.pt; a file as given."""
    paths = []
    for run in runs:
        path = Path(run)
        if path.is_dir():
            if not (path / "final.pt").exists():
                raise FileNotFoundError(f"{run}: a run folder needs final.pt (written by `landscape train` at its end)")
            path = path / "final.pt"
        elif not path.exists():
            raise FileNotFoundError(f"{run}: no such run folder or checkpoint")
        paths.append(str(path))
    if len(paths) < 3:
        raise ValueError(f"correlate needs at least 3 runs, got {len(paths)}")
    return paths


def hyperparameters(config: dict | None, axes: list[str]) -> dict:
    """The run's value of each axis, and its training seed (groups for the granulated τ share the seed)."""
    if not config:
        return {}
    values = {"method": method_label(config), **config}
    return {**{a: values.get(a) for a in axes}, "seed": config.get("seed")}


def generalization(path: str, spec: ObjectiveSpec) -> dict:
    """Loss and error on the whole train and test splits (eval mode as measured), and the gaps."""
    out = {}
    for split in ("train", "test"):
        result = build_objective(path, spec.whole(split)).evaluate()
        out[f"{split}_loss"] = result.loss
        out[f"{split}_error"] = None if result.accuracy is None else 1.0 - result.accuracy
    out["loss"] = out["test_loss"] - out["train_loss"]
    out["error"] = None if out["test_error"] is None else out["test_error"] - out["train_error"]
    return out


def measure_runs(paths: list[str], spec: CorrelateSpec) -> list[Measurement]:
    """Every run's report (metrics on the measurement set, gaps on the whole splits), saved as each finishes."""
    settings = {**spec.measure.settings(), "at_train_loss": spec.at_train_loss}  # gaps, axes, resamples: no measurement
    results = ResultsFile.open(spec.out / "measurements.json", {**settings, "checkpoints": paths}, resume=True)

    def one(path: str) -> Measurement:  # results.save writes on rank 0 only
        with working_on(f"run {paths.index(path) + 1}/{len(paths)} {path}"):  # which run each progress line is about
            found = measure_checkpoint(path, spec.measure, previous=results.previous(path), saved=results.save, distributed=False)
            if "generalization" not in found.context:
                found = found.with_context(generalization=generalization(path, spec.measure.objective))
        return found

    reports = ranks.map_split(paths, one, done=results.save)
    results.complete = True
    results.write()
    return reports


def correlations(
    reports: list[Measurement], hypers: list[dict], gaps: list[str], axes: list[str], resamples: int, seed: int
) -> list[Correlation]:
    """Each scalar quantity of the reports against each gap; `hypers[r]`: run r's hyperparameters and seed."""
    quantities = [{n: q.value for m, res in r.metrics.items() for n, q in metric_quantities(m, res).items()} for r in reports]
    names = list(dict.fromkeys(n for q in quantities for n in q))
    out = []
    for gap in gaps:
        gaps_of = [r.context["generalization"][gap] for r in reports]
        values = np.array([np.nan if g is None else g for g in gaps_of])
        if not np.isfinite(values).any():
            raise ValueError(f"--gap {gap}: the runs have no {gap} (no accuracy for this loss?); use --gap loss")
        for name in names:
            measure = np.array([q.get(name, np.nan) for q in quantities], float)
            out.append(correlate(measure, values, hypers, axes, name=name, gap_name=gap, resamples=resamples, seed=seed))
    return out


def correlate_runs(runs: list[str], spec: CorrelateSpec) -> dict:
    """Measure the runs and rank every measure against every gap: the JSON `landscape correlate --json` prints."""
    gaps, axes = list(spec.gaps), list(spec.axes)
    for what, names, choices in (("--gap", gaps, GAPS), ("--axes", axes, AXES)):
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise ValueError(f"{what} {','.join(unknown) or '(empty)'}: choose from {', '.join(choices)}")
    if spec.resamples < 100:
        raise ValueError(f"--resamples {spec.resamples}: a 95% bootstrap interval needs at least 100")
    given = run_paths(runs)
    paths, target, points = given, None, None
    if spec.at_train_loss:
        points, target = at_train_loss(given, parse_target(spec.at_train_loss))
        paths = [p.path for p in points]
    reports = measure_runs(paths, spec)
    configs = [load_checkpoint(p).meta.get("train") for p in paths]
    hypers = [hyperparameters(c, axes) for c in configs]
    found = correlations(reports, hypers, gaps, axes, spec.resamples, spec.measure.metrics.seed)
    runs = []
    for i, (report, config) in enumerate(zip(reports, configs)):
        run = {
            "run": given[i],
            "checkpoint": report.checkpoint,
            "hyperparameters": hyperparameters(config, list(AXES)),
            "generalization": report.context["generalization"],
            "measures": {n: q for m, r in report.metrics.items() for n, q in metric_quantities(m, r).items()},
        }
        if points is not None:
            run["at_train_loss"] = {"epoch": points[i].epoch, "recorded_train_loss": points[i].train_loss}
        runs.append(run)
    return {
        "runs": runs,
        "correlations": [c.to_dict() for c in found],
        "gaps": gaps,
        "axes": varying(hypers, axes),
        "at_train_loss": target,
        "setup": reports[0].setup,
        "resamples": spec.resamples,
    }


def _interval(e: dict | None) -> str:
    return "" if e is None or e["value"] != e["value"] else f"{e['value']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}]"


def correlation_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """One row per measure and gap: τ, ψ per varying hyperparameter (with its groups), Ψ; each with its 95% interval."""
    axes = result["axes"]
    headers = ["measure", "gap", "τ [95% CI]", *[f"ψ {a}" for a in axes], "Ψ [95% CI]"]
    rows = []
    for c in result["correlations"]:
        cells = [f"{_interval(c['granulated'].get(a))} ({c['groups'].get(a, 0)})" if a in c["granulated"] else "—" for a in axes]
        rows.append([c["measure"], c["gap"], _interval(c["tau"]), *cells, _interval(c["psi"])])
    return headers, rows


def build_report(result: dict, figure: str | None) -> Report:
    setup, m = result["setup"], result["setup"]["measurement"]
    report = Report("Sharpness against generalization")
    when = (
        "at the end of training"
        if result["at_train_loss"] is None
        else f"at the trajectory checkpoint whose recorded train loss is closest to {result['at_train_loss']:.4g}"
    )
    report.paragraph(
        f"{len(result['runs'])} runs, measured {when} on {m['n_samples']} samples of the {m['split']} split of "
        f"{setup['data']['spec']} (seed {m['seed']}; the same probes and noise for every run). The gaps use the whole "
        f"train and test splits: {'; '.join(f'{g}: {GAPS[g]}' for g in result['gaps'])}."
    )
    headers, rows = correlation_table(result)
    report.table(
        headers,
        rows,
        "Kendall's τ-b over all runs; ψ: Jiang et al. (2019)'s granulated τ for one hyperparameter (the τ over "
        "runs that differ only in it, averaged over the settings of the others and the training seed; groups "
        "in brackets); Ψ: the mean of the ψ. Intervals: 95% percentile bootstrap over runs "
        f"({result['resamples']} resamples). τ > 0: a larger measure goes with a larger gap.",
    )
    report.heading("Runs")
    gaps = result["gaps"]
    names = list(dict.fromkeys(n for r in result["runs"] for n in r["measures"]))
    report.table(
        [
            "run",
            *[a for a in AXES if any(r["hyperparameters"].get(a) is not None for r in result["runs"])],
            "train loss",
            *[f"{g} gap" for g in gaps],
            *names,
        ],
        [
            [
                r["run"],
                *[
                    str(r["hyperparameters"][a])
                    for a in AXES
                    if any(x["hyperparameters"].get(a) is not None for x in result["runs"])
                ],
                f"{r['generalization']['train_loss']:.3g}",
                *[f"{r['generalization'][g]:.3g}" if r["generalization"][g] is not None else "" for g in gaps],
                *[f"{r['measures'][n].value:.4g}" if n in r["measures"] else "" for n in names],
            ]
            for r in result["runs"]
        ],
    )
    if figure:
        report.heading("Figure")
        report.figure(figure, f"Each measure against the {gaps[0]} gap, one point per run; τ and Ψ with their 95% intervals.")
    return report


def write_outputs(result: dict, out: Path) -> list[Path]:
    """correlation.json, correlation.png and correlation.md/html in `out`."""
    from analysis.report.charts import plot_correlation, save

    out.mkdir(parents=True, exist_ok=True)
    (out / "correlation.json").write_text(json.dumps(to_jsonable(result), indent=1) + "\n")
    figure = save(plot_correlation(result), out / "correlation.png")
    md, page = build_report(result, figure.name).write(out, name="correlation")
    return [out / "correlation.json", figure, md, page]


def run(args: argparse.Namespace) -> None:
    spec = CorrelateSpec.from_args(args)
    result = correlate_runs(args.runs, spec)
    if not ranks.is_main():
        return
    files = write_outputs(result, spec.out)
    if args.json:
        print_json(result)
        return
    print(format_table(*correlation_table(result)))
    print(f"\nwrote {', '.join(map(str, files))}")
