"""Mode connectivity: a trained curve between two checkpoints against the straight line, in a resumable HDF5 file.

Garipov et al. (2018), "Loss surfaces, mode connectivity, and fast ensembling of DNNs", and Draxler et al. (2018),
"Essentially no barriers in neural network energy landscape": two minima that the straight line between them
separates by a loss barrier are often joined by a simple curve along which the loss stays low. The curve has one
trainable bend θ between the fixed end points w0 and w1:

- quadratic Bézier: φ(t) = (1−t)²·w0 + 2t(1−t)·θ + t²·w1;
- polygonal chain: φ(t) = (1−2t)·w0 + 2t·θ for t ≤ ½, (2−2t)·θ + (2t−1)·w1 after.

θ starts at the midpoint (w0 + w1)/2, where both curves are the straight line, and is trained to minimize
E_{t∼U(0,1)} L(φ(t)): every step draws one t and takes a gradient step on one minibatch of the training set, with
BatchNorm normalizing by the batch's own statistics, as Garipov et al. train theirs. Every evaluated point, on the
curve and on the line, gets its BN running statistics re-estimated from training batches before it is measured.
The trained bend is saved after every epoch and each evaluated point as it finishes, so a killed run resumes.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

import landscape
from landscape.engine.batched_points import PointEvaluator
from landscape.engine.batched_points import points_per_call as resolve_points_per_call
from landscape.engine.objective import Objective
from landscape.engine.params import tensor_digest
from landscape.engine.progress import Progress
from landscape.engine.recalibration import recalibration_inputs
from landscape.inputs.batches import Batch
from landscape.results import Result, to_jsonable
from landscape.statistics import CONFIDENCE, t_halfwidth
from landscape.surfaces.directions import Directions, between, flat_state
from landscape.surfaces.surface import (
    Fingerprint,
    SurfaceError,
    _calls,
    _evaluate_points,
    _fingerprint,
    _Lock,
    open_resumable,
)

if TYPE_CHECKING:
    import h5py

CURVES = ("bezier", "chain")
OPTIMIZERS = ("sgd", "adam")
BARRIERS = ("max", "interpolated")
PATHS = ("line", "curve")
FORMAT = "landscape-curve"
VERSION = 1


class ConnectivityError(ValueError):
    """A curve that cannot be trained, evaluated or resumed as asked: the message names the cause and the fix."""


def coefficients(kind: str, t: float) -> tuple[float, float, float]:
    """The weights (a, b, c) of φ(t) = a·w0 + b·θ + c·w1 for a path of `kind` ("line", "bezier" or "chain").

    Exactly (1, 0, 0) at t = 0 and (0, 0, 1) at t = 1, so both ends are the checkpoints themselves.

    Examples:
        >>> coefficients("bezier", 0.5), coefficients("chain", 0.25), coefficients("line", 1.0)
        ((0.25, 0.5, 0.25), (0.5, 0.5, 0.0), (0.0, 0.0, 1.0))
    """
    if not 0.0 <= t <= 1.0:
        raise ConnectivityError(f"a curve is defined for t in [0, 1], got t={t}")
    if kind == "line":
        return 1.0 - t, 0.0, t
    if kind == "bezier":
        return (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t * t
    if kind == "chain":
        return (1.0 - 2.0 * t, 2.0 * t, 0.0) if t <= 0.5 else (0.0, 2.0 - 2.0 * t, 2.0 * t - 1.0)
    raise ConnectivityError(f"unknown curve {kind!r}; use one of {', '.join(CURVES)} (or 'line')")


@dataclass(frozen=True)
class Curve:
    """A path through one bend: `nodes` (3, n) holds w0, the bend θ and w1 in an Objective's flat layout.

    `point(t)` is the weight vector φ(t) the evaluation measures (bit for bit: the same product), exactly w0 at
    t = 0 and w1 at t = 1. Kind "line" ignores the bend: the straight line (1−t)·w0 + t·w1.
    """

    kind: str
    nodes: torch.Tensor

    def coordinates(self, t: Sequence[float]) -> torch.Tensor:
        """The (len(t), 3) coefficients of the points at `t`, in the nodes' dtype and device."""
        rows = [coefficients(self.kind, float(x)) for x in t]
        return torch.tensor(rows, dtype=self.nodes.dtype, device=self.nodes.device)

    def point(self, t: float) -> torch.Tensor:
        """φ(t) as a flat weight vector."""
        return torch.addmv(torch.zeros_like(self.nodes[0]), self.nodes.T, self.coordinates([t])[0])

    def as_directions(self) -> Directions:
        """The nodes as three 'directions' from the zero origin: a point is then Σ coefficient·node (surface code)."""
        return Directions(self.nodes, "curve", {"kind": self.kind})


