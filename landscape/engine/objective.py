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
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.engine import distributed as ranks
from landscape.engine import finite_difference as fd
from landscape.engine.hvp_check import HVPCheck, self_checked
from landscape.engine.hvp_paths import (
    COMPILED_HVP,
    FINITE_DIFFERENCE_HVP,
    HVP_METHODS,
    HVP_PATHS,
    TORCH_FUNC_METHODS,
    weighted_add,
)
from landscape.engine.memory import MemoryPlan, plan_memory, saved_graph_bytes
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
from landscape.inputs.precision import LOW_PRECISION
from landscape.results import Result

MODES = ("eval", "train")

__all__ = ["Objective", "ObjectiveError", "Evaluation", "cross_entropy"]


class ObjectiveError(ValueError):
    """The model, data or settings cannot define a finite objective."""


FLOAT16_LOSS_SCALE = 2.0**10  # float16's first loss scale, halved while a derivative overflows (Objective)


@dataclass(frozen=True)
class Evaluation(Result):
    """Loss and accuracy of the objective at one point of weight space."""

    loss: float
    accuracy: float | None
    n_samples: int


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
    product path (landscape.engine.hvp_paths, benchmarks/hvp.py), or `finite-difference`, central differences of
    gradients with an error estimate per product (for models without a second derivative); `auto` is `reuse`: the
    create_graph gradient of as many batches as fit in `graph_memory_budget` bytes (default: half the free memory)
    is kept across products and the rest rebuilt per product, so any measurement set fits. The first product is
    checked against double backward (`hvp_check_result`, landscape.engine.hvp_check).
    Peak memory is predicted at construction (`memory_plan`, landscape.engine.memory.plan_memory); a plan that
    cannot fit the free memory raises InsufficientMemory at once, naming the option that would fit.
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
                total = weighted_add(total, c, g)
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
            products = HVP_PATHS[FINITE_DIFFERENCE_HVP](self, V)
            return self_checked(self, V, products) if self._check_pending else products
        norms = None
        if self.model_dtype == torch.float16:  # unit rows: a product's size then follows H, not the probe's length
            norms = V.norm(dim=1, keepdim=True)
            V = V / norms.clamp_min(torch.finfo(V.dtype).tiny)

        def products() -> torch.Tensor:
            out = self._local_hvp(V)
            if self._check_pending:
                out = self_checked(self, V, out)
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

    def _local_hvp(self, V: torch.Tensor) -> torch.Tensor:
        """This rank's share of H V (all of it when not distributed); zero for a rank without batches."""
        if not self.batches:
            return torch.zeros_like(V)
        try:
            return HVP_PATHS[self.hvp_method](self, V)
        except Exception as error:  # torch.func cannot trace every model; autograd can
            if self.hvp_method not in TORCH_FUNC_METHODS or isinstance(error, torch.OutOfMemoryError):
                raise
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            raise ObjectiveError(
                f"hvp_method {self.hvp_method!r}: torch.func could not trace the model ({reason}); use auto or double-backward"
            ) from error

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
        exclude = [self.w, *self._fixed.values(), *_tensors(batch)]
        return saved_graph_bytes(lambda w: self._batch_loss(w, batch), self.w, exclude)

    def _plan_memory(self, budget: float | None) -> MemoryPlan:
        """The memory plan of the chosen path over these batches (landscape.engine.memory.plan_memory)."""
        return plan_memory(
            self.hvp_method,
            self.device,
            [batch_size(b) for b in self.batches],
            self._graph_size_model(),
            budget=budget,
            vector_bytes=self.n_params * self.w.element_size(),
            sequence_length=max((sequence_length(b) or 0 for b in self.batches), default=0),
        )

    def _forward_batches(self) -> list[Batch]:
        """The batches forward-only evaluation runs over: in eval mode, small batches merged (see _merged)."""
        if self._eval_chunks is None:
            merge = self.mode == "eval" and self.batches
            self._eval_chunks = _merged(self.batches, self._graph_bytes_per_sample()) if merge else self.batches
        return self._eval_chunks


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


def _is_pair(batch: Batch) -> bool:
    return (
        isinstance(batch, tuple)
        and len(batch) == 2
        and all(isinstance(t, torch.Tensor) for t in batch)
        and batch[0].ndim > 0
        and batch[1].ndim > 0
    )


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
