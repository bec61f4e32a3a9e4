"""The comparisons `landscape figures` and `figures --paper` share.

Checkpoints measured through `landscape compare` (cached while files and settings are unchanged), value tables
(mean ± std over seeds), families of paired tests with Holm's correction (Holm 1979), and Keskar et al. (2017)'s
interpolation between small- and large-batch minima.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from analysis.cli.compare import compare, format_difference, format_value
from analysis.cli.specs import CompareSpec, MeasureSpec, ObjectiveSpec
from analysis.cli.train import NOISE_OPTION
from analysis.experiments.recipes import LARGE, METHODS, SMALL, label
from analysis.measures.options import MetricSpec
from analysis.measures.text import EPSILON_SHARPNESS, eigenvalue_label, noise_increase_label
from analysis.report.charts import plot_lines, save
from analysis.report.comparison import ComparedCheckpoint, Comparison
from analysis.report.differences import Difference, aggregate, difference, holm
from analysis.report.document import write_text
from landscape.engine.from_checkpoint import objective_from_checkpoint
from landscape.inputs.checkpoints import load_checkpoint
from landscape.inputs.data import MeasurementSet
from landscape.results import Result
from landscape.surfaces.directions import between
from landscape.surfaces.surface import compute_surface, grid_axis

NOISE = noise_increase_label(0.02)
VALUE_QUANTITIES = (
    "train loss",
    "gradient norm",
    "test accuracy",
    "test loss",
    eigenvalue_label(1),
    "trace",
    NOISE,
    EPSILON_SHARPNESS,
)
TESTED = ("test accuracy", eigenvalue_label(1), "trace", NOISE, EPSILON_SHARPNESS)  # what each comparison table tests
MEASURED = "eig,trace,sharpness-curve,eps-sharpness"
ALPHA = 0.05  # family-wise error rate of each table (Holm)


def budget_metrics(budget: dict, metrics: str, radius: tuple[float, ...], progress: bool | str = False) -> MeasureSpec:
    """The measurement a figures budget pays for: `metrics` (comma list) at `radius`, on the budget's training
    samples (None: all) in batches of 1000."""
    return MeasureSpec(
        ObjectiveSpec(n_samples=budget["n_samples"] or None, batch_size=1000),
        MetricSpec(
            metrics=tuple(metrics.split(",")),
            k=budget["k"],
            probes=budget["probes"],
            noise_samples=budget["noise_samples"],
            restarts=budget["restarts"],
            radius=radius,
            progress=progress,
        ),
    )


def compare_cached(
    paths: list[str],
    labels: list[str],
    budget: dict,
    out: Path,
    progress: bool | str,
    *,
    metrics: str = MEASURED + ",surface",
    at_train_loss: str | None = None,
) -> Comparison:
    """Every checkpoint through `landscape compare` (shared probes, noise and directions), cached in `out`.

    The cache holds while the checkpoints' files and the settings are unchanged.
    """
    spec = CompareSpec(
        budget_metrics(budget, metrics, (0.005, 0.01, 0.02), progress),
        out=out,
        labels=tuple(labels),
        at_train_loss=at_train_loss,
        surface_range=f"-1:1:{budget['line']}",
    )
    key = hashlib.sha256(json.dumps([spec.settings(), paths, [Path(p).stat().st_mtime_ns for p in paths]]).encode()).hexdigest()
    cached = out / "figures-cache.json"
    if cached.exists():
        stored = json.loads(cached.read_text())
        if stored.get("key") == key:
            return Comparison.from_dict(stored["result"])
    result = compare(paths, spec)
    write_text(cached, json.dumps({"key": key, "result": result.to_dict()}) + "\n")
    return result


def by_label(result: Comparison) -> dict[str, list[ComparedCheckpoint]]:
    """The measured checkpoints of each label (its seeds), in order."""
    return result.members()


def interpolation_figure(
    pairs: list[tuple[str, str]],
    budget: dict,
    cache: Path,
    out: Path,
    progress: bool | str = False,
    *,
    batches: tuple[int, int] = (SMALL, LARGE),
    name: str = "interpolation.png",
) -> dict:
    """(a) Keskar's parametric plot θ(α) = θ_SB + α(θ_LB − θ_SB) for each seed's pair (SGD at `batches`): mean and 95%
    band over seeds, drawn to out/`name`."""
    surfaces = []
    for small, large in pairs:
        measurement = MeasurementSet("train", budget["n_samples"], 1000)
        train = objective_from_checkpoint(load_checkpoint(small), measurement=measurement)
        test = objective_from_checkpoint(load_checkpoint(small), measurement=MeasurementSet("test", None, 1000))
        cached = f"interpolation-{Path(small).parent.name}-{Path(large).parent.name}-{budget['n_samples'] or 'all'}.h5"
        surfaces.append(
            compute_surface(
                {"train": train, "test": test},
                between(train, load_checkpoint(large).build_model(), f"SGD B={batches[1]}"),
                [grid_axis(-1.0, 2.0, budget["interpolation"])],
                path=cache / "surfaces" / cached,
                resume=True,
                progress=progress,
            )
        )
    line = f"SGD B={batches[0]} (α=0) → SGD B={batches[1]} (α=1)" + (f", {len(pairs)} seed pairs" if len(pairs) > 1 else "")
    fig = plot_lines(
        {line: surfaces},
        log=True,
        accuracy=True,
        title="Keskar et al. (2017) interpolation between small- and large-batch minima",
    )
    save(fig, out / name)
    alphas = list(surfaces[0].axes[0])
    return {
        split: {
            "loss_at_0": [float(s.loss[split][alphas.index(0.0)]) for s in surfaces],
            "loss_at_1": [float(s.loss[split][alphas.index(1.0)]) for s in surfaces],
        }
        for split in surfaces[0].loss
    }


def value_table(
    result: Comparison, noise: dict[str, float], batches: tuple[int, ...] = (SMALL, LARGE), methods: tuple[str, ...] = METHODS
) -> tuple[list[str], list[list[str]]]:
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


@dataclass(frozen=True)
class FamilyTest(Result):
    """One test of a table's family: `comparison` ("other vs base") in `quantity`, Holm-adjusted within the table."""

    comparison: str
    quantity: str
    difference: Difference
    holm_p: float
    established: bool  # Holm p < ALPHA

    def to_dict(self) -> dict:
        """Flat, as figures.json and paper.json hold it: the comparison, the quantity and the difference's fields."""
        return {
            "comparison": self.comparison,
            "quantity": self.quantity,
            **self.difference.to_dict(),
            "holm_p": self.holm_p,
            "established": self.established,
        }


def comparison_family(result: Comparison, pairs: list[tuple[str, str]], quantities=TESTED) -> list[FamilyTest]:
    """One table's tests: other − baseline for each pair and quantity, paired over seeds, Holm-adjusted together."""
    groups = by_label(result)
    found = []
    for other, base in pairs:
        for q in quantities:
            d = difference(groups[base], groups[other], q)
            if d is not None:
                found.append((f"{other} vs {base}", q, d))
    adjusted = holm([d.p_value for _, _, d in found])
    return [FamilyTest(c, q, replace(d, holm_p=p), p, p < ALPHA) for (c, q, d), p in zip(found, adjusted)]


def family_rows(tests: list[FamilyTest]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "comparison",
        "quantity",
        "difference [95% CI] (relative)",
        "interval from",
        "p",
        "Holm p",
        f"established? (Holm p < {ALPHA:g})",
    ]
    rows = [
        [
            t.comparison,
            t.quantity,
            format_difference(t.difference),
            t.difference.basis,
            f"{t.difference.p_value:.2g}",
            f"{t.holm_p:.2g}",
            ("yes: " + ("higher" if t.difference.diff > 0 else "lower")) if t.established else "no",
        ]
        for t in tests
    ]
    return headers, rows
