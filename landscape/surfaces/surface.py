"""1-D and 2-D loss surfaces around a checkpoint, stored in resumable HDF5 files.

Each grid point is origin + Σ_j c_j·d_j (landscape.surfaces.directions), evaluated by the Objective's
functional forward pass: no model copies, no state-dict loads, the caller's model untouched; on a GPU
several points share one vmapped forward (landscape.engine.batched_points).
Every finished block of points is flushed to the file before it is marked done, so a killed run
resumes with `resume=True` and computes only what is missing. Under torch.distributed the grid
points are split across ranks (each evaluating its points on the whole measurement set) and
rank 0 alone writes the file (with data-parallel objectives every rank evaluates every point).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None
import numpy as np
import torch
import torch.distributed as dist

import landscape
from landscape.engine import distributed as ranks
from landscape.engine.batched_points import PointEvaluator
from landscape.engine.batched_points import points_per_call as resolve_points_per_call
from landscape.engine.objective import Objective
from landscape.engine.params import tensor_digest
from landscape.engine.progress import Progress
from landscape.engine.recalibration import recalibration_inputs
from landscape.results import Result, to_jsonable
from landscape.surfaces.directions import Directions
from landscape.surfaces.quantities import QUANTITIES, SurfacePoint, extra_quantities

if TYPE_CHECKING:  # h5py is imported where a file is read or written: `landscape --help` stays fast
    import h5py

FORMAT = "landscape-surface"
VERSION = 1
FLUSH_SECONDS = 1.0  # a block of points grows until it takes about this long; a kill loses at most one block
COST_KEYS = ("seconds", "forwards", "backwards")  # per point: wall time, forward and backward passes over the measurement sets


class SurfaceError(ValueError):
    """A surface file that cannot be written, read or resumed: the message names the file and the fix."""


@dataclass(frozen=True)
class Surface(Result):
    """Loss and accuracy on a 1-D or 2-D grid, per split; NaN where a point is not computed yet.

    `loss[split]` and `accuracy[split]` have shape (len(axes[0]),) or (len(axes[0]), len(axes[1]));
    entry [i, j] is the point `origin + axes[0][i]·d_0 + axes[1][j]·d_1`. `quantities[name][split]`
    holds any other quantity evaluated per point (e.g. "grad-norm"), and `cost["seconds" | "forwards" |
    "backwards"]` what each point cost (wall seconds; forward and backward passes over the measurement
    sets, summed over the splits).
    """

    axes: tuple[np.ndarray, ...]
    loss: dict[str, np.ndarray]
    accuracy: dict[str, np.ndarray]
    done: np.ndarray
    directions: Directions
    metadata: dict
    path: str | None = None
    quantities: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    cost: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return len(self.axes)

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def to_dict(self) -> dict:
        return to_jsonable(
            {
                "path": self.path,
                "axes": self.axes,
                "loss": self.loss,
                "accuracy": self.accuracy,
                "quantities": self.quantities,
                "cost": self.cost,
                "n_done": int(self.done.sum()),
                "n_points": int(self.done.size),
                "directions": self.directions.to_dict(),
                "metadata": self.metadata,
            }
        )


def grid_axis(start: float, stop: float, num: int) -> np.ndarray:
    """`num` evenly spaced values from start to stop, computed so a symmetric odd grid holds exactly 0.

    Args:
        start: the first value.
        stop: the last value, greater than start.
        num: how many values, at least 2.

    Returns:
        np.ndarray: the float64 values; entry i is start + (stop − start)·i/(num − 1).

    Raises:
        SurfaceError: fewer than 2 points, or start ≥ stop.

    Examples:
        >>> grid_axis(-1, 1, 5)
        array([-1. , -0.5,  0. ,  0.5,  1. ])
    """
    if num < 2:
        raise SurfaceError(f"a grid axis needs at least 2 points, got {num}")
    if not start < stop:
        raise SurfaceError(f"a grid axis needs start < stop, got {start}:{stop}")
    return np.array([start + (stop - start) * (i / (num - 1)) for i in range(num)])


def compute_surface(
    objectives: Objective | Mapping[str, Objective],
    directions: Directions,
    axes: Sequence[Sequence[float]],
    *,
    path: str | os.PathLike | None = None,
    resume: bool = False,
    bn_recalibration: int | None = None,
    progress: bool | str = False,
    points_per_call: int | str = "auto",
    quantities: Sequence[str] = ("loss", "accuracy"),
) -> Surface:
    """Loss and accuracy (and any registered quantity) at every grid point, for each objective (one per split).

    The loss-surface plots of Li et al. (2018) (with filter-normalized `random_directions`) and the
    1-D interpolations of Goodfellow, Vinyals & Saxe (2015) and Keskar et al. (2017) (with
    `between`). Point c is origin + Σ_j c_j·d_j, evaluated through the Objective's functional
    forward pass (no model copies); under torch.distributed the points are split across ranks and
    rank 0 writes the file. Points where the loss diverges are stored as inf/NaN.

    Args:
        objectives: an Objective, or {split name: Objective} over one checkpoint (e.g. train and test).
        directions: 1 or 2 directions (landscape.surfaces.directions), one per axis.
        axes: one grid per direction (e.g. `grid_axis(-1, 1, 51)`).
        path: an HDF5 file the results go to as they finish (blocks flushed before they are marked
            done, so a killed run loses at most about a second); None: memory only.
        resume: finish an existing `path`, computing only the missing points; refused unless it was
            made with the same checkpoint, data, measurement set, directions, grid and options.
            Without resume an existing file is refused.
        bn_recalibration: k: re-estimate BN running statistics at each point from the first k
            batches of the first objective (the train split); None: the checkpoint's statistics.
        progress: a progress bar (True, or a label), off by default.
        points_per_call: grid points per vmapped forward (landscape.engine.batched_points); "auto": 1 on
            a CPU, as many as fit on a GPU. The values and the file do not depend on it.
        quantities: what to evaluate per point: loss and accuracy always (one forward pass gives both),
            plus any name of landscape.surfaces.quantities.QUANTITIES, e.g. "grad-norm" (‖∇L‖₂: one more
            forward and one backward pass per point and split, about 3× the time of loss alone).

    Returns:
        Surface: `axes`, `loss[split]` and `accuracy[split]` of shape (len(axes[0]),) or
            (len(axes[0]), len(axes[1])), `quantities[name][split]` likewise, the `done` mask, each
            point's `cost` (seconds, forward and backward passes), the directions, metadata
            (measurement set, checkpoint, options) and the file's `path`.

    Raises:
        SurfaceError: mismatched axes, directions or objectives, or a file that exists (without
            resume), does not match (with resume), is held by another run, or cannot be written.

    Examples:
        L(w) = ((2w₁ − 2)² + (w₂ − 1)²)/2 at w = (1, 1), along the line to w' = (0, 1): 2α².

        >>> import torch
        >>> from torch import nn
        >>> from landscape.surfaces.directions import between
        >>> from landscape.examples import quadratic
        >>> objective = quadratic()
        >>> other = nn.Linear(2, 1, bias=False)
        >>> _ = other.weight.data.copy_(torch.tensor([[0.0, 1.0]]))
        >>> surface = compute_surface(objective, between(objective, other), [grid_axis(-1, 1, 3)])
        >>> surface.loss["train"], surface.complete
        (array([2., 0., 2.]), True)

        Accuracy is NaN here: a regression target has none.
    """
    objectives = {"train": objectives} if isinstance(objectives, Objective) else dict(objectives)
    axes = tuple(np.asarray(a, dtype=np.float64) for a in axes)
    _check_inputs(objectives, directions, axes)
    grid = evaluate_grid(
        objectives,
        directions,
        np.array(list(itertools.product(*axes))),
        axes,
        tuple(len(a) for a in axes),
        path=path,
        resume=resume,
        bn_recalibration=bn_recalibration,
        progress=progress,
        points_per_call=points_per_call,
        quantities=quantities,
    )
    return Surface(axes, *grid)


class GridValues(NamedTuple):
    """What `evaluate_grid` returns, in Surface's field order after the axes."""

    loss: dict[str, np.ndarray]
    accuracy: dict[str, np.ndarray]
    done: np.ndarray
    directions: Directions
    metadata: dict
    path: str | None
    quantities: dict[str, dict[str, np.ndarray]]
    cost: dict[str, np.ndarray]