@dataclass(frozen=True)
class CurveTraining:
    """How the bend is trained: the curve, epochs over the training batches, optimizer and seed (Garipov et al. 2018).

    The learning rate follows Garipov et al.'s schedule: constant for the first half of the epochs, then down
    linearly to 1% of it at 90%, then 1%. `weight_decay` is the optimizer's, on the bend only (the end points are
    fixed). `seed` draws every t and the minibatch order: the same seed, the same curve.
    """

    curve: str = "bezier"
    epochs: int = 20
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0

    def check(self) -> None:
        """Raise a one-line ConnectivityError for the first setting that cannot work."""
        if self.curve not in CURVES:
            raise ConnectivityError(f"unknown curve {self.curve!r}; use one of {', '.join(CURVES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConnectivityError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConnectivityError(f"epochs must be a positive integer, got {self.epochs!r}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ConnectivityError(f"{name} must be a finite number {'> 0' if name == 'lr' else '≥ 0'}, got {value}")

    def learning_rate(self, epoch: int) -> float:
        """The learning rate of epoch `epoch` (0-based) under Garipov et al.'s schedule."""
        progress = epoch / self.epochs
        if progress <= 0.5:
            return self.lr
        if progress <= 0.9:
            return self.lr * (1.0 - 0.99 * (progress - 0.5) / 0.4)
        return self.lr * 0.01


@dataclass(frozen=True)
class PathLoss(Result):
    """Loss and accuracy at the points `t` of one path between the checkpoints, per split; NaN where not computed.

    `kind` is "line" (the straight line) or the trained curve's ("bezier", "chain"); `seconds[i]` is what point i
    cost (BN re-estimation and every split's evaluation).
    """

    kind: str
    t: np.ndarray
    loss: dict[str, np.ndarray]
    accuracy: dict[str, np.ndarray]
    seconds: np.ndarray

    def worst(self, split: str) -> int:
        """Index of the highest loss on the path."""
        return int(np.nanargmax(self.loss[split]))

    def max_loss(self, split: str) -> float:
        return float(self.loss[split][self.worst(split)])

    def barrier(self, split: str, definition: str = "max") -> float:
        """The path's loss barrier on `split`.

        "max": max_t L(φ(t)) − max(L(w0), L(w1)), how far the path climbs above the worse end point (0 when it
        never does better than that: the end points are the path's highest points).
        "interpolated": max_t [L(φ(t)) − ((1−t)·L(w0) + t·L(w1))], the height above the chord between the end
        points' losses (Entezari et al. 2022; Frankle et al. 2020 measure from the end points' mean instead).
        """
        loss = self.loss[split]
        if definition == "max":
            return float(np.nanmax(loss) - max(loss[0], loss[-1]))
        if definition == "interpolated":
            return float(np.nanmax(loss - ((1 - self.t) * loss[0] + self.t * loss[-1])))
        raise ConnectivityError(f"unknown barrier {definition!r}; use one of {', '.join(BARRIERS)}")

    def accuracy_at_worst(self, split: str) -> float:
        return float(self.accuracy[split][self.worst(split)])

    def summary(self) -> dict[str, dict[str, float]]:
        """Per split: the highest loss, where it is, both barriers and the accuracy there."""
        return {
            split: {
                "max_loss": self.max_loss(split),
                "t_at_max": float(self.t[self.worst(split)]),
                "barrier": self.barrier(split),
                "interpolated_barrier": self.barrier(split, "interpolated"),
                "accuracy_at_max": self.accuracy_at_worst(split),
            }
            for split in self.loss
        }

    def to_dict(self) -> dict:
        complete = all(not np.isnan(v).any() for v in self.loss.values())
        return {**super().to_dict(), **({"summary": to_jsonable(self.summary())} if complete else {})}


@dataclass(frozen=True)
class Connection(Result):
    """A trained curve between two checkpoints and the straight line, evaluated at the same points (Garipov et al. 2018).

    `train_loss[e]` is epoch e's mean minibatch loss along the curve (t drawn per step), `training_seconds[e]` what
    it took; `n_steps` counts the gradient steps. `bend` (the trained θ) is left out of `to_dict`: it lives in
    the HDF5 file at `path`.
    """

    kind: str
    line: PathLoss
    curve: PathLoss
    train_loss: np.ndarray
    training_seconds: np.ndarray
    n_steps: int
    settings: dict
    metadata: dict
    path: str | None = None
    bend: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """JSON-ready fields (the bend left out), each path with its summary."""
        data = {f.name: to_jsonable(getattr(self, f.name)) for f in fields(self) if f.name not in ("bend", *PATHS)}
        return {**data, **{name: getattr(self, name).to_dict() for name in PATHS}}


@dataclass(frozen=True)
class BarrierInterval(Result):
    """The mean barrier of one path over several pairs of checkpoints or curve seeds, with its Student-t interval."""

    path: str  # "line" or "curve"
    split: str
    definition: str
    values: tuple[float, ...]
    mean: float
    halfwidth: float  # of the two-sided interval at `confidence`; NaN from a single value
    confidence: float = CONFIDENCE

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.halfwidth, self.mean + self.halfwidth


def barrier_interval(
    connections: Sequence[Connection], *, path: str = "curve", split: str = "test", definition: str = "max"
) -> BarrierInterval:
    """Mean barrier over `connections` (seed pairs, or curves trained with several seeds) with a t-interval.

    Args:
        connections: finished connections, one per pair or curve seed.
        path: "line" or "curve".
        split: the split the barrier is taken on.
        definition: "max" or "interpolated" (PathLoss.barrier).

    Returns:
        BarrierInterval: the values, their mean and the half-width of the Student-t interval at CONFIDENCE
            (NaN for a single connection: one value has no spread).

    Examples:
        >>> import numpy as np
        >>> t = np.array([0.0, 0.5, 1.0])
        >>> def joined(middle):
        ...     line = PathLoss("line", t, {"test": np.array([0.1, middle, 0.2])}, {"test": np.full(3, 0.9)}, np.zeros(3))
        ...     return Connection("bezier", line, line, np.zeros(1), np.zeros(1), 1, {}, {})
        >>> interval = barrier_interval([joined(1.2), joined(1.4)], path="line")
        >>> round(interval.mean, 6), interval.values
        (1.1, (1.0, 1.2))
    """
    if path not in PATHS:
        raise ConnectivityError(f"unknown path {path!r}; use 'line' or 'curve'")
    if not connections:
        raise ConnectivityError("a barrier interval needs at least one connection")
    values = tuple(getattr(c, path).barrier(split, definition) for c in connections)
    halfwidth = float(t_halfwidth(values)) if len(values) > 1 else float("nan")
    return BarrierInterval(path, split, definition, values, float(np.mean(values)), halfwidth)


def connect(
    objectives: Objective | Mapping[str, Objective],
    other: nn.Module,
    *,
    training: CurveTraining = CurveTraining(),
    train: Objective | None = None,
    points: int = 21,
    bn_batches: int | None = None,
    path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool | str = False,
    points_per_call: int | str = "auto",
    label: str = "B",
) -> Connection:
    """Train a Bézier curve or polygonal chain from the objectives' checkpoint to `other`; measure it against the line.

    Garipov et al. (2018) and Draxler et al. (2018): the bend starts at the midpoint and is trained on
    E_{t∼U(0,1)} L(φ(t)) with SGD or Adam (`training`), one t per minibatch step, BatchNorm on batch statistics.
    Then loss and accuracy at `points` evenly spaced t along the trained curve and along the straight line, on
    every split, each point with its BN running statistics re-estimated from `bn_batches` batches of the first
    objective (models with BatchNorm in eval mode).

    Args:
        objectives: an Objective at checkpoint A (w0, t = 0), or {split: Objective} over A (train first), eval mode.
        other: checkpoint B (w1, t = 1), the same architecture.
        training: the curve, epochs, optimizer, learning rate and seed.
        train: the minibatches the bend is trained on, each a step (an Objective at A; with BatchNorm in mode
            "train"); None: the first objective's batches, with BatchNorm on batch statistics.
        points: evaluated points per path, t = 0, 1/(points−1), …, 1 (at least 3).
        bn_batches: batches of the first objective the BN statistics are re-estimated from; None: all of them.
        path: an HDF5 file the bend (after every epoch) and the points (as they finish) go to; None: memory only.
        resume: finish an existing `path`, training only the epochs and evaluating only the points it lacks;
            refused unless made with the same checkpoints, data, points and settings.
        progress: progress bars (True, or a label), off by default.
        points_per_call: points per vmapped forward (landscape.engine.batched_points); "auto": 1 on a CPU.
        label: B's name in errors.

    Returns:
        Connection: both paths' losses and accuracies, the training losses per epoch, the cost, the settings and
            metadata, and the trained bend.

    Raises:
        ConnectivityError: bad settings, a train-mode-less BN training objective, B differing from A outside the
            measured parameters, or a curve whose loss diverges (the last finished epoch stays in the file).
        DirectionError: B is another architecture or has non-finite weights.
        SurfaceError: a file that exists (without resume), does not match (with resume), is held by another run,
            or cannot be written.

    Examples:
        Between two weights of one linear layer (no barrier to remove): both ends are the checkpoints' own losses.

        >>> import torch
        >>> from torch import nn
        >>> from landscape.examples import quadratic
        >>> objective = quadratic()                  # one Linear(2, 1) layer at w = (1, 1)
        >>> other = nn.Linear(2, 1, bias=False)
        >>> _ = other.weight.data.copy_(torch.tensor([[0.0, 1.0]]))
        >>> result = connect(objective, other, training=CurveTraining(epochs=2, lr=0.01), points=5)
        >>> float(result.line.loss["train"][0]) == objective.loss(), result.line.loss["train"].shape
        (True, (5,))
    """
    objectives = {"train": objectives} if isinstance(objectives, Objective) else dict(objectives)
    training.check()
    if isinstance(points, bool) or not isinstance(points, int) or points < 3:
        raise ConnectivityError(f"a path needs at least 3 points (both ends and one between), got {points!r}")
    if not objectives:
        raise ConnectivityError("give at least one objective (split)")
    first = next(iter(objectives.values()))
    _check_objectives(objectives, train)
    w1 = flat_state(first, other, label)[0]
    _check_fixed_parameters(first, other, label)
    train = train if train is not None else _training_objective(first)
    if train.has_batchnorm and train.mode == "eval":
        raise ConnectivityError("the bend trains with BatchNorm on batch statistics: give a train objective with mode='train'")
    recalibrate = first.has_batchnorm and first.mode == "eval"
    k = (bn_batches or first.n_batches) if recalibrate else None
    inputs = recalibration_inputs(first, k) if recalibrate else None

    if bn_batches is not None and not recalibrate:
        raise ConnectivityError("bn_batches: the objectives have no BatchNorm running statistics to re-estimate")
    t = np.linspace(0.0, 1.0, points)
    fingerprint = {
        **_fingerprint(objectives, between(first, other, "B"), (t,), k),
        "training": {**to_jsonable(training), "batches": _batches_digest(train), "n_batches": train.n_batches},
    }
    metadata = {
        "splits": {s: o.describe() for s, o in objectives.items()},
        "train": train.describe(),
        "other": {"label": label, **_checkpoint_of(other)},
        "bn_recalibration": k,
        "library_version": landscape.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    state = _State.empty(objectives, t, training.epochs)
    store = None
    if path is not None:
        store = _CurveFile.open_or_create(Path(path), resume, fingerprint, metadata, state)
        state = store.read()
    try:
        w0 = first.w.detach().clone()
        evaluators = {split: PointEvaluator(o) for split, o in objectives.items()}
        per_call = resolve_points_per_call(list(objectives.values()), points_per_call)
        line = Curve("line", torch.stack([w0, (w0 + w1) / 2, w1]))  # first: it needs no training
        _evaluate_path("line", line, state, store, evaluators, inputs, per_call, progress)
        bend = _train_bend(train, w0, w1, training, state, store, progress)
        curve = Curve(training.curve, torch.stack([w0, bend, w1]))
        _evaluate_path("curve", curve, state, store, evaluators, inputs, per_call, progress)
    finally:
        if store is not None:
            store.close()
    return state.connection(training, train.n_batches, k, metadata, None if path is None else str(path))


# ------------------------------------------------------------------ checks
def _check_objectives(objectives: dict[str, Objective], train: Objective | None) -> None:
    """One process, one checkpoint: every split's objective (and the training one) at the first's point."""
    first = next(iter(objectives.values()))
    named = {**objectives, **({"training": train} if train is not None else {})}
    for split, objective in named.items():
        if objective.distributed:
            raise ConnectivityError("mode connectivity runs in one process: build the objectives without torchrun")
        if objective.n_params != first.n_params or not torch.equal(objective.w, first.w):
            raise ConnectivityError(
                f"the {split} objective is at a different point than the first: give objectives of checkpoint A"
            )


def _check_fixed_parameters(objective: Objective, other: nn.Module, label: str) -> None:
    """Parameters outside the measured selection stay at A's values along the path: refuse a B that differs there,
    since the path would then not end at B."""
    selected = set(objective.layout.names)
    theirs = dict(other.named_parameters())
    for name, mine in objective.model.named_parameters():
        if name in selected or name not in theirs:
            continue
        if not torch.equal(mine.detach().cpu(), theirs[name].detach().cpu().to(mine.dtype)):
            raise ConnectivityError(
                f"{label} differs from A in {name!r}, a parameter outside the measured selection: the path would not "
                "end at it; measure all parameters (params='all')"
            )


def _training_objective(objective: Objective) -> Objective:
    """The objective's batches and checkpoint with BatchNorm on batch statistics (itself when it has none)."""
    if not objective.has_batchnorm or objective.mode == "train":
        return objective
    return Objective(
        objective.model,
        objective.batches,
        loss=objective.loss_function,
        params=objective.param_selection,
        mode="train",
        dtype=objective.model_dtype,
        device=objective.device,
        hvp_check=False,
        metadata=objective.metadata,
    )


def _batches_digest(objective: Objective) -> str:
    """Digest of the training batches (inputs and targets, in order): the bend depends on every one."""
    from landscape.surfaces.surface import _samples_digest

    return _samples_digest(objective)


def _checkpoint_of(model: nn.Module) -> dict:
    return {"weights_sha256": tensor_digest({n: p for n, p in model.state_dict().items()})}


# ------------------------------------------------------------------ training
def _train_bend(
    train: Objective,
    w0: torch.Tensor,
    w1: torch.Tensor,
    training: CurveTraining,
    state: _State,
    store: _CurveFile | None,
    progress: bool | str,
) -> torch.Tensor:
    """θ after `training.epochs` epochs, from the midpoint or from the last epoch the file holds."""
    theta = ((w0 + w1) / 2 if state.bend is None else state.bend.to(w0)).clone().requires_grad_(True)
    optimizer = _optimizer(training, theta)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    total = training.epochs * train.n_batches
    done = state.epochs_done * train.n_batches
    with Progress(total, f"{training.curve} curve", "step", progress, initial=done) as bar:
        for epoch in range(state.epochs_done, training.epochs):
            start = time.perf_counter()
            generator = torch.Generator().manual_seed(_epoch_seed(training.seed, epoch))
            for group in optimizer.param_groups:
                group["lr"] = training.learning_rate(epoch)
            losses = []
            for batch in _epoch_batches(train.batches, generator):
                a, b, c = coefficients(training.curve, float(torch.rand((), generator=generator, dtype=torch.float64)))
                scaled = train._batch_loss(a * w0 + b * theta + c * w1, batch)
                optimizer.zero_grad(set_to_none=True)
                scaled.backward()
                if train.loss_scale != 1:
                    theta.grad /= train.loss_scale
                optimizer.step()
                losses.append(scaled.detach() / train.loss_scale)
                bar.update(1)
            mean = float(torch.stack(losses).mean())
            if not (np.isfinite(mean) and torch.isfinite(theta).all()):
                raise ConnectivityError(
                    f"the curve's loss diverged in epoch {epoch + 1} (mean loss {mean}): lower the learning rate "
                    f"(now {training.lr:g}); epochs before it are kept"
                )
            state.record_epoch(epoch, theta.detach().clone(), optimizer.state_dict(), mean, time.perf_counter() - start)
            if store is not None:
                store.write_epoch(state, epoch)
    return theta.detach()


def _optimizer(training: CurveTraining, theta: torch.Tensor) -> torch.optim.Optimizer:
    if training.optimizer == "adam":
        return torch.optim.Adam([theta], lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.SGD([theta], lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)


def _epoch_seed(seed: int, epoch: int) -> int:
    """One seed per (seed, epoch): an epoch's draws do not depend on how many epochs ran before it in this process."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def _epoch_batches(batches: Sequence[Batch], generator: torch.Generator) -> list[Batch]:
    """One epoch's minibatches: (x, y) pairs of one input shape reshuffled sample by sample into the same sizes;
    other batches (dicts, tuples of several tensors) kept whole, in a shuffled order."""
    pairs = all(isinstance(b, tuple) and len(b) == 2 and all(isinstance(v, torch.Tensor) for v in b) for b in batches)
    if not pairs or len({tuple(x.shape[1:]) for x, _ in batches}) > 1:
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    order = torch.randperm(len(x), generator=generator).to(x.device)
    sizes = [len(b[1]) for b in batches]
    return list(zip(x[order].split(sizes), y[order].split(sizes)))


# ---------------------------------------------------------------- evaluation
def _evaluate_path(
    name: str,
    curve: Curve,
    state: _State,
    store: _CurveFile | None,
    evaluators: dict[str, PointEvaluator],
    inputs: list[torch.Tensor] | None,
    per_call: int,
    progress: bool | str,
) -> None:
    """Every point of the path the state lacks, BN re-estimated at each, stored as it finishes."""
    done = state.done[name]
    directions, origin = curve.as_directions(), torch.zeros_like(curve.nodes[0])
    coords = curve.coordinates(state.t)
    pending = [int(i) for i in np.flatnonzero(~done)]
    label = "straight line" if name == "line" else f"{curve.kind} curve"
    with Progress(len(done), label, "point", progress, initial=len(done) - len(pending)) as bar:
        for call in _calls(pending, per_call):
            start = time.perf_counter()
            rows = _evaluate_points(evaluators, directions, origin, {}, coords[call], inputs)
            seconds = (time.perf_counter() - start) / len(call)
            for i, row in zip(call, rows):
                for split in evaluators:
                    for quantity in ("loss", "accuracy"):
                        state.values[f"{name}/{split}/{quantity}"][i] = row[f"{split}/{quantity}"]
                state.seconds[name][i] = seconds
                done[i] = True
            if store is not None:
                store.write_path(state, name)
            bar.update(len(call))


# ------------------------------------------------------------------- storage
@dataclass
class _State:
    """What a run has so far: the points' values, done masks and costs per path, and the training's progress."""

    t: np.ndarray
    values: dict[str, np.ndarray]  # "line/train/loss", "curve/test/accuracy", ...
    done: dict[str, np.ndarray]
    seconds: dict[str, np.ndarray]
    train_loss: np.ndarray
    training_seconds: np.ndarray
    epochs_done: int = 0
    bend: torch.Tensor | None = None
    optimizer: dict | None = None

    @classmethod
    def empty(cls, objectives: Mapping[str, Objective], t: np.ndarray, epochs: int) -> _State:
        shape = t.shape
        values = {f"{p}/{s}/{q}": np.full(shape, np.nan) for p in PATHS for s in objectives for q in ("loss", "accuracy")}
        done = {p: np.zeros(shape, dtype=bool) for p in PATHS}
        seconds = {p: np.full(shape, np.nan) for p in PATHS}
        return cls(t, values, done, seconds, np.full(epochs, np.nan), np.full(epochs, np.nan))

    def connection(
        self, training: CurveTraining, n_batches: int, bn_batches: int | None, metadata: dict, path: str | None
    ) -> Connection:
        """The typed result of what the state holds (NaN where a point is not computed yet)."""
        splits = list(dict.fromkeys(k.split("/")[1] for k in self.values))
        paths = {
            name: PathLoss(
                kind,
                self.t,
                {s: self.values[f"{name}/{s}/loss"] for s in splits},
                {s: self.values[f"{name}/{s}/accuracy"] for s in splits},
                self.seconds[name],
            )
            for name, kind in (("line", "line"), ("curve", training.curve))
        }
        settings = {**to_jsonable(training), "points": len(self.t), "bn_recalibration": bn_batches}
        n_steps = training.epochs * n_batches
        return Connection(
            training.curve,
            paths["line"],
            paths["curve"],
            self.train_loss,
            self.training_seconds,
            n_steps,
            settings,
            metadata,
            path,
            self.bend,
        )

    def record_epoch(self, epoch: int, bend: torch.Tensor, optimizer: dict, loss: float, seconds: float) -> None:
        self.bend, self.optimizer, self.epochs_done = bend, optimizer, epoch + 1
        self.train_loss[epoch], self.training_seconds[epoch] = loss, seconds


class _CurveFile:
    """The HDF5 file of one connection: the bend in two alternating slots (an epoch's is complete before the
    count of finished epochs points at it), and per path the points' values, written before their done mask."""

    def __init__(self, path: Path, file: h5py.File, lock: _Lock) -> None:
        self.path, self.file, self.lock = path, file, lock

    @classmethod
    def open_or_create(cls, path: Path, resume: bool, fingerprint: dict, metadata: dict, state: _State) -> _CurveFile:
        """The file, locked for this process until `close`; an existing one only with `resume` and matching settings
        (a file of other checkpoints, data, points or training settings is refused, naming the first difference)."""
        names = {"directions": "checkpoint B", "axes": "points", "bn_recalibration": "BN batches"}
        file, lock = open_resumable(
            path,
            resume,
            lambda: _create(path, fingerprint, metadata, state),
            Fingerprint(FORMAT, "curve", fingerprint, metadata, names),
        )
        return cls(path, file, lock)

    def read(self) -> _State:
        f = self.file
        t = f["t"][()]
        splits = json.loads(f.attrs["splits"])
        values = {f"{p}/{s}/{q}": f[p][s][q][()] for p in PATHS for s in splits for q in ("loss", "accuracy")}
        state = _State(
            t,
            values,
            {p: f[p]["done"][()].astype(bool) for p in PATHS},
            {p: f[p]["seconds"][()] for p in PATHS},
            f["training/loss"][()],
            f["training/seconds"][()],
        )
        epochs = int(f["training"].attrs["epochs_done"])
        if epochs:
            slot = f[f"training/slot{epochs % 2}"]
            state.epochs_done, state.bend = epochs, torch.from_numpy(slot["bend"][()])
            state.optimizer = torch.load(io.BytesIO(slot["optimizer"][()].tobytes()), weights_only=True)
        return state

    def write_epoch(self, state: _State, epoch: int) -> None:
        """The epoch's bend and optimizer state into the slot not in use, flushed; then the epoch count, flushed."""
        slot = self.file.require_group(f"training/slot{(epoch + 1) % 2}")
        buffer = io.BytesIO()
        torch.save(state.optimizer, buffer)
        _put(slot, "bend", state.bend.detach().cpu().numpy())
        _put(slot, "optimizer", np.frombuffer(buffer.getvalue(), dtype=np.uint8))
        self.file["training/loss"][...] = state.train_loss
        self.file["training/seconds"][...] = state.training_seconds
        self.file.flush()
        self.file["training"].attrs["epochs_done"] = epoch + 1
        self.file.flush()

    def write_path(self, state: _State, name: str) -> None:
        """One path's values and costs, flushed; then its done mask, flushed: a kill never marks an unwritten point."""
        for key, array in state.values.items():
            if key.startswith(f"{name}/"):
                self.file[key][...] = array
        self.file[f"{name}/seconds"][...] = state.seconds[name]
        self.file.flush()
        self.file[f"{name}/done"][...] = state.done[name].astype(np.uint8)
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self.lock.release()


def _put(group: h5py.Group, name: str, data: np.ndarray) -> None:
    """A 1-D dataset written in place, resized to the data (chunked: rewriting it every epoch does not grow the file)."""
    if name not in group:
        group.create_dataset(name, data=data, maxshape=(None,), chunks=True)
    else:
        group[name].resize(data.shape)
        group[name][...] = data


def _create(path: Path, fingerprint: dict, metadata: dict, state: _State) -> None:
    """The whole empty file under a temporary name, then renamed: a kill leaves no half-made file."""
    import h5py

    tmp = path.with_name(path.name + ".tmp")
    splits = list(dict.fromkeys(k.split("/")[1] for k in state.values))
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "fingerprint": json.dumps(fingerprint),
                    "metadata": json.dumps(to_jsonable(metadata)),
                    "splits": json.dumps(splits),
                }
            )
            f.create_dataset("t", data=state.t)
            for key, array in state.values.items():
                f.create_dataset(key, data=array)
            for name in PATHS:
                f.create_dataset(f"{name}/done", data=np.zeros(state.t.shape, dtype=np.uint8))
                f.create_dataset(f"{name}/seconds", data=state.seconds[name])
            group = f.create_group("training")
            group.attrs["epochs_done"] = 0
            group.create_dataset("loss", data=state.train_loss)
            group.create_dataset("seconds", data=state.training_seconds)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise SurfaceError(f"cannot write {path}: {error.strerror or error}") from error


def read_connection(path: str | os.PathLike) -> Connection:
    """The connection a file holds (points not computed yet are NaN); refuses files that are not curve files.

    Args:
        path: a file written by `connect` (or `landscape connect`).

    Returns:
        Connection: both paths, the training losses so far, settings, metadata and the last saved bend.

    Raises:
        SurfaceError: no such file, not HDF5, or not a landscape curve file.
    """
    path = Path(path)
    if not path.exists():
        raise SurfaceError(f"{path}: no such file")
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("format") != FORMAT:
                raise SurfaceError(f"{path} is not a landscape curve file (no format={FORMAT!r} attribute)")
            state = _CurveFile(path, f, None).read()
            fingerprint, metadata = json.loads(f.attrs["fingerprint"]), json.loads(f.attrs["metadata"])
    except OSError as error:
        raise SurfaceError(f"{path} cannot be read as HDF5 ({error}); is it a curve file?") from error
    training = CurveTraining(**{k: v for k, v in fingerprint["training"].items() if k in CurveTraining.__dataclass_fields__})
    n_batches = int(fingerprint["training"]["n_batches"])
    return state.connection(training, n_batches, fingerprint["bn_recalibration"], metadata, str(path))
