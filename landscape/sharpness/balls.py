"""Worst-case, adaptive and m-sharpness (Foret et al. 2021; Kwon et al. 2021; Andriushchenko et al. 2023), and their average case.

S(w, ρ) = max_{‖δ'‖_p ≤ ρ} L(w + T ⊙ δ') − L(w), p ∈ {2, ∞}: T = 1 is the worst case around w (SAM's
inner problem), T = |w| + η the adaptive one (ASAM), invariant to rescaling a ReLU network's layers.
m-sharpness is the mean over disjoint batches of m samples of each batch's own S. Every maximum comes
from landscape.sharpness.ascent's APGD (Croce & Hein 2020), the ascent Andriushchenko et al. use, and is the
largest loss an ascent visited: a lower bound on the true maximum. The average case E_δ' L(w + T ⊙ δ')
− L(w) is landscape.sharpness.perturb's expected loss with the matching noise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from landscape.engine.checks import check_int, check_number
from landscape.engine.objective import Objective
from landscape.engine.probes import seeded_generator
from landscape.engine.progress import Progress
from landscape.inputs.batches import logit_normalized
from landscape.inputs.fold_bn import fold_batch_norm
from landscape.results import Result
from landscape.sharpness.ascent import Neighbourhood, Starts, maximize, norm_name
from landscape.sharpness.perturb import ExpectedLoss, expected_loss

# Typical radii in the papers: ℓ2 0.05 (SAM, Foret et al. 2021), adaptive ℓ2 0.5 (ASAM on CIFAR-10, Kwon et al. 2021;
# 0.25–2 in Andriushchenko et al. 2023), ℓ∞ 1e-3 and adaptive ℓ∞ 2e-3 (Andriushchenko et al.'s ResNet grids,
# 5e-4–4e-3 and 1e-3–8e-3).
DEFAULT_RHO = {("2", False): 0.05, ("2", True): 0.5, ("inf", False): 1e-3, ("inf", True): 2e-3}
# The average case at the ranges Andriushchenko et al. sweep (N(0, ρ²) or U[−ρ, ρ] per coordinate, times |w| if adaptive).
DEFAULT_AVERAGE_RHO = {("2", False): 0.01, ("2", True): 0.1, ("inf", False): 0.02, ("inf", True): 0.2}


@dataclass(frozen=True)
class WorstCase(Result):
    """S(w, ρ) = max_{‖δ'‖_p ≤ ρ} L(w + T ⊙ δ') − L(w), best over starts (T = 1, or |w| + η when adaptive).

    Every start's increase (`values`, in the order of `start_kinds`: "gradient", the maximizer of the
    linear model, then "random" points of the ball) is the largest its ascent visited, a lower bound on S;
    `value` is the largest, `spread` = best − worst and `std` say how much the start mattered.
    """

    value: float  # best increase over starts: the worst-case sharpness reported
    spread: float
    std: float
    values: np.ndarray
    start_kinds: tuple[str, ...]
    max_losses: np.ndarray
    clean_loss: float
    rho: float
    p: str  # "2" or "inf"
    adaptive: bool
    eta: float  # T = |w| + eta when adaptive
    steps: int  # APGD iterations per start
    restarts: int  # random starts besides the gradient start
    iterations: np.ndarray
    converged: tuple[bool, ...]  # the start stopped at a KKT point of the ball
    n_forward: int  # loss evaluations over the measurement set (the clean point included)
    n_grad: int
    seconds: float
    seed: int
    setup: dict
    bound: str = "lower"  # in the JSON too: `value` is a lower bound on the maximum (the best an ascent found)
    logit_normalization: bool = False  # the loss of centred, unit-norm logits (Andriushchenko et al. 2023)
    fold_bn: bool = False  # measured on the weights with BatchNorm folded in (setup["fold_bn"] counts the layers)


@dataclass(frozen=True)
class MSharpness(Result):
    """m-sharpness (Foret et al. 2021; Andriushchenko et al. 2023): mean over disjoint m-sample batches of each batch's S.

    The measurement set, in its order, is cut into n_batches = ⌊n/m⌋ batches (the last n − m·n_batches
    samples are left out); `batch_values` holds each batch's best increase, `batch_spreads` the spread of
    its starts. `stderr` is the standard error of the mean over batches (None for a single batch).
    """

    value: float  # mean over batches of the batch's worst-case increase
    stderr: float | None
    m: int
    n_batches: int
    n_unused: int  # samples after the last whole batch, not measured
    batch_values: np.ndarray
    batch_spreads: np.ndarray  # best − worst start per batch
    batch_clean_losses: np.ndarray
    rho: float
    p: str
    adaptive: bool
    eta: float
    steps: int
    restarts: int
    n_forward: int  # loss evaluations, each over one batch of m samples
    n_grad: int  # gradients, each over one batch of m samples
    seconds: float
    seed: int
    setup: dict
    bound: str = "lower"  # in the JSON too: `value` is a lower bound on the maximum (the best an ascent found)
    logit_normalization: bool = False  # the loss of centred, unit-norm logits (Andriushchenko et al. 2023)
    fold_bn: bool = False  # measured on the weights with BatchNorm folded in (setup["fold_bn"] counts the layers)


def default_rho(p: str | float, adaptive: bool, *, average: bool = False) -> float:
    """The radius used when none is given (see DEFAULT_RHO and DEFAULT_AVERAGE_RHO)."""
    return (DEFAULT_AVERAGE_RHO if average else DEFAULT_RHO)[(norm_name(p), bool(adaptive))]


def worst_case(
    objective: Objective,
    rho: float | None = None,
    *,
    p: str | float = 2,
    adaptive: bool = False,
    eta: float = 0.0,
    steps: int = 20,
    restarts: int = 1,
    seed: int = 0,
    logit_normalization: bool = False,
    fold_bn: bool = False,
    progress: bool | str = False,
) -> WorstCase:
    """Worst-case sharpness S(w, ρ) over the ℓ2 (SAM, Foret et al. 2021) or ℓ∞ ball, adaptive with T = |w| + η (Kwon et al. 2021).

    S(w, ρ) = max_{‖δ'‖_p ≤ ρ} L(w + T ⊙ δ') − L(w), as Andriushchenko et al. (2023) measure it:
    APGD (Croce & Hein 2020; 20 iterations in Andriushchenko et al.) from ρ·direction(T ⊙ ∇L), the
    maximizer of the linear model (SAM's perturbation for ℓ2, the box's corner for ℓ∞), and from
    `restarts` uniform random points of the ball; each iteration costs a loss and a gradient. Each
    start's value is the largest loss its ascent visited: a lower bound on the true maximum.

    Args:
        objective: the loss L and the point w (the checkpoint) it is measured at.
        rho: radius ρ of the ball; None: DEFAULT_RHO for (p, adaptive) (ℓ2 0.05, adaptive ℓ2 0.5,
            ℓ∞ 1e-3, adaptive ℓ∞ 2e-3).
        p: the norm, 2 or "inf" (also "2" or math.inf).
        adaptive: scale the ball by T = |w| + η (ASAM's adaptive sharpness), invariant to
            rescaling a ReLU network's layers.
        eta: η of the adaptive ball (0 as in Andriushchenko et al.; ASAM uses 0.01); only with adaptive.
        steps: APGD iterations per start.
        restarts: random starts besides the gradient start.
        seed: seed of the random starts.
        logit_normalization: measure the loss of normalized logits (see `preprocessed`).
        fold_bn: measure the model with BatchNorm folded into its weights (see `preprocessed`).
        progress: a progress bar (True, or a label), off by default.

    Returns:
        WorstCase: `value` (the best increase over starts), each start's `values` and
            `start_kinds`, their `spread` and `std`, `clean_loss`, the settings, and the cost
            (`n_forward`, `n_grad`, `seconds`).

    Raises:
        ValueError: a non-positive rho, a negative eta (or eta > 0 without adaptive), or bad counts.

    Examples:
        L(w) = ((2w₁ − 2)² + (w₂ − 1)²)/2 sits at its minimum w = (1, 1) with Hessian diag(4, 1):

        >>> from landscape.examples import quadratic
        >>> objective = quadratic()                  # L = ((2w₀ − 2)² + (w₁ − 1)²)/2, H = diag(4, 1)
        >>> result = worst_case(objective, rho=0.1)        # ρ²·λ1/2 = 0.01·4/2
        >>> round(result.value, 6), result.start_kinds
        (0.02, ('gradient', 'random'))

        At a minimum the gradient start is w itself; the random start finds the top eigenvector.
    """
    p, rho, eta = _check(objective, p, rho, adaptive, eta, steps, restarts)
    start = time.perf_counter()
    objective = preprocessed(objective, logit_normalization=logit_normalization, fold_bn=fold_bn)
    generator = seeded_generator(objective.device, seed)
    clean_loss = objective.loss()
    nb = Neighbourhood(objective, p, rho, scale=_scale(objective, adaptive, eta))
    with Progress(
        1 + restarts, f"worst-case sharpness (ℓ{_symbol(p)}{', adaptive' if adaptive else ''})", "start", progress
    ) as bar:
        runs = _ascend(nb, generator, steps, restarts, bar)
    values = runs.max_losses - clean_loss
    return WorstCase(
        value=float(values.max()),
        spread=float(values.max() - values.min()),
        std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        values=values,
        start_kinds=runs.kinds,
        max_losses=runs.max_losses,
        clean_loss=clean_loss,
        rho=rho,
        p=p,
        adaptive=bool(adaptive),
        eta=eta,
        steps=steps,
        restarts=restarts,
        iterations=runs.iterations,
        converged=runs.converged,
        n_forward=1 + nb.n_forward,
        n_grad=nb.n_grad,
        seconds=time.perf_counter() - start,
        seed=int(seed),
        setup=objective.describe(),
        logit_normalization=bool(logit_normalization),
        fold_bn=bool(fold_bn),
    )


def m_sharpness(
    objective: Objective,
    m: int,
    rho: float | None = None,
    *,
    p: str | float = 2,
    adaptive: bool = False,
    eta: float = 0.0,
    steps: int = 20,
    restarts: int = 1,
    seed: int = 0,
    logit_normalization: bool = False,
    fold_bn: bool = False,
    progress: bool | str = False,
) -> MSharpness:
    """m-sharpness (Foret et al. 2021; Andriushchenko et al. 2023): each m-sample batch's own worst case, averaged.

    The batches are consecutive runs of m samples of the measurement set (a seeded random subset
    when measured from a checkpoint; the last n − m·⌊n/m⌋ samples are left out); each is maximized
    as `worst_case` does, on an objective over that batch alone (BN mode and parameter selection as
    the measurement set's). One random generator serves all batches. Foret et al. found that small m
    correlates better with generalization; Andriushchenko et al. use m = 128.

    Args:
        objective: the loss L and the point w; its batches must be (x, y) pairs, in one process.
        m: samples per batch, at most the measurement set's size.
        rho: radius ρ of the ball; None: DEFAULT_RHO for (p, adaptive).
        p: the norm, 2 or "inf".
        adaptive: scale the ball by T = |w| + η.
        eta: η of the adaptive ball; only with adaptive.
        steps: APGD iterations per start.
        restarts: random starts besides the gradient start, per batch.
        seed: seed of the random starts.
        logit_normalization: measure the loss of normalized logits (see `preprocessed`).
        fold_bn: measure the model with BatchNorm folded into its weights (see `preprocessed`).
        progress: a progress bar (True, or a label), off by default.

    Returns:
        MSharpness: `value` (the mean over batches), its `stderr` (None for one batch), each
            batch's `batch_values`, `batch_spreads` and `batch_clean_losses`, `n_batches`,
            `n_unused`, the settings and the cost.

    Raises:
        ValueError: m larger than the measurement set, a distributed objective, batches that
            are not (x, y) pairs, or the arguments `worst_case` refuses.

    Examples:
        With m = 1 each sample is its own batch: L₁ = (2w₁ − 2)² (Hessian diag(8, 0)) and
        L₂ = (w₂ − 1)² (diag(0, 2)) have worst cases 0.04 and 0.01 at ρ = 0.1:

        >>> from landscape.examples import quadratic
        >>> objective = quadratic()                  # L = ((2w₀ − 2)² + (w₁ − 1)²)/2, H = diag(4, 1)
        >>> result = m_sharpness(objective, 1, rho=0.1)
        >>> round(result.value, 6), result.batch_values.round(6), round(result.stderr, 6)
        (0.025, array([0.04, 0.01]), 0.015)
    """
    p, rho, eta = _check(objective, p, rho, adaptive, eta, steps, restarts)
    check_int("m", m, 1)
    if m > objective.n_samples:
        raise ValueError(
            f"m = {m} exceeds the {objective.n_samples} samples of the measurement set; give at most {objective.n_samples}"
        )
    if objective.distributed:
        raise ValueError("m-sharpness needs the whole measurement set in one process: run it without torchrun")
    start = time.perf_counter()
    objective = preprocessed(objective, logit_normalization=logit_normalization, fold_bn=fold_bn)
    generator = seeded_generator(objective.device, seed)
    if not all(isinstance(b, tuple) and len(b) == 2 for b in objective.batches):
        raise ValueError("m-sharpness re-batches the measurement set into m samples and needs (x, y) batches")
    x = torch.cat([x for x, _ in objective.batches])
    y = torch.cat([y for _, y in objective.batches])
    n_batches = objective.n_samples // m
    scale = _scale(objective, adaptive, eta)
    values, spreads, clean, n_forward, n_grad = [], [], [], 0, 0
    name = f"{'adaptive ' if adaptive else ''}m-sharpness (ℓ{_symbol(p)}, m={m})"
    with Progress(n_batches * (1 + restarts), name, "start", progress) as bar:
        for i in range(n_batches):
            part = objective.restricted([(x[i * m : (i + 1) * m], y[i * m : (i + 1) * m])])
            clean.append(part.loss())
            nb = Neighbourhood(part, p, rho, scale=scale)
            runs = _ascend(nb, generator, steps, restarts, bar)
            values.append(float(runs.max_losses.max()) - clean[-1])
            spreads.append(float(runs.max_losses.max() - runs.max_losses.min()))
            n_forward, n_grad = n_forward + 1 + nb.n_forward, n_grad + nb.n_grad
    values = np.array(values)
    stderr = float(values.std(ddof=1) / math.sqrt(n_batches)) if n_batches > 1 else None
    return MSharpness(
        value=float(values.mean()),
        stderr=stderr,
        m=m,
        n_batches=n_batches,
        n_unused=objective.n_samples - n_batches * m,
        batch_values=values,
        batch_spreads=np.array(spreads),
        batch_clean_losses=np.array(clean),
        rho=rho,
        p=p,
        adaptive=bool(adaptive),
        eta=eta,
        steps=steps,
        restarts=restarts,
        n_forward=n_forward,
        n_grad=n_grad,
        seconds=time.perf_counter() - start,
        seed=int(seed),
        setup=objective.describe(),
        logit_normalization=bool(logit_normalization),
        fold_bn=bool(fold_bn),
    )


def average_case(
    objective: Objective,
    rho: float | None = None,
    *,
    p: str | float = 2,
    adaptive: bool = False,
    n_samples: int = 100,
    seed: int = 0,
    logit_normalization: bool = False,
    fold_bn: bool = False,
    progress: bool | str = False,
) -> ExpectedLoss:
    """The average-case counterpart E_δ' L(w + T ⊙ δ') − L(w) (Andriushchenko et al. 2023), with a 95% CI.

    δ' ~ N(0, ρ²I) for p = 2 and uniform on the box [−ρ, ρ]^d for p = ∞; T = |w| when adaptive (η is
    not supported here). This is landscape.sharpness.perturb.expected_loss with distribution gaussian/uniform
    and scale absolute/weight, in antithetic pairs; its `increase` and `increase_ci` are the answer.

    Args:
        objective: the loss L and the point w.
        rho: the noise size ρ; None: DEFAULT_AVERAGE_RHO for (p, adaptive) (ℓ2 0.01, adaptive ℓ2
            0.1, ℓ∞ 0.02, adaptive ℓ∞ 0.2).
        p: 2 (Gaussian noise) or "inf" (uniform noise on the box).
        adaptive: noise scaled by |w| per coordinate.
        n_samples: perturbed forward passes (antithetic pairs).
        seed: seed of the noise.
        logit_normalization: measure the loss of normalized logits (see `preprocessed`).
        fold_bn: measure the model with BatchNorm folded into its weights (see `preprocessed`).
        progress: a progress bar (True, or a label), off by default.

    Returns:
        ExpectedLoss: the mean loss under noise, its `increase` over L(w) with `increase_ci`, the
            samples and the cost.

    Raises:
        ValueError: a non-positive rho or an unknown p.

    Examples:
        L(w) = ((2w₁ − 2)² + (w₂ − 1)²)/2 sits at its minimum w = (1, 1) with Hessian diag(4, 1):

        >>> from landscape.examples import quadratic
        >>> objective = quadratic()                  # L = ((2w₀ − 2)² + (w₁ − 1)²)/2, H = diag(4, 1)
        >>> result = average_case(objective, rho=0.1)      # E ½δᵀHδ = ρ²·tr(H)/2 = 0.025
        >>> low, high = result.increase_ci
        >>> bool(low < 0.025 < high)
        True
    """
    p = norm_name(p)
    rho = default_rho(p, adaptive, average=True) if rho is None else check_number("rho", rho, allow_zero=False)
    return expected_loss(
        preprocessed(objective, logit_normalization=logit_normalization, fold_bn=fold_bn),
        rho,
        distribution="gaussian" if p == "2" else "uniform",
        scale="weight" if adaptive else "absolute",
        n_samples=n_samples,
        seed=seed,
        progress=progress,
    )


def preprocessed(objective: Objective, *, logit_normalization: bool = False, fold_bn: bool = False) -> Objective:
    """The objective with Andriushchenko et al. (2023)'s two options: itself when neither is asked for.

    logit_normalization: the loss is taken of the logits centred over the classes and divided by their ℓ2 norm
    (landscape.inputs.batches.normalize_logits), at w and at every perturbed point, so a network cannot look
    flatter by scaling its logits down. fold_bn: the parameters are the weights with eval-mode BatchNorm
    folded in (landscape.inputs.fold_bn.fold_batch_norm), so the adaptive scaling T = |w| + η acts on the
    weights the network applies; same function, same batches, the same parameter selection applied to the
    folded model. The setup records both (`logit_normalization`, and `fold_bn` with how many BN layers were
    fused into a preceding layer or merged into a scale and shift).

    Args:
        objective: the loss L and the point w.
        logit_normalization: take the loss of the normalized logits.
        fold_bn: measure the model with its BatchNorm layers folded into the weights.

    Returns:
        Objective: a new objective over the same batches (or `objective` itself when both are False).

    Raises:
        ValueError: fold_bn on an objective with mode="train" (BN on batch statistics has no fixed weights).

    Examples:
        Logits (3, −1) for class 0 normalize to (1, −1)/√2, whatever their scale: the loss becomes log(1 + e^(−√2)):

        >>> from torch import nn
        >>> model = nn.Linear(1, 2, bias=False)
        >>> _ = model.weight.data.copy_(torch.tensor([[3.0], [-1.0]]))
        >>> objective = Objective(model, [(torch.ones(1, 1), torch.tensor([0]))], dtype=torch.float64, device="cpu")
        >>> round(objective.loss(), 6), round(preprocessed(objective, logit_normalization=True).loss(), 6)
        (0.01815, 0.217622)
    """
    if not (logit_normalization or fold_bn):
        return objective
    model, loss, metadata = objective.model, objective.loss_function, dict(objective.metadata)
    if fold_bn:
        if objective.mode == "train":
            raise ValueError(
                "fold_bn folds BN running statistics into the weights, but this objective has mode='train' (BN on "
                "each batch's own statistics, which no fixed weights reproduce): use mode='eval' or fold_bn=False"
            )
        folded = fold_batch_norm(model)
        model, metadata["fold_bn"] = folded.model, folded.describe()
    if logit_normalization:
        loss, metadata["logit_normalization"] = logit_normalized(loss), True
    kept = {"params": objective.param_selection, "mode": objective.mode, "dtype": objective.model_dtype}
    kept.update(device=objective.device, hvp_method=objective.hvp_method, distributed=objective.distributed)
    return Objective(model, objective.batches, loss=loss, hvp_check=False, metadata=metadata, **kept)


# ------------------------------------------------------------------------------------- internals
def _ascend(nb: Neighbourhood, generator: torch.Generator, steps: int, restarts: int, bar: Progress) -> Starts:
    """APGD from the linear model's maximizer and from `restarts` random points of the ball."""
    starts = [("gradient", nb.first_order(nb.grad(nb.zeros())))]
    starts += [("random", nb.random(generator)) for _ in range(restarts)]
    return maximize(nb, starts, steps, progress=bar)


def _scale(objective: Objective, adaptive: bool, eta: float) -> torch.Tensor | None:
    return objective.w.abs() + eta if adaptive else None


def _check(
    objective: Objective, p: str | float, rho: float | None, adaptive: bool, eta: float, steps: int, restarts: int
) -> tuple[str, float, float]:
    p = norm_name(p)
    rho = default_rho(p, adaptive) if rho is None else check_number("rho", rho, allow_zero=False)
    eta = check_number("eta", eta, allow_zero=True)
    if eta > 0 and not adaptive:
        raise ValueError(f"eta = {eta} scales the adaptive ball T = |w| + eta; pass adaptive=True or eta = 0")
    check_int("steps", steps, 1)
    check_int("restarts", restarts, 0)
    return p, rho, eta


def _symbol(p: str) -> str:
    return "∞" if p == "inf" else "2"
