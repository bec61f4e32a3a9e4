"""Each flat-minimum method's noise size, chosen by a validation sweep as the papers tune it.

Every method is trained at a few sizes around its default (the grid grown past an end where the
best size sits there), at batch 2000 with one seed, on the training set less a held-out validation
split, and the size with the best validation accuracy (ties: lower validation loss) is used for every
run of `landscape figures`. The test split is never
looked at. So no method is compared at a size that happens to suit the measurement, e.g. SmoothOut
at the a of the ΔL a=0.02 metric while AdaSmoothOut's relative noise is several times smaller.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from analysis.cli.train import NOISE_OPTION
from analysis.experiments.recipes import CONVERGED, LARGE, Recipe, config, train_all

GRID = {  # around each default (SmoothOut a=0.02; landscape.training.optim: σ=0.01, radius 0.01, ρ=0.05), by factors of 2
    "smoothout": (0.005, 0.01, 0.02, 0.04),
    "adasmoothout": (0.01, 0.02, 0.05, 0.1),
    "ssgd": (0.0025, 0.005, 0.01, 0.02),
    "nso": (0.0025, 0.005, 0.01, 0.02),
    "nrs": (0.0025, 0.005, 0.01, 0.02),
    "sam": (0.0125, 0.025, 0.05, 0.1),
}
VALIDATION = 500  # of mnist1d's 4000 training samples


@dataclass(frozen=True)
class SweepPoint:
    """One trained size: the validation split's accuracy (± its binomial stderr) and loss at the end of training."""

    method: str
    option: str
    value: float
    validation_accuracy: float
    validation_stderr: float
    validation_loss: float
    train_loss: float


def noise_sweep(
    cache: Path,
    *,
    grid: dict[str, tuple[float, ...]] = GRID,
    batch: int = LARGE,
    recipe: Recipe = CONVERGED,
    epoch_fraction: float = 1.0,
    jobs: int = 1,
    extend: int = 2,
    progress: bool | str = False,
) -> dict[str, list[SweepPoint]]:
    """Train every (method, size) of `grid` with a validation hold-out; the final validation metrics per size.

    Where the best size is at an end of its grid, the grid grows by a factor of 2 past that end, up to
    `extend` times, so the choice is not an artifact of where the grid stopped.
    """
    grid = {m: tuple(sorted(v)) for m, v in grid.items()}
    found = _train_grid(grid, cache, batch, recipe, epoch_fraction, jobs, progress)
    for _ in range(extend):
        grown = {}
        for m, points in found.items():
            best, values = chosen(points).value, [p.value for p in points]
            if best in (values[0], values[-1]):
                grown[m] = (*values, best * 2) if best == values[-1] else (best / 2, *values)
        if not grown:
            break
        found.update(_train_grid(grown, cache, batch, recipe, epoch_fraction, jobs, progress))
    return found


def _train_grid(
    grid: dict[str, tuple[float, ...]],
    cache: Path,
    batch: int,
    recipe: Recipe,
    epoch_fraction: float,
    jobs: int,
    progress: bool | str,
) -> dict[str, list[SweepPoint]]:
    runs = [
        config(m, batch, 0, epoch_fraction, recipe=recipe, noise=v, validation=VALIDATION)
        for m, values in grid.items()
        for v in values
    ]
    finals = train_all(runs, cache, jobs=jobs, progress=progress)
    found: dict[str, list[SweepPoint]] = {}
    for run, final in zip(runs, finals):
        last = json.loads((final.parent / "log.jsonl").read_text().splitlines()[-1])
        p = last["validation_accuracy"]
        option = NOISE_OPTION[run.optimizer]
        found.setdefault(run.optimizer, []).append(
            SweepPoint(
                run.optimizer,
                option,
                run.optimizer_kwargs[option],
                p,
                math.sqrt(p * (1 - p) / VALIDATION),
                last["validation_loss"],
                last["train_loss"],
            )
        )
    return {m: sorted(points, key=lambda p: p.value) for m, points in found.items()}


def chosen(points: list[SweepPoint]) -> SweepPoint:
    """The best validation accuracy; a tie goes to the lower validation loss."""
    return max(points, key=lambda p: (p.validation_accuracy, -p.validation_loss))


def sweep_table(found: dict[str, list[SweepPoint]]) -> tuple[list[str], list[list[str]]]:
    """One row per method: validation accuracy at each size, and the size chosen."""
    headers = ["method", "option", "validation accuracy at each size (± stderr)", "chosen"]
    rows = []
    for method, points in found.items():
        best = chosen(points)
        cells = ", ".join(f"{p.value:g}: {p.validation_accuracy:.3f} ± {p.validation_stderr:.3f}" for p in points)
        rows.append([method, points[0].option, cells, f"{best.value:g}"])
    return headers, rows


def to_jsonable(found: dict[str, list[SweepPoint]]) -> dict:
    return {m: {"points": [asdict(p) for p in points], "chosen": chosen(points).value} for m, points in found.items()}
