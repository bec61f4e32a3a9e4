"""`landscape figures`: regenerate every figure in figures/ from scratch (training and measurements cached between runs).

Small-scale versions of the seed papers' figures, on the converged recipe of analysis/experiments/recipes.py:
(0) each method's noise size from a validation sweep; (a) Keskar et al. (2017)'s interpolation between
small- and large-batch minima; (b) Li et al. (2018)'s filter-normalized 1-D curves for SGD, SmoothOut
and AdaSmoothOut (Wen et al. 2018); (c) 2-D contours on one colour scale; (d) expected-loss increase
against the noise radius; (e) Hessian spectral densities; (f) the method tables over seeds, at the end
of training and at matched train loss, with paired differences and Holm's correction per table; (g) Jiang
et al. (2019)'s rank correlation between sharpness and the generalization gap over a learning-rate ×
batch-size sweep; (h) Garipov et al. (2018)'s mode connectivity between training seeds of SGD and of SmoothOut;
(i) SGD and SmoothOut on the plane of their top two Hessian eigenvectors (certified Lanczos).
`--paper DIR` instead regenerates SmoothOut's CIFAR comparison under the paper recipes (analysis/experiments/paper.py).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
from pathlib import Path

from analysis.cli.output import print_json
from analysis.cli.specs import CorrelateSpec
from analysis.cli.surface import quadratic_extent
from analysis.cli.train import NOISE_OPTION
from analysis.experiments.method_comparison import (
    ALPHA,
    MEASURED,
    TESTED,
    budget_metrics,
    by_label,
    compare_cached,
    comparison_family,
    family_rows,
    interpolation_figure,
    value_table,
)
from analysis.experiments.noise_sweep import GRID, chosen, noise_sweep, sweep_table
from analysis.experiments.noise_sweep import to_jsonable as sweep_json
from analysis.experiments.recipes import (
    CONVERGED,
    LARGE,
    LR_SWEEP,
    METHODS,
    SMALL,
    SWEEP_LRS,
    config,
    label,
    train_all,
    train_runs,
)
from analysis.report.charts import (
    plot_connectivity,
    plot_correlation,
    plot_lines,
    plot_sharpness_panels,
    plot_spectral_densities,
    plot_surfaces,
    save,
)
from analysis.report.comparison import Comparison
from analysis.report.document import Report, write_text
from analysis.report.tables import format_table
from landscape.curvature.density import slq_density
from landscape.engine import distributed as ranks
from landscape.engine.from_checkpoint import objective_from_checkpoint
from landscape.engine.operators import HessianOperator
from landscape.inputs.checkpoints import load_checkpoint
from landscape.inputs.data import MeasurementSet
from landscape.results import to_jsonable
from landscape.surfaces.connectivity import CurveTraining, barrier_interval, connect
from landscape.surfaces.directions import eigenvector_directions, random_directions
from landscape.surfaces.surface import compute_surface, grid_axis, read_surface

FULL = {
    "lrs": SWEEP_LRS,
    "sweep_seeds": 3,
    "seeds": 3,
    "epoch_fraction": 1.0,
    "grid": GRID,
    "n_samples": None,
    "k": 1,
    "probes": 60,
    "noise_samples": 40,
    "restarts": 3,
    "line": 41,
    "plane": 21,
    "density_steps": 80,
    "interpolation": 31,
    "extend": 2,
    "curve_epochs": 20,
    "curve_points": 21,
}
QUICK = {
    "lrs": SWEEP_LRS[1:],
    "sweep_seeds": 1,
    "seeds": 2,
    "epoch_fraction": 0.04,
    "grid": {m: v[1:3] for m, v in GRID.items()},
    "n_samples": 500,
    "k": 1,
    "probes": 10,
    "noise_samples": 8,
    "restarts": 2,
    "line": 9,
    "plane": 5,
    "density_steps": 20,
    "interpolation": 7,
    "extend": 0,
    "curve_epochs": 2,
    "curve_points": 5,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the figures (default figures/; with --quick runs/figures-quick/figures, so a "
        "quick run never overwrites the README's figures unless --out figures is given)",
    )
    parser.add_argument(
        "--cache",
        default=None,
        help="folder for cached training runs, measurements and surfaces (default runs/figures, with --quick runs/figures-quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a smaller version (two seeds, 4%% of the training), for tests")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time, each in its own process (default 1)")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="training seeds per method (default 3, with --quick 2); more seeds, more power per comparison",
    )
    parser.add_argument(
        "--epoch-fraction",
        type=fraction,
        default=None,
        metavar="F",
        help="train F of each recipe's epochs (default 1; --quick: 0.04, with --paper 0.005, i.e. one epoch)",
    )
    paper = parser.add_argument_group(
        "SmoothOut's CIFAR comparison (--paper DIR)",
        "--paper DIR trains SGD and SmoothOut under the paper recipes (landscape train --help lists them) for each data "
        "set in DIR: ResNet-44 on CIFAR-10 (DIR/cifar-10-batches-py) and C3 on CIFAR-100 (DIR/cifar-100-python), batch "
        "128 and 4096, --seeds seeds each; measures them alike on a subset of the training set and writes paper.md with "
        "the tables and figures to --out (default runs/paper/figures, with --quick runs/paper-quick/figures). An epoch "
        "fraction (--quick, --epoch-fraction) is not the paper's result; the report says how much was trained.",
    )
    paper.add_argument(
        "--paper",
        metavar="DIR",
        default=None,
        help="folder holding cifar-10-batches-py and/or cifar-100-python (or one archive's files)",
    )
    paper.add_argument("--model", default=None, help="with --paper: train this model instead of each recipe's (e.g. for tests)")
    paper.add_argument(
        "--model-opt", action="append", metavar="KEY=VALUE", help="with --paper: model option, e.g. channels=(8,8)"
    )
    paper.add_argument(
        "--noise",
        type=float,
        default=None,
        help="with --paper: SmoothOut's noise size a (default: SmoothOut's 0.02; the paper's value on CIFAR is unconfirmed)",
    )


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def output_folders(out: str | None, cache: str | None, quick: bool, paper: bool = False) -> tuple[Path, Path]:
    """(figures folder, cache folder): figures/ and runs/figures, or a scratch pair for --quick unless given; with
    --paper runs/paper (runs/paper-quick) and its figures/ subfolder, so the README's figures are never touched."""
    name = "paper" if paper else "figures"
    cache_path = Path(cache or (f"runs/{name}-quick" if quick else f"runs/{name}"))
    return Path(out or (cache_path / "figures" if quick or paper else "figures")), cache_path


