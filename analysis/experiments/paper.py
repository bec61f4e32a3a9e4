"""`landscape figures --paper DIR`: SmoothOut's CIFAR comparison (Wen et al. 2018, arXiv 1805.07898) under its recipes.

For each data set found in DIR (CIFAR-10 in DIR/cifar-10-batches-py, CIFAR-100 in DIR/cifar-100-python, or either
archive's files in DIR itself) it trains SGD and SmoothOut under the paper recipes of landscape.training.presets
(`smoothout-resnet44-cifar10` and its `-large` variant on CIFAR-10, `smoothout-c3-cifar100` and `-large` on
CIFAR-100; batch 128 and 4096, ghost batches of 128, clip 5.0, lr scaled by sqrt(B/128)), `--seeds` seeds each
(seed s starts both methods from the same weights and batch order), measures every final checkpoint alike with
`landscape compare` on a seeded subset of the training set, and writes paper.md/.html and the figures into --out.

What it regenerates: the CIFAR part of the paper's generalization comparison — test accuracy of SGD against
SmoothOut at small and large batch, for ResNet-44 on CIFAR-10 and C3 on CIFAR-100 — with the sharpness measures
behind it (the expected loss under uniform weight noise, the paper's own measure; Keskar's ε-sharpness; λ1 and
the Hessian trace), and Keskar et al.'s small-to-large-batch interpolation plot that SmoothOut's reference code
draws (`visualize_sharpness.py`). Which table and figure numbers these are in the paper was not checked here.
What it does not: the ImageNet (AlexNet) and MNIST rows, C1 on CIFAR-10 and the other model/data pairings, the
Adam-based runs, AdaSmoothOut (`landscape train --recipe ... --optimizer adasmoothout` trains it), and the
ablations (noise schedules, noise types, BN perturbation).
A run at an epoch fraction (`--quick`, `--epoch-fraction`), on a CPU or without the reference's data augmentation
is not the paper's result: the report says how much of each recipe was trained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from analysis.cli.compare import build_report
from analysis.cli.key_values import parse_options
from analysis.cli.train import NOISE_OPTION
from analysis.experiments.method_comparison import (
    TESTED,
    compare_cached,
    comparison_family,
    family_rows,
    interpolation_figure,
    value_table,
)
from analysis.experiments.recipes import DEFAULT_NOISE, label, train_all
from analysis.report.document import Report, write_text
from analysis.report.tables import format_table
from landscape.engine import distributed as ranks
from landscape.inputs.data import CIFAR_LAYOUTS, cifar_folder, has_cifar
from landscape.results import to_jsonable
from landscape.training.loop import TrainConfig
from landscape.training.presets import PRESETS, Preset, apply_preset

METHODS = ("sgd", "smoothout")
FULL = {
    "seeds": 3,
    "epoch_fraction": 1.0,
    "n_samples": 5000,
    "k": 1,
    "probes": 30,
    "noise_samples": 20,
    "restarts": 3,
    "line": 41,
    "interpolation": 31,
}
QUICK = {
    "seeds": 2,
    "epoch_fraction": 0.005,
    "n_samples": 100,
    "k": 1,
    "probes": 4,
    "noise_samples": 4,
    "restarts": 1,
    "line": 5,
    "interpolation": 7,
}
REGENERATES = (
    "the CIFAR part of the paper's generalization comparison (test accuracy of SGD against SmoothOut at "
    "small and large batch: ResNet-44 on CIFAR-10, C3 on CIFAR-100), the sharpness measures behind it (expected "
    "loss under uniform weight noise, the paper's own measure; Keskar's ε-sharpness; λ1; the Hessian trace), and "
    "Keskar et al.'s small-to-large-batch interpolation plot that SmoothOut's reference code draws; the paper's "
    "table and figure numbers were not checked"
)
NOT_REGENERATED = (
    "the ImageNet (AlexNet) and MNIST rows, C1 on CIFAR-10 and other model/data pairings, the Adam-based "
    "runs, AdaSmoothOut, and the ablations (noise schedules, noise types, BN perturbation)"
)


def cifar_specs(root: Path) -> dict[str, str]:
    """The data spec of each CIFAR archive under `root` (its cifar-*-python subfolder or `root` itself), by kind."""
    if not root.is_dir():
        raise ValueError(f"--paper {root}: no such folder; give the folder holding cifar-10-batches-py and/or cifar-100-python")
    found = {kind: f"{kind}:{cifar_folder(kind, root)}" for kind in CIFAR_LAYOUTS if has_cifar(kind, root)}
    if not found:
        raise ValueError(
            f"--paper {root}: no CIFAR python batches found (expected {root}/cifar-10-batches-py or "
            f"{root}/cifar-100-python, extracted from the python-version archives)"
        )
    return found


def recipes_for(kind: str) -> list[Preset]:
    """The paper recipes for data `kind`, small batch first."""
    return sorted((p for p in PRESETS.values() if p.data_kind == kind), key=lambda p: p.settings["batch_size"])


def shortened(preset: Preset, fraction: float) -> dict:
    """Epochs, lr milestones and trajectory spacing for `fraction` of the recipe: milestones scale with the epochs
    (those that would fall on the first or past the last epoch are dropped); about 20 trajectory checkpoints per run."""
    epochs = max(1, round(preset.settings["epochs"] * fraction))
    milestones = tuple(sorted({round(m * fraction) for m in preset.settings.get("lr_milestones", ())} - {0}))
    return {
        "epochs": epochs,
        "lr_milestones": tuple(m for m in milestones if m < epochs),
        "lr_warmup_epochs": round(preset.settings.get("lr_warmup_epochs", 0) * fraction),
        "save_every": max(1, epochs // 20),
    }


def run_configs(
    preset: Preset, spec: str, seeds: int, fraction: float, overrides: dict, noise: float | None
) -> list[TrainConfig]:
    """SGD and SmoothOut under `preset` on `spec`, every seed; `overrides` are TrainConfig settings that win (the model)."""
    runs = []
    for method in METHODS:
        options = {} if method not in NOISE_OPTION else {NOISE_OPTION[method]: DEFAULT_NOISE[method] if noise is None else noise}
        for seed in range(seeds):
            given = {
                "data": spec,
                "optimizer": method,
                "seed": seed,
                "optimizer_kwargs": options,
                **shortened(preset, fraction),
                **overrides,
            }
            runs.append(TrainConfig(**apply_preset(preset.name, given)))
    return runs


def caveat(fraction: float, overrides: dict) -> str:
    """What this run is and is not: a shortened or re-modelled run is never the paper's result."""
    changed = [f"{fraction:g} of each recipe's epochs"] if fraction < 1 else []
    changed += [f"{k} {v} instead of the recipe's" for k, v in overrides.items()]
    head = (
        f"This run is NOT the paper's result: it trained {' and '.join(changed)}, so it only shows that the pipeline runs. "
        if changed
        else "Full recipes; read the differences only where they clear the spread over seeds. "
    )
    return head + (
        "Unlike the paper in any case: no data augmentation (the reference trains on random crops and flips), "
        "and SmoothOut's noise size on CIFAR is unconfirmed (a = 0.02 unless --noise is given)."
    )


