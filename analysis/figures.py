"""`landscape figures`: regenerate every figure in figures/ from scratch (training cached between runs).

Small-scale versions of the seed papers' figures, on the recipes of analysis/recipes.py:
(a) Keskar et al. (2017)'s interpolation between small- and large-batch minima; (b) Li et al.
(2018)'s filter-normalized 1-D curves for SGD, SmoothOut and AdaSmoothOut (Wen et al. 2018);
(c) 2-D contours on one colour scale; (d) expected-loss increase against the noise radius;
(e) Hessian spectral densities; (f) the method table over several seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from analysis.compare import compare, format_difference, format_value
from analysis.differences import aggregate, difference, verdict
from analysis.plots import (
    plot_lines,
    plot_sharpness_curves,
    plot_spectral_densities,
    plot_surfaces,
    save,
)
from analysis.recipes import LARGE, METHODS, SMALL, label, train_runs
from analysis.report import Report
from analysis.tables import format_table
from landscape.checkpoints import load_checkpoint
from landscape.data import MeasurementSet
from landscape.directions import between, random_directions
from landscape.operators import HessianOperator
from landscape.problem import objective_from_checkpoint
from landscape.spectrum import slq_density
from landscape.surface import compute_surface, grid_axis, read_surface

TABLE_QUANTITIES = ("train loss", "gradient norm", "test accuracy", "λ1", "trace", "ΔL a=0.02", "ε-sharpness")
FULL = {"seeds": 3, "epoch_fraction": 1.0, "n_samples": None, "k": "1", "probes": "60", "noise_samples": "40",
        "restarts": "3", "line": 41, "plane": 21, "density_steps": 80}
QUICK = {"seeds": 1, "epoch_fraction": 0.1, "n_samples": 500, "k": "1", "probes": "10", "noise_samples": "8",
         "restarts": "2", "line": 9, "plane": 5, "density_steps": 20}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None,
                        help="folder for the figures (default figures/; with --quick runs/figures-quick/figures, so a "
                             "quick run never overwrites the README's figures unless --out figures is given)")
    parser.add_argument("--cache", default=None,
                        help="folder for cached training runs and surfaces (default runs/figures, with --quick runs/figures-quick)")
    parser.add_argument("--quick", action="store_true", help="a smaller version (one seed, a tenth of the training), for tests")


def output_folders(out: str | None, cache: str | None, quick: bool) -> tuple[Path, Path]:
    """(figures folder, cache folder): figures/ and runs/figures, or a scratch pair for --quick unless given."""
    cache_path = Path(cache or ("runs/figures-quick" if quick else "runs/figures"))
    return Path(out or (cache_path / "figures" if quick else "figures")), cache_path


def measure_all(paths: list[str], labels: list[str], budget: dict, cache: Path, progress: bool | str) -> dict:
    """Every checkpoint through `landscape compare` (shared probes, noise and directions)."""
    from analysis.cli import build_parser

    argv = ["compare", *paths, "--labels", ",".join(labels), "--out", str(cache / "compare"), "--batch-size", "1000",
            "--metrics", "eig,trace,sharpness-curve,eps-sharpness,surface", "--k", budget["k"], "--probes", budget["probes"],
            "--noise-samples", budget["noise_samples"], "--restarts", budget["restarts"], "--radius", "0.005,0.01,0.02",
            f"--surface-range=-1:1:{budget['line']}"]
    if budget["n_samples"]:
        argv += ["--n-samples", str(budget["n_samples"])]
    args = build_parser().parse_args(argv)
    args.progress = progress
    return compare(paths, args)


def first_seed(result: dict, wanted: list[str]) -> dict[str, dict]:
    """The first checkpoint of each wanted label."""
    found: dict[str, dict] = {}
    for c in result["checkpoints"]:
        if c["label"] in wanted:
            found.setdefault(c["label"], c)
    return {w: found[w] for w in wanted}


def interpolation_figure(small: str, large: str, budget: dict, cache: Path, out: Path, progress: bool | str = False) -> dict:
    """(a) Keskar's parametric plot: θ(α) = θ_SB + α(θ_LB − θ_SB), train and test loss and accuracy."""
    measurement = MeasurementSet("train", budget["n_samples"], 1000)
    train = objective_from_checkpoint(load_checkpoint(small), measurement=measurement)
    test = objective_from_checkpoint(load_checkpoint(small), measurement=MeasurementSet("test", None, 1000))
    surface = compute_surface({"train": train, "test": test},
                              between(train, load_checkpoint(large).build_model(), f"SGD B={LARGE}"),
                              [grid_axis(-1.0, 2.0, 31 if budget["seeds"] > 1 else 7)],
                              path=cache / "surfaces" / f"interpolation-{budget['n_samples'] or 'all'}.h5",
                              resume=True, progress=progress)
    fig = plot_lines({f"SGD B={SMALL} (α=0) → SGD B={LARGE} (α=1)": surface}, log=True, accuracy=True,
                     title="Keskar et al. (2017) interpolation between small- and large-batch minima")
    save(fig, out / "interpolation.png")
    alphas = list(surface.axes[0])
    return {split: {"loss_at_0": float(surface.loss[split][alphas.index(0.0)]),
                    "loss_at_1": float(surface.loss[split][alphas.index(1.0)])} for split in surface.loss}