def seeds_given(args: argparse.Namespace) -> int | None:
    """--seeds, at least 2 (the comparisons pair over seeds); None where not given."""
    seeds = getattr(args, "seeds", None)
    if seeds is not None and seeds < 2:
        raise ValueError(f"--seeds must be at least 2 (paired comparisons over seeds), got {seeds}")
    return seeds


CORRELATED = "eig,trace,sharpness-curve,eps-sharpness,adaptive-worst-case"


def correlation_sweep(
    smoothout_noise: float, budget: dict, cache: Path, out: Path, jobs: int, progress: bool | str = False
) -> dict:
    """(g) Jiang et al. (2019)'s question on a small sweep: SGD and SmoothOut × batch 32, 256 × three learning rates ×
    seeds, every measure ranked against the generalization gap (`landscape correlate`); correlation.png/.md in `out`."""
    from analysis.cli.correlate import build_report, correlate_runs

    runs = [
        config(m, b, s, budget["epoch_fraction"], recipe=LR_SWEEP, lr=lr, noise=smoothout_noise if m == "smoothout" else None)
        for m in ("sgd", "smoothout")
        for b in LR_SWEEP.epochs
        for lr in budget["lrs"]
        for s in range(budget["sweep_seeds"])
    ]
    paths = [str(p) for p in train_all(runs, cache / "sweep-runs", jobs=jobs, progress=progress)]
    measure = budget_metrics({**budget, "k": 1}, CORRELATED, (0.02,), progress)
    key = hashlib.sha256(
        json.dumps([measure.settings(), paths, [Path(p).stat().st_mtime_ns for p in paths]]).encode()
    ).hexdigest()[:16]
    result = correlate_runs(paths, CorrelateSpec(measure, out=cache / f"correlate-{key}"))
    save(
        plot_correlation(result, title=f"{len(paths)} runs on mnist1d: does sharpness rank them by their gap?"),
        out / "correlation.png",
    )
    report = build_report(result, "correlation.png")
    report.paragraph(
        f"Recipe `{LR_SWEEP.name}`: {LR_SWEEP.note}. SmoothOut at its validation-tuned a = {smoothout_noise:g}. "
        f"Every run measured at the end of training."
    )
    write_text(out / "correlation.md", report.markdown())
    return result