def evaluate_grid(
    objectives: dict[str, Objective],
    directions: Directions,
    points: np.ndarray,
    axes: tuple[np.ndarray, ...],
    shape: tuple[int, ...],
    *,
    path: str | os.PathLike | None,
    resume: bool,
    bn_recalibration: int | None,
    progress: bool | str,
    points_per_call: int | str,
    quantities: Sequence[str],
    layout: dict | None = None,
) -> GridValues:
    """The engine under `compute_surface` and `compute_spread`: every point (a row of `points`, coordinates along
    the rows of `directions.vectors`, in the C order of `shape`) evaluated, written to `path` as it finishes.

    `layout` (JSON) describes a file that is not a plain surface (a spread over directions); it is stored and must
    match on resume. Returns the arrays of shape `shape` in Surface's field order (after the axes).
    """
    first = next(iter(objectives.values()))
    extras = extra_quantities(quantities)
    inputs = recalibration_inputs(first, bn_recalibration) if bn_recalibration else None
    per_call = resolve_points_per_call(list(objectives.values()), points_per_call)
    fingerprint = _fingerprint(objectives, directions, axes, bn_recalibration)
    if extras:  # files of loss and accuracy alone keep the fingerprint they always had
        fingerprint["quantities"] = list(extras)
    if layout is not None:
        fingerprint["layout"] = to_jsonable(layout)
    metadata = {
        "splits": {s: o.describe() for s, o in objectives.items()},
        "bn_recalibration": bn_recalibration,
        "points_per_call": per_call,
        "quantities": ["loss", "accuracy", *extras],
        "library_version": landscape.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    values = {f"{s}/{q}": np.full(shape, np.nan) for s in objectives for q in ("loss", "accuracy", *extras)}
    values.update({f"cost/{k}": np.full(shape, np.nan) for k in COST_KEYS})
    done = np.zeros(shape, dtype=bool)

    rank = ranks.rank()
    # data-parallel objectives already split the samples: every rank evaluates every point together
    shards = 1 if any(o.distributed for o in objectives.values()) else ranks.world_size()
    store = None
    if rank == 0:
        try:
            if path is not None:
                attrs = {"splits": list(objectives), "quantities": list(extras), "layout": layout}
                store = _SurfaceFile.open_or_create(Path(path), resume, fingerprint, metadata, directions, axes, values, attrs)
                values, done = store.read_values(values), store.read_done()
            state = ("ok", values, done)
        except (SurfaceError, OSError) as error:
            state = ("error", str(error), None)
    else:
        state = None
    status, values, done = _broadcast(state)
    if status == "error":
        raise SurfaceError(values)

    pending = [int(i) for i in np.flatnonzero(~done.reshape(-1))]
    origin = first.w.detach().clone()
    origin_buffers = {n: b for n, b in first.model.named_buffers() if n in directions.buffers}
    coords = torch.as_tensor(points, dtype=first.dtype, device=first.device)
    evaluators = {split: PointEvaluator(o) for split, o in objectives.items()}
    recalibration = len(inputs) / first.n_batches if inputs else 0.0  # passes over the first split's set
    per_rank = per_call
    with Progress(len(points), "surface", "point", progress, initial=len(points) - len(pending)) as bar:
        while pending:
            block, pending = pending[: per_rank * shards], pending[per_rank * shards :]
            start = time.perf_counter()
            mine = []
            for call in _calls(block[rank % shards :: shards], per_call):
                rows = _evaluate_points(evaluators, directions, origin, origin_buffers, coords[call], inputs, extras)
                for row in rows:
                    row["cost/forwards"] += recalibration
                mine.extend(zip(call, rows))
            part = (mine, time.perf_counter() - start)
            gathered = ranks.all_gather(part) if shards > 1 else [part]
            results = [r for chunk, _ in gathered for r in chunk]
            for i, row in results:
                for key, v in row.items():
                    values[key].reshape(-1)[i] = v
                done.reshape(-1)[i] = True
            if store is not None:
                store.write(values, done)
            bar.update(len(results))
            if max(seconds for _, seconds in gathered) < FLUSH_SECONDS / 2:
                per_rank = min(2 * per_rank, max(1024, per_call))
    if store is not None:
        store.close()
    loss = {s: values[f"{s}/loss"] for s in objectives}
    accuracy = {s: values[f"{s}/accuracy"] for s in objectives}
    extra = {q: {s: values[f"{s}/{q}"] for s in objectives} for q in extras}
    cost = {k: values[f"cost/{k}"] for k in COST_KEYS}
    return GridValues(loss, accuracy, done, directions, metadata, None if path is None else str(path), extra, cost)


def read_surface(path: str | os.PathLike, reader: Callable[[tuple, GridValues, dict | None], object] | None = None) -> Surface:
    """A surface (complete or not) from its HDF5 file; refuses files that are not landscape surfaces.

    The file is read without HDF5's lock, so a surface can be read (plotted) while a run is
    still writing it; points not computed yet are NaN and False in `done`.

    Args:
        path: a file written by `compute_surface` (or `landscape surface`).
        reader: builds the result from (axes, GridValues, the file's layout) instead, for files of another
            layout (`read_spread` passes one); None: a plain surface, refusing other layouts.

    Returns:
        Surface: the axes, losses, accuracies, done mask, directions (vectors included) and
            metadata stored in the file.

    Raises:
        SurfaceError: no such file, not HDF5, or not a landscape surface file.

    Examples:
        A file written by `compute_surface` reads back whole, directions included:

        >>> import os, tempfile
        >>> from landscape.surfaces.directions import random_directions
        >>> from landscape.examples import quadratic
        >>> objective, folder = quadratic(), tempfile.TemporaryDirectory()
        >>> path = os.path.join(folder.name, "line.h5")
        >>> written = compute_surface(objective, random_directions(objective, 1, seed=0), [grid_axis(-1, 1, 5)], path=path)
        >>> surface = read_surface(path)
        >>> bool((surface.loss["train"] == written.loss["train"]).all()), surface.directions.kind, surface.complete
        (True, 'random', True)
        >>> folder.cleanup()
    """
    path = Path(path)
    if not path.exists():
        raise SurfaceError(f"{path}: no such file")
    import h5py

    try:  # without HDF5's file lock, so a surface can be read (plotted) while a run is still writing it
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("format") != FORMAT:
                raise SurfaceError(f"{path} is not a landscape surface file (no format={FORMAT!r} attribute)")
            axes = tuple(f["axes"][name][()] for name in sorted(f["axes"]))
            if "layout" in f.attrs and reader is None:
                kind = json.loads(f.attrs["layout"]).get("kind")
                raise SurfaceError(f"{path} holds a {kind}, not one surface; read it with read_{kind}")
            splits = [s for s in json.loads(f.attrs["splits"])]
            extras = json.loads(f.attrs.get("quantities", "[]"))
            loss = {s: f[s]["loss"][()] for s in splits}
            accuracy = {s: f[s]["accuracy"][()] for s in splits}
            quantities = {q: {s: f[s][q][()] for s in splits} for q in extras}
            cost = {k: f["cost"][k][()] for k in COST_KEYS if f"cost/{k}" in f}
            done = f["done"][()].astype(bool)
            directions = _read_directions(f["directions"])
            metadata = json.loads(f.attrs["metadata"])
            layout = json.loads(f.attrs["layout"]) if "layout" in f.attrs else None
    except OSError as error:
        raise SurfaceError(f"{path} cannot be read as HDF5 ({error}); is it a surface file?") from error
    grid = GridValues(loss, accuracy, done, directions, metadata, str(path), quantities, cost)
    if reader is not None:
        return reader(axes, grid, layout)
    return Surface(axes, *grid)


# ------------------------------------------------------------------ evaluation
def _check_inputs(objectives: dict[str, Objective], directions: Directions, axes: tuple[np.ndarray, ...]) -> None:
    if not objectives:
        raise SurfaceError("give at least one objective (split)")
    if len(axes) != directions.dim:
        raise SurfaceError(f"{len(axes)} grid axes for {directions.dim} directions")
    first = next(iter(objectives.values()))
    for split, objective in objectives.items():
        if objective.n_params != directions.vectors.shape[1]:
            raise SurfaceError(
                f"directions have {directions.vectors.shape[1]} parameters, the {split} objective {objective.n_params}"
            )
        if not torch.equal(objective.w, first.w):
            raise SurfaceError(f"the {split} objective is at a different point than the first: give objectives of one checkpoint")


def _calls(indices: list[int], per_call: int) -> list[list[int]]:
    """Consecutive groups of at most `per_call` point indices: one evaluation call each."""
    return [indices[i : i + per_call] for i in range(0, len(indices), per_call)]


def _point_state(
    objective: Objective,
    directions: Directions,
    origin: torch.Tensor,
    origin_buffers: dict[str, torch.Tensor],
    c: torch.Tensor,
    inputs: list[torch.Tensor] | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weights origin + Σ c_j d_j (exactly the origin when c = 0) and the buffers that point replaces."""
    w = torch.addmv(origin, directions.vectors.T, c)
    buffers = {n: origin_buffers[n] + torch.tensordot(c, d, dims=1) for n, d in directions.buffers.items()}
    if inputs is not None:
        buffers.update(objective.bn_statistics(w, inputs))
    return w, buffers


def _evaluate_points(
    evaluators: dict[str, PointEvaluator],
    directions: Directions,
    origin: torch.Tensor,
    origin_buffers: dict[str, torch.Tensor],
    coords: torch.Tensor,
    inputs: list[torch.Tensor] | None,
    extras: Sequence[str] = (),
) -> list[dict[str, float]]:
    """Loss and accuracy of each split at each row of `coords`, all of them in one evaluation call per split; then
    each extra quantity point by point; and what each point cost (a call's time is shared by its points)."""
    start = time.perf_counter()
    first = next(iter(evaluators.values())).objective
    states = [_point_state(first, directions, origin, origin_buffers, c, inputs) for c in coords]
    W = torch.stack([w for w, _ in states])
    buffers = {n: torch.stack([b[n] for _, b in states]) for n in states[0][1]}
    rows: list[dict[str, float]] = [{} for _ in states]
    for split, evaluator in evaluators.items():
        for row, evaluation in zip(rows, evaluator.evaluate(W, buffers or None)):
            row[f"{split}/loss"] = evaluation.loss
            row[f"{split}/accuracy"] = np.nan if evaluation.accuracy is None else evaluation.accuracy
    shared = (time.perf_counter() - start) / len(rows)
    quantities = [QUANTITIES[q] for q in extras]
    for row, (w, point_buffers), c in zip(rows, states, coords.tolist()):
        start = time.perf_counter()
        for split, evaluator in evaluators.items():
            for name, quantity in zip(extras, quantities):
                point = SurfacePoint(evaluator.objective, w, point_buffers or None, tuple(c))
                row[f"{split}/{name}"] = quantity.function(point)
        row["cost/seconds"] = shared + time.perf_counter() - start
        row["cost/forwards"] = len(evaluators) * (1 + sum(q.forward_passes for q in quantities))
        row["cost/backwards"] = len(evaluators) * sum(q.backward_passes for q in quantities)
    return rows


def _fingerprint(
    objectives: dict[str, Objective], directions: Directions, axes: tuple[np.ndarray, ...], bn_recalibration: int | None
) -> dict:
    """What must match for a file to be resumed: weights, data, measurement set, directions, grid, options."""
    keep = ("data", "measurement", "n_samples", "batch_sizes", "mode", "params", "n_params", "dtype")
    first = next(iter(objectives.values()))
    return to_jsonable(
        {
            "weights": tensor_digest(first.model.state_dict()),
            "splits": {
                s: {**{k: o.describe().get(k) for k in keep}, "samples": _samples_digest(o)} for s, o in objectives.items()
            },
            "directions": directions.fingerprint(),
            "axes": [a.tolist() for a in axes],
            "bn_recalibration": bn_recalibration,
        }
    )


def _samples_digest(objective: Objective) -> str:
    """Digest of the measurement set's inputs and targets, batch by batch in the global order.

    A sharded objective gathers every rank's batch digests (rank r holds batches r, r+world, ...),
    so a file started under torchrun resumes in one process, and the other way round.
    """
    batches = [tensor_digest(_named_tensors(batch)) for batch in objective.batches]
    if objective.distributed:
        batches = ranks.unshard(batches, objective.n_batches)
    return hashlib.sha256("".join(batches).encode()).hexdigest()


# ------------------------------------------------------------- distribution
def _broadcast(obj: object) -> object:
    """Rank 0's object on every rank (itself when not distributed)."""
    if ranks.world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------- storage
@dataclass(frozen=True)
class Fingerprint:
    """What a resumable file must have been written for: its format, the settings that change its numbers
    (`fingerprint`) and a readable account of them (`metadata`, named in a refusal); `names` renames a setting's
    key for the refusal."""

    format: str
    what: str  # "surface", "curve": said when another kind of file is in the way
    fingerprint: dict
    metadata: dict
    names: dict[str, str] = field(default_factory=dict)


def open_resumable(path: Path, resume: bool, create: Callable[[], None], expected: Fingerprint) -> tuple[h5py.File, _Lock]:
    """`path` locked for this process (a second run on it fails at once, naming it) and open for writing: created
    by `create()` when new, and an existing file only with `resume` and written for `expected`, else refused in one
    line naming the first difference."""
    lock = _Lock(path)
    try:
        if not path.exists():
            create()
            return _open(path, "r+"), lock
        if not resume:
            raise SurfaceError(f"{path} exists; pass resume=True to finish it, or choose another path=...")
        file = _open(path, "r+")
        try:
            _check(file, path, expected)
        except BaseException:
            file.close()
            raise
        return file, lock
    except BaseException:
        lock.release()
        raise


def _check(file: h5py.File, path: Path, expected: Fingerprint) -> None:
    if file.attrs.get("format") != expected.format:
        raise SurfaceError(f"{path} is not a landscape {expected.what} file; choose another path=...")
    stored = json.loads(file.attrs["fingerprint"])
    if stored != expected.fingerprint:
        stored_metadata = json.loads(file.attrs["metadata"])
        name, values = _describe_difference(stored, expected.fingerprint, stored_metadata, expected.metadata)
        raise SurfaceError(
            f"{path} does not match this run ({expected.names.get(name, name)} differs: {values}); it cannot be "
            "resumed with these settings (choose another path=..., or delete the file to start over)"
        )


class _SurfaceFile:
    """The HDF5 file of one surface: preallocated arrays, a done mask written after the values it covers."""

    def __init__(self, path: Path, file: h5py.File, lock: _Lock) -> None:
        self.path, self.file, self.lock = path, file, lock
        self.last_flush = time.perf_counter()

    @classmethod
    def open_or_create(
        cls,
        path: Path,
        resume: bool,
        fingerprint: dict,
        metadata: dict,
        directions: Directions,
        axes: tuple[np.ndarray, ...],
        values: dict[str, np.ndarray],
        attrs: dict,
    ) -> _SurfaceFile:
        """The file, locked for this process until `close` (a second run on it fails at once, naming it)."""
        file, lock = open_resumable(
            path,
            resume,
            lambda: _create(path, fingerprint, metadata, directions, axes, values, attrs),
            Fingerprint(FORMAT, "surface", fingerprint, metadata),
        )
        return cls(path, file, lock)

    def read_values(self, empty: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The stored arrays of every key of `empty`; a key the file lacks (the per-point cost, in a file written
        before it was recorded) is added to it from `empty`."""
        for key, array in empty.items():
            if key not in self.file:
                self.file.create_dataset(key, data=array)
        return {key: self.file[key][()] for key in empty}

    def read_done(self) -> np.ndarray:
        return self.file["done"][()].astype(bool)

    def write(self, values: dict[str, np.ndarray], done: np.ndarray) -> None:
        """Values first, flushed; then the done mask, flushed: a kill never marks an unwritten point done."""
        for key, array in values.items():
            self.file[key][...] = array  # whole arrays: a few KB, one contiguous write each
        self.file.flush()
        self.file["done"][...] = done.astype(np.uint8)
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        self.lock.release()


class _Lock:
    """An advisory lock (fcntl.flock) on PATH.lock, held while one process writes PATH, holding its process id.

    HDF5 locks the file itself too, but only while it is open and with an error that names neither
    the file's use nor the fix; this lock covers creating the file as well (two runs racing to
    create it) and says who holds it. It goes when the process ends, however it ends, and when
    the lock is garbage (a run that raised midway): it is a Python file object, closed then.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")
        self.file = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SurfaceError(f"cannot create the folder of {path}: {error.strerror}") from error
        if fcntl is None:  # no flock (Windows): unlocked, as before
            return
        try:
            while self.file is None:
                file = open(self.path, "a+b", buffering=0)
                try:
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    file.seek(0)
                    owner = file.read(32).decode(errors="replace").strip()
                    file.close()
                    raise SurfaceError(
                        f"{path} is in use by another landscape run{f' (process {owner})' if owner else ''}; "
                        "wait for it to finish, or choose another path=..."
                    ) from None
                if self._still_linked(file):  # else its last holder removed it between our open and our lock: retry
                    self.file = file
                else:
                    file.close()
            self.file.truncate(0)
            self.file.write(str(os.getpid()).encode())
        except OSError as error:
            raise SurfaceError(f"cannot lock {path} (through {self.path.name}): {error.strerror or error}") from error

    def _still_linked(self, file) -> bool:
        try:
            return os.path.samestat(os.stat(self.path), os.fstat(file.fileno()))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.file is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting opener then sees a stale file and retries
            self.file.close()
            self.file = None


def _open(path: Path, mode: str) -> h5py.File:
    import h5py

    try:
        return h5py.File(path, mode)
    except OSError as error:
        raise SurfaceError(f"{path} cannot be opened as HDF5 ({error}); is it a surface file?") from error


def _create(
    path: Path,
    fingerprint: dict,
    metadata: dict,
    directions: Directions,
    axes: tuple[np.ndarray, ...],
    values: dict[str, np.ndarray],
    attrs: dict,
) -> None:
    """Write the whole empty file under a temporary name, then rename: a kill leaves no half-made file.
    Its folder exists: the file's lock made it."""
    import h5py

    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["fingerprint"] = json.dumps(fingerprint)
            f.attrs["metadata"] = json.dumps(to_jsonable(metadata))
            f.attrs["splits"] = json.dumps(attrs["splits"])
            if attrs.get("quantities"):
                f.attrs["quantities"] = json.dumps(attrs["quantities"])
            if attrs.get("layout") is not None:
                f.attrs["layout"] = json.dumps(to_jsonable(attrs["layout"]))
            for name, axis in zip("xy", axes):
                f.create_dataset(f"axes/{name}", data=axis)
            for key, array in values.items():
                f.create_dataset(key, data=array)
            f.create_dataset("done", data=np.zeros(array.shape, dtype=np.uint8))
            _write_directions(f.create_group("directions"), directions)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise SurfaceError(f"cannot write {path}: {error.strerror or error}") from error


def _write_directions(group: h5py.Group, directions: Directions) -> None:
    group.attrs["kind"] = directions.kind
    group.attrs["spec"] = json.dumps(to_jsonable(directions.spec))
    group.attrs["labels"] = json.dumps(list(directions.labels))
    group.create_dataset("vectors", data=directions.vectors.detach().cpu().numpy())
    for name, tensor in directions.buffers.items():
        group.create_dataset(f"buffers/{name}", data=tensor.detach().cpu().numpy())
    if directions.trajectory is not None:
        group.create_dataset("trajectory", data=directions.trajectory)


def _read_directions(group: h5py.Group) -> Directions:
    buffers = {name: torch.from_numpy(d[()]) for name, d in group["buffers"].items()} if "buffers" in group else {}
    trajectory = group["trajectory"][()] if "trajectory" in group else None
    return Directions(
        torch.from_numpy(group["vectors"][()]),
        group.attrs["kind"],
        json.loads(group.attrs["spec"]),
        buffers,
        trajectory,
        tuple(json.loads(group.attrs["labels"])),
    )


# fingerprint fields in the order a difference is reported: the cause before what follows from it
# (new weights also give new filter-normalized directions)
FIELD_ORDER = ("weights", "splits", "axes", "bn_recalibration", "directions")


def _first_difference(a: object, b: object, prefix: str = "") -> tuple[str, object, object]:
    """The dotted key path of the first difference between two JSON values, and both values there."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=lambda k: (FIELD_ORDER.index(k) if k in FIELD_ORDER else len(FIELD_ORDER), k))
        for key in keys:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
    return prefix or "setting", a, b


def _describe_difference(stored: dict, asked: dict, stored_metadata: dict, metadata: dict) -> tuple[str, str]:
    """The first differing setting and both its values, short: ("axes", "-1:1:51 in the file, -1:1:41 asked")."""
    field, before, now = _first_difference(stored, asked)
    if field == "weights":
        before, now = (_checkpoint_hash(m, digest) for m, digest in ((stored_metadata, before), (metadata, now)))
        return "checkpoint", f"sha256 {before} in the file, {now} now"
    if field == "axes":
        before, now = (" × ".join(f"{a[0]:g}:{a[-1]:g}:{len(a)}" for a in axes) for axes in (before, now))
    return field, f"{_short(before)} in the file, {_short(now)} asked"


def _checkpoint_hash(metadata: dict, weights_digest: str) -> str:
    """The checkpoint file's SHA-256 as the surface recorded it (12 digits), else its weights' digest."""
    splits = metadata.get("splits") or {}
    file_hash = next((s.get("checkpoint_sha256") for s in splits.values() if s.get("checkpoint_sha256")), None)
    return str(file_hash or weights_digest)[:12]


def _short(value: object, limit: int = 60) -> str:
    """A JSON value in at most `limit` characters; hex digests cut to 12 digits."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _named_tensors(batch) -> dict[str, torch.Tensor]:
    """A batch's tensors by name: {"x", "y"} for a pair (the digests of files written before other batches existed)."""
    if isinstance(batch, dict):
        return {f"{k}": v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if isinstance(batch, tuple) and len(batch) == 2:
        return {"x": batch[0], "y": batch[1]}
    return {f"{i}": v for i, v in enumerate(batch) if isinstance(v, torch.Tensor)}