def overrides_from(args: argparse.Namespace) -> dict:
    """--model and --model-opt, as TrainConfig settings replacing every recipe's model."""
    out = {}
    if args.model is not None:
        out["model"] = args.model
    if args.model_opt:
        out["model_kwargs"] = parse_options(args.model_opt)
    return out


def run_paper(args: argparse.Namespace, out: Path, cache: Path, seeds: int | None) -> dict:
    """Train, measure and report every recipe whose data is in args.paper; the summary written to out/paper.json."""
    budget = dict(QUICK if args.quick else FULL)
    if seeds is not None:
        budget["seeds"] = seeds
    if args.epoch_fraction is not None:
        budget["epoch_fraction"] = args.epoch_fraction
    specs = cifar_specs(Path(args.paper))
    overrides = overrides_from(args)
    out.mkdir(parents=True, exist_ok=True)
    report = Report("SmoothOut's CIFAR comparison (Wen et al. 2018)")
    report.paragraph(f"Regenerates {REGENERATES}. Not regenerated: {NOT_REGENERATED}.")
    report.paragraph(caveat(budget["epoch_fraction"], overrides))
    summary: dict = {"budget": budget, "data": specs, "overrides": overrides, "recipes": {}}
    for kind, spec in specs.items():
        summary["recipes"][kind] = _one_data_set(kind, spec, budget, overrides, args, out, cache, report)
    report.write(out, "paper")
    write_text(out / "paper.json", json.dumps(to_jsonable(summary), indent=1, default=str) + "\n")  # rank 0 writes
    return summary


