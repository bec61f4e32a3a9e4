"""The edge of stability at laptop scale: λ1 under full-batch GD against 2/η (Cohen et al. 2021), and λ1(P⁻¹H)
under full-batch Adam against 38/η (Cohen et al. 2022).

A tanh MLP (40-32-32-10) is trained with the squared loss on 500 mnist1d training samples, at three step sizes η.
The top eigenvalue is measured every few steps by Lanczos, warm-started from the previous top eigenvector
(landscape.curvature.stability). GD: each run shows progressive sharpening (λ1 grows from about 2 while the loss
falls) until λ1 reaches 2/η, where it then stays, for three seeds per step size, while a small-η control
stays far below 2/η; at the edge the gradient lies along the top eigenvector, in the control it does not;
about 2 minutes on one idle CPU thread. Adam (β1 = 0.9, β2 = 0.999):
the preconditioned sharpness λ1(P⁻¹H), P = √v̂ + ε, rises to (2 + 2β1)/(η(1 − β1)) = 38/η and stays there, for
three seeds per step size, while a small-η control stays far below its threshold; about 10 minutes:

    python -m analysis.experiments.edge_of_stability --out figures      # writes figures/edge-of-stability.png
    python -m analysis.experiments.edge_of_stability --optimizer adam --out figures  # adaptive-edge-of-stability.png
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from analysis.report.charts import plt, save
from landscape.curvature.stability import GDConfig, GDRun, gradient_descent
from landscape.inputs.data import load_data
from landscape.inputs.models import MLP

DATA, N_SAMPLES, HIDDEN = "mnist1d", 500, (32, 32)


@dataclass(frozen=True)
class Setting:
    """One optimizer's experiment: its step sizes (and a small-η control, never at its threshold), steps, seeds."""

    step_sizes: tuple[float, ...]
    steps: int
    every: int
    seeds: int
    filename: str
    control: float | None = None
    sharpness: str = "λ1"
    threshold: str = "2/η"


SETTINGS = {
    "gd": Setting((0.15, 0.25, 0.4), 3000, 10, 3, "edge-of-stability.png", control=0.02),
    "adam": Setting(
        (2e-3, 4e-3, 8e-3), 2000, 20, 3, "adaptive-edge-of-stability.png", control=1e-4, sharpness="λ1(P⁻¹H)", threshold="38/η"
    ),
}
STEP_SIZES, STEPS, EVERY = SETTINGS["gd"].step_sizes, SETTINGS["gd"].steps, SETTINGS["gd"].every


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
    optimizer: str = "gd",
) -> list[GDRun]:
    """One run per step size (GD or Adam), all from the same seeded initialization and the first `n_samples`
    training samples."""
    dataset = load_data(data)
    x, y = dataset.x_train[:n_samples], dataset.y_train[:n_samples]
    runs = []
    for lr in step_sizes:
        torch.manual_seed(seed)
        model = MLP(dataset.input_shape, dataset.num_classes, tuple(hidden), activation="tanh")
        config = GDConfig(lr=lr, steps=steps, every=every, warm_start=warm_start, seed=seed, optimizer=optimizer)
        runs.append(gradient_descent(model, x, y, config, squared_loss))
    return runs


def window_ratio(run: GDRun, start: int | None = None) -> np.ndarray:
    """λ1/(2/η) at the recorded steps from `start` (default: the second half of the run) on."""
    start = run.config.steps // 2 if start is None else start
    return run.sharpness[run.recorded >= start] / run.threshold


def window_alignment(run: GDRun, start: int | None = None) -> np.ndarray:
    """|cos| between the gradient and the top eigenvector at the recorded steps from `start` (default: the second half)."""
    start = run.config.steps // 2 if start is None else start
    return run.alignment[run.recorded >= start]


def plot_edge_of_stability(columns: Sequence[Sequence[GDRun]], title: str = "", setting: Setting = SETTINGS["gd"]) -> plt.Figure:
    """One column per step size (its seeds' runs together): the sharpness against step with its threshold line
    above, the train loss beneath."""
    fig, axes = plt.subplots(
        2,
        len(columns),
        figsize=(4.2 * len(columns), 5.6),
        sharex="col",
        squeeze=False,
        gridspec_kw={"height_ratios": [2, 1], "hspace": 0.08, "wspace": 0.22},
    )
    step_name = "GD step" if setting is SETTINGS["gd"] else f"{columns[0][0].config.optimizer.capitalize()} step"
    for column, runs in enumerate(columns):
        top, bottom = axes[0, column], axes[1, column]
        first = runs[0]
        for i, run in enumerate(runs):
            color = f"C{column}" if len(runs) == 1 else f"C{i}"
            label = f"{setting.sharpness} (Lanczos, warm-started)" if len(runs) == 1 else f"seed {run.config.seed}"
            top.plot(run.recorded, run.sharpness, color=color, lw=1.3 if len(runs) == 1 else 1.0, label=label)
            bottom.semilogy(np.arange(len(run.loss)), run.loss, color=color, lw=1.1 if len(runs) == 1 else 0.9)
        top.axhline(first.threshold, color="black", ls="--", lw=1.1, label=f"{setting.threshold} = {first.threshold:.3g}")
        ratio = np.concatenate([window_ratio(run) for run in runs])
        along = ", ".join(f"{np.nanmedian(window_alignment(run)):.2g}" for run in runs)
        vector = "v1" if setting is SETTINGS["gd"] else "u"
        half = first.config.steps // 2
        top.axvspan(half, first.config.steps, color="0.92", zorder=0)
        seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
        top.text(
            0.97,
            0.04,
            f"steps {half}–{first.config.steps}{seeds}:\n{setting.sharpness}/({setting.threshold}) = "
            f"{_short(ratio.mean())} [{_short(ratio.min())}, {_short(ratio.max())}]\n"
            f"median |cos(∇, {vector})|{' per seed' if len(runs) > 1 else ''}:\n{along}",
            transform=top.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "0.7", "alpha": 0.9},
        )
        top.set_ylim(0, 1.9 * first.threshold)
        control = " (control)" if first.config.lr == setting.control else ""
        top.set_title(f"η = {first.config.lr:g}{control}")
        top.legend(loc="upper right", fontsize=8.5, frameon=False)
        top.grid(alpha=0.3)
        bottom.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        bottom.yaxis.set_minor_locator(NullLocator())
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        bottom.set_xlabel(step_name)
        bottom.grid(alpha=0.3, which="both")
        if column == 0:
            top.set_ylabel(
                "top Hessian eigenvalue λ1" if setting is SETTINGS["gd"] else f"preconditioned sharpness {setting.sharpness}"
            )
            bottom.set_ylabel("train loss (MSE)")
    if title:
        fig.suptitle(title, y=0.995)
    return fig


