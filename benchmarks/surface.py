"""Loss-surface throughput: grid points per second vs a naive loop, Li et al.'s plot_surface.py and loss-landscapes.

Per problem, in one process at one thread: one forward pass over the measurement set (the
floor any exact evaluation pays per point), `compute_surface` (HDF5 file included), a naive loop
(deep copy + load_state_dict + eval per point, as a script would do), the per-point logic of Li et
al. (2018)'s loss-landscape `plot_surface.py` re-implemented from its algorithm (weights set by
assigning origin + x·d1 + y·d2 to each parameter, its eval loop, the whole arrays written to HDF5
after every point) and, where it installs, loss-landscapes' `random_plane`, all on the same model and data. A second table: points per second at
several points per call (vmapped forward, landscape.engine.batched_points) on the digits MLP and ConvNet;
`points_per_second` measures one setting on any device (benchmarks/gpu.py runs it on a GPU).
Writes benchmarks/results/surface.json.
Usage: python benchmarks/surface.py [--problems mlp-digits,convnet-digits,resnet20] [--tables peers,batched]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, seconds_per_call, write_results  # noqa: E402

from landscape.engine.batched_points import BatchedPointsNote  # noqa: E402
from landscape.engine.objective import Objective  # noqa: E402
from landscape.inputs.data import MeasurementSet, load_data  # noqa: E402
from landscape.inputs.models import model_for_data  # noqa: E402
from landscape.surfaces.directions import random_directions  # noqa: E402
from landscape.surfaces.surface import compute_surface, grid_axis  # noqa: E402

GRID = {"mlp-digits": 15, "convnet-digits": 7, "resnet20": 3}  # points per axis of the 2-D grid
BATCHED_POINTS = {"mlp-digits": 256, "convnet-digits": 32}  # points per timed 1-D grid in the points-per-call table


def problem(name: str):
    """(model, batches): MLP and ConvNet on all 1437 digits training images (batches of 256); ResNet-20 on 512 CIFAR-shaped images."""
    torch.manual_seed(0)
    if name.endswith("-digits"):
        data = load_data("digits")
        model, _ = model_for_data(name.split("-")[0], data)
        return model, MeasurementSet("train", None, 256).batches(data)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g)
    model, _ = model_for_data(name, (3, 32, 32), num_classes=10)
    return model, list(zip(x.split(128), y.split(128)))


@torch.no_grad()
def forward_pass(model, batches) -> None:
    for x, _ in batches:
        model(x)


@torch.no_grad()
def naive_point(model, state: dict, batches) -> tuple[float, float]:
    """What a script does per grid point: copy the model, load the perturbed weights, evaluate."""
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    net.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in batches:
        out = net(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return loss / n, correct / n


def naive_seconds_per_point(model, objective: Objective, directions, coords) -> float:
    names = objective.layout.names
    start = time.perf_counter()
    for c in coords:
        w = objective.w + torch.as_tensor(c, dtype=objective.dtype) @ directions.vectors
        state = {**model.state_dict(), **dict(zip(names, objective.layout.unflatten(w).values()))}
        naive_point(model, state, objective.batches)
    return (time.perf_counter() - start) / len(coords)


def li_et_al_seconds_per_point(model, objective: Objective, directions, coords, batches) -> float:
    """Seconds per point of the per-point loop of Li et al. (2018)'s plot_surface.py, re-implemented from its algorithm.

    Its direction file holds one numpy array per parameter; at each point it forms d1·x + d2·y per
    parameter in numpy, assigns `p.data = w + tensor(change)`, evaluates with its eval loop (eval
    mode, no_grad, batch-mean loss × batch size, argmax accuracy, `.item()` per batch), and rewrites
    the whole loss and accuracy arrays of the surface file, flushed, after every point. Its data
    loader is replaced by the same pre-made batches every contender gets.
    """
    import h5py

    net = copy.deepcopy(model).eval()
    params = dict(net.named_parameters())
    weights = [p.data for p in net.parameters()]  # the origin (set_weights replaces p.data, never writes into it)
    per_direction = [objective.layout.unflatten(v.detach().cpu()) for v in directions.vectors]
    dirs = [[d[name].numpy() for name in params] for d in per_direction]
    shape = (len(coords),)
    with tempfile.TemporaryDirectory() as tmp, h5py.File(Path(tmp) / "surface.h5", "a") as f:
        losses, accuracies = -np.ones(shape), -np.ones(shape)
        f["train_loss"], f["train_acc"] = losses, accuracies
        start = time.perf_counter()
        for index, (x, y) in enumerate(coords):
            changes = [d0 * x + d1 * y for d0, d1 in zip(*dirs)]
            for p, w, d in zip(net.parameters(), weights, changes):
                p.data = w + torch.Tensor(d).type(type(w))
            total_loss, correct, total = 0.0, 0, 0
            net.eval()
            with torch.no_grad():
                for inputs, targets in batches:
                    total += inputs.size(0)
                    outputs = net(inputs)
                    total_loss += F.cross_entropy(outputs, targets).item() * inputs.size(0)
                    correct += outputs.data.max(1)[1].eq(targets).sum().item()
            losses.ravel()[index], accuracies.ravel()[index] = total_loss / total, 100.0 * correct / total
            f["train_loss"][:] = losses
            f["train_acc"][:] = accuracies
            f.flush()
        return (time.perf_counter() - start) / len(coords)


def loss_landscapes_seconds_per_point(model, batches, steps: int) -> float | str | None:
    """Seconds per point of loss-landscapes' random_plane; None if not installed, the error text if it fails."""
    try:
        import loss_landscapes
        from loss_landscapes.metrics import Loss
    except ImportError:
        return None
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])  # its Loss takes one batch
    metric = Loss(torch.nn.CrossEntropyLoss(), x, y)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            loss_landscapes.random_plane(
                model.eval(), metric, distance=1, steps=steps, normalization="filter", deepcopy_model=True
            )
    except ZeroDivisionError as error:  # its filter normalization divides by an all-zero filter (BN bias at init)
        return f"fails: ZeroDivisionError ({error})"
    return (time.perf_counter() - start) / steps**2