def random_direction_figures(result: Comparison, noise: dict[str, float], out: Path) -> None:
    """(b) 1-D filter-normalized curves of SGD, SmoothOut and AdaSmoothOut, every seed, one figure per batch size."""
    groups = by_label(result)
    for batch, name in ((SMALL, "small"), (LARGE, "large")):
        methods = ("sgd", "smoothout", "adasmoothout")
        fig = plot_lines(
            {_named(m, batch, noise): [read_surface(c.surfaces["surface"]) for c in groups[label(m, batch)]] for m in methods},
            log=True,
            title=f"Filter-normalized random direction (Li et al. 2018), batch {batch}",
        )
        save(fig, out / f"random-1d-{name}-batch.png")


def contour_figure(result: Comparison, budget: dict, cache: Path, out: Path, progress: bool | str = False) -> None:
    """(c) 2-D filter-normalized planes side by side on one colour scale (training seed 0: a plane does not average)."""
    groups = by_label(result)
    wanted = [label("sgd", SMALL), label("sgd", LARGE), label("smoothout", LARGE), label("adasmoothout", LARGE)]
    surfaces = {}
    for name in wanted:
        c = groups[name][0]
        objective = objective_from_checkpoint(
            load_checkpoint(c.path), measurement=MeasurementSet("train", budget["n_samples"], 1000)
        )
        axis = grid_axis(-1.0, 1.0, budget["plane"])
        surfaces[name] = compute_surface(
            objective,
            random_directions(objective, 2, seed=0),
            [axis, axis],
            resume=True,
            path=cache / "surfaces" / f"plane-{Path(c.path).parent.name}-{budget['plane']}.h5",
            progress=progress,
        )
    save(
        plot_surfaces(
            surfaces,
            kind="contour",
            log=True,
            title="Train loss on a filter-normalized random plane (training seed 0 of each method)",
        ),
        out / "contours.png",
    )


def connectivity_figure(
    result: Comparison, noise: dict[str, float], budget: dict, cache: Path, out: Path, progress: bool | str = False
) -> dict:
    """(h) Mode connectivity (Garipov et al. 2018) between two training seeds of one method, SGD and SmoothOut at
    batch 2000: the loss along the straight line and along a trained Bézier curve, BN re-estimated at each point.

    Between seeds rather than between SGD and SmoothOut: the question is whether a method's independent solutions
    lie in one connected low-loss valley, and whether the flat-minimum method's straight line crosses a lower
    barrier. Every pair of seeds of a method is one sample of its barrier (pairs share checkpoints when there are
    more than two seeds, so the interval is a rough one).
    """
    groups = by_label(result)
    training = CurveTraining(epochs=budget["curve_epochs"])
    connections = {}
    for method in ("sgd", "smoothout"):
        members = sorted((c.path for c in groups[label(method, LARGE)]), key=lambda p: Path(p).parent.name)
        runs = []
        for a, b in itertools.combinations(members, 2):
            checkpoint = load_checkpoint(a)
            measured = {"train": MeasurementSet("train", budget["n_samples"], 1000), "test": MeasurementSet("test", None, 1000)}
            objectives = {s: objective_from_checkpoint(checkpoint, measurement=m) for s, m in measured.items()}
            train = objective_from_checkpoint(checkpoint, measurement=MeasurementSet("train", None, 128), mode="train")
            name = f"{Path(a).parent.name}-{Path(b).parent.name}-e{training.epochs}-t{budget['curve_points']}"
            runs.append(
                connect(
                    objectives,
                    load_checkpoint(b).build_model(),
                    training=training,
                    train=train,
                    points=budget["curve_points"],
                    path=cache / "curves" / f"{name}-{budget['n_samples'] or 'all'}.h5",
                    resume=True,
                    progress=progress,
                    label=b,
                )
            )
        connections[_named(method, LARGE, noise)] = runs
    fig = plot_connectivity(connections, title=f"Mode connectivity between training seeds at batch {LARGE} (Garipov et al. 2018)")
    save(fig, out / "connectivity.png")
    return {
        name: {
            f"{path}/{split}": barrier_interval(runs, path=path, split=split).to_dict()
            for path in ("line", "curve")
            for split in ("train", "test")
        }
        for name, runs in connections.items()
    }


