"""The comparisons `landscape figures` and `figures --paper` share.

Checkpoints measured through `landscape compare` (cached while files and settings are unchanged), value tables
(mean ± std over seeds), families of paired tests with Holm's correction (Holm 1979), and Keskar et al. (2017)'s
interpolation between small- and large-batch minima.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from analysis.command_line import command_arguments
from analysis.compare import add_arguments as add_compare_arguments
from analysis.compare import compare, format_difference, format_value
from analysis.differences import aggregate, difference, holm
from analysis.plots import plot_lines, save
from analysis.recipes import LARGE, METHODS, SMALL, label
from analysis.report import write_text
from analysis.train_command import NOISE_OPTION
from landscape.checkpoints import load_checkpoint
from landscape.data import MeasurementSet
from landscape.directions import between
from landscape.from_checkpoint import objective_from_checkpoint
from landscape.results import to_jsonable
from landscape.surface import compute_surface, grid_axis

VALUE_QUANTITIES = ("train loss", "gradient norm", "test accuracy", "test loss", "λ1", "trace", "ΔL a=0.02", "ε-sharpness")
TESTED = ("test accuracy", "λ1", "trace", "ΔL a=0.02", "ε-sharpness")  # the quantities each comparison table tests
MEASURED = "eig,trace,sharpness-curve,eps-sharpness"
ALPHA = 0.05  # family-wise error rate of each table (Holm)


def measure_all(paths: list[str], labels: list[str], budget: dict, out: Path, progress: bool | str, *,
                metrics: str = MEASURED + ",surface", at_train_loss: str | None = None) -> dict:
    """Every checkpoint through `landscape compare` (shared probes, noise and directions), cached in `out`.

    The cache holds while the checkpoints' files and the settings are unchanged.
    """
    argv = ["compare", *paths, "--labels", ",".join(labels), "--out", str(out), "--batch-size", "1000",
            "--metrics", metrics, "--k", budget["k"], "--probes", budget["probes"], "--noise-samples",
            budget["noise_samples"], "--restarts", budget["restarts"], "--radius", "0.005,0.01,0.02",
            f"--surface-range=-1:1:{budget['line']}"]
    if budget["n_samples"]:
        argv += ["--n-samples", str(budget["n_samples"])]
    if at_train_loss:
        argv += ["--at-train-loss", at_train_loss]
    key = hashlib.sha256(json.dumps([argv, [Path(p).stat().st_mtime_ns for p in paths]]).encode()).hexdigest()
    cached = out / "figures-cache.json"
    if cached.exists():
        stored = json.loads(cached.read_text())
        if stored.get("key") == key:
            return stored["result"]
    args = command_arguments("compare", add_compare_arguments, argv[1:])
    args.progress = progress
    result = to_jsonable(compare(paths, args))
    write_text(cached, json.dumps({"key": key, "result": result}) + "\n")
    return result


def by_label(result: dict) -> dict[str, list[dict]]:
    """The measured checkpoints of each label (its seeds), in order."""
    groups: dict[str, list[dict]] = {}
    for c in result["checkpoints"]:
        groups.setdefault(c["label"], []).append(c)
    return groups


def interpolation_figure(pairs: list[tuple[str, str]], budget: dict, cache: Path, out: Path,
                         progress: bool | str = False, *, batches: tuple[int, int] = (SMALL, LARGE),
                         name: str = "interpolation.png") -> dict:
    """(a) Keskar's parametric plot θ(α) = θ_SB + α(θ_LB − θ_SB) for each seed's pair (SGD at `batches`): mean and 95%
    band over seeds, drawn to out/`name`."""
    surfaces = []
    for small, large in pairs:
        measurement = MeasurementSet("train", budget["n_samples"], 1000)
        train = objective_from_checkpoint(load_checkpoint(small), measurement=measurement)
        test = objective_from_checkpoint(load_checkpoint(small), measurement=MeasurementSet("test", None, 1000))
        cached = f"interpolation-{Path(small).parent.name}-{Path(large).parent.name}-{budget['n_samples'] or 'all'}.h5"
        surfaces.append(compute_surface({"train": train, "test": test},
                                        between(train, load_checkpoint(large).build_model(), f"SGD B={batches[1]}"),
                                        [grid_axis(-1.0, 2.0, budget["interpolation"])],
                                        path=cache / "surfaces" / cached, resume=True, progress=progress))
    line = f"SGD B={batches[0]} (α=0) → SGD B={batches[1]} (α=1)" + (f", {len(pairs)} seed pairs" if len(pairs) > 1 else "")
    fig = plot_lines({line: surfaces}, log=True, accuracy=True,
                     title="Keskar et al. (2017) interpolation between small- and large-batch minima")
    save(fig, out / name)
    alphas = list(surfaces[0].axes[0])
    return {split: {"loss_at_0": [float(s.loss[split][alphas.index(0.0)]) for s in surfaces],
                    "loss_at_1": [float(s.loss[split][alphas.index(1.0)]) for s in surfaces]} for split in surfaces[0].loss}


def value_table(result: dict, noise: dict[str, float], batches: tuple[int, ...] = (SMALL, LARGE),
                methods: tuple[str, ...] = METHODS) -> tuple[list[str], list[list[str]]]:
    """Every method at every batch size: mean ± std over seeds of each quantity."""
    groups = by_label(result)
    rows = []
    for batch in batches:
        for method in methods:
            members = groups.get(label(method, batch))
            if members:
                size = f"{NOISE_OPTION[method]}={noise[method]:g}" if method in noise else ""
                rows.append([method, size, str(batch), *[format_value(aggregate(members, q)) for q in VALUE_QUANTITIES]])
    return ["method", "noise", "batch", *VALUE_QUANTITIES], rows


def comparison_family(result: dict, pairs: list[tuple[str, str]], quantities=TESTED) -> list[dict]:
    """One table's tests: other − baseline for each pair and quantity, paired over seeds, Holm-adjusted together."""
    groups = by_label(result)
    tests = []
    for other, base in pairs:
        for q in quantities:
            d = difference(groups[base], groups[other], q)
            if d is not None:
                tests.append({"comparison": f"{other} vs {base}", "quantity": q, **d})
    for t, p in zip(tests, holm([t["p_value"] for t in tests])):
        t["holm_p"] = p
        t["established"] = p < ALPHA
    return tests


def family_rows(tests: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["comparison", "quantity", "difference [95% CI] (relative)", "interval from", "p", "Holm p",
               f"established? (Holm p < {ALPHA:g})"]
    rows = [[t["comparison"], t["quantity"], format_difference(t), t["basis"], f"{t['p_value']:.2g}", f"{t['holm_p']:.2g}",
             ("yes: " + ("higher" if t["diff"] > 0 else "lower")) if t["established"] else "no"] for t in tests]
    return headers, rows