def ours_seconds_per_point(objective: Objective, directions, axes) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        compute_surface(objective, directions, axes, path=Path(tmp) / "s.h5")
        return (time.perf_counter() - start) / np.prod([len(a) for a in axes])


def run_problem(name: str, rounds: int) -> dict:
    """Medians over `rounds` interleaved rounds, so a busy spell on a shared machine hits every contender alike."""
    model, batches = problem(name)
    model.eval()
    objective = Objective(model, batches, device="cpu")
    directions = random_directions(objective, 2, seed=0)
    n = GRID[name]
    axes = [grid_axis(-1, 1, n)] * 2
    coords = np.array([(a, b) for a in axes[0] for b in axes[1]])
    times: dict[str, list] = {"forward": [], "ours": [], "naive": [], "li": [], "peer": []}
    for _ in range(rounds):
        times["forward"].append(seconds_per_call(lambda: forward_pass(model, batches), min_seconds=1.0))
        times["ours"].append(ours_seconds_per_point(objective, directions, axes))
        times["naive"].append(naive_seconds_per_point(model, objective, directions, coords))
        times["li"].append(li_et_al_seconds_per_point(model, objective, directions, coords, batches))
        times["peer"].append(loss_landscapes_seconds_per_point(model, batches, n))
    forward, ours, naive, li = (float(np.median(times[k])) for k in ("forward", "ours", "naive", "li"))
    peers = times["peer"]
    peer = float(np.median(peers)) if all(isinstance(p, float) for p in peers) else peers[0]
    result = {
        "n_params": objective.n_params,
        "n_samples": objective.n_samples,
        "grid": f"{n}x{n}",
        "rounds": rounds,
        "forward_seconds": forward,
        "ours_seconds_per_point": ours,
        "naive_seconds_per_point": naive,
        "li_et_al_seconds_per_point": li,
        "loss_landscapes_seconds_per_point": peer,
        "ours_points_per_second": 1 / ours,
        "ours_cost_in_forward_passes": ours / forward,
        "speedup_vs_naive": naive / ours,
        "speedup_vs_li_et_al": li / ours,
        "naive_cost_in_forward_passes": naive / forward,
        "speedup_vs_loss_landscapes": peer / ours if isinstance(peer, float) else peer,
    }
    print(
        f"{name}: {1 / ours:.1f} points/s, {ours / forward:.2f} forward passes per point; "
        f"naive {naive / ours:.2f}x slower, Li et al.'s plot_surface.py loop {li / ours:.2f}x slower"
        + (f", loss-landscapes {peer / ours:.2f}x slower" if isinstance(peer, float) else f", loss-landscapes: {peer}"),
        flush=True,
    )
    return result


