"""Flat-minimum training methods around a base torch optimizer: SmoothOut, AdaSmoothOut, S-SGD, NSO, NRS, SAM/ASAM.

One calling convention for the trainer: `loss, logits = opt.step(model, x, y, loss_fn)` once per
mini-batch. The method makes every forward/backward pass it needs (ghost-batch chunks, perturbed
points), leaves the gradient it descends in `p.grad`, clips it optionally and steps the base
optimizer at the unperturbed weights. Perturbed weights are always restored from a saved copy, so
they are bitwise what they were. Only one pass per chunk updates BatchNorm running statistics (the
first); every later pass restores all buffers exactly. `loss_fn(logits, y)` must return the batch
mean: chunks are combined with weights n_chunk / n_batch. Noise comes from a torch.Generator seeded
with `seed`, drawn per chunk and per parameter in `model.named_parameters()` order.

The pieces of one step: `accumulate=K` cuts the batch into K micro-batches, each cut again into ghost
batches when `ghost_batch_size` is smaller; the passes run piece by piece and their gradients are summed
as they come, so only one piece's activations are alive at a time. For SGD/Adam, K micro-batches equal
the K-times-larger batch (to float rounding; BatchNorm sees each micro-batch's statistics). A noisy
method draws fresh noise per piece, so `accumulate=K` means noise per micro-batch, as ghost batches of
n/K would (SmoothOut, S-SGD, NSO, NRS); SAM's ascent follows `ascent_gradient`.

Data-parallel (`distribute`, landscape/training/data_parallel.py): each rank makes the passes on its share of the
global batch with its own noise stream; SmoothOut, S-SGD and NSO draw independent noise per rank, NSO's
±U pairs stay together on one rank, and de-noising restores each rank's (identical) weights exactly.
The pieces' gradients are weighted by n_piece / N_global and summed over the ranks once per step.

Mixed precision (`amp`): the forward passes run under torch.autocast in bf16 or fp16; the gradients,
the weights and the optimizer state stay in float32. With fp16 a GradScaler scales every pass's loss,
and the combined gradient is unscaled, checked for inf/nan and stepped once per step: a pass that
overflows skips the whole step (the weights are restored from their saved copy either way). SAM's
ε̂ = ρ·g/‖g‖ does not depend on the scale.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from landscape.engine.noise import DISTRIBUTIONS, NOISE_SCALES, TO_UNIT_STD, draw, smoothout_noise
from landscape.engine.params import norm_layer_parameter_names
from landscape.results import to_jsonable
from landscape.training.data_parallel import GradientSync, rank_seed

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Grads = list[torch.Tensor | None]

BASES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
SCHEDULES = ("constant", "anneal", "tanh")
NRS_DISTRIBUTIONS = ("box", "ball", "gaussian")
KL_DIRECTIONS = ("forward", "reverse")
ASAM_RULES = ("name", "ndim")
ASCENTS = ("local", "global")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_one_of(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) ‖ softmax(q)), summed over classes and averaged over the batch."""
    return F.kl_div(F.log_softmax(q_logits, dim=-1), F.log_softmax(p_logits, dim=-1), log_target=True, reduction="batchmean")


@contextlib.contextmanager
def displaced(params: list[torch.Tensor], deltas: list[torch.Tensor], restore: bool = True) -> Iterator[None]:
    """Weights w+δ inside the block; on exit the saved copy of w is written back (bitwise, unlike (w+δ)−δ)."""
    saved = [p.detach().clone() for p in params] if restore else None
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p.add_(d)
    try:
        yield
    finally:
        if saved is not None:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)


