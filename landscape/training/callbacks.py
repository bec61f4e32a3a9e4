"""What the training-framework callbacks share: when to measure, on which fixed batches, under which names.

The callbacks for the HuggingFace Trainer (`landscape.training.hf_callback`) and PyTorch Lightning
(`landscape.training.lightning_callback`) are thin: each holds one `CurvatureTracker`, built afresh when training
starts (so a resumed run starts Lanczos cold), calls its `measure` every `every` optimizer steps, and hands the
values to its framework's loggers as "landscape/lambda1", "landscape/trace", ... This module imports neither
framework, so `import landscape` needs neither.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from landscape.engine.checks import check_int
from landscape.inputs.batches import Batch, Loss
from landscape.training.train_tracking import CurvatureTracker


class ScheduledTracking:
    """A CurvatureTracker run every `every` optimizer steps, on `batches` or on `n_samples` drawn from the training set.

    The framework callbacks derive from it and from their framework's callback class. `measures`, `tol`,
    `trace_matvecs`, `seed` and `loss` are the tracker's (landscape.CurvatureTracker); `prefix` starts every logged
    name. `history` keeps every measurement as {"step": …, "landscape/lambda1": …, …}.
    """

    def __init__(
        self,
        every: int,
        batches: Sequence[Batch] | None = None,
        *,
        measures: Sequence[str] = ("eig",),
        n_samples: int = 64,
        loss: Loss | None = None,
        tol: float = 1e-3,
        trace_matvecs: int = 30,
        seed: int = 0,
        prefix: str = "landscape/",
    ) -> None:
        check_int("every", every, 1)
        check_int("n_samples", n_samples, 1)
        if batches is not None and not batches:
            raise ValueError("batches=[] holds no batch: give at least one, or None to draw them from the training set")
        self.every, self.batches, self.n_samples, self.loss, self.prefix = every, batches, n_samples, loss, prefix
        self.options = dict(measures=tuple(measures), tol=tol, trace_matvecs=trace_matvecs, seed=seed)
        CurvatureTracker([], **self.options)  # the measure names are checked now, not when training starts
        self.tracker: CurvatureTracker | None = None
        self.history: list[dict] = []
        self._last_step = 0

    def start(self, model: nn.Module, batches: Sequence[Batch], loss: Loss | None) -> None:
        """A fresh tracker on the model's device: its first measurement starts Lanczos cold."""
        device = next(model.parameters()).device
        self.tracker = CurvatureTracker(list(batches), loss=loss, device=device, **self.options)
        self._last_step = 0

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (≥ 1) is one to measure at (once, however many micro-batches share it)."""
        return self.tracker is not None and step > self._last_step and step % self.every == 0

    def measure(self, step: int, model: nn.Module, optimizer: Any = None) -> dict[str, float]:
        """The tracker's values at `step`, named with the prefix; the optimizer unwrapped from a framework's wrapper."""
        measured = self.tracker.measure(model, torch_optimizer(optimizer))
        values = {f"{self.prefix}{key}": float(value) for key, value in measured.items()}
        self._last_step = step
        self.history.append({"step": step, **values})
        return values


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside a framework's wrapper (accelerate's AcceleratedOptimizer holds it as `.optimizer`)."""
    while optimizer is not None and getattr(optimizer, "optimizer", optimizer) is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def sampled_batches(dataset: Any, collate_fn: Callable[[list], Batch], n_samples: int, batch_size: int, seed: int) -> list[Batch]:
    """`n_samples` items of `dataset` chosen with `seed`, collated by `collate_fn` into batches of `batch_size`.

    The global random states (torch's CPU generator, numpy's, Python's) are left as they were: a collator or a data
    set may draw (masked-language-model masking, augmentation), and training must not see a draw it would not have
    made. The draws inside are seeded, so the same seed gives the same batches in a resumed run.

    >>> data = [{"x": torch.tensor([float(i)])} for i in range(10)]
    >>> stack = lambda items: {"x": torch.stack([item["x"] for item in items])}
    >>> [b["x"].flatten().tolist() for b in sampled_batches(data, stack, 5, 2, seed=0)]
    [[4.0, 1.0], [7.0, 5.0], [3.0]]
    """
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(f"the training data ({type(dataset).__name__}) cannot be indexed: give the batches to measure on")
    check_int("batch_size", batch_size, 1)
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n_samples].tolist()
    with seeded_random_state(seed):
        return [collate_fn([dataset[i] for i in chosen[j : j + batch_size]]) for j in range(0, len(chosen), batch_size)]


@contextlib.contextmanager
def seeded_random_state(seed: int) -> Iterator[None]:
    """Seeded global random states inside; outside, the states from before (CUDA's are never touched)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
