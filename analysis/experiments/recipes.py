"""The training recipes behind `landscape demo` and `landscape figures` (the seed papers' small-scale check).

An MLP on mnist1d with SGD momentum 0.9: small batch 32 (lr 0.01) against large batch 2000 (lr 0.1),
and each flat-minimum method with the same settings. Two recipes:
- `converged`: the reference 60 and 600 epochs; the figures use it.
- `demo`: a third of those epochs, so the demo runs in minutes; its small-batch runs are underfit.
Every run records its recipe's name in its checkpoints (TrainConfig.recipe).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from analysis.cli.train import NOISE_OPTION
from landscape.engine import distributed as ranks
from landscape.engine.progress import working_on
from landscape.training.loop import TrainConfig, train

SMALL, LARGE = 32, 2000
LR = {SMALL: 0.01, LARGE: 0.1}
METHODS = ("sgd", "smoothout", "adasmoothout", "ssgd", "nso", "nrs", "sam")
DEFAULT_NOISE = {"smoothout": 0.02}  # the others at landscape.training.optim's defaults


@dataclass(frozen=True)
class Recipe:
    """Epochs and trajectory spacing per batch size, and what the recipe can and cannot back."""

    name: str
    epochs: dict[int, int]
    save_every: dict[int, int]
    note: str


CONVERGED = Recipe(
    "converged",
    {SMALL: 60, LARGE: 600},
    {SMALL: 1, LARGE: 10},
    "the reference recipe (60 epochs at batch 32, 600 at batch 2000), trained to the end; "
    "60 trajectory checkpoints per run, so runs can be compared at matched train loss",
)
DEMO = Recipe(
    "demo",
    {SMALL: 20, LARGE: 200},
    {SMALL: 2, LARGE: 20},
    "a third of the reference epochs (20 at batch 32, 200 at batch 2000), to fit the demo's few minutes: the "
    "batch-32 runs stop underfit (train loss about 0.6 against 0.24 at batch 2000), so the demo cannot say "
    "whether small or large batches generalize better",
)
# the learning-rate × batch-size sweep behind figures/correlation.png: equal step counts at both batch sizes
# (100 epochs × 125 steps at batch 32, 800 × 16 at batch 256 on mnist1d's 4000 training samples)
LR_SWEEP = Recipe(
    "lr-sweep",
    {SMALL: 100, 256: 800},
    {SMALL: 5, 256: 40},
    "batch 32 and 256 at learning rates 0.005, 0.01 and 0.02 (momentum 0.9), 100 and 800 epochs: about "
    "12,500 steps each; no schedule",
)
SWEEP_LRS = (0.005, 0.01, 0.02)
RECIPES = {r.name: r for r in (CONVERGED, DEMO, LR_SWEEP)}


def label(method: str, batch: int) -> str:
    return f"{method} B={batch}"


def config(
    method: str,
    batch: int,
    seed: int,
    epoch_fraction: float = 1.0,
    *,
    recipe: Recipe = CONVERGED,
    noise: float | None = None,
    validation: int = 0,
    lr: float | None = None,
) -> TrainConfig:
    """One run of `recipe`: `noise` sets the method's noise size (its NOISE_OPTION), `epoch_fraction` < 1 shortens
    the run (quick versions for tests), `validation` holds out training samples for tuning, `lr` replaces the
    batch size's learning rate."""
    epochs = max(1, round(recipe.epochs[batch] * epoch_fraction))
    if noise is None:
        noise = DEFAULT_NOISE.get(method)
    options = {} if noise is None else {NOISE_OPTION[method]: noise}
    return TrainConfig(
        data="mnist1d",
        model="mlp",
        optimizer=method,
        optimizer_kwargs=options,
        batch_size=batch,
        lr=LR[batch] if lr is None else lr,
        epochs=epochs,
        seed=seed,
        validation=validation,
        recipe=recipe.name,
        save_every=max(1, round(recipe.save_every[batch] * epoch_fraction)) if epochs > 1 else 1,
    )


def run_name(run: TrainConfig) -> str:
    """A folder name that differs whenever the run does: method, noise size, batch, learning rate (where it is not
    the batch size's default), epochs, seed, hold-out."""
    noise = "".join(f"-{k}{v:g}" for k, v in run.optimizer_kwargs.items() if k == NOISE_OPTION.get(run.optimizer))
    lr = "" if LR.get(run.batch_size) == run.lr else f"-lr{run.lr:g}"
    held = f"-val{run.validation}" if run.validation else ""
    return f"{run.optimizer}{noise}-b{run.batch_size}{lr}-e{run.epochs}-seed{run.seed}{held}"


def train_all(runs: list[TrainConfig], cache: Path, *, jobs: int = 1, progress: bool | str = False) -> list[Path]:
    """Train (or reuse from `cache`) every run, `jobs` at a time in separate processes; their final checkpoints, in order.

    Under torchrun the runs are split over the ranks instead, each run trained whole by one rank; every rank
    gets every path.
    """
    folders = [cache / run_name(run) for run in runs]
    if ranks.world_size() > 1:
        return ranks.map_split(list(zip(runs, folders)), _train_on_this_rank)
    if jobs <= 1:
        paths = []
        for i, (run, folder) in enumerate(zip(runs, folders), 1):
            with working_on(f"run {i}/{len(runs)} {folder.name}"):  # which run each progress line is about
                paths.append(train(run, folder, resume=True, progress=progress))
        return paths
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        return list(pool.map(_train_quietly, runs, folders))


def _train_on_this_rank(item: tuple[TrainConfig, Path]) -> Path:
    return train(item[0], item[1], resume=True, progress=False, data_parallel=False)


def _one_thread() -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)  # parallel runs share the cores; small models train fastest on one thread each


def _train_quietly(run: TrainConfig, folder: Path) -> Path:
    return train(run, folder, resume=True, progress=False)


def train_runs(
    specs: list[tuple[str, int]],
    seeds: int,
    cache: Path,
    *,
    recipe: Recipe = CONVERGED,
    noise: dict[str, float] | None = None,
    epoch_fraction: float = 1.0,
    jobs: int = 1,
    progress: bool | str = False,
) -> tuple[list[str], list[str]]:
    """Every (method, batch) × seed of `recipe`: checkpoint paths and their labels, in order."""
    runs = [config(m, b, s, epoch_fraction, recipe=recipe, noise=(noise or {}).get(m)) for m, b in specs for s in range(seeds)]
    paths = train_all(runs, cache, jobs=jobs, progress=progress)
    return [str(p) for p in paths], [label(r.optimizer, r.batch_size) for r in runs]
