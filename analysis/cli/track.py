"""`landscape track RUN_DIR`: every trajectory checkpoint of a training run measured alike, as a time series.

Progressive sharpening and the edge of stability (Cohen et al. 2021) show in how λ1 moves over
training. Every checkpoint is measured on one fixed measurement set with the same seed, so probes
and noise draws are shared across checkpoints (common random numbers: the series is smooth where
the model is). Lanczos starts from the previous checkpoint's top eigenvector (a warm start, with
the residual stopping rule: a warm start under the error-estimate rule can stop on λ2 where λ1 and
λ2 are close). Each finished metric is saved at once to `track.json` (the `landscape measure
--out` format), so a killed run resumes; `track.h5` holds the series and `track.png` draws them. Under torchrun each rank measures one block
of consecutive checkpoints, warm-starting within it, and rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from analysis.cli.matched_loss import TrajectoryPoint, trajectory
from analysis.cli.measure import (
    add_metric_arguments,
    add_objective_arguments,
    measure_checkpoint,
)
from analysis.cli.output import print_json
from analysis.cli.results_file import ResultsFile
from analysis.cli.specs import MeasureSpec
from analysis.measures.measurement import Measurement
from analysis.measures.registry import MEASURES, metric_quantities
from landscape.curvature.preconditioned import has_stepped
from landscape.curvature.spectrum import WarmStart
from landscape.engine import distributed as ranks
from landscape.inputs.checkpoints import load_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_objective_arguments(parser)
    add_metric_arguments(parser)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `landscape train` run folder (its trajectory/ checkpoints)")
    parser.add_argument("--out", default=None, help="folder for track.json, track.h5 and track.png (default RUN_DIR/track)")
    parser.add_argument(
        "--stability-line",
        action="store_true",
        help="draw 2(1+β)/η on the λ1 panel (η the run's learning rate, β its momentum): where full-batch "
        "GD turns unstable (Cohen et al. 2021); stochastic runs may sit below it",
    )


def run(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a folder; landscape track takes the folder that `landscape train --out` wrote")
    points = trajectory(run_dir, needed_by="landscape track")
    spec = MeasureSpec.from_args(args, tuple(MEASURES))  # an unknown or empty --metrics fails here, before any work
    if "preconditioned-sharpness" in spec.metrics.metrics and spec.metrics.optimizer_state is None:
        points = _stepped(points)
    out = Path(args.out) if args.out else run_dir / "track"
    results = ResultsFile.open(out / "track.json", {**spec.settings(), "checkpoints": [p.path for p in points]}, resume=True)
    # measure's eig starts each Lanczos from the previous checkpoint's top eigenvector
    spec = replace(spec, metrics=replace(spec.metrics, warm_start=WarmStart()))

    def one(point: TrajectoryPoint) -> Measurement:  # results.save writes on rank 0 only
        found = measure_checkpoint(point.path, spec, previous=results.previous(point.path), saved=results.save, distributed=False)
        return found.with_context(epoch=point.epoch, recorded=load_checkpoint(point.path).meta.get("metrics", {}))

    # under torchrun each rank measures one block of consecutive checkpoints (its warm starts chain within the block)
    reports = ranks.map_split(points, one, contiguous=True, done=results.save)
    results.complete = True
    results.write()
    if not ranks.is_main():
        return
    series = time_series(reports)
    write_hdf5(series, out / "track.h5")
    from analysis.report.charts import plot_track, save

    line = stability_threshold(load_checkpoint(points[-1].path).meta.get("train", {})) if args.stability_line else None
    save(
        plot_track(series, stability_line=line, title=f"{run_dir.name}: measured at every trajectory checkpoint"),
        out / "track.png",
    )
    if args.json:
        print_json({"series": series, "files": [str(out / n) for n in ("track.json", "track.h5", "track.png")]})
        return
    names = [n for n in series if n not in ("epoch",) and not n.endswith(" stderr")]
    columns = ["epoch", *names]
    widths = [max(len(n), 10) for n in columns]
    print("  ".join(f"{n:>{w}}" for n, w in zip(columns, widths)))
    for i in range(len(series["epoch"])):
        print("  ".join(f"{series[n][i]:>{w}.5g}" for n, w in zip(columns, widths)))
    hvps = [r.metrics["eig"].n_matvecs for r in reports if "eig" in r.metrics]
    if hvps:
        first = "the first" if ranks.world_size() == 1 else f"the first of each of the {ranks.world_size()} ranks' blocks"
        print(f"Lanczos HVPs per checkpoint (warm-started after {first}): {', '.join(map(str, hvps))}")
    print(f"wrote {out / 'track.json'}, {out / 'track.h5'} and {out / 'track.png'}")


def _stepped(points: list[TrajectoryPoint]) -> list[TrajectoryPoint]:
    """The checkpoints whose optimizer state has stepped (preconditioned sharpness needs its P); the others said."""
    kept = [p for p in points if has_stepped(load_checkpoint(p.path).optimizer_state)]
    left = [Path(p.path).name for p in points if p not in kept]
    if not kept:
        raise ValueError(
            "preconditioned-sharpness needs checkpoints keeping an adaptive optimizer's state (train with --base adam), "
            "or --optimizer-state FILE"
        )
    if left and ranks.is_main():
        print(f"note: leaving out {', '.join(left)}: no optimizer step before it, so no preconditioner", file=sys.stderr)
    return kept


def stability_threshold(config: dict) -> tuple[float, str] | None:
    """Where gradient descent with heavy-ball momentum β and step η turns unstable on a quadratic: λ1 = 2(1 + β)/η
    (2/η without momentum; Cohen et al. 2021). None for runs not stepped by SGD."""
    if not config or (config.get("base") or "sgd") != "sgd" or not config.get("lr"):
        return None
    eta, beta = float(config["lr"]), float(config.get("momentum") or 0.0)
    label = f"2/η = {2 / eta:g}" if beta == 0 else f"2(1+β)/η = {2 * (1 + beta) / eta:g} (β = {beta:g})"
    return 2 * (1 + beta) / eta, label


def time_series(reports: list[Measurement]) -> dict[str, list[float]]:
    """Per checkpoint, in epoch order: epoch, recorded train/test loss, measured loss, and each scalar quantity ± stderr."""
    series: dict[str, list[float]] = {"epoch": [float(r.context["epoch"]) for r in reports]}
    for key in ("train_loss", "test_loss"):
        series[f"recorded {key.replace('_', ' ')}"] = [float(r.context["recorded"].get(key, np.nan)) for r in reports]
    series["measured loss"] = [float(r.loss) for r in reports]
    for r_index, report in enumerate(reports):
        for metric, result in report.metrics.items():
            for name, q in metric_quantities(metric, result).items():
                for column, value in ((name, q.value), (f"{name} stderr", q.stderr)):
                    series.setdefault(column, [np.nan] * len(reports))[r_index] = float(value)
    return series


def write_hdf5(series: dict[str, list[float]], path: Path) -> None:
    """One float64 dataset per column (names as in track.json's quantities), written whole."""
    import h5py  # here, not at the top: the CLI's start-up should not pay for it

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["columns"] = json.dumps(list(series))
        for name, values in series.items():
            f.create_dataset(name.replace("/", "_"), data=np.asarray(values, dtype=np.float64))
