"""Loss and accuracy at several weight vectors per call: torch.func.vmap over a stacked (k, n) block of points.

A surface evaluates the same measurement set at many nearby points. One point per call pays the
model's Python and kernel-launch overhead once per point; a vmapped forward pays it once per k points,
which is where a GPU running a small model spends its time. Every number is what k calls of
`Objective.evaluate` give (same item weighting, same accuracy), to rounding: the batched matrix
products sum in another order. Where vmap cannot run (an op without a batching rule, a loss whose
item count depends on the output, a data-parallel objective) the points go one per call, and
`PointEvaluator.fallback` says why.
"""

from __future__ import annotations

import warnings

import torch

from landscape.engine.memory import available_bytes
from landscape.engine.objective import Evaluation, Objective, _forward
from landscape.inputs.batches import accuracy, batch_size, logits, model_arguments

MAX_POINTS_PER_CALL = 32  # beyond this a GPU is saturated by the small models batching helps
ACTIVATION_MEMORY_FRACTION = 0.25  # of the device's free memory, for the k copies of one chunk's activations


class BatchedPointsNote(UserWarning):
    """Points could not be batched with vmap on this objective; they are evaluated one per call (same numbers)."""


def points_per_call(objectives: list[Objective], requested: int | str = "auto") -> int:
    """Points evaluated per call: `requested` when an int; for "auto", 1 on a CPU (batching measured no faster
    there, benchmarks/surface.py) and on CUDA as many as let k copies of the largest chunk's activations fit
    in a quarter of the free memory (at most MAX_POINTS_PER_CALL)."""
    if requested != "auto":
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"points_per_call must be a positive integer or 'auto', got {requested!r}")
        return requested
    if any(o.device.type != "cuda" or o.distributed for o in objectives):
        return 1
    free = available_bytes(objectives[0].device)
    per_point = max(_activation_bytes(o) for o in objectives)
    return max(1, min(MAX_POINTS_PER_CALL, int(ACTIVATION_MEMORY_FRACTION * free // per_point)))


def _activation_bytes(objective: Objective) -> float:
    """Bytes one point's forward needs on the largest chunk: the saved tensors of a gradient (an upper bound on
    the activations) plus the point's weights."""
    largest = max(batch_size(b) for b in objective._forward_batches())
    itemsize = torch.finfo(objective.dtype).bits // 8
    return largest * objective._graph_bytes_per_sample() + objective.n_params * itemsize


class PointEvaluator:
    """`evaluate(W, buffers)`: one Evaluation per row of W, k rows per vmapped call, one per call where vmap cannot."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.fallback: str | None = (
            "a data-parallel objective all-reduces each evaluation: one point per call" if objective.distributed else None
        )

    def evaluate(self, W: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None) -> list[Evaluation]:
        """Loss and accuracy at each row of W (k, n); `buffers[name]` (k, ...) replaces a buffer per point.

        Non-finite losses are returned, not raised (far points of a surface may diverge).
        """
        if len(W) > 1 and self.fallback is None:
            try:
                return _evaluate_batched(self.objective, W, buffers)
            except Exception as error:  # vmap refuses the model or its loss: the loop below computes the same numbers
                text = str(error).splitlines()[0] if str(error) else ""
                self.fallback = f"vmap cannot batch this model's points ({type(error).__name__}: {text})"
                warnings.warn(f"{self.fallback}; evaluating one point per call", BatchedPointsNote, stacklevel=2)
        return [
            self.objective.evaluate(w, None if not buffers else {n: b[i] for n, b in buffers.items()}, check_finite=False)
            for i, w in enumerate(W)
        ]


@torch.no_grad()
def _evaluate_batched(objective: Objective, W: torch.Tensor, buffers: dict[str, torch.Tensor] | None) -> list[Evaluation]:
    """Objective.evaluate at every row of W in one vmapped forward per chunk of the measurement set."""
    W = W.to(device=objective.device, dtype=objective.dtype)
    if W.ndim != 2 or W.shape[1] != objective.n_params:
        raise ValueError(f"a block of points has shape {tuple(W.shape)}, expected (k, {objective.n_params})")
    totals = torch.zeros(len(W), 3, dtype=torch.float64, device=objective.device)  # weighted loss, correct, labelled
    for batch in objective._forward_batches():
        means, scores, count = _batch_means(objective, W, buffers, batch)
        totals[:, 0] += count / objective.n_items * means.double()
        for i, score in enumerate(scores):
            hits = accuracy(objective.loss_function, score, batch)  # counts as ints or device tensors
            if hits is None:  # the loss defines no prediction: no accuracy at any point
                break
            totals[i, 1] += hits[0]
            totals[i, 2] += hits[1]
    return [
        Evaluation(loss, correct / labelled if labelled else None, objective.n_samples)
        for loss, correct, labelled in totals.tolist()
    ]


def _batch_means(
    objective: Objective, W: torch.Tensor, buffers: dict[str, torch.Tensor] | None, batch
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(k mean losses, k output tensors, the batch's item count) from one vmapped forward over the rows of W."""
    args, kwargs = model_arguments(batch)
    counts: list[int] = []

    def one(w: torch.Tensor, point_buffers: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = _forward(objective.model, objective._state(w, point_buffers), args, kwargs, objective._slots)
        mean, count = objective._batch_mean(out, batch)
        counts.append(count)  # the batch's own count: the same for every point
        return mean, logits(out)

    means, scores = torch.func.vmap(one, in_dims=(0, None if not buffers else 0))(W, buffers or None)
    return means, scores, counts[0]