@contextlib.contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Every buffer (BatchNorm running statistics, batch counters) restored exactly on exit."""
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def _combine(terms: list[tuple[float, torch.Tensor, Grads]]) -> tuple[torch.Tensor, Grads]:
    """Σ weight·loss and Σ weight·grad over (weight, loss, grads) terms; a gradient stays None where every term has None."""
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1], list(terms[0][2])
    loss = sum(w * l for w, l, _ in terms)
    total: Grads = [None] * len(terms[0][2])
    for w, _, grads in terms:
        for i, g in enumerate(grads):
            if g is not None:
                total[i] = g * w if total[i] is None else total[i].add_(g, alpha=w)
    return loss, total


class Method:
    """What every training method shares: the base optimizer (SGD or Adam), the step's pieces, the loss scaler, the
    data-parallel reduction, the noise generator and resuming. A method changes `_chunk`: the passes it makes on one
    piece. The plain baseline, one clean pass, is `Plain`.

    `momentum` is SGD's momentum or Adam's β1; `clip_grad_norm` clips the global gradient norm before the
    base step (SmoothOut's reference: 5.0); `ghost_batch_size` splits each batch into chunks (None: one).
    """

    name = "sgd"

    def __init__(
        self,
        model: nn.Module,
        *,
        base: str = "sgd",
        lr: float,
        momentum: float | None = None,
        weight_decay: float = 0.0,
        base_kwargs: dict | None = None,
        clip_grad_norm: float | None = None,
        ghost_batch_size: int | None = None,
        accumulate: int = 1,
        amp: str = "none",
        seed: int = 0,
    ) -> None:
        if base not in BASES:
            raise ValueError(f"unknown base optimizer {base!r}; use one of {', '.join(BASES)}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm}")
        if ghost_batch_size is not None and ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be at least 1 or None, got {ghost_batch_size}")
        if accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {accumulate}")
        if amp not in AMP_DTYPES:
            raise ValueError(f"unknown amp {amp!r}; use one of {', '.join(AMP_DTYPES)}")
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("the model has no trainable parameters")
        self.params = [p for _, p in self.named]
        if base == "sgd":
            kwargs = {"momentum": 0.0 if momentum is None else momentum}
        else:
            kwargs = {"betas": (0.9 if momentum is None else momentum, 0.999)}
        self.base = BASES[base](self.params, lr=lr, weight_decay=weight_decay, **kwargs, **(base_kwargs or {}))
        self.base_name = base
        if type(self) is Plain:  # the baseline is named after its base optimizer
            self.name = base
        self.base_hyperparameters = {k: v for k, v in self.base.param_groups[0].items() if k != "params"}
        self.clip_grad_norm = clip_grad_norm
        self.ghost_batch_size = ghost_batch_size
        self.accumulate, self.amp = accumulate, amp
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(self.params[0].device.type) if amp == "fp16" else None
        self.seed = seed
        self.generator = torch.Generator(device=self.params[0].device).manual_seed(seed)
        self.sync: GradientSync | None = None
        self.steps = 0

    @property
    def param_groups(self) -> list[dict]:
        """The base optimizer's parameter groups (a torch lr_scheduler attaches to `opt.base`)."""
        return self.base.param_groups

    def options(self) -> dict:
        """The method's own hyperparameters (none for plain SGD/Adam)."""
        return {}

    def config(self) -> dict:
        """Every hyperparameter and option, JSON-ready (stored in checkpoints)."""
        return to_jsonable(
            {
                "method": self.name,
                "base": self.base_name,
                "base_hyperparameters": self.base_hyperparameters,
                "clip_grad_norm": self.clip_grad_norm,
                "ghost_batch_size": self.ghost_batch_size,
                "accumulate": self.accumulate,
                "amp": self.amp,
                "seed": self.seed,
                **self.options(),
            }
        )

    def distribute(self, sync: GradientSync) -> None:
        """Train data-parallel: gradients summed over the ranks by `sync` each step, and this rank's own noise stream
        (seeded `landscape.training.data_parallel.rank_seed(seed, rank)`; rank 0 keeps the one-process stream)."""
        self.sync = sync
        self.generator.manual_seed(rank_seed(self.seed, sync.rank))

    def preconditioner_state(self) -> dict | None:
        """The base optimizer's state_dict with its parameters named, for preconditioned sharpness; None for SGD
        (no preconditioner), so only an adaptive optimizer's checkpoints carry it."""
        if self.base_name == "sgd":
            return None
        state = self.base.state_dict()
        names = iter(n for n, _ in self.named)
        for group in state["param_groups"]:
            group["param_names"] = [next(names) for _ in group["params"]]
        return state

    def state_dict(self) -> dict:
        """Base optimizer state, step counter, noise generator and loss-scaler state: resuming repeats the run exactly."""
        state = {
            "config": self.config(),
            "base": self.base.state_dict(),
            "steps": self.steps,
            "generator": self.generator.get_state(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; settings that differ from this optimizer's are an error.

        Settings a state written by an older version lacks are read as this optimizer's.
        """
        stored = {**self.config(), **state["config"]}
        if stored != self.config():
            differ = sorted(k for k in set(stored) | set(self.config()) if stored.get(k) != self.config().get(k))
            raise ValueError(f"optimizer state belongs to different settings ({', '.join(differ)}); resume with the same options")
        self.base.load_state_dict(state["base"])
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def step(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, global_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on the mini-batch (x, y): the method's gradient in `p.grad`, clipped, then a base step.

        Data-parallel (after `distribute`), (x, y) is this rank's share of the global batch and the
        gradient is the global batch's; `global_size`, the global batch's size where the caller knows it,
        saves the collective that counts it. Returns the method's loss (the weighted losses of the passes its
        gradient combines, detached; the global batch's when data-parallel) and the logits of each
        chunk's first pass on this rank.
        """
        if model is not self.model:
            raise ValueError("step() got a different model from the one this optimizer was built for")
        if self.sync is None:
            total = len(y)
        else:
            total = global_size if global_size is not None else self.sync.global_count(len(y), self.params[0].device)
        loss, grads, logits = self._sweep(model, self.chunks(x, y), total, loss_fn)
        loss, grads = self._reduce(loss, grads)
        self._descend(grads)
        return loss, logits

    def chunks(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The pieces one step makes its passes on, in order: `accumulate` micro-batches (sizes ⌈n/K⌉), each split
        into ghost batches of `ghost_batch_size`. A method draws fresh noise per piece."""
        if len(y) == 0:
            return []
        micro = -(-len(y) // self.accumulate)
        pieces = []
        for xm, ym in zip(torch.split(x, micro), torch.split(y, micro)):
            size = min(self.ghost_batch_size or len(ym), len(ym))
            pieces += list(zip(torch.split(xm, size), torch.split(ym, size)))
        return pieces

    def _sweep(
        self,
        model: nn.Module,
        pieces: list[tuple[torch.Tensor, torch.Tensor]],
        total: int,
        loss_fn: LossFn,
        chunk: Callable | None = None,
    ) -> tuple[torch.Tensor, Grads, torch.Tensor]:
        """Σ (n_piece/total)·(loss, grads) of `chunk` (default `_chunk`) over the pieces, summed as they come (one
        piece's gradients alive at a time), and the pieces' first-pass logits."""
        chunk = chunk or self._chunk
        loss: torch.Tensor = torch.zeros((), device=self.params[0].device)
        grads: Grads = [None] * len(self.params)
        logits = []
        for i, (xc, yc) in enumerate(pieces):
            chunk_logits, chunk_terms = chunk(model, xc, yc, loss_fn)
            chunk_loss, chunk_grads = _combine(chunk_terms)
            weight = len(yc) / total
            if weight == 1.0:  # the whole batch in one piece: unweighted, as one pass
                loss, grads = chunk_loss, chunk_grads
            elif i == 0:
                loss, grads = _combine([(weight, chunk_loss, chunk_grads)])
            else:  # the same operations, in the same order, as _combine over all pieces at once
                loss = loss + weight * chunk_loss
                for j, g in enumerate(chunk_grads):
                    if g is not None:
                        grads[j] = g * weight if grads[j] is None else grads[j].add_(g, alpha=weight)
            logits.append(chunk_logits)
        return loss, grads, torch.cat(logits) if logits else torch.empty(0)

    def _reduce(self, loss: torch.Tensor, grads: Grads) -> tuple[torch.Tensor, Grads]:
        """Loss and gradients summed over the ranks when data-parallel (unchanged otherwise)."""
        if self.sync is None:
            return loss, grads
        return self.sync.sum_gradients(loss, grads, self.params)

    def _descend(self, grads: Grads) -> None:
        """`grads` into p.grad, unscaled (fp16), clipped, and the base step at the current weights."""
        for p, g in zip(self.params, grads):
            p.grad = g
        if self.scaler is not None:
            self.scaler.unscale_(self.base)  # once per step, whatever number of passes the gradient combines
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.base)  # skipped when a pass overflowed: the gradient then holds inf or nan
            self.scaler.update()
        else:
            self.base.step()
        self.steps += 1

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The forward passes' mixed-precision context (a no-op with amp="none")."""
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=AMP_DTYPES[self.amp])

    def _chunk(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, list[tuple[float, torch.Tensor, Grads]]]:
        """(first-pass logits, [(weight, loss, grads)]) of one chunk: here a single clean pass."""
        loss, logits, grads = self._gradient(model, x, y, loss_fn)
        return logits, [(1.0, loss, grads)]

    def _objective(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) at the current weights."""
        logits = model(x)
        return loss_fn(logits, y), logits

    def _gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, freeze_buffers: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, Grads]:
        """One forward/backward pass at the current weights: (loss, logits, grads of all trainable params)."""
        with frozen_buffers(model) if freeze_buffers else contextlib.nullcontext():
            with self.autocast(x.device):
                loss, logits = self._objective(model, x, y, loss_fn)
            scaled = loss if self.scaler is None else self.scaler.scale(loss)
            grads = torch.autograd.grad(scaled, self.params, allow_unused=True)
        return loss.detach(), logits.detach(), list(grads)


class Plain(Method):
    """Plain SGD/Adam through the common interface: the baseline every flat-minimum method is compared with."""


class PerturbationMethod(Method):
    """A method that evaluates gradients at perturbed weights; `exclude_bn` / `exclude_bias` pick what is perturbed."""

    def __init__(self, model: nn.Module, *, exclude_bn: bool = False, exclude_bias: bool = False, **kwargs) -> None:
        super().__init__(model, **kwargs)
        norm = norm_layer_parameter_names(model)
        self.exclude_bn, self.exclude_bias = exclude_bn, exclude_bias
        self.perturbed = [
            (n, p)
            for n, p in self.named
            if not (exclude_bn and n in norm) and not (exclude_bias and n not in norm and n.endswith("bias"))
        ]
        if not self.perturbed:
            raise ValueError("exclude_bn/exclude_bias leave no parameter to perturb")
        self.perturbed_params = [p for _, p in self.perturbed]
        index = {id(p): i for i, p in enumerate(self.params)}
        self.perturbed_index = [index[id(p)] for p in self.perturbed_params]

    def options(self) -> dict:
        return {"exclude_bn": self.exclude_bn, "exclude_bias": self.exclude_bias, "perturbed": [n for n, _ in self.perturbed]}


class SmoothOut(PerturbationMethod):
    """SmoothOut (Wen et al. 2018, arXiv 1805.07898): gradient of the loss at w+u per ghost batch, step at w.

    Noise scale a_t by `schedule`: constant a; anneal a·((1+t)^−anneal_index)^½ (the reference code's
    coefficient (1+t)^−0.55, square-rooted, times a); tanh a·(tanh(tanh_scale·(t/T − ½)) + 1)/2 with
    T = `total_steps`; t counts completed steps from 0. `denoise=False` keeps the noise in the weights.
    """

    name = "smoothout"

    def __init__(
        self,
        model: nn.Module,
        *,
        a: float = 0.02,
        scale: str = "absolute",
        distribution: str = "uniform",
        schedule: str = "constant",
        anneal_index: float = 0.55,
        tanh_scale: float = 10.0,
        total_steps: int | None = None,
        denoise: bool = True,
        exclude_bn: bool = True,
        **kwargs,
    ) -> None:
        if a < 0:
            raise ValueError(f"noise scale a must be non-negative, got {a}")
        if scale not in NOISE_SCALES:
            raise ValueError(f"unknown noise scale {scale!r}; use one of {', '.join(NOISE_SCALES)}")
        if distribution not in ("uniform", "gaussian"):
            raise ValueError(f"SmoothOut noise distribution must be 'uniform' or 'gaussian', got {distribution!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
        if schedule == "tanh" and (total_steps is None or total_steps < 1):
            raise ValueError("the tanh noise schedule needs total_steps (the number of optimizer steps in the run)")
        super().__init__(model, exclude_bn=exclude_bn, **kwargs)
        self.a, self.scale, self.distribution, self.schedule = a, scale, distribution, schedule
        self.anneal_index, self.tanh_scale, self.total_steps, self.denoise = anneal_index, tanh_scale, total_steps, denoise

    def options(self) -> dict:
        return {
            "a": self.a,
            "scale": self.scale,
            "distribution": self.distribution,
            "schedule": self.schedule,
            "anneal_index": self.anneal_index,
            "tanh_scale": self.tanh_scale,
            "total_steps": self.total_steps,
            "denoise": self.denoise,
            **super().options(),
        }

    def noise_scale(self, step: int | None = None) -> float:
        """a_t at step t (default: the step about to be taken)."""
        t = self.steps if step is None else step
        if self.schedule == "anneal":
            return self.a * ((1 + t) ** -self.anneal_index) ** 0.5
        if self.schedule == "tanh":
            return self.a * (math.tanh(self.tanh_scale * (t / self.total_steps - 0.5)) + 1) / 2
        return self.a

    def _chunk(self, model, x, y, loss_fn):
        a = self.noise_scale()
        noise = [smoothout_noise(p.detach(), a, self.scale, self.generator, self.distribution) for p in self.perturbed_params]
        with displaced(self.perturbed_params, noise, restore=self.denoise):
            return super()._chunk(model, x, y, loss_fn)


class AdaSmoothOut(SmoothOut):
    """AdaSmoothOut (Wen et al. 2018): SmoothOut with filter-wise noise, each filter's noise norm a·‖w_filter‖."""

    name = "adasmoothout"

    def __init__(self, model: nn.Module, *, scale: str = "filter", **kwargs) -> None:
        super().__init__(model, scale=scale, **kwargs)


class NSO(PerturbationMethod):
    """Noise stability optimization (Zhang, Li, Ju 2023, arXiv 2306.08553): λ·∇f(W) + (1−λ)/(2k)·Σ_i[∇f(W+U_i) + ∇f(W−U_i)].

    U_i = σ·(unit-variance noise of `distribution`): gaussian N(0,1), uniform U(−√3,√3), laplace.
    `clean_weight` λ: 0 as the authors' scripts (their trainer's default is 0.5). BN statistics:
    `bn_update="clean"` (default, the authors' trainer) moves them in a clean pass at W on every
    chunk, even at λ = 0, where that pass is a forward only (its gradient would weigh 0); the
    perturbed passes freeze them. `"first"` lets the first pass of each chunk move them instead
    (the clean pass if λ > 0, else W + U_1).
    """

    name = "nso"

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma: float = 0.01,
        k: int = 1,
        clean_weight: float = 0.0,
        distribution: str = "gaussian",
        two_point: bool = True,
        bn_update: str = "clean",
        **kwargs,
    ) -> None:
        if sigma < 0 or k < 1 or not 0 <= clean_weight <= 1:
            raise ValueError(f"need sigma ≥ 0, k ≥ 1 and 0 ≤ clean_weight ≤ 1; got {sigma}, {k}, {clean_weight}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown noise distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}")
        if bn_update not in ("first", "clean"):
            raise ValueError(f"bn_update must be 'first' or 'clean', got {bn_update!r}")
        super().__init__(model, **kwargs)
        self.sigma, self.k, self.clean_weight = sigma, k, clean_weight
        self.distribution, self.two_point, self.bn_update = distribution, two_point, bn_update

    def options(self) -> dict:
        return {
            "sigma": self.sigma,
            "k": self.k,
            "clean_weight": self.clean_weight,
            "distribution": self.distribution,
            "two_point": self.two_point,
            "bn_update": self.bn_update,
            **super().options(),
        }

    def _chunk(self, model, x, y, loss_fn):
        terms, logits = [], None
        if self.clean_weight > 0:
            loss, logits, grads = self._gradient(model, x, y, loss_fn)
            terms.append((self.clean_weight, loss, grads))
        elif self.bn_update == "clean":  # the reference's clean pass at weight 0: it only moves the BN statistics
            with torch.no_grad(), self.autocast(x.device):
                logits = self._objective(model, x, y, loss_fn)[1].detach()
        signs = (1.0, -1.0) if self.two_point else (1.0,)
        weight = (1 - self.clean_weight) / (self.k * len(signs))
        factor = self.sigma * TO_UNIT_STD[self.distribution]
        for _ in range(self.k):
            noise = [draw(self.distribution, p, self.generator).mul_(factor) for p in self.perturbed_params]
            for sign in signs:
                freeze = bool(terms) or self.bn_update == "clean"
                with displaced(self.perturbed_params, [sign * u for u in noise]):
                    loss, pass_logits, grads = self._gradient(model, x, y, loss_fn, freeze_buffers=freeze)
                terms.append((weight, loss, grads))
                logits = pass_logits if logits is None else logits
        return logits, terms


class SSGD(NSO):
    """S-SGD, symmetric weight noise (Sung et al. 2020, arXiv 2009.02479): ½[∇L(w+δ) + ∇L(w−δ)], δ = σ·(random signs).

    NSO with k=1, λ=0 and fixed-magnitude noise; `distribution="sphere"` is the Gaussian-direction variant
    (per tensor, the same norm σ√n as the sign noise).
    """

    name = "ssgd"

    def __init__(
        self, model: nn.Module, *, sigma: float = 0.01, distribution: str = "rademacher", bn_update: str = "first", **kwargs
    ) -> None:
        # no reference code: the BN statistics move in the first pass (W + δ), as in the first release
        super().__init__(model, sigma=sigma, distribution=distribution, bn_update=bn_update, **kwargs)


class NRS(PerturbationMethod):
    """Neighborhood region smoothing (Zhao & Zhang 2022, arXiv 2201.06064): loss_fn + α·KL between f(x;w) and f(x;w+δ).

    δ in a radius-r neighbourhood: `box` U(−r,r) per coordinate, `ball` uniform in the L2 ball of radius r,
    `gaussian` N(0, r²/d) (E‖δ‖² = r²), over the perturbed parameters together. `kl_direction` "forward" is
    KL(f(w) ‖ f(w+δ)), "reverse" KL(f(w+δ) ‖ f(w)); gradients flow through both. Defaults are unconfirmed.
    """

    name = "nrs"

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: float = 1.0,
        radius: float = 0.01,
        distribution: str = "box",
        kl_direction: str = "forward",
        **kwargs,
    ) -> None:
        if alpha < 0 or radius < 0:
            raise ValueError(f"alpha and radius must be non-negative, got {alpha}, {radius}")
        if distribution not in NRS_DISTRIBUTIONS:
            raise ValueError(f"unknown NRS distribution {distribution!r}; use one of {', '.join(NRS_DISTRIBUTIONS)}")
        _check_one_of("kl_direction", kl_direction, KL_DIRECTIONS)
        super().__init__(model, **kwargs)
        self.alpha, self.radius, self.distribution, self.kl_direction = alpha, radius, distribution, kl_direction

    def options(self) -> dict:
        return {
            "alpha": self.alpha,
            "radius": self.radius,
            "distribution": self.distribution,
            "kl_direction": self.kl_direction,
            **super().options(),
        }

    def neighbour(self) -> list[torch.Tensor]:
        """A fresh δ for the perturbed parameters."""
        params = [p.detach() for p in self.perturbed_params]
        if self.distribution == "box":
            return [draw("uniform", p, self.generator).mul_(self.radius) for p in params]
        z = [draw("gaussian", p, self.generator) for p in params]
        d = sum(p.numel() for p in params)
        if self.distribution == "gaussian":
            return [g.mul_(self.radius / math.sqrt(d)) for g in z]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in z]))
        u = torch.rand((), generator=self.generator, device=params[0].device, dtype=torch.float64)
        return [g.mul_(self.radius * float(u) ** (1 / d) / norm) for g in z]

    def regularizer(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The KL term for a fresh δ, differentiable in w (buffers untouched by the perturbed pass)."""
        delta = self.neighbour()
        moved_params = {n: p + d for (n, p), d in zip(self.perturbed, delta)}
        buffer_copies = {n: b.clone() for n, b in model.named_buffers()}  # the clean pass's graph keeps the originals
        moved = functional_call(model, {**buffer_copies, **moved_params}, (x,))
        return kl_divergence(logits, moved) if self.kl_direction == "forward" else kl_divergence(moved, logits)

    def _objective(self, model, x, y, loss_fn):
        loss, logits = super()._objective(model, x, y, loss_fn)
        return loss + self.alpha * self.regularizer(model, x, logits), logits


class SAM(PerturbationMethod):
    """SAM (Foret et al. 2021): gradient at w + ρ·g/‖g‖ (global norm), step at w; `adaptive=True` is ASAM
    (Kwon et al. 2021): ε = ρ·T²g/‖Tg‖, T = |w|+η where `asam_rule` says a weight, 1 for biases.

    `asam_rule` "name": parameters whose name contains 'weight' (the ASAM reference code, BN scales
    included); "ndim": tensors with ≥ 2 dims. `ascent_gradient` "local" (default): each piece (ghost batch,
    micro-batch of `accumulate`, this rank's share of the batch) ascends along its own gradient, m-sharpness
    with m the piece size, as Foret et al. ran it per accelerator; "global": one ε̂ from the whole step's
    gradient, over all pieces and ranks (one more all-reduce and a second sweep). BatchNorm statistics
    move in the first pass only, either way.
    """

    name = "sam"

    def __init__(
        self,
        model: nn.Module,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        asam_rule: str = "name",
        ascent_gradient: str = "local",
        **kwargs,
    ) -> None:
        if rho < 0 or eta < 0:
            raise ValueError(f"rho and eta must be non-negative, got {rho}, {eta}")
        _check_one_of("asam_rule", asam_rule, ASAM_RULES)
        _check_one_of("ascent_gradient", ascent_gradient, ASCENTS)
        super().__init__(model, **kwargs)
        self.rho, self.adaptive, self.eta, self.asam_rule = rho, adaptive, eta, asam_rule
        self.ascent_gradient = ascent_gradient

    def options(self) -> dict:
        return {
            "rho": self.rho,
            "adaptive": self.adaptive,
            "eta": self.eta,
            "asam_rule": self.asam_rule,
            "ascent_gradient": self.ascent_gradient,
            **super().options(),
        }

    def _sweep(self, model, pieces, total, loss_fn, chunk=None):
        """`ascent_gradient="global"`: ε̂ from the whole step's gradient (every piece, summed over the ranks), then
        the gradient at w + ε̂ piece by piece: two sweeps, BatchNorm statistics moved in the first only."""
        if self.ascent_gradient == "local" or chunk is not None:
            return super()._sweep(model, pieces, total, loss_fn, chunk)
        _, grads, logits = super()._sweep(model, pieces, total, loss_fn, Method._chunk.__get__(self))
        _, grads = self._reduce(torch.zeros((), device=self.params[0].device), grads)
        with displaced(self.perturbed_params, self.ascent(grads)):
            loss, grads, _ = super()._sweep(model, pieces, total, loss_fn, self._perturbed_pass)
        return loss, grads, logits

    def _perturbed_pass(self, model, x, y, loss_fn):
        loss, logits, grads = self._gradient(model, x, y, loss_fn, freeze_buffers=True)
        return logits, [(1.0, loss, grads)]

    def ascent(self, grads: Grads) -> list[torch.Tensor]:
        """ε̂ for the perturbed parameters from the gradients of all trainable ones (zero where no gradient)."""
        scales = [self._scale(n, p) for n, p in self.perturbed]
        g = [
            grads[i] if grads[i] is not None else torch.zeros_like(p) for i, p in zip(self.perturbed_index, self.perturbed_params)
        ]
        tg = [gi * t for gi, t in zip(g, scales)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in tg]))
        return [v * t * (self.rho / (norm + 1e-12)) for v, t in zip(tg, scales)]

    def _scale(self, name: str, p: torch.Tensor) -> torch.Tensor | float:
        is_weight = "weight" in name if self.asam_rule == "name" else p.ndim >= 2
        return p.detach().abs() + self.eta if self.adaptive and is_weight else 1.0

    def _chunk(self, model, x, y, loss_fn):
        _, logits, grads = self._gradient(model, x, y, loss_fn)
        with displaced(self.perturbed_params, self.ascent(grads)):
            return logits, self._perturbed_pass(model, x, y, loss_fn)[1]


class ASAM(SAM):
    """ASAM (Kwon et al. 2021): adaptive SAM, ρ = 0.5 by default (their CIFAR-10 value)."""

    name = "asam"

    def __init__(self, model: nn.Module, *, rho: float = 0.5, adaptive: bool = True, **kwargs) -> None:
        super().__init__(model, rho=rho, adaptive=adaptive, **kwargs)


METHODS = {
    "sgd": Plain,
    "adam": Plain,
    "smoothout": SmoothOut,
    "adasmoothout": AdaSmoothOut,
    "ssgd": SSGD,
    "nso": NSO,
    "nrs": NRS,
    "sam": SAM,
    "asam": ASAM,
}


def make_optimizer(
    name: str,
    model: nn.Module,
    *,
    base: str | None = None,
    lr: float,
    momentum: float | None = None,
    weight_decay: float = 0.0,
    **options,
) -> Method:
    """The method `name` around the base optimizer `base` (sgd or adam; "adam" alone is plain Adam).

    `options` are the method's keyword options (see each class) plus clip_grad_norm, ghost_batch_size,
    seed and base_kwargs (extra base-optimizer arguments, e.g. nesterov).
    """
    if name not in METHODS:
        raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(METHODS)}")
    if name in BASES:
        if base not in (None, name):
            raise ValueError(f"optimizer {name!r} is plain {name}; for a method around base {base!r} name the method")
        base = name
    cls = METHODS[name]
    allowed = {n for c in cls.__mro__ if c is not object for n in inspect.signature(c.__init__).parameters} - {
        "self",
        "model",
        "kwargs",
    }
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"optimizer {name!r} has no option {', '.join(unknown)}; its options: {', '.join(sorted(allowed))}")
    return cls(model, base=base or "sgd", lr=lr, momentum=momentum, weight_decay=weight_decay, **options)
