"""The Objective: L(w) = Σ_b sum_b(w) / Σ_b count_b over a fixed list of batches, with exact HVPs.

Every number in the toolkit comes from here (DESIGN.md). A batch is an (x, y) pair, a tuple or a
HuggingFace-style dict, and a loss gives each batch's sum of per-item losses and its number of
items, samples or real tokens (landscape.inputs.batches). The model is evaluated functionally
(torch.func.functional_call) at a flat parameter vector, so loss, gradient and Hessian-vector
products never mutate the user's model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.engine import distributed as ranks
from landscape.engine import finite_difference as fd
from landscape.engine.memory import InsufficientMemory, available_bytes, format_size, resident_bytes
from landscape.engine.params import FlatLayout, select_parameters
from landscape.engine.source_watch import SourceWatch
from landscape.inputs.batches import (
    Batch,
    Loss,
    accuracy,
    batch_size,
    class_cross_entropy,
    from_mean,
    logits,
    loss_name,
    model_arguments,
    sequence_length,
    targets,
    to_device,
)
from landscape.inputs.batches import mean_cross_entropy as cross_entropy
from landscape.results import Result

HVP_METHODS = ("auto", "reuse", "linearize", "fwd-rev", "double-backward")
COMPILED_HVP = "compiled"  # torch.compile'd forward-over-reverse: for GPUs, measured by benchmarks/gpu.py
FINITE_DIFFERENCE_HVP = "finite-difference"  # central differences of gradients: approximate, with an error estimate
MODES = ("eval", "train")

__all__ = ["Objective", "ObjectiveError", "Evaluation", "HVPCheck", "MemoryPlan", "cross_entropy", "linearized"]


class ObjectiveError(ValueError):
    """The model, data or settings cannot define a finite objective."""


class HVPCheckWarning(UserWarning):
    """The chosen HVP path failed its run-time self-check and was replaced by double backward."""


LOW_PRECISION = (torch.bfloat16, torch.float16)  # the model runs in these; the solvers' vectors stay float32
FLOAT16_LOSS_SCALE = 2.0**10  # float16's first loss scale, halved while a derivative overflows (Objective)
LOW_PRECISION_CHECK_EPS = 32  # self-check tolerance in the model's ε: 5.8 ε (4.5e-2) was the largest difference measured


def hvp_check_tolerance(dtype: torch.dtype) -> float:
    """Relative difference allowed between two exact HVP paths run with the model in `dtype`.

    10·√(machine ε) for float32 (3.5e-3) and float64 (1.5e-7). In bfloat16 and float16 two exact paths round
    differently at every layer: 32 ε (0.25 bfloat16, 0.031 float16), over five times the largest difference
    measured between them (5.8 ε, GPT-2 4×256 in bfloat16, benchmarks/precision.py); a wrong product differs by O(1).
    """
    if dtype in LOW_PRECISION:
        return LOW_PRECISION_CHECK_EPS * torch.finfo(dtype).eps
    return 10 * math.sqrt(torch.finfo(dtype).eps)


@dataclass(frozen=True)
class HVPCheck(Result):
    """The run-time self-check of the chosen HVP path on the first probe.

    `difference`: ‖Hv − H_ref v‖/‖H_ref v‖ against double backward; `repeat_difference`: the same
    product taken twice. Both must stay under `tolerance`; otherwise `replaced_by` names the path used.
    The finite-difference path's `tolerance` follows its `estimated_error` (relative, on the same probe:
    landscape.engine.finite_difference.check_tolerance); `skipped` says why no exact reference could be taken.
    """

    path: str
    difference: float
    repeat_difference: float
    tolerance: float
    seconds: float
    replaced_by: str | None = None
    n_extra_hvps: int = 2
    estimated_error: float | None = None
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return self.skipped is None and self.difference <= self.tolerance and self.repeat_difference <= self.tolerance

    def to_dict(self) -> dict:
        return {**super().to_dict(), "passed": self.passed}


@dataclass(frozen=True)
class Evaluation(Result):
    """Loss and accuracy of the objective at one point of weight space."""

    loss: float
    accuracy: float | None
    n_samples: int


@dataclass(frozen=True)
class MemoryPlan(Result):
    """What the HVP path keeps in memory, and the peak it is predicted to add to what the objective holds already.

    `reuse` keeps the create_graph gradient of the first `kept_batches` batches (as many as fit in `budget_bytes`)
    and rebuilds the others' per product (`streamed`). Predictions come from the bytes autograd saves for a gradient
    graph, measured on slices of the first batch (Objective._graph_bytes), times the factors in GRAPH_OVERHEAD.
    """

    path: str
    kept_batches: int
    n_batches: int
    kept_bytes: int
    predicted_peak_bytes: int
    budget_bytes: int
    available_bytes: int
    resident_bytes: int = 0  # what the process held when the plan was made (weights, data, the objective's copies)

    @property
    def streamed_batches(self) -> int:
        return self.n_batches - self.kept_batches

    def describe(self) -> str:
        kept = (
            f"gradient graphs of {self.kept_batches}/{self.n_batches} batches kept ({format_size(self.kept_bytes)})"
            if self.path == "reuse"
            else self.path
        )
        return f"{kept}; predicted peak {format_size(self.predicted_peak_bytes)} of {format_size(self.available_bytes)} free"


# Measured peak ÷ autograd's saved bytes (benchmarks/hvp.py memory table, benchmarks/scale.py): a kept graph holds
# its saved tensors; building or streaming one adds the backward's work space, and so does a product through kept
# graphs (GPT-2 configs: peak resident memory 3.7-4.1× the saved bytes with the graph kept; ResNet-20 less, where
# this predicts 0.78-1.03× the measured peak); linearize's functionalized trace keeps every intermediate of forward
# and backward (8.3× on ResNet-20); forward-over-reverse holds tangents.
GRAPH_OVERHEAD = {"kept": 1.0, "transient": 2.5, "linearize": 9.0, "fwd-rev": 2.5}
WORKSPACE_BYTES = 40 * 2**20  # allocator arenas and autograd's first use: the whole peak of the digits MLP's HVPs


def default_device() -> torch.device:
    """CUDA when present, otherwise CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _prepare_model(model: nn.Module, mode: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A private copy in the requested mode: BN eval (running stats) or BN train (batch stats), dropout off."""
    if mode not in MODES:
        raise ObjectiveError(f"unknown mode {mode!r}; use 'eval' (BN running statistics) or 'train' (BN batch statistics)")
    model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    if device.type == "cuda":
        _full_float32_precision()
    if mode == "train":
        # BatchNorm without running statistics normalizes with the batch's own statistics,
        # in eval() as well, so the Hessian of the train-mode loss is exact and dropout stays off.
        torch.func.replace_all_batch_norm_modules_(model)
    return model


def _full_float32_precision() -> None:
    """Turn TensorFloat-32 off for cuDNN convolutions and matrix products (process-wide).

    On Ampere and later GPUs cuDNN convolutions default to TF32 (10-bit mantissa): float32 HVPs then differ from
    the CPU's by ~1e-3, as much as the run-time self-check allows between two exact paths. A measurement asked
    for in float32 gets float32.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class Objective:
    """Item-weighted mean loss of `model` over fixed `batches`, as a function of flat parameters.

    `loss` is `(model output, batch) → (sum of per-item losses, number of items)` (landscape.inputs.batches:
    class cross-entropy by default, token cross-entropy for causal language models, mean squared
    error, or your own); `loss_fn(output, targets) → batch mean` is the older form for (x, y) batches.

    `params` selects the parameters that vary (see landscape.engine.params.select_parameters);
    the rest and all buffers stay fixed. `hvp_method` picks the exact Hessian-vector
    product path (benchmarks/hvp.py), or `finite-difference`, central differences of gradients with an error
    estimate per product (for models without a second derivative, `_hvp_finite_difference`); `auto` is `reuse`: the create_graph gradient of as
    many batches as fit in `graph_memory_budget` bytes (default: half the free memory) is
    kept across products and the rest rebuilt per product, so any measurement set fits.
    Peak memory is predicted at construction (`memory_plan`); a plan that cannot fit the
    free memory raises InsufficientMemory at once, naming the option that would fit.
    With `distributed=True` (under torchrun) `batches` is this rank's shard of the measurement set
    (landscape.engine.distributed.shard) and every loss, gradient and HVP is summed over the ranks, so
    each rank sees the global objective and seeded estimators run identically everywhere.
    The model is copied when the Objective is built, and every number is at the copied weights: once `model`
    changes in place (an optimizer step, load_state_dict) the Objective refuses to answer. To measure during
    training, build one per measurement, or use landscape.CurvatureTracker (docs/how-to/track-training.md).

    `dtype` bfloat16 or float16 runs the model's forward and backward (the HVP's second one too) in that dtype,
    while the point, the directions and every product stay float32 (`self.dtype`), so the solvers' bases and
    sums keep float32; the loss is taken from float32 logits. float16 derivatives are taken of the loss times
    `loss_scale` (default FLOAT16_LOSS_SCALE), so small backward values do not flush to zero, and divided by it in
    float32 (loss scaling, Micikevicius et al. 2018); one that overflows is taken again at half the scale, and an
    overflow at scale 1 is one error line. HVPs in float16 take unit directions (rescaled after).
    docs/how-to/precision.md gives the measured errors against float32.
    """

    _any_attention = False  # True while the finite-difference path takes gradients: fused attention kernels allowed

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        loss: Loss | None = None,
        params: str = "all",
        mode: str = "eval",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        hvp_method: str = "auto",
        graph_memory_budget: float | None = None,
        metadata: dict | None = None,
        distributed: bool = False,
        hvp_check: bool = True,
        loss_scale: float | None = None,
    ) -> None:
        if hvp_method not in (*HVP_METHODS, COMPILED_HVP, FINITE_DIFFERENCE_HVP):
            raise ObjectiveError(
                f"unknown hvp_method {hvp_method!r}; use one of {', '.join(HVP_METHODS)}, {COMPILED_HVP} or {FINITE_DIFFERENCE_HVP}"
            )
        if distributed and not ranks.active():
            raise ObjectiveError("distributed=True needs an initialised process group: launch with torchrun")
        self.distributed = distributed
        self.world_size = ranks.world_size() if distributed else 1
        self.device = torch.device(device) if device is not None else default_device()
        if distributed:
            self.device = ranks.local_device(self.device)
        self.model_dtype = dtype  # what the model computes in
        self.dtype = torch.float32 if dtype in LOW_PRECISION else dtype  # the point, directions and products
        self.loss_scale = _loss_scale(dtype, loss_scale)
        self.mode = mode
        if loss is not None and loss_fn is not None:
            raise ObjectiveError("give loss (output, batch) → (sum, count) or loss_fn (output, targets) → mean, not both")
        self.loss_function: Loss = loss if loss is not None else from_mean(loss_fn) if loss_fn else class_cross_entropy
        self.loss_fn = getattr(self.loss_function, "mean_loss", None)  # the per-batch mean loss, where the loss is one
        self._source = SourceWatch(model)  # the copy below is fixed: refuse to answer once `model` trains on
        self.model = _prepare_model(model, mode, self.device, dtype)
        self._slots = _tensor_slots(self.model)  # where each named tensor lives: swapped in per call (_forward)
        self.has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self._graph_size: tuple[float, float] | None = None  # saved bytes of a gradient graph: fixed, per item
        self.param_selection = params
        names = select_parameters(self.model, params)
        state = dict(self.model.named_parameters())
        self.layout = FlatLayout.of({n: state[n] for n in names})
        self._fixed = {n: p.detach() for n, p in state.items() if n not in names}
        self._buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        self.w = self.layout.flatten({n: state[n].detach() for n in names}).to(self.dtype).clone()
        if not torch.isfinite(self.w).all():
            bad = [n for n, t in self.layout.unflatten(self.w).items() if not torch.isfinite(t).all()]
            raise ObjectiveError(f"non-finite weights in {', '.join(bad)}")
        if batches:
            self._check_forward(to_device(batches[0], self.device, self.model_dtype))
        self._set_batches(batches)
        self.hvp_method = "reuse" if hvp_method == "auto" else hvp_method
        self.memory_plan = self._plan_memory(graph_memory_budget)
        self.metadata = dict(metadata or {})
        self._cache: tuple | None = None
        self._check_pending = hvp_check
        self._batch_probes = True  # probes batched with vmap until an op without a batching rule is met
        self.hvp_check_result: HVPCheck | None = None
        self.hvp_error: fd.FiniteDifferenceErrors | None = None  # the finite-difference path's step and errors so far
        self.last_hvp_errors: torch.Tensor | None = None  # its last block's estimated error per row, ‖D(h) − D(2h)‖·‖v‖

    def _check_forward(self, batch: Batch) -> None:
        """The model on the first two items of the first batch: data it cannot take is one line naming both, not a
        framework message such as "expected 4D input (got 3D input)" from deep inside the forward."""
        sample = _leading(batch, 2)
        sample = batch if sample is None else sample
        try:
            with torch.no_grad():
                self._call(self.w, sample)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise ObjectiveError(
                f"the model ({type(self.model).__name__}) cannot take the data's {_input_shapes(batch)}: {reason}"
            ) from error

    def _set_batches(self, batches: Sequence[Batch]) -> None:
        moved = [to_device(b, self.device, self.model_dtype) for b in batches]
        counts = [self._count(b) for b in moved]
        self.batches = [b for b, c in zip(moved, counts) if c > 0]  # a batch of ignored tokens only adds nothing
        sizes, counts = [batch_size(b) for b in self.batches], [c for c in counts if c > 0]
        gathered = ranks.all_gather((sizes, counts)) if self.distributed else [(sizes, counts)]
        all_sizes = [n for part, _ in gathered for n in part]
        if not all_sizes:
            raise ObjectiveError("the measurement set is empty: give at least one batch (with at least one item the loss counts)")
        self.n_samples, self.n_batches = sum(all_sizes), len(all_sizes)
        self.n_items = sum(c for _, part in gathered for c in part)  # samples, or real tokens for a language model
        self.batch_sizes = sorted(set(all_sizes))
        self.batch_weights = [c / self.n_items for c in counts]
        self._eval_chunks: list[Batch] | None = None

    def _count(self, batch: Batch) -> int:
        """Items the loss counts in `batch`: from the loss's `count`, else from one forward pass."""
        count = getattr(self.loss_function, "count", None)
        if count is not None:
            return int(count(batch))
        with torch.no_grad():
            return int(self.loss_function(self._call(self.w, batch), batch)[1])

    def restricted(self, batches: Sequence[Batch]) -> Objective:
        """The same prepared model, point, parameters and settings over other `batches`, without copying the model.

        For measures over parts of the measurement set (m-sharpness: each batch of m samples on its own).
        Not for a sharded objective, whose batches are spread over the ranks.
        """
        if self.distributed:
            raise ObjectiveError("a sharded objective cannot be restricted to some batches: run without torchrun")
        sub = copy.copy(self)
        sub._set_batches(batches)
        sub.metadata, sub._cache = dict(self.metadata), None
        sub.hvp_error = sub.last_hvp_errors = None  # finite differences: a step of its own, errors of its own
        sub.memory_plan = sub._plan_memory(self.memory_plan.budget_bytes)
        return sub

    # ----------------------------------------------------------------- basics
    @property
    def n_params(self) -> int:
        return self.layout.size

    def describe(self) -> dict:
        """What was measured and how: recorded in every result's metadata."""
        return {
            "n_samples": self.n_samples,
            **({} if self.n_items == self.n_samples else {"n_items": self.n_items}),
            "n_batches": self.n_batches,
            "batch_sizes": self.batch_sizes,
            "world_size": self.world_size,
            "sharded": self.distributed,
            "mode": self.mode,
            "batchnorm": self.has_batchnorm,  # the mode matters only with BatchNorm
            "params": self.param_selection,
            **({} if self.loss_function is class_cross_entropy else {"loss": loss_name(self.loss_function)}),
            "n_params": self.n_params,
            "dtype": _dtype_name(self.model_dtype),
            **self._precision(),
            "device": str(self.device),
            "hvp_method": self.hvp_method,
            **self.metadata,
        }

    def _precision(self) -> dict:
        """A model run in a low dtype: the solvers' dtype, and float16's loss scale (nothing for float32/float64)."""
        if self.model_dtype == self.dtype:
            return {}
        scale = {"loss_scale": self.loss_scale} if self.loss_scale != 1 else {}
        return {"solver_dtype": _dtype_name(self.dtype), **scale}

    def _state(self, w: torch.Tensor, buffers: dict | None = None) -> dict[str, torch.Tensor]:
        """Every tensor functional_call needs: fixed parameters, buffers, replaced buffers, then `w`'s views.

        The checkpoint's buffers are cloned for every call, so a forward that writes them in place (a call
        counter, running statistics) sees the checkpoint's values each time, never a captured tensor it
        mutates (which torch.func refuses); the copies are as small as the buffers. `buffers` given by the
        caller are passed as they are, so train-mode BN can update them (bn_statistics).
        """
        own = {n: b.clone() for n, b in self._buffers.items() if not buffers or n not in buffers}
        if w.dtype != self.model_dtype:  # a low-precision model's float32 point: cast inside the graph
            w = w.to(self.model_dtype)
        return {**self._fixed, **own, **(buffers or {}), **self.layout.unflatten(w)}

    def _outputs(self, w: torch.Tensor, x: torch.Tensor, buffers: dict | None = None) -> torch.Tensor:
        """The model's output tensor (its .logits for a HuggingFace model) on one batch, or on inputs alone."""
        return logits(self._call(w, x, buffers))

    def _call(self, w: torch.Tensor, batch: Batch, buffers: dict | None = None):
        """The model called on a batch (its inputs; a tensor is the input itself), as it returns."""
        args, kwargs = ((batch,), {}) if isinstance(batch, torch.Tensor) else model_arguments(batch)
        return _forward(self.model, self._state(w, buffers), args, kwargs, self._slots, not self._any_attention)

    def _batch_loss(self, w: torch.Tensor, batch: Batch, buffers: dict | None = None) -> torch.Tensor:
        """The mean loss over the batch's items (weighted by batch_weights into L), times the loss scale.

        Every derivative is taken of this: each path divides its result by `loss_scale` (`_unscaled`).
        """
        mean = self._batch_mean(self._call(w, batch, buffers), batch)[0]
        return mean * self.loss_scale if self.loss_scale != 1 else mean

    def _unscaled(self, derivative: torch.Tensor) -> torch.Tensor:
        """A derivative of `_batch_loss` divided by the loss scale (a power of two: exact in float32)."""
        return derivative / self.loss_scale if self.loss_scale != 1 else derivative

    def _batch_mean(self, output, batch: Batch) -> tuple[torch.Tensor, int]:
        """(mean loss over the batch's items, their number) from the model's output on it (float32 logits for a
        low-precision model, so the loss and its reduction are float32)."""
        if self.model_dtype in LOW_PRECISION:
            output = _float32_output(output)
        if self.loss_fn is not None:  # a per-batch mean loss: as computed before losses took whole batches
            y = targets(batch)
            return self.loss_fn(logits(output), y), len(y)
        total, count = self.loss_function(output, batch)
        return total / count, int(count)

    def _check_source(self) -> None:
        """Refuse to measure a copy that is no longer the model: it was trained (or loaded) in place since."""
        if self._source.changed():
            raise ObjectiveError(
                "the model changed in place since this Objective copied it (an optimizer step, load_state_dict, or "
                "BatchNorm statistics): it would measure the old weights. Build a new Objective after training, or take "
                "curvature every N steps with landscape.CurvatureTracker"
            )

    def _point(self, w: torch.Tensor | None) -> torch.Tensor:
        self._check_source()
        if w is None:
            return self.w
        if w.shape != self.w.shape:
            raise ObjectiveError(f"weight vector has shape {tuple(w.shape)}, expected ({self.n_params},)")
        return w.to(device=self.device, dtype=self.dtype)

    def _reduced(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum summed over the ranks (itself when not distributed)."""
        return ranks.all_reduce_sum(tensor) if self.distributed else tensor

    def _weighted_sum(self, per_batch: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
        return sum(c * per_batch(batch) for c, batch in zip(self.batch_weights, self.batches))

    # ----------------------------------------------------------- loss, grad
    @torch.no_grad()
    def evaluate(
        self, w: torch.Tensor | None = None, buffers: dict[str, torch.Tensor] | None = None, check_finite: bool = True
    ) -> Evaluation:
        """Loss and accuracy (top-1 for class labels, next-token for a language model) at `w` (default: the checkpoint).

        `buffers` replaces fixed tensors by name, e.g. BN statistics from `bn_statistics(w)`.
        A non-finite loss raises unless `check_finite` is False (far points of a surface may diverge).
        """
        state = self._state(self._point(w), buffers)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # weighted loss, correct, labelled
        for batch in self._forward_batches():
            out = _forward(self.model, state, *model_arguments(batch), self._slots)
            mean, count = self._batch_mean(out, batch)
            totals[0] += count / self.n_items * mean.double()
            correct = accuracy(self.loss_function, out, batch)
            if correct is not None:
                totals[1] += correct[0]
                totals[2] += correct[1]
        loss, correct, labelled = self._reduced(totals).tolist()
        if check_finite and not math.isfinite(loss):
            hint = "; float16 overflows past 65504: measure in bfloat16 or float32" if self.model_dtype == torch.float16 else ""
            raise ObjectiveError(f"the loss is not finite at this point (NaN or inf): check the weights and the data{hint}")
        return Evaluation(loss, correct / labelled if labelled else None, self.n_samples)

    @torch.no_grad()
    def bn_statistics(self, w: torch.Tensor, inputs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """BatchNorm running statistics re-estimated at `w` from `inputs` (cumulative average over them).

        After a large weight perturbation the stored running statistics no longer match the
        activations, so eval-mode BN overstates the loss; re-estimating them (as for SWA, Izmailov
        et al. 2018) measures the perturbed network as it would be used. Returns fresh tensors by name.
        No collective: a distributed objective needs the same `inputs` on every rank (landscape.engine.recalibration.recalibration_inputs).
        """
        norms = {
            name: m
            for name, m in self.model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        }
        if not norms:
            raise ObjectiveError("BN re-estimation: the model has no BatchNorm layer with running statistics")
        fresh = {}
        for name, m in norms.items():
            prefix = f"{name}." if name else ""
            fresh[prefix + "running_mean"] = torch.zeros_like(m.running_mean)
            fresh[prefix + "running_var"] = torch.ones_like(m.running_var)
            fresh[prefix + "num_batches_tracked"] = torch.zeros_like(m.num_batches_tracked)
        saved = [(m, m.momentum) for m in norms.values()]
        try:
            for m in norms.values():
                m.momentum, m.training = None, True  # cumulative average, batch statistics
            for x in inputs:  # train-mode BN updates the fresh buffers in place
                self._call(self._point(w), to_device(x, self.device, self.model_dtype), fresh)
        finally:
            for m, momentum in saved:
                m.momentum, m.training = momentum, False
        return fresh

    def loss(self, w: torch.Tensor | None = None) -> float:
        """L(w), the item-weighted mean loss over the measurement set (samples, or real tokens)."""
        return self.evaluate(w).loss

    def grad(self, w: torch.Tensor | None = None, buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """∇L(w) as a flat vector; `buffers` replaces fixed tensors by name, as in `evaluate`."""
        w = self._point(w).detach().requires_grad_(True)

        def gradient() -> torch.Tensor:
            total = None
            for c, batch in zip(self.batch_weights, self.batches):
                (g,) = torch.autograd.grad(self._batch_loss(w, batch, buffers), w)
                total = _weighted_add(total, c, g)
            return self._reduced(torch.zeros_like(w) if total is None else self._unscaled(total))

        return self._backed_off(gradient, "gradient")

    # ------------------------------------------------------------------ HVPs
    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v at the objective's point, H = ∇²L(w), for a flat vector v."""
        return self.hvp_batched(v.reshape(1, -1)).reshape(-1)

    def hvp_batched(self, V: torch.Tensor) -> torch.Tensor:
        """H vᵢ for each row vᵢ of V (k, n): several probes in one call."""
        self._check_source()
        V = V.to(device=self.device, dtype=self.dtype)
        if V.ndim != 2 or V.shape[1] != self.n_params:
            raise ObjectiveError(f"probe block has shape {tuple(V.shape)}, expected (k, {self.n_params})")
        if self.hvp_method == FINITE_DIFFERENCE_HVP:  # summed over the ranks inside: its step and errors are global
            products = self._hvp_finite_difference(V)
            return self._self_checked(V, products) if self._check_pending else products
        norms = None
        if self.model_dtype == torch.float16:  # unit rows: a product's size then follows H, not the probe's length
            norms = V.norm(dim=1, keepdim=True)
            V = V / norms.clamp_min(torch.finfo(V.dtype).tiny)

        def products() -> torch.Tensor:
            out = self._local_hvp(V)
            if self._check_pending:
                out = self._self_checked(V, out)
            return self._reduced(out)

        out = self._backed_off(products, "Hessian-vector product")
        return out if norms is None else out * norms

    def _backed_off(self, derivative: Callable[[], torch.Tensor], what: str) -> torch.Tensor:
        """`derivative()`, taken again at half the loss scale while float16 overflows (inf or NaN), as dynamic loss
        scaling backs off (Micikevicius et al. 2018); an overflow at scale 1 is one error line, never a number.

        Checked after the sum over the ranks (an inf or NaN anywhere reaches every rank), so every rank backs off alike.
        """
        while True:
            value = derivative()
            if self.model_dtype != torch.float16 or bool(torch.isfinite(value).all()):
                return value
            if self.loss_scale <= 1:
                raise ObjectiveError(
                    f"float16 overflowed in the {what} (inf or NaN at loss scale 1: its range ends at 65504): "
                    "measure in bfloat16, which has float32's range, or in float32"
                )
            self.loss_scale /= 2
            self._cache = None  # a kept gradient graph holds the old scale

    def _self_checked(self, V: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
        """The first products, checked against double backward and against a repeat; replaced if either differs.

        Costs two extra products on the first call only: one by the chosen path (the repeat) and
        one by double backward (the reference), both on the caller's first probe. A fast path that
        disagrees is dropped for double backward, with one warning line, and the block is recomputed.
        """
        self._check_pending = False
        if self.hvp_method == FINITE_DIFFERENCE_HVP:
            return self._finite_difference_checked(V, products)
        if self.hvp_method == "double-backward" or not self.batches:
            return products
        if self.model_dtype == torch.float16 and not bool(torch.isfinite(products).all()):
            self._check_pending = True  # float16 overflowed: checked once the loss scale is backed off (_backed_off)
            return products
        start = time.perf_counter()
        if bool(V[0].any()):
            probe, first = V[:1], products[:1]
        else:  # a zero first probe checks nothing: take a seeded random one (one more product)
            probe = _random_probe(self)
            first = self._local_hvp(probe)
        repeat = self._local_hvp(probe)
        reference = self._hvp_double_backward(probe)
        if self.model_dtype == torch.float16 and not bool(torch.isfinite(torch.cat([repeat, reference])).all()):
            self._check_pending = True  # an overflow in the check: backed off as one in the product is
            return torch.full_like(products, math.inf)
        check = HVPCheck(
            path=self.hvp_method,
            difference=_relative_difference(first, reference),
            repeat_difference=_relative_difference(repeat, first),
            tolerance=hvp_check_tolerance(self.model_dtype),
            seconds=time.perf_counter() - start,
        )
        self.hvp_check_result = check
        if check.passed:
            return products
        self._replace_path(check, f"(a repeated product by {check.repeat_difference:.2g}; tolerance {check.tolerance:.1g})")
        return self._local_hvp(V)

    def _replace_path(self, check: HVPCheck, detail: str) -> None:
        """After a failed self-check: one warning line, and double backward from now on."""
        warnings.warn(
            f"HVP self-check: the {check.path} path differs from double backward by {check.difference:.2g} {detail} "
            f"on this model; using double-backward",
            HVPCheckWarning,
            stacklevel=4,
        )
        self.hvp_method, self._cache = "double-backward", None
        self.hvp_check_result = dataclasses.replace(check, replaced_by="double-backward")

    # ------------------------------------------------------- finite differences
    def _finite_difference_checked(self, V: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
        """`_self_checked` for the finite-difference path: its first product against double backward, within a
        tolerance from its own error estimate; skipped, and said so, where the model has no double backward.

        Runs on every rank (its products are collective); a failed check moves to double backward, as an exact
        path's does. Costs one more finite-difference product (the repeat) and one exact one, on the first call.
        """
        self._check_pending = False
        start, errors = time.perf_counter(), self.last_hvp_errors
        if bool(V[0].any()):
            probe, first, error = V[:1], products[:1], float(errors[0])
        else:  # a zero first probe checks nothing: take a seeded random one (one more product)
            probe = _random_probe(self)
            first = self._hvp_finite_difference(probe, record=False)
            error = float(self.last_hvp_errors[0])
        repeat = self._hvp_finite_difference(probe, record=False)
        self.last_hvp_errors = errors
        check = HVPCheck(self.hvp_method, math.nan, _relative_difference(repeat, first), math.nan, 0.0, n_extra_hvps=2)
        try:
            reference = self._reduced(self._hvp_double_backward(probe))
        except (RuntimeError, NotImplementedError) as failure:  # no second derivative through this model
            reason = (str(failure).splitlines() or [type(failure).__name__])[0]
            skipped = f"no double backward through this model ({reason})"
            self.hvp_check_result = dataclasses.replace(check, seconds=time.perf_counter() - start, skipped=skipped)
            return products
        estimated = error / max(float(reference.norm()), torch.finfo(self.dtype).tiny)
        check = dataclasses.replace(
            check,
            difference=_relative_difference(first, reference),
            tolerance=fd.check_tolerance(estimated, self._gradient_dtype),
            seconds=time.perf_counter() - start,
            estimated_error=estimated,
        )
        self.hvp_check_result = check
        if check.passed:
            return products
        self._replace_path(check, f"(more than its error estimate allows: {check.tolerance:.1g})")
        return self._reduced(self._local_hvp(V))

    def _hvp_finite_difference(self, V: torch.Tensor, record: bool = True) -> torch.Tensor:
        """H vᵢ ≈ (g(w + h v̂ᵢ) − g(w − h v̂ᵢ))/2h·‖vᵢ‖ from first-order gradients, summed over the ranks; each row's
        error estimate ‖D(h) − D(2h)‖·‖vᵢ‖ (Richardson) goes to `last_hvp_errors` and, if `record`, to `hvp_error`.

        Four gradients per probe, fused attention kernels allowed; the step rule is fd.CentralDifferences's
        (Nocedal & Wright §8.1, landscape.engine.finite_difference).
        """
        if self.hvp_error is None:  # a fresh record: a step of its own (a restricted copy starts here too)
            gradients = self._first_order_gradient
            self._differences = fd.CentralDifferences(gradients, self.w, self._gradient_dtype, reduce=self._reduced)
        products, self.last_hvp_errors = self._differences.products(V, record)
        self.hvp_error = self._differences.errors
        return products

    @property
    def _gradient_dtype(self) -> torch.dtype:
        """The precision gradients are computed in (the model's, where it runs below the vectors' dtype): the
        rounding the finite-difference step and tolerance are set against."""
        return getattr(self, "model_dtype", self.dtype)

    def _first_order_gradient(self, w: torch.Tensor) -> torch.Tensor:
        """This rank's share of ∇L(w) by plain autograd, with any attention kernel (no second derivative is taken)."""
        w = w.detach().requires_grad_(True)
        total = torch.zeros_like(w)
        self._any_attention = True
        try:
            for c, batch in zip(self.batch_weights, self.batches):
                total.add_(torch.autograd.grad(self._batch_loss(w, batch), w)[0], alpha=c)
        finally:
            self._any_attention = False
        return self._unscaled(total)

    def _local_hvp(self, V: torch.Tensor) -> torch.Tensor:
        """This rank's share of H V (all of it when not distributed); zero for a rank without batches."""
        if not self.batches:
            return torch.zeros_like(V)
        try:
            return getattr(self, "_hvp_" + self.hvp_method.replace("-", "_"))(V)
        except Exception as error:  # torch.func cannot trace every model; autograd can
            if self.hvp_method not in _TORCH_FUNC_METHODS or isinstance(error, torch.OutOfMemoryError):
                raise
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            raise ObjectiveError(
                f"hvp_method {self.hvp_method!r}: torch.func could not trace the model ({reason}); use auto or double-backward"
            ) from error

    def _hvp_double_backward(self, V: torch.Tensor) -> torch.Tensor:
        """Double backward, rebuilding each batch's gradient graph per call (least memory: one batch's graph)."""
        return self._streamed_hvp(V, self.batches, self.batch_weights)

    def _streamed_hvp(self, V: torch.Tensor, batches: Sequence[Batch], weights: Sequence[float]) -> torch.Tensor:
        out = torch.zeros_like(V)
        for c, batch in zip(weights, batches):
            w = self.w.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self._batch_loss(w, batch), w, create_graph=True)
            out += c * self._backward_rows(g, w, V, retain_graph=False)
        return out

    def _hvp_reuse(self, V: torch.Tensor) -> torch.Tensor:
        """Double backward through the gradient graph of the batches kept (memory_plan), the rest rebuilt per call.

        The kept batches' weighted gradients are summed into one graph built on the first call, so each
        product is one backward pass through it; batches beyond the budget are streamed as double backward.
        """
        kept = self.memory_plan.kept_batches
        if self._cache is None or self._cache[0] != "reuse":
            w = self.w.detach().requires_grad_(True)
            g = None
            for c, batch in zip(self.batch_weights[:kept], self.batches[:kept]):
                g = _weighted_add(g, c, torch.autograd.grad(self._batch_loss(w, batch), w, create_graph=True)[0])
            self._cache = ("reuse", w, g)
        _, w, g = self._cache
        out = self._backward_rows(g, w, V, retain_graph=True) if kept else torch.zeros_like(V)
        if kept < len(self.batches):
            out += self._streamed_hvp(V, self.batches[kept:], self.batch_weights[kept:])
        return out

    def _backward_rows(self, g: torch.Tensor, w: torch.Tensor, V: torch.Tensor, retain_graph: bool) -> torch.Tensor:
        """Rows of ∂(g·vᵢ)/∂w for the rows vᵢ of V.

        On a GPU in one batched backward (is_grads_batched); on a CPU one row at a time, which measures
        faster there (benchmarks/hvp.py: 1.5 against 2.6 gradients per product on the digits MLP). Some
        double-backward formulas have no vmap rule (GroupNorm's, in torch 2.13): their rows go one at a time.
        """
        if len(V) > 1 and self._batch_probes and self.device.type != "cpu":
            try:
                return self._unscaled(torch.autograd.grad(g, w, V, retain_graph=True, is_grads_batched=True)[0])
            except RuntimeError:
                self._batch_probes = False
        last = len(V) - 1  # ∂(g·v)/∂w of the scalar g·v: the same product as grad_outputs=v, without the import of
        # torch's symbolic-shape machinery that a tensor grad_outputs triggers (0.4 s of a short run's start-up)
        rows = [torch.autograd.grad(g @ v, w, retain_graph=retain_graph or i < last)[0] for i, v in enumerate(V)]
        return self._unscaled(rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows))  # one probe: its row

    def _gradient_function(self) -> Callable[[torch.Tensor], torch.Tensor]:
        def gradient(w: torch.Tensor) -> torch.Tensor:
            return self._unscaled(self._weighted_sum(lambda batch: torch.func.grad(self._batch_loss)(w, batch)))

        return gradient

    def _hvp_fwd_rev(self, V: torch.Tensor) -> torch.Tensor:
        """Forward-over-reverse: jvp of the gradient, probes batched with vmap."""
        gradient = self._gradient_function()
        w = self.w.detach()

        def one(v: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(gradient, (w,), (v,))[1]

        if len(V) > 1 and self._batch_probes:
            try:
                return torch.func.vmap(one)(V)
            except RuntimeError:  # an op without a vmap rule (a custom autograd Function): one probe at a time
                self._batch_probes = False
        return torch.stack([one(v) for v in V])

    def _hvp_compiled(self, V: torch.Tensor) -> torch.Tensor:
        """Forward-over-reverse per batch, compiled by torch.compile (inductor) on first use of each batch shape.

        For GPUs (curvlinops reports 8× → 1.8× a gradient for a ResNet-18 there); on a CPU compiling ResNet-20
        takes ~90 s and the product still costs ~3 gradients (benchmarks/hvp.py), so `auto` never picks it.
        """
        if self._cache is None or self._cache[0] != "compiled":

            def product(w: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
                return self._unscaled(torch.func.jvp(lambda u: torch.func.grad(self._batch_loss)(u, batch), (w,), (v,))[1])

            # static shapes: a recompile (another model, or the last, smaller batch) would otherwise go dynamic, and
            # jvp's dual tensors cannot take symbolic sizes in torch 2.13
            self._cache = ("compiled", torch.compile(product, dynamic=False))
        product, w = self._cache[1], self.w.detach()
        return torch.stack([self._weighted_sum(lambda batch: product(w, v, batch)) for v in V])

    def _hvp_linearize(self, V: torch.Tensor) -> torch.Tensor:
        """Forward-over-reverse with the primal pass linearized once and reused (torch.func.linearize, functionalized)."""
        if self._cache is None or self._cache[0] != "linearize":
            self._cache = ("linearize", self._linearized_gradient())
        jvp_fn = self._cache[1]
        return torch.stack([jvp_fn(v) for v in V])

    def _linearized_gradient(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """v ↦ H v from one linearization of the gradient at w (see `linearized`)."""
        return linearized(self._gradient_function(), self.w.detach())

    # ---------------------------------------------------------------- memory
    def _graph_bytes(self, batch: Batch) -> float:
        """Bytes autograd saves for the gradient graph of one batch (from _graph_size_model)."""
        fixed, per_item = self._graph_size_model()
        return fixed + per_item * batch_size(batch)

    def _graph_bytes_per_sample(self) -> float:
        """Bytes a create_graph gradient saves per sample (the slope of _graph_size_model)."""
        return self._graph_size_model()[1]

    def _graph_size_model(self) -> tuple[float, float]:
        """(fixed, per-item) bytes of the tensors a create_graph gradient saves, from two slices of the first batch.

        Saved tensors are counted once per storage, without the weights and the batch itself, which exist
        anyway; slices of 4 and 8 items give the line, so a batch too large to differentiate is sized
        without building its graph. A batch that cannot be sliced (unequal leading dimensions) is measured whole.
        """
        if self._graph_size is None:
            self._graph_size = (0.0, 0.0)
            if self.batches:
                first = self.batches[0]
                n = batch_size(first)
                small, large = (_leading(first, 4), _leading(first, 8)) if n > 8 else (None, None)
                if small is None or large is None:
                    self._graph_size = (0.0, self._saved_bytes(first) / max(n, 1))
                else:
                    a, b = self._saved_bytes(small), self._saved_bytes(large)
                    per_item = max(b - a, 0.0) / 4
                    self._graph_size = (max(a - 4 * per_item, 0.0), per_item)
        return self._graph_size

    def _saved_bytes(self, batch: Batch) -> float:
        """Distinct bytes autograd saves for one create_graph gradient on `batch` (weights and inputs left out)."""
        exclude = {t.untyped_storage().data_ptr() for t in [self.w, *self._fixed.values(), *_tensors(batch)]}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.layout == torch.strided and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in exclude:
                    saved[storage.data_ptr()] = storage.nbytes()
            return t

        w = self.w.detach().requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # also inside evaluate
            torch.autograd.grad(self._batch_loss(w, batch), w, create_graph=True)
        return float(sum(saved.values()))

    def _plan_memory(self, budget: float | None) -> MemoryPlan:
        """How many batches `reuse` keeps, the predicted peak of the chosen path, and a one-line refusal if it cannot fit."""
        free = available_bytes(self.device)
        budget = int(budget if budget is not None else 0.5 * free)
        sizes = [self._graph_bytes(b) for b in self.batches]
        largest = max(sizes, default=0.0)
        transient = GRAPH_OVERHEAD["transient"] * largest
        kept, kept_bytes = 0, 0.0
        if self.hvp_method == "reuse":
            room = min(budget, free - transient - WORKSPACE_BYTES)  # kept graphs never crowd out a streamed batch
            for size in sizes:
                if kept_bytes + GRAPH_OVERHEAD["kept"] * size > room:
                    break
                kept, kept_bytes = kept + 1, kept_bytes + GRAPH_OVERHEAD["kept"] * size
            peak = kept_bytes + transient
        elif self.hvp_method == "linearize":
            peak = GRAPH_OVERHEAD["linearize"] * sum(sizes) + transient
        elif self.hvp_method == "fwd-rev":
            peak = GRAPH_OVERHEAD["fwd-rev"] * sum(sizes)
        elif self.hvp_method == FINITE_DIFFERENCE_HVP:
            # one first-order gradient graph at a time (no create_graph: double backward's transient graph bounds it)
            # plus the n-vectors fd.CentralDifferences holds (fd.HELD_VECTORS)
            peak = transient + fd.HELD_VECTORS * self.n_params * self.w.element_size()
        else:  # double backward, and compiled forward-over-reverse: one batch at a time
            peak = transient
        plan = MemoryPlan(
            path=self.hvp_method,
            kept_batches=kept,
            n_batches=len(sizes),
            kept_bytes=int(kept_bytes),
            predicted_peak_bytes=int(peak + WORKSPACE_BYTES),
            budget_bytes=budget,
            available_bytes=int(free),
            resident_bytes=resident_bytes(self.device),
        )
        if plan.predicted_peak_bytes > free:
            raise InsufficientMemory(self._memory_advice(plan, largest))
        return plan

    def _memory_advice(self, plan: MemoryPlan, largest: float) -> str:
        """One line: what the path needs, what is free, and the options that would fit."""
        need, free = format_size(plan.predicted_peak_bytes), format_size(plan.available_bytes)
        fixed, per_item = (GRAPH_OVERHEAD["transient"] * b for b in self._graph_size_model())
        fitting = int((0.8 * plan.available_bytes - WORKSPACE_BYTES - fixed) / per_item) if per_item else 0
        options = []
        if plan.path in ("linearize", "fwd-rev") and GRAPH_OVERHEAD["transient"] * largest <= plan.available_bytes:
            options.append("--hvp auto (keeps what fits, streams the rest)")
        if GRAPH_OVERHEAD["transient"] * largest > plan.available_bytes or not options:
            length = max((sequence_length(b) or 0 for b in self.batches), default=0)
            items = max((batch_size(b) for b in self.batches), default=1)
            if length and per_item:  # per item cost grows at least linearly with the length (attention: squared)
                shorter = int(length * (0.8 * plan.available_bytes - WORKSPACE_BYTES - fixed) / (per_item * items))
                if 2 <= shorter < length:
                    options.append(f"--max-length {shorter}")
            if plan.path != FINITE_DIFFERENCE_HVP and length:
                options.append(f"--hvp {FINITE_DIFFERENCE_HVP} (gradients only: no second-order graph, fused attention)")
            options.append(
                f"--batch-size {max(fitting, 1)} or smaller"
                if fitting >= 1
                else "a smaller model or a larger device (not even one sample's gradient graph fits)"
            )
        return (
            f"not enough memory on {self.device}: HVPs by {plan.path} need about {need} but {free} is free; "
            f"use {' or '.join(options)}"
        )

    def _forward_batches(self) -> list[Batch]:
        """The batches forward-only evaluation runs over: in eval mode, small batches merged (see _merged)."""
        if self._eval_chunks is None:
            merge = self.mode == "eval" and self.batches
            self._eval_chunks = _merged(self.batches, self._graph_bytes_per_sample()) if merge else self.batches
        return self._eval_chunks


_TORCH_FUNC_METHODS = ("linearize", "fwd-rev", "compiled")
EVAL_CHUNK_BYTES = 8 * 2**20


def _merged(batches: list[Batch], bytes_per_sample: float) -> list[Batch]:
    """Consecutive batches joined while a chunk's activations stay under EVAL_CHUNK_BYTES (never split).

    In eval mode every sample's loss is independent of its batch, so forward-only evaluation
    of a small model can take fewer, larger calls (fewer Python round trips per grid point);
    a model whose activations outgrow the cache keeps its batches, which run faster there.
    """
    if not all(_is_pair(b) for b in batches) or len({tuple(x.shape[1:]) for x, _ in batches}) > 1:
        return list(batches)  # dicts and tuples (token sequences of different lengths) are kept as they are
    chunks: list[list[Batch]] = []
    size = EVAL_CHUNK_BYTES
    for x, y in batches:
        nbytes = len(y) * bytes_per_sample
        if size + nbytes > EVAL_CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append((x, y))
        size += nbytes
    return [(torch.cat([x for x, _ in c]), torch.cat([y for _, y in c])) if len(c) > 1 else c[0] for c in chunks]


def _forward(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    args: tuple,
    kwargs: dict,
    slots: dict | None = None,
    math_attention: bool = True,
):
    """The model at `state`, with scaled_dot_product_attention on its math kernel: the fused kernels (flash attention
    on CPU and GPU) have neither a second derivative nor a forward-mode one, so no HVP could pass through them. The
    math kernel computes the same attention (to rounding) and every number here uses it, forward-only ones too,
    except the first-order gradients of the finite-difference path (`math_attention=False`: any kernel).

    With the model's `slots` (_tensor_slots) the tensors are put in place directly, as functional_call does after
    finding them: its per-call walk of the module tree (tied names, attribute lookups) cost 0.03 ms a call on the
    digits MLP, 0.09 ms on the ConvNet and 0.7 ms on ResNet-20 (1-2% of the small models' gradients). A
    name the slots do not know, and code torch.compile traces, take functional_call itself."""
    with sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
        if slots is None or torch.compiler.is_compiling() or not slots.keys() >= state.keys():
            return functional_call(model, state, args, kwargs)
        swapped = []
        try:
            for name, tensor in state.items():
                for table, key in slots[name]:
                    swapped.append((table, key, table[key]))
                    table[key] = tensor
            return model(*args, **kwargs)
        finally:
            for table, key, original in reversed(swapped):
                table[key] = original


def _tensor_slots(model: nn.Module) -> dict[str, list[tuple[dict, str]]]:
    """Each parameter's and buffer's name → the (module._parameters or ._buffers, key) entries that hold it.

    Names are those of named_parameters() and named_buffers(): a tensor registered under several names (tied
    weights, a module used twice) is listed under its first name with every entry that holds it, so one value
    given for it reaches all of them, as functional_call's tie_weights does.
    """
    slots: dict[str, list[tuple[dict, str]]] = {}
    first_name: dict[int, str] = {}
    seen: set[tuple[int, str]] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is None or (id(table), key) in seen:
                    continue
                seen.add((id(table), key))
                name = first_name.setdefault(id(tensor), prefix + key)
                slots.setdefault(name, []).append((table, key))
    return slots


def _loss_scale(dtype: torch.dtype, scale: float | None) -> float:
    """The first loss scale: FLOAT16_LOSS_SCALE for float16 unless given, 1 otherwise; a power of two, so exact."""
    if scale is None:
        return FLOAT16_LOSS_SCALE if dtype == torch.float16 else 1.0
    if not (scale > 0 and math.isfinite(scale) and math.log2(scale).is_integer()):
        raise ObjectiveError(f"loss_scale {scale!r}: use a power of two (1, 2, ..., 1024, ...), which scales exactly")
    return float(scale)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _float32_output(output):
    """The model's output with its logits in float32 (a tensor, an output with .logits, a dict, or a tuple's first)."""
    if isinstance(output, torch.Tensor):
        return output.float()
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        cast = copy.copy(output)  # a HuggingFace ModelOutput stays one (its .logits and ["logits"] are one field)
        cast["logits"] = output["logits"].float()
        return cast
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        cast = copy.copy(output)
        cast.logits = output.logits.float()
        return cast
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0].float(), *output[1:])
    return output


def _weighted_add(total: torch.Tensor | None, c: float, g: torch.Tensor) -> torch.Tensor:
    """total + c·g, with total None before the first batch; the only batch's weight is 1 and multiplies nothing."""
    if total is None:
        return g if c == 1 else c * g
    return total + c * g


def _is_pair(batch: Batch) -> bool:
    return (
        isinstance(batch, tuple)
        and len(batch) == 2
        and all(isinstance(t, torch.Tensor) for t in batch)
        and batch[0].ndim > 0
        and batch[1].ndim > 0
    )


def linearized(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """v ↦ J_fn(w) v, from one trace of `fn` at w (torch.func.linearize), replayed for every v.

    Functionalized first: a traced in-place op (`out += h`, ReLU(inplace=True)) otherwise writes into the
    graph's saved constants, so every product after the first came out wrong. A function that
    functionalization cannot trace (a custom autograd Function, in torch 2.13) gets an eager jvp per
    product instead: slower, never wrong.
    """
    with warnings.catch_warnings():  # torch.fx const folding warns about its own graph attributes
        warnings.simplefilter("ignore", UserWarning)
        try:
            return torch.func.linearize(torch.func.functionalize(fn), w)[1]
        except RuntimeError as error:
            if "functionaliz" not in str(error).lower():
                raise
    return lambda v: torch.func.jvp(fn, (w,), (v,))[1]


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖/‖b‖ (absolute when b is zero); NaN anywhere counts as infinitely different."""
    scale = float(b.norm())
    difference = float((a - b).norm())
    if not math.isfinite(difference):
        return math.inf
    return difference / scale if scale > 0 else difference


def _random_probe(objective: Objective) -> torch.Tensor:
    """A seeded Gaussian probe (1, n), for a first probe block that is all zeros."""
    g = torch.Generator(device=objective.device).manual_seed(0)
    return torch.randn(1, objective.n_params, generator=g, device=objective.device, dtype=objective.dtype)


def _tensors(batch: Batch) -> list[torch.Tensor]:
    """The tensors of a batch (a tensor, a tuple or a dict)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, dict) else batch
    return [t for t in values if isinstance(t, torch.Tensor)]


def _input_shapes(batch: Batch) -> str:
    """What the model is given, in shapes: "inputs of shape (8, 8) (batches of 64)", or each keyword's shape."""
    args, kwargs = model_arguments(batch)
    if kwargs:
        return "inputs " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    x = args[0]
    if not isinstance(x, torch.Tensor) or not x.ndim:
        return f"inputs of type {type(x).__name__}"
    return f"inputs of shape {tuple(x.shape[1:])} (batches of {x.shape[0]})"


def _leading(batch: Batch, n: int) -> Batch | None:
    """The first n items of a batch whose tensors all share their leading dimension; None otherwise."""
    tensors = _tensors(batch)
    if not tensors or len({t.shape[0] if t.ndim else -1 for t in tensors}) != 1:
        return None
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return tuple(t[:n] if isinstance(t, torch.Tensor) else t for t in batch)