def _one_data_set(
    kind: str, spec: str, budget: dict, overrides: dict, args: argparse.Namespace, out: Path, cache: Path, report: Report
) -> dict:
    """Train, measure and report the small- and large-batch recipes of one data set; its section of `report`."""
    small, large = recipes_for(kind)
    runs = [
        r for p in (small, large) for r in run_configs(p, spec, budget["seeds"], budget["epoch_fraction"], overrides, args.noise)
    ]
    batches = (runs[0].batch_size, runs[-1].batch_size)
    key = hashlib.sha256(json.dumps([spec, overrides], sort_keys=True, default=str).encode()).hexdigest()[:8]
    where = cache / f"{kind}-{key}"
    paths = [str(p) for p in train_all(runs, where / "runs", jobs=args.jobs, progress=args.progress)]
    labels = [label(r.optimizer, r.batch_size) for r in runs]
    result = compare_cached(paths, labels, budget, where / "compare", args.progress)
    folder = out / f"{runs[0].model}-{kind}"
    folder.mkdir(parents=True, exist_ok=True)
    build_report(result, folder).write(folder)  # every measured value and difference, with its figures
    sgd = {b: [p for p, r in zip(paths, runs) if r.optimizer == "sgd" and r.batch_size == b] for b in batches}
    interpolation = interpolation_figure(
        list(zip(sgd[batches[0]], sgd[batches[1]])), budget, where, folder, args.progress, batches=batches
    )
    families = {
        f"SmoothOut vs SGD at batch {b}": comparison_family(result, [(label("smoothout", b), label("sgd", b))]) for b in batches
    }
    families["large vs small batch"] = comparison_family(
        result, [(label(m, batches[1]), label(m, batches[0])) for m in METHODS], (*TESTED, "test loss")
    )
    noise = {"smoothout": runs[-1].optimizer_kwargs["a"]}

    setup, first = result.checkpoints[0].setup, runs[0]
    report.heading(f"{first.model} on {kind}: recipes {small.name} and {large.name}")
    trained = "; ".join(
        f"batch {r.batch_size}: {r.epochs} of {p.settings['epochs']} epochs, lr {r.scaled_lr:.4g} "
        + (f"×{r.lr_warmup_factor:g} for the first {r.lr_warmup_epochs} epoch(s), " if r.lr_warmup_epochs else "")
        + (
            f"×{r.lr_gamma:g} at epochs {', '.join(map(str, r.lr_milestones))}"
            if r.lr_milestones
            else "without a decay in the epochs trained"
        )
        for p, r in ((small, runs[0]), (large, runs[-1]))
    )
    options = json.dumps(first.model_kwargs) if first.model_kwargs else "with the recipe's options"
    report.paragraph(
        f"Data {spec}. Trained: {trained}; {budget['seeds']} seed(s) per method, model {first.model} {options}. Measured on "
        f"{setup['measurement']['n_samples']} training samples (eval mode) and the whole test split. "
        + f"Every value and difference, with the 1-D surface and sharpness figures: {folder.name}/report.md."
    )
    report.table(*value_table(result, noise, batches, METHODS), "mean ± std over seeds (n).")
    for title, tests in families.items():
        report.table(
            *family_rows(tests),
            f"{title}: paired over seeds, 95% intervals; Holm's correction over the {len(tests)} tests of this table.",
        )
    report.figure(
        f"{folder.name}/interpolation.png",
        f"SGD: interpolation from batch {batches[0]} (α=0) to batch "
        f"{batches[1]} (α=1), train and test, mean and 95% band over seeds.",
    )
    for name, caption in (
        ("sharpness.png", "Expected loss increase under uniform weight noise of radius a."),
        ("surface-1d.png", "Loss along one filter-normalized random direction."),
    ):
        if (folder / name).exists():
            report.figure(f"{folder.name}/{name}", caption)
    if not args.json and ranks.is_main():
        print(f"\n{first.model} on {kind}\n" + format_table(*value_table(result, noise, batches, METHODS)))
    return {
        "recipes": [small.name, large.name],
        "runs": [r.to_dict() for r in runs],
        "paths": paths,
        "groups": result.groups,
        "families": {title: [t.to_dict() for t in tests] for title, tests in families.items()},
        "interpolation": interpolation,
    }