@functools.cache
def _surface_problem(name: str, device: str, dim: int = 1):
    """(objective, `dim` random directions) of a problem on `device`."""
    model, batches = problem(name)
    objective = Objective(model.eval(), batches, device=device)
    return objective, random_directions(objective, dim, seed=0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def points_per_second(problem: str, device: str, points_per_call: int | str, n_points: int, dim: int = 1) -> dict:
    """Grid points per second of compute_surface (no file) on a grid of `n_points` per axis (`dim` axes: a 51×51
    plane is n_points=51, dim=2), `points_per_call` per call ('auto': as many as fit on a GPU).

    One untimed warm-up grid first; the device is synchronized before and after the timed grid.
    `fallback` names why points went one per call instead, if vmap could not batch them.
    """
    objective, directions = _surface_problem(problem, device, dim)
    warm = max(2, min(n_points, 2 * points_per_call)) if isinstance(points_per_call, int) else 2
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", BatchedPointsNote)
        compute_surface(objective, directions, [grid_axis(-1, 1, warm)] * dim, points_per_call=points_per_call)
        _synchronize(objective.device)
        start = time.perf_counter()
        compute_surface(objective, directions, [grid_axis(-1, 1, n_points)] * dim, points_per_call=points_per_call)
        _synchronize(objective.device)
        seconds = time.perf_counter() - start
    fallback = next((str(n.message) for n in notes if issubclass(n.category, BatchedPointsNote)), None)
    return {
        "problem": problem,
        "device": str(objective.device),
        "points_per_call": points_per_call,
        "n_points": n_points**dim,
        "grid": [n_points] * dim,
        "n_params": objective.n_params,
        "n_samples": objective.n_samples,
        "seconds": seconds,
        "points_per_second": n_points**dim / seconds,
        "fallback": fallback,
    }


def run_points_per_call(name: str, settings: list[int], rounds: int) -> dict:
    """Median points per second per setting over `rounds` interleaved rounds, on the CPU; speedup over one per call."""
    runs: dict[int, list[dict]] = {k: [] for k in settings}
    for _ in range(rounds):
        for k in settings:
            runs[k].append(points_per_second(name, "cpu", k, BATCHED_POINTS[name]))
    speeds = {k: float(np.median([r["points_per_second"] for r in rows])) for k, rows in runs.items()}
    result = {
        "device": "cpu",
        "n_points": BATCHED_POINTS[name],
        "rounds": rounds,
        "points_per_second": {str(k): v for k, v in speeds.items()},
        "speedup_vs_one_per_call": {str(k): v / speeds[settings[0]] for k, v in speeds.items()},
        "fallback": next((r["fallback"] for rows in runs.values() for r in rows if r["fallback"]), None),
    }
    print(f"{name} (cpu): " + ", ".join(f"{k} per call {v:.1f} points/s" for k, v in speeds.items()), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default=",".join(GRID))
    parser.add_argument(
        "--tables",
        default="peers,batched",
        help="peers: vs naive and loss-landscapes; batched: points per call (default %(default)s)",
    )
    parser.add_argument("--points-per-call", default="1,4,16", help="settings of the batched table (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    names, tables = args.problems.split(","), args.tables.split(",")
    old = json.loads((RESULTS / "surface.json").read_text()) if (RESULTS / "surface.json").exists() else {}
    results = old.get("problems", {})  # a table not run keeps its rows from the last run
    batched = old.get("points_per_call", {})
    if "peers" in tables:
        results = {**results, **{name: run_problem(name, args.rounds) for name in names}}  # other problems' rows kept
    if "batched" in tables:
        settings = [int(k) for k in args.points_per_call.split(",")]
        batched = {name: run_points_per_call(name, settings, args.rounds) for name in names if name in BATCHED_POINTS}
    path = write_results(
        "surface",
        {
            "what": "2-D surface grid points per second; cost per point in forward passes over the same measurement set",
            "problems": results,
            "points_per_call_what": "1-D grid points per second of compute_surface at k points per vmapped call (CPU, one thread)",
            "points_per_call": batched,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