def sharpness_figures(result: Comparison, noise: dict[str, float], out: Path) -> None:
    """(d) Expected-loss increase against the radius: one panel per method beside SGD at the same batch size."""
    groups = by_label(result)
    for batch, name in ((SMALL, "small"), (LARGE, "large")):
        curves = {_named(m, batch, noise): [c.results["sharpness-curve"] for c in groups[label(m, batch)]] for m in METHODS}
        fig = plot_sharpness_panels(
            curves, _named("sgd", batch, noise), title=f"Expected loss increase under uniform weight noise, batch {batch}"
        )
        save(fig, out / f"sharpness-{name}-batch.png")


def spectra_figure(result: Comparison, budget: dict, out: Path, progress: bool | str = False) -> dict:
    """(e) Hessian spectral densities by SLQ of every seed, with each seed's Lanczos λ1 marked."""
    groups = by_label(result)
    spectra, tops = {}, {}
    for name in (label("sgd", SMALL), label("sgd", LARGE), label("smoothout", LARGE)):
        spectra[name], tops[name] = [], []
        for c in groups[name]:
            objective = objective_from_checkpoint(
                load_checkpoint(c.path), measurement=MeasurementSet("train", budget["n_samples"], 1000)
            )
            spectra[name].append(
                slq_density(HessianOperator(objective), n_runs=4, n_steps=budget["density_steps"], seed=0, progress=progress)
            )
            tops[name].append(c.results["eig"].values)
    seeds = len(next(iter(spectra.values())))
    save(
        plot_spectral_densities(
            spectra, tops, title=f"Hessian spectral density, MLP on mnist1d ({seeds} seed(s) each; dotted: each seed's λ1)"
        ),
        out / "spectra.png",
    )
    return tops


def eigenvector_plane_figure(result: Comparison, budget: dict, cache: Path, out: Path, progress: bool | str = False) -> dict:
    """(i) SGD and SmoothOut at batch 2000 (training seed 0) on the plane of each one's top two Hessian eigenvectors.

    The axes are unit eigenvectors from the certified Lanczos, so both panels share one grid in weight-space
    distance, wide enough that the quadratic model of the flatter one rises by 1 at its edge: the sharper minimum's
    contours are visibly tighter. Returns each panel's eigenvalues and whether Lanczos certified them.
    """
    groups = by_label(result)
    named = [label("sgd", LARGE), label("smoothout", LARGE)]
    objectives, directions, paths = {}, {}, {}
    for name in named:
        checkpoint = groups[name][0].path
        objectives[name] = objective_from_checkpoint(
            load_checkpoint(checkpoint), measurement=MeasurementSet("train", budget["n_samples"], 1000)
        )
        paths[name] = cache / "surfaces" / f"eigenvectors-{Path(checkpoint).parent.name}-{budget['plane']}.h5"
        if paths[name].exists():  # the file's own directions: Lanczos is not rerun (its check refuses other weights)
            directions[name] = read_surface(paths[name]).directions.to(objectives[name].device, objectives[name].dtype)
        else:
            directions[name] = eigenvector_directions(objectives[name], 2, seed=0)
    extent = max(quadratic_extent(d) for d in directions.values())
    axis = grid_axis(-extent, extent, budget["plane"])
    surfaces = {
        name: compute_surface(objectives[name], directions[name], [axis, axis], resume=True, path=paths[name], progress=progress)
        for name in named
    }
    save(
        plot_surfaces(
            surfaces,
            kind="contour",
            log=True,
            title="Train loss on the plane of the top two Hessian eigenvectors (training seed 0 of each method)",
        ),
        out / "eigenvector-plane.png",
    )
    return {name: {k: d.spec[k] for k in ("eigenvalues", "certified", "n_matvecs")} for name, d in directions.items()}


