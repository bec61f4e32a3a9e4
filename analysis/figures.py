"""`landscape figures`: regenerate every figure in figures/ from scratch (training cached between runs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from analysis.plots import plot_spectral_densities, save
from landscape.checkpoints import load_checkpoint
from landscape.data import MeasurementSet
from landscape.operators import HessianOperator
from landscape.problem import objective_from_checkpoint
from landscape.spectrum import lanczos, slq_density
from landscape.train import TrainConfig, train

# METHODS.md's small-scale check: MLP 40-100-100-10 on mnist1d, small vs large batch SGD.
RUNS = {
    "small-batch SGD (B=32)": TrainConfig(data="mnist1d", model="mlp", batch_size=32, lr=0.01, epochs=60, save_every=10),
    "large-batch SGD (B=2000)": TrainConfig(data="mnist1d", model="mlp", batch_size=2000, lr=0.1, epochs=600, save_every=100),
}


def quick(config: TrainConfig) -> TrainConfig:
    """A tenth of the epochs, for a fast smoke version of every figure."""
    return TrainConfig.from_dict({**config.to_dict(), "epochs": max(1, config.epochs // 10), "save_every": 1000})


def spectra_figure(cache: Path, out: Path, *, quick_mode: bool, progress: bool) -> dict:
    """Hessian spectral density and top-5 eigenvalues of small- vs large-batch minima."""
    spectra, tops, summary = {}, {}, {}
    for label, config in RUNS.items():
        config = quick(config) if quick_mode else config
        run_dir = cache / f"{config.optimizer}-b{config.batch_size}-e{config.epochs}-s{config.seed}"
        final = train(config, run_dir, resume=True, progress=progress)
        objective = objective_from_checkpoint(load_checkpoint(final), measurement=MeasurementSet("train", batch_size=1000))
        top = lanczos(HessianOperator(objective), 5, tol=1e-3, seed=0)
        density = slq_density(HessianOperator(objective), n_runs=4, n_steps=80, seed=0)
        spectra[label], tops[label] = density.to_dict(), [float(v) for v in top.values]
        summary[label] = {"test_accuracy": load_checkpoint(final).meta["metrics"]["test_accuracy"],
                          "top_eigenvalues": tops[label], "residuals": top.residuals.tolist()}
    fig = plot_spectral_densities(spectra, tops, title="Hessian spectral density, MLP on mnist1d (dotted: λ1..λ5)")
    save(fig, out / "spectra.png")
    return summary


def run(args: argparse.Namespace) -> None:
    out, cache = Path(args.out), Path(args.cache)
    summary = {"spectra": spectra_figure(cache, out, quick_mode=args.quick, progress=not args.quiet)}
    (out / "figures.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote figures to {out}/ (training runs cached in {cache}/)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="figures", help="folder for the figures (default figures/)")
    parser.add_argument("--cache", default="runs/figures", help="folder for cached training runs")
    parser.add_argument("--quick", action="store_true", help="a smaller version (a tenth of the training), for tests")
