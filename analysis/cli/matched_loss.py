"""Compare runs at equal train loss: for each run, the trajectory checkpoint whose train loss is closest to a target.

A method that adds noise (SmoothOut, NSO, ...) ends training at a higher train loss than SGD, and
sharpness falls as the loss rises along a trajectory, so final checkpoints compare a method's effect
with how far each run got. `landscape compare --at-train-loss X` measures every run where its train
loss is closest to X; `matched` takes X as the lowest loss that every run reaches (the largest of the
runs' minima). The train loss is the one `landscape train` recorded for each checkpoint: the whole
training split, eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from landscape.inputs.checkpoints import CheckpointError, load_checkpoint


@dataclass(frozen=True)
class TrajectoryPoint:
    path: str
    epoch: int
    train_loss: float


def trajectory(path: str | Path, *, needed_by: str = "--at-train-loss") -> list[TrajectoryPoint]:
    """Every checkpoint of the run `path` belongs to (its trajectory/ folder), with the train loss it recorded.

    `path` is a checkpoint of the run or the run's folder; `needed_by` is what the errors say needs the trajectory.
    """
    final = Path(path)
    folder = final if final.is_dir() else final.parent.parent if final.parent.name == "trajectory" else final.parent
    files = sorted((folder / "trajectory").glob("epoch_*.pt"))
    if not files:
        where = "in it" if final.is_dir() else "beside it"
        raise CheckpointError(
            f"{path}: no trajectory/epoch_*.pt {where}; {needed_by} needs a run written by `landscape train` "
            "(its trajectory/ folder of per-epoch checkpoints)"
        )
    points = []
    for file in files:
        meta = load_checkpoint(file).meta
        loss = meta.get("metrics", {}).get("train_loss")
        if loss is None:
            raise CheckpointError(f"{file} records no train loss; {needed_by} needs a run written by `landscape train`")
        points.append(TrajectoryPoint(str(file), int(meta.get("epoch", 0)), float(loss)))
    return points


def parse_target(text: str) -> float | str:
    """`matched` or a positive number."""
    if text == "matched":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"--at-train-loss takes a positive train loss or 'matched', got {text!r}")
    return value


def matched_target(runs: list[list[TrajectoryPoint]]) -> float:
    """The lowest train loss that every run reaches: the largest of the runs' minima."""
    return max(min(p.train_loss for p in run) for run in runs)


def at_train_loss(paths: list[str], target: float | str) -> tuple[list[TrajectoryPoint], float]:
    """For each run, its checkpoint closest in train loss to `target` (a number or 'matched'), and the target used."""
    runs = [trajectory(p) for p in paths]
    value = matched_target(runs) if target == "matched" else float(target)
    return [min(run, key=lambda p: (abs(p.train_loss - value), p.epoch)) for run in runs], value