def _named(method: str, batch: int, noise: dict[str, float]) -> str:
    """A method's label with its noise size: 'smoothout a=0.02 B=2000'."""
    return label(method, batch) if method not in noise else f"{method} {NOISE_OPTION[method]}={noise[method]:g} B={batch}"


def matched_table(result: Comparison) -> tuple[list[str], list[list[str]]]:
    """Where each run was measured at matched train loss: the target, and the epochs and losses chosen."""
    rows = []
    for name, members in by_label(result).items():
        epochs = ", ".join(str(m.at_train_loss["epoch"]) for m in members)
        losses = ", ".join(f"{m.at_train_loss['recorded_train_loss']:.3g}" for m in members)
        rows.append([name, f"{members[0].at_train_loss['target']:.3g}", epochs, losses])
    return ["method", "target train loss", "epoch of each seed", "its train loss"], rows


def run(args: argparse.Namespace) -> None:
    paper = getattr(args, "paper", None) is not None
    out, cache = output_folders(args.out, args.cache, args.quick, paper)
    seeds = seeds_given(args)
    if paper:
        from analysis.experiments.paper import run_paper

        summary = run_paper(args, out, cache, seeds)
        if not ranks.is_main():
            return
        if args.json:
            print_json(summary)
        else:
            print(f"wrote {out / 'paper.md'} and its figures (training runs and measurements cached in {cache}/)")
        return
    given = [name for name in ("model", "model_opt", "noise") if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} only applies with --paper DIR")
    budget = dict(QUICK if args.quick else FULL)
    if seeds is not None:
        budget["seeds"] = seeds
    if getattr(args, "epoch_fraction", None) is not None:
        budget["epoch_fraction"] = args.epoch_fraction
    jobs = getattr(args, "jobs", 1)
    swept = noise_sweep(
        cache / "sweep",
        grid=budget["grid"],
        epoch_fraction=budget["epoch_fraction"],
        jobs=jobs,
        extend=budget["extend"],
        progress=args.progress,
    )
    noise = {m: chosen(points).value for m, points in swept.items()}
    specs = [(m, b) for b in (SMALL, LARGE) for m in METHODS]
    paths, labels = train_runs(
        specs,
        budget["seeds"],
        cache / "runs",
        recipe=CONVERGED,
        noise=noise,
        epoch_fraction=budget["epoch_fraction"],
        jobs=jobs,
        progress=args.progress,
    )
    result = compare_cached(paths, labels, budget, cache / "compare", args.progress)
    batch_of = {p: int(lab.rsplit("=", 1)[1]) for p, lab in zip(paths, labels)}
    matched = {}
    for batch in (SMALL, LARGE):
        chosen_paths = [p for p in paths if batch_of[p] == batch]
        matched[batch] = compare_cached(
            chosen_paths,
            [lab for p, lab in zip(paths, labels) if batch_of[p] == batch],
            budget,
            cache / f"compare-matched-b{batch}",
            args.progress,
            metrics=MEASURED,
            at_train_loss="matched",
        )
    sgd = [(p, lab) for p, lab in zip(paths, labels) if lab.startswith("sgd ")]
    matched["sgd"] = compare_cached(
        [p for p, _ in sgd],
        [lab for _, lab in sgd],
        budget,
        cache / "compare-matched-sgd",
        args.progress,
        metrics=MEASURED,
        at_train_loss="matched",
    )
    out.mkdir(parents=True, exist_ok=True)

    groups = by_label(result)
    pairs = list(
        zip(*(sorted((c.path for c in groups[label("sgd", b)]), key=lambda p: Path(p).parent.name) for b in (SMALL, LARGE)))
    )
    summary: dict = {
        "recipe": CONVERGED.name,
        "seeds": budget["seeds"],
        "noise_sweep": sweep_json(swept),
        "interpolation": interpolation_figure(pairs, budget, cache, out, args.progress),
    }
    random_direction_figures(result, noise, out)
    contour_figure(result, budget, cache, out, args.progress)
    summary["connectivity"] = connectivity_figure(result, noise, budget, cache, out, args.progress)
    sharpness_figures(result, noise, out)
    summary["top_eigenvalues"] = spectra_figure(result, budget, out, args.progress)
    summary["eigenvector_plane"] = eigenvector_plane_figure(result, budget, cache, out, args.progress)

    batch_question = [(label("sgd", LARGE), label("sgd", SMALL))]
    method_questions = {b: [(label(m, b), label("sgd", b)) for m in METHODS if m != "sgd"] for b in (SMALL, LARGE)}
    families = {
        "large vs small batch (SGD), end of training": comparison_family(result, batch_question, (*TESTED, "test loss")),
        "large vs small batch (SGD), matched train loss": comparison_family(
            matched["sgd"], batch_question, (*TESTED, "test loss")
        ),
    }
    for b in (LARGE, SMALL):
        families[f"each method vs SGD at batch {b}, end of training"] = comparison_family(result, method_questions[b])
        families[f"each method vs SGD at batch {b}, matched train loss"] = comparison_family(matched[b], method_questions[b])
    summary["families"] = {title: [t.to_dict() for t in tests] for title, tests in families.items()}
    summary["correlation"] = correlation_sweep(noise["smoothout"], budget, cache, out, jobs, args.progress)
    summary["groups"] = result.groups
    summary["matched_groups"] = {str(k): v.groups for k, v in matched.items()}

    report = Report("Method tables")
    report.paragraph(
        f"Recipe `{CONVERGED.name}`: {CONVERGED.note}. {budget['seeds']} training seed(s) per method; seed s starts every "
        "method from the same initial weights and batch order, so differences are paired over seeds. Measured on "
        f"{result.checkpoints[0].setup['measurement']['n_samples']} training samples of mnist1d (eval mode) and the "
        "1000 test samples. ΔL a=0.02 is SmoothOut's own training objective at a = 0.02, so it favours SmoothOut."
    )
    report.heading("Noise sizes: validation sweep")
    report.table(
        *sweep_table(swept),
        f"Each method trained at batch {LARGE}, seed 0, on 3500 training samples; accuracy on the 500 held out "
        "(never the test split). The chosen size is used at both batch sizes.",
    )
    report.heading("Values at the end of training")
    report.table(*value_table(result, noise), "mean ± std over seeds (n).")
    report.heading("Values at matched train loss")
    for batch in (SMALL, LARGE):
        report.table(*matched_table(matched[batch]))
        report.table(
            *value_table(matched[batch], noise),
            f"batch {batch}: every run measured at its trajectory checkpoint "
            "whose recorded train loss is closest to the lowest loss all of them reach; mean ± std over seeds (n).",
        )
    for title, tests in families.items():
        report.heading(title[0].upper() + title[1:])
        report.table(
            *family_rows(tests),
            f"95% intervals and two-sided p from the paired t over seeds; Holm's "
            f"correction over the {len(tests)} tests of this table (family-wise error {ALPHA:g}).",
        )
    write_text(out / "methods.md", report.markdown())
    write_text(out / "figures.json", json.dumps(to_jsonable(summary), indent=1, default=str) + "\n")
    if args.json:
        print_json({**summary, "figures": sorted(p.name for p in out.iterdir())})
        return
    print(format_table(*value_table(result, noise)))
    for title, tests in families.items():
        print(f"\n{title}\n" + format_table(*family_rows(tests)))
    print(f"wrote figures to {out}/ (training runs, measurements and surfaces cached in {cache}/)")
