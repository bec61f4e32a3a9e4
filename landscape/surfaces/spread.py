"""The spread of 1-D curves (or 2-D planes) over N random filter-normalized directions, in one resumable HDF5 file.

One random direction can be lucky: Li et al. (2018) draw a single filter-normalized direction per
figure. Member k of a spread is exactly the surface `random_directions(objective, dim, seed=seed + k)`
gives, so any member can be redrawn alone; the spread reports the median curve with a quantile band,
and a summary number with its spread: the sharpness radius at a loss rise Δ (per direction the |α|
where the loss first exceeds L0 + Δ; per plane the radius of the disc whose area the origin's
sublevel set {L ≤ L0 + Δ} covers), as a median and interquartile range over the members.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from landscape.engine.objective import Objective
from landscape.results import Result, to_jsonable
from landscape.surfaces.directions import Directions, random_directions
from landscape.surfaces.surface import GridValues, Surface, SurfaceError, evaluate_grid, read_surface

DEFAULT_DIRECTIONS = 10
DEFAULT_BAND = (0.1, 0.9)  # the band drawn around the median: 10th to 90th percentile over the directions


@dataclass(frozen=True)
class Spread(Surface):
    """N members (1-D curves or 2-D planes), member k along the random direction(s) of seed `seeds[k]`.

    The fields are Surface's, with a leading member axis: `loss[split]`, `accuracy[split]`,
    `quantities[name][split]`, `done` and `cost[...]` have shape (N, *grid); `directions` holds the
    N·dim vectors, member k's in rows k·dim … k·dim + dim − 1.
    """

    @property
    def n(self) -> int:
        return self.done.shape[0]

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.directions.spec["seeds"])

    def member(self, k: int) -> Surface:
        """Member k as the Surface its seed alone gives (same directions, grid and values)."""
        rows = self.directions.vectors[k * self.dim : (k + 1) * self.dim]
        buffers = {n: b[k * self.dim : (k + 1) * self.dim] for n, b in self.directions.buffers.items()}
        spec = {**{key: v for key, v in self.directions.spec.items() if key not in ("seeds", "dim")}, "seed": self.seeds[k]}
        return Surface(
            self.axes,
            {s: v[k] for s, v in self.loss.items()},
            {s: v[k] for s, v in self.accuracy.items()},
            self.done[k],
            Directions(rows, "random", spec, buffers),
            self.metadata,
            self.path,
            {q: {s: v[k] for s, v in per.items()} for q, per in self.quantities.items()},
            {c: v[k] for c, v in self.cost.items()},
        )

    def median(self, split: str = "train", quantity: str = "loss") -> np.ndarray:
        """The pointwise median over the members (NaN where no member is computed yet)."""
        return _nan_quantile(self._values(split, quantity), 0.5)

    def band(
        self, split: str = "train", quantity: str = "loss", quantiles: tuple[float, float] = DEFAULT_BAND
    ) -> tuple[np.ndarray, np.ndarray]:
        """The pointwise (low, high) quantiles over the members: the 10th and 90th percentile by default."""
        values = self._values(split, quantity)
        return _nan_quantile(values, quantiles[0]), _nan_quantile(values, quantiles[1])

    def _values(self, split: str, quantity: str) -> np.ndarray:
        table = {"loss": self.loss, "accuracy": self.accuracy, **self.quantities}
        if quantity not in table:
            raise SurfaceError(f"this spread has no {quantity!r} (it has {', '.join(table)})")
        if split not in table[quantity]:
            raise SurfaceError(f"this spread has no {split} split (it has {', '.join(table[quantity])})")
        return np.asarray(table[quantity][split], dtype=float)

    def to_dict(self) -> dict:
        return to_jsonable(
            {
                "path": self.path,
                "n_directions": self.n,
                "seeds": self.seeds,
                "axes": self.axes,
                "loss": self.loss,
                "accuracy": self.accuracy,
                "quantities": self.quantities,
                "cost": self.cost,
                "median": {s: self.median(s) for s in self.loss},
                "band": {"quantiles": DEFAULT_BAND, **{s: self.band(s) for s in self.loss}},
                "n_done": int(self.done.sum()),
                "n_points": int(self.done.size),
                "directions": self.directions.to_dict(),
                "metadata": self.metadata,
            }
        )


@dataclass(frozen=True)
class SharpnessRadius(Result):
    """The sharpness radius at loss level L0 + Δ over a spread's members: per member, and median with IQR.

    1-D: per direction, the |α| where the loss first exceeds the level walking out from the origin
    (either side, linearly interpolated between grid points). 2-D: per plane, √(area/π) of the sublevel
    set {L ≤ L0 + Δ} connected to the origin (grid cells, 4-neighbours). A member whose loss stays under
    the level on the whole grid (1-D) or whose set reaches the grid's edge (2-D) is censored: its radius
    is only a lower bound (inf in 1-D, the grid's value in 2-D), and `n_censored` counts them.
    """

    rise: float
    level: float
    loss_at_origin: float
    split: str
    dim: int
    radii: np.ndarray
    areas: np.ndarray | None
    censored: np.ndarray
    median: float
    q25: float
    q75: float

    @property
    def n_censored(self) -> int:
        return int(self.censored.sum())

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    def to_dict(self) -> dict:
        return {**super().to_dict(), "n_censored": self.n_censored, "iqr": self.iqr}


def spread_directions(
    objective: Objective,
    n: int = DEFAULT_DIRECTIONS,
    dim: int = 1,
    *,
    seed: int = 0,
    normalization: str = "filter",
    one_d: str = "ignore",
    states: bool = False,
) -> Directions:
    """N members' filter-normalized random directions (Li et al. 2018), member k's from seed + k, stacked.

    Member k's rows are exactly `random_directions(objective, dim, seed=seed + k, ...)`'s.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise SurfaceError(f"a spread needs at least 2 directions, got {n!r}")
    members = [
        random_directions(objective, dim, seed=seed + k, normalization=normalization, one_d=one_d, states=states)
        for k in range(n)
    ]
    buffers = {name: torch.cat([m.buffers[name] for m in members]) for name in members[0].buffers}
    spec = {**{k: v for k, v in members[0].spec.items() if k != "seed"}, "seeds": [seed + k for k in range(n)], "dim": dim}
    return Directions(torch.cat([m.vectors for m in members]), "random", spec, buffers)


def compute_spread(
    objectives: Objective | Mapping[str, Objective],
    axes: Sequence[Sequence[float]],
    *,
    n: int = DEFAULT_DIRECTIONS,
    seed: int = 0,
    normalization: str = "filter",
    one_d: str = "ignore",
    states: bool = False,
    path: str | os.PathLike | None = None,
    resume: bool = False,
    bn_recalibration: int | None = None,
    progress: bool | str = False,
    points_per_call: int | str = "auto",
    quantities: Sequence[str] = ("loss", "accuracy"),
) -> Spread:
    """The surface along each of N random filter-normalized directions (Li et al. 2018), one file, resumable.

    Member k is the 1-D curve (one axis) or 2-D plane (two axes) of `random_directions(..., seed=seed + k)`,
    evaluated exactly as `compute_surface` would (the same points, the same numbers); the N members cost
    N surfaces. Options as in `compute_surface` and `random_directions`.

    Args:
        objectives: an Objective, or {split: Objective} over one checkpoint.
        axes: one grid (curves) or two (planes), each member's.
        n: the number of directions (members), at least 2.
        seed: member k's seed is seed + k.
        normalization: as in `random_directions`.
        one_d: as in `random_directions`.
        states: as in `random_directions`.
        path: as in `compute_surface`.
        resume: as in `compute_surface`.
        bn_recalibration: as in `compute_surface`.
        progress: as in `compute_surface`.
        points_per_call: as in `compute_surface`.
        quantities: as in `compute_surface`.

    Returns:
        Spread: values of shape (n, *grid), `median`/`band` over the members, `member(k)`.

    Raises:
        SurfaceError: fewer than 2 directions, more than 2 axes, or a file that cannot be written or resumed.

    Examples:
        L(w) = ((2w₁ − 2)² + (w₂ − 1)²)/2 at its minimum w = (1, 1), along three filter-normalized directions:

        >>> from landscape.examples import quadratic
        >>> from landscape.surfaces.surface import grid_axis
        >>> spread = compute_spread(quadratic(), [grid_axis(-1, 1, 3)], n=3)
        >>> spread.loss["train"].shape, spread.median().round(3).tolist()
        ((3, 3), [3.58, 0.0, 3.58])
    """
    objectives = {"train": objectives} if isinstance(objectives, Objective) else dict(objectives)
    axes = tuple(np.asarray(a, dtype=np.float64) for a in axes)
    if len(axes) not in (1, 2):
        raise SurfaceError(f"a spread holds curves (1 axis) or planes (2 axes), got {len(axes)} axes")
    if not objectives:
        raise SurfaceError("give at least one objective (split)")
    first = next(iter(objectives.values()))
    dim = len(axes)
    directions = spread_directions(first, n, dim, seed=seed, normalization=normalization, one_d=one_d, states=states)
    grid = np.array(np.meshgrid(*axes, indexing="ij")).reshape(dim, -1).T  # (P, dim), C order of the grid
    points = np.zeros((n * len(grid), n * dim))
    for k in range(n):
        points[k * len(grid) : (k + 1) * len(grid), k * dim : (k + 1) * dim] = grid
    layout = {"kind": "spread", "n": n, "dim": dim, "seeds": directions.spec["seeds"]}
    values = evaluate_grid(
        objectives,
        directions,
        points,
        axes,
        (n, *(len(a) for a in axes)),
        path=path,
        resume=resume,
        bn_recalibration=bn_recalibration,
        progress=progress,
        points_per_call=points_per_call,
        quantities=quantities,
        layout=layout,
    )
    return Spread(axes, *values)


def read_spread(path: str | os.PathLike) -> Spread:
    """A spread (complete or not) from its HDF5 file; refuses plain surface files (read them with read_surface)."""

    def build(axes: tuple, grid: GridValues, layout: dict | None) -> Spread:
        if not layout or layout.get("kind") != "spread":
            raise SurfaceError(f"{path} is one surface, not a spread over directions; read it with read_surface")
        return Spread(axes, *grid)

    return read_surface(path, reader=build)


def is_spread_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a spread file (rather than one surface); False for anything unreadable."""
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            return "layout" in f.attrs
    except OSError:
        return False


def sharpness_radius(spread: Spread | Surface, rise: float = 0.1, split: str = "train") -> SharpnessRadius:
    """The radius at which the loss first rises by `rise` over its value at the origin, per member, with median and IQR.

    1-D: per direction, the |α| where L first exceeds L0 + Δ walking out from α = 0 on either side,
    interpolated linearly between the last grid point under the level and the first above it.
    2-D: per plane, the radius √(A/π) of the disc with the area A of the origin's sublevel set
    {L ≤ L0 + Δ} on the grid (cells of 4-connected grid points, each of area Δα·Δβ). A lone Surface
    counts as a spread of one member.

    Args:
        spread: a Spread (or one Surface) whose grid holds the origin (0 on every axis).
        rise: Δ > 0, in loss units (e.g. 0.1: the training-loss target of Jiang et al. 2020's flatness measures).
        split: which split's loss.

    Returns:
        SharpnessRadius: per-member radii, areas (2-D), censored members, median and quartiles.

    Raises:
        SurfaceError: Δ ≤ 0, a grid without the origin, an unknown split, or points not computed yet.

    Examples:
        The quadratic's loss along a direction d is (4d₁² + d₂²)α²/2: it reaches 0.1 near |α| = 0.16.

        >>> from landscape.examples import quadratic
        >>> from landscape.surfaces.surface import grid_axis
        >>> summary = sharpness_radius(compute_spread(quadratic(), [grid_axis(-1, 1, 201)], n=4), 0.1)
        >>> summary.radii.round(3).tolist(), round(summary.median, 3), summary.n_censored
        ([0.16, 0.167, 0.175, 0.161], 0.164, 0)
    """
    if not rise > 0:
        raise SurfaceError(f"the loss rise Δ must be positive, got {rise}")
    if split not in spread.loss:
        raise SurfaceError(f"no {split} split (the file has {', '.join(spread.loss)})")
    losses = np.asarray(spread.loss[split], dtype=float)
    done = np.asarray(spread.done)
    if not isinstance(spread, Spread):
        losses, done = losses[None], done[None]
    if not done.all():
        raise SurfaceError(f"{int((~done).sum())} points are not computed yet; finish the file (resume=True) first")
    centre = []
    for axis in spread.axes:
        hits = np.flatnonzero(axis == 0.0)
        if not len(hits):
            raise SurfaceError("the grid does not hold the origin (0 on every axis): use a symmetric odd grid, e.g. -1:1:51")
        centre.append(int(hits[0]))
    origins = losses[(slice(None), *centre)]
    if not np.allclose(origins, origins[0], rtol=1e-9, atol=0):
        raise SurfaceError("the members disagree at the origin: not one checkpoint")
    loss0 = float(origins[0])
    level = loss0 + rise
    if len(spread.axes) == 1:
        radii, censored = zip(*(_first_crossing(spread.axes[0], curve, centre[0], level) for curve in losses))
        areas = None
    else:
        cell = np.outer(_cell_widths(spread.axes[0]), _cell_widths(spread.axes[1]))
        areas, censored = zip(*(_sublevel_area(plane, tuple(centre), level, cell) for plane in losses))
        areas = np.array(areas)
        radii = np.sqrt(areas / np.pi)
    radii = np.array(radii, dtype=float)
    q25, median, q75 = (_quantile(radii, q) for q in (0.25, 0.5, 0.75))
    return SharpnessRadius(float(rise), level, loss0, split, len(spread.axes), radii, areas, np.array(censored), median, q25, q75)


def _first_crossing(alphas: np.ndarray, curve: np.ndarray, centre: int, level: float) -> tuple[float, bool]:
    """(|α| of the nearest crossing of `level` on either side of the centre, censored: no crossing on the grid)."""
    radii = []
    for step in (1, -1):
        i = centre
        while 0 <= i + step < len(curve) and curve[i + step] <= level:
            i += step
        j = i + step
        if not 0 <= j < len(curve):
            continue
        a, b, fa, fb = alphas[i], alphas[j], curve[i], curve[j]
        t = (level - fa) / (fb - fa) if np.isfinite(fb) else 0.0  # a diverged point: the crossing is at the last one below
        radii.append(abs(a + t * (b - a)))
    return (min(radii), False) if radii else (float("inf"), True)


def _cell_widths(axis: np.ndarray) -> np.ndarray:
    """The width each grid point stands for: half the gap to each neighbour (the ends: half their one gap)."""
    gaps = np.diff(axis)
    return np.concatenate([[gaps[0] / 2], (gaps[:-1] + gaps[1:]) / 2, [gaps[-1] / 2]])


def _sublevel_area(plane: np.ndarray, centre: tuple[int, int], level: float, cell: np.ndarray) -> tuple[float, bool]:
    """(area of the grid points with L ≤ level 4-connected to the centre, whether that set touches the grid's edge)."""
    inside = plane <= level
    seen = np.zeros_like(inside)
    stack, seen[centre] = [centre], True
    while stack:
        i, j = stack.pop()
        for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
            if 0 <= a < plane.shape[0] and 0 <= b < plane.shape[1] and inside[a, b] and not seen[a, b]:
                seen[a, b] = True
                stack.append((a, b))
    edge = bool(seen[0].any() or seen[-1].any() or seen[:, 0].any() or seen[:, -1].any())
    return float(cell[seen].sum()), edge


def _quantile(values: np.ndarray, q: float) -> float:
    """numpy's linear quantile, inf (numpy gives NaN) where it interpolates towards a censored (infinite) radius."""
    ordered = np.sort(values)
    position = q * (len(ordered) - 1)
    low, high = int(np.floor(position)), int(np.ceil(position))
    if high == low:
        return float(ordered[low])
    if np.isinf(ordered[high]):
        return float("inf")
    return float(ordered[low] + (position - low) * (ordered[high] - ordered[low]))


def _nan_quantile(values: np.ndarray, q: float) -> np.ndarray:
    """The quantile over axis 0, ignoring members not computed yet (NaN everywhere none is)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: a point no member has yet
        return np.nanquantile(values, q, axis=0)