def _short(ratio: float) -> str:
    """A ratio to two decimals, or two significant digits below 0.1 (a control run far under its threshold)."""
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.experiments.edge_of_stability", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("figures"), help="folder for the figure")
    parser.add_argument("--optimizer", choices=tuple(SETTINGS), default="gd", help="full-batch gd (default) or adam")
    parser.add_argument("--steps", type=int, default=None, help="steps per step size (default: gd 3000, adam 2000)")
    parser.add_argument("--every", type=int, default=None, help="measure the sharpness every this many steps (gd 10, adam 20)")
    parser.add_argument("--seeds", type=int, default=None, help="initializations per step size (default: gd 1, adam 3)")
    parser.add_argument(
        "--replot", action="store_true", help="draw the figure again from the runs the last run saved beside it (.json)"
    )
    parser.add_argument(
        "--cold", action="store_true", help="also measure every λ1 by a cold-started Lanczos, to report the HVPs warm starts save"
    )
    args = parser.parse_args(argv)
    setting = SETTINGS[args.optimizer]
    steps, every = args.steps or setting.steps, args.every or setting.every
    seeds = range(args.seeds or setting.seeds)
    step_sizes = setting.step_sizes + ((setting.control,) if setting.control else ())
    began = time.perf_counter()
    runs_file = args.out / Path(setting.filename).with_suffix(".json").name
    if args.replot:
        columns = [[GDRun.from_dict(run) for run in column] for column in json.loads(runs_file.read_text())]
        steps, every = columns[0][0].config.steps, columns[0][0].config.every
    else:
        by_seed = [run_experiment(step_sizes, steps=steps, every=every, seed=seed, optimizer=args.optimizer) for seed in seeds]
        columns = [list(runs) for runs in zip(*by_seed)]
        args.out.mkdir(parents=True, exist_ok=True)
        runs_file.write_text(json.dumps([[run.to_dict() for run in column] for column in columns]))
    optimizer = "GD" if args.optimizer == "gd" else f"Adam (β1 {GDConfig.beta1}, β2 {GDConfig.beta2})"
    title = (
        f"{'Adaptive edge' if args.optimizer == 'adam' else 'Edge'} of stability: full-batch {optimizer}, tanh MLP "
        f"40-{'-'.join(map(str, HIDDEN))}-10, squared loss, {N_SAMPLES} {DATA} samples ({setting.sharpness} every {every} steps)"
    )
    path = save(plot_edge_of_stability(columns, title, setting), args.out / setting.filename)
    cold = (
        run_experiment(step_sizes, steps=steps, every=every, warm_start=False, optimizer=args.optimizer)
        if args.cold
        else [None] * len(columns)
    )
    for runs, reference in zip(columns, cold):
        for run in runs:
            ratio = window_ratio(run)
            line = (
                f"η = {run.config.lr:g}, seed {run.config.seed}: {setting.sharpness}/({setting.threshold}) over steps "
                f"{run.config.steps // 2}–{run.config.steps}: mean {ratio.mean():.3f}, range [{ratio.min():.3f}, "
                f"{ratio.max():.3f}]; gradient along the top eigenvector, median |cos| "
                f"{np.nanmedian(window_alignment(run)):.3g}; first recorded {run.sharpness[0]:.4g}; final loss {run.loss[-1]:.4g}; "
                f"{run.hvps.sum()} HVPs over {len(run.hvps)} Lanczos runs, {int(np.sum(~run.converged))} not converged"
            )
            if reference is not None and run.config.seed == 0:
                differ = np.abs(run.sharpness - reference.sharpness) / reference.sharpness
                line += (
                    f" (cold starts: {reference.hvps.sum()}; warm and cold λ1 differ by more than the tolerance "
                    f"{run.config.tol:g} at {int((differ > run.config.tol).sum())} steps, by at most {differ.max():.2g})"
                )
            print(line, flush=True)
    print(f"wrote {path} in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