def random_direction_figures(result: dict, out: Path) -> None:
    """(b) 1-D filter-normalized curves of SGD, SmoothOut and AdaSmoothOut, one figure per batch size."""
    for batch, name in ((SMALL, "small"), (LARGE, "large")):
        chosen = first_seed(result, [label(m, batch) for m in ("sgd", "smoothout", "adasmoothout")])
        fig = plot_lines({k: read_surface(c["raw"]["surface"]) for k, c in chosen.items()}, log=True,
                         title=f"Filter-normalized random direction (Li et al. 2018), batch {batch}")
        save(fig, out / f"random-1d-{name}-batch.png")


def contour_figure(result: dict, budget: dict, cache: Path, out: Path, progress: bool | str = False) -> None:
    """(c) 2-D filter-normalized planes side by side on one colour scale."""
    chosen = first_seed(result, [label("sgd", SMALL), label("sgd", LARGE), label("smoothout", LARGE), label("adasmoothout", LARGE)])
    surfaces = {}
    for name, c in chosen.items():
        objective = objective_from_checkpoint(load_checkpoint(c["path"]), measurement=MeasurementSet("train", budget["n_samples"], 1000))
        axis = grid_axis(-1.0, 1.0, budget["plane"])
        surfaces[name] = compute_surface(objective, random_directions(objective, 2, seed=0), [axis, axis], resume=True,
                                         path=cache / "surfaces" / f"plane-{Path(c['path']).parent.name}-{budget['plane']}.h5",
                                         progress=progress)
    save(plot_surfaces(surfaces, kind="contour", log=True, title="Train loss on a filter-normalized random plane"),
         out / "contours.png")


def sharpness_figures(result: dict, out: Path) -> None:
    """(d) Expected-loss increase against the radius, every method, one figure per batch size."""
    for batch, name in ((SMALL, "small"), (LARGE, "large")):
        curves: dict[str, list[dict]] = {}
        for c in result["checkpoints"]:
            if c["label"].endswith(f"B={batch}"):
                curves.setdefault(c["label"], []).append(c["raw"]["sharpness-curve"])
        save(plot_sharpness_curves(curves), out / f"sharpness-{name}-batch.png")


def spectra_figure(result: dict, budget: dict, out: Path, progress: bool | str = False) -> dict:
    """(e) Hessian spectral densities by SLQ with the Lanczos λ1 marked."""
    chosen = first_seed(result, [label("sgd", SMALL), label("sgd", LARGE), label("smoothout", LARGE)])
    spectra, tops = {}, {}
    for name, c in chosen.items():
        objective = objective_from_checkpoint(load_checkpoint(c["path"]), measurement=MeasurementSet("train", budget["n_samples"], 1000))
        spectra[name] = slq_density(HessianOperator(objective), n_runs=4, n_steps=budget["density_steps"], seed=0,
                                    progress=progress).to_dict()
        tops[name] = c["raw"]["eig"]["values"]
    save(plot_spectral_densities(spectra, tops, title="Hessian spectral density, MLP on mnist1d (dotted: λ1)"), out / "spectra.png")
    return tops


def method_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(f) Every method at both batch sizes: mean ± std over seeds, and the ΔL difference against SGD at that batch."""
    groups: dict[str, list[dict]] = {}
    for c in result["checkpoints"]:
        groups.setdefault(c["label"], []).append(c)
    headers = ["method", "batch", *TABLE_QUANTITIES, "ΔL a=0.02 vs SGD (95% CI)", "flatter than SGD?"]
    rows = []
    for batch in (SMALL, LARGE):
        baseline = groups[label("sgd", batch)]
        for method in METHODS:
            members = groups[label(method, batch)]
            d = difference(baseline, members, "ΔL a=0.02") if method != "sgd" else None
            rows.append([method, str(batch), *[format_value(aggregate(members, q)) for q in TABLE_QUANTITIES],
                         "" if d is None else format_difference(d), "" if d is None else _flatter(d)])
    return headers, rows


def _flatter(d: dict) -> str:
    if not d["seeds"]:
        return verdict(d)
    if not d["significant"]:
        return "no clear difference"
    return "flatter" if d["diff"] < 0 else "sharper"


def run(args: argparse.Namespace) -> None:
    out, cache = output_folders(args.out, args.cache, args.quick)
    budget = QUICK if args.quick else FULL
    specs = [(m, b) for b in (SMALL, LARGE) for m in METHODS]
    paths, labels = train_runs(specs, budget["seeds"], cache / "runs", epoch_fraction=budget["epoch_fraction"], progress=args.progress)
    result = measure_all(paths, labels, budget, cache, args.progress)
    out.mkdir(parents=True, exist_ok=True)
    small, large = (first_seed(result, [label("sgd", b)])[label("sgd", b)]["path"] for b in (SMALL, LARGE))
    summary = {"interpolation": interpolation_figure(small, large, budget, cache, out, args.progress)}
    random_direction_figures(result, out)
    contour_figure(result, budget, cache, out, args.progress)
    sharpness_figures(result, out)
    summary["top_eigenvalues"] = spectra_figure(result, budget, out, args.progress)
    headers, rows = method_table(result)
    table = Report("Method table")
    table.paragraph(f"{budget['seeds']} seed(s) per method; mean ± std over seeds (± stderr for one seed); measured on "
                    f"{result['checkpoints'][0]['setup']['n_samples']} training samples of mnist1d. The last two columns: "
                    "the difference from SGD at the same batch size, 95% Welch interval over seeds.")
    table.table(headers, rows)
    (out / "methods.md").write_text(table.markdown())
    summary["groups"] = result["groups"]
    (out / "figures.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if args.json:
        from analysis.cli import print_json

        print_json({**summary, "figures": sorted(p.name for p in out.iterdir())})
        return
    print(format_table(headers, rows))
    print(f"wrote figures to {out}/ (training runs and surfaces cached in {cache}/)")
