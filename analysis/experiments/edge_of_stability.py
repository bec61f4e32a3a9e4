"""The edge of stability at laptop scale (Cohen et al. 2021): λ1 under full-batch GD, against 2/η.

A tanh MLP (40-32-32-10) is trained by full-batch gradient descent with the squared loss on
500 mnist1d training samples, at three step sizes η. The top Hessian eigenvalue λ1 is
measured every 10 steps by Lanczos, warm-started from the previous top eigenvector
(landscape.curvature.stability). Each run shows progressive sharpening (λ1 grows from about 2 while
the loss falls) until λ1 reaches 2/η, where it then stays. About 30 s on one CPU thread:

    python -m analysis.experiments.edge_of_stability --out figures      # writes figures/edge-of-stability.png
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from analysis.report.charts import plt, save
from landscape.curvature.stability import GDConfig, GDRun, gradient_descent
from landscape.inputs.data import load_data
from landscape.inputs.models import MLP

STEP_SIZES = (0.15, 0.25, 0.4)
DATA, N_SAMPLES, HIDDEN = "mnist1d", 500, (32, 32)
STEPS, EVERY = 3000, 10
FILENAME = "edge-of-stability.png"


def squared_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """½‖f(x) − e_y‖² averaged over samples, e_y the one-hot label (Cohen et al.'s MSE)."""
    targets = torch.eye(outputs.shape[1], dtype=outputs.dtype, device=outputs.device)[labels]
    return 0.5 * (outputs - targets).pow(2).sum(1).mean()


def run_experiment(
    step_sizes: Sequence[float] = STEP_SIZES,
    *,
    steps: int = STEPS,
    every: int = EVERY,
    n_samples: int = N_SAMPLES,
    hidden: Sequence[int] = HIDDEN,
    data: str = DATA,
    seed: int = 0,
    warm_start: bool = True,
) -> list[GDRun]:
    """One GD run per step size, all from the same seeded initialization and the first `n_samples` training samples."""
    dataset = load_data(data)
    x, y = dataset.x_train[:n_samples], dataset.y_train[:n_samples]
    runs = []
    for lr in step_sizes:
        torch.manual_seed(seed)
        model = MLP(dataset.input_shape, dataset.num_classes, tuple(hidden), activation="tanh")
        config = GDConfig(lr=lr, steps=steps, every=every, warm_start=warm_start, seed=seed)
        runs.append(gradient_descent(model, x, y, config, squared_loss))
    return runs


def window_ratio(run: GDRun, start: int | None = None) -> np.ndarray:
    """λ1/(2/η) at the recorded steps from `start` (default: the second half of the run) on."""
    start = run.config.steps // 2 if start is None else start
    return run.sharpness[run.recorded >= start] / run.threshold


def plot_edge_of_stability(runs: Sequence[GDRun], title: str = "") -> plt.Figure:
    """One column per step size: λ1 against step with its 2/η line above, the train loss beneath."""
    fig, axes = plt.subplots(
        2,
        len(runs),
        figsize=(4.2 * len(runs), 5.6),
        sharex="col",
        squeeze=False,
        gridspec_kw={"height_ratios": [2, 1], "hspace": 0.08, "wspace": 0.22},
    )
    for column, run in enumerate(runs):
        top, bottom = axes[0, column], axes[1, column]
        color = f"C{column}"
        top.plot(run.recorded, run.sharpness, color=color, lw=1.3, label="λ1 (Lanczos, warm-started)")
        top.axhline(run.threshold, color="black", ls="--", lw=1.1, label=f"2/η = {run.threshold:.3g}")
        ratio = window_ratio(run)
        half = run.config.steps // 2
        top.axvspan(half, run.config.steps, color="0.92", zorder=0)
        top.text(
            0.97,
            0.04,
            f"steps {half}–{run.config.steps}:\nλ1/(2/η) = {ratio.mean():.2f} [{ratio.min():.2f}, {ratio.max():.2f}]",
            transform=top.transAxes,
            ha="right",
            va="bottom",
            fontsize=8.5,
            bbox={"facecolor": "white", "edgecolor": "0.7", "alpha": 0.9},
        )
        top.set_ylim(0, 1.9 * run.threshold)
        top.set_title(f"η = {run.config.lr:g}")
        top.legend(loc="upper right", fontsize=8.5, frameon=False)
        top.grid(alpha=0.3)
        bottom.semilogy(np.arange(len(run.loss)), run.loss, color=color, lw=1.1)
        bottom.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        bottom.yaxis.set_minor_locator(NullLocator())
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        bottom.set_xlabel("GD step")
        bottom.grid(alpha=0.3, which="both")
        if column == 0:
            top.set_ylabel("top Hessian eigenvalue λ1")
            bottom.set_ylabel("train loss (MSE)")
    if title:
        fig.suptitle(title, y=0.995)
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.experiments.edge_of_stability", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("figures"), help="folder for edge-of-stability.png")
    parser.add_argument("--steps", type=int, default=STEPS, help="GD steps per step size")
    parser.add_argument("--every", type=int, default=EVERY, help="measure λ1 every this many steps")
    parser.add_argument(
        "--cold", action="store_true", help="also measure every λ1 by a cold-started Lanczos, to report the HVPs warm starts save"
    )
    args = parser.parse_args(argv)
    began = time.perf_counter()
    runs = run_experiment(steps=args.steps, every=args.every)
    title = (
        f"Edge of stability: full-batch GD, tanh MLP 40-{'-'.join(map(str, HIDDEN))}-10, squared loss, "
        f"{N_SAMPLES} {DATA} samples (λ1 every {args.every} steps)"
    )
    path = save(plot_edge_of_stability(runs, title), args.out / FILENAME)
    cold = run_experiment(steps=args.steps, every=args.every, warm_start=False) if args.cold else [None] * len(runs)
    for run, reference in zip(runs, cold):
        ratio = window_ratio(run)
        line = (
            f"η = {run.config.lr:g}: λ1/(2/η) over steps {run.config.steps // 2}–{run.config.steps}: "
            f"mean {ratio.mean():.3f}, range [{ratio.min():.3f}, {ratio.max():.3f}]; "
            f"λ1 at step 0 = {run.sharpness[0]:.2f}; {run.hvps.sum()} HVPs over {len(run.hvps)} Lanczos runs"
        )
        if reference is not None:
            differ = np.abs(run.sharpness - reference.sharpness) / reference.sharpness
            line += (
                f" (cold starts: {reference.hvps.sum()}; warm and cold λ1 differ by more than the tolerance "
                f"{run.config.tol:g} at {int((differ > run.config.tol).sum())} steps, by at most {differ.max():.2g})"
            )
        print(line)
    print(f"wrote {path} in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
