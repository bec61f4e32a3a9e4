"""Sharpness from random weight perturbations: expected loss under noise and its curve over radii.

Expected loss C̄(w) = E_u L(w+u) is SmoothOut's measure (Wen et al. 2018); ε-sharpness, Keskar
et al. (2017)'s box-constrained ascent, lives in landscape.sharpness.box. Both only evaluate the Objective (its loss, and its gradient for the ascent); noise comes
from a torch.Generator seeded on the objective's device, so the same seed gives the same draws.
Perturbed points are evaluated one at a time: stacking draws under torch.func.vmap was faster
only for ~100-parameter toys and 1.5–3× slower for a 15k-parameter MLP and a 60k-parameter conv
net on CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from landscape.curvature.trace import HUTCHINSON_BLOCK, TraceResult, hutchinson
from landscape.engine.checks import check_int, check_number
from landscape.engine.noise import draw
from landscape.engine.objective import Batch, Evaluation, Objective
from landscape.engine.operators import DiagonalScaledOperator, HessianOperator
from landscape.engine.params import rescale_filters
from landscape.engine.probes import seeded_generator
from landscape.engine.progress import Progress, working_on
from landscape.engine.recalibration import recalibration_inputs
from landscape.results import Result
from landscape.statistics import skew_corrected_interval
from landscape.statistics import stderr as _stderr  # `stderr` is a local name in expected_loss

DISTRIBUTIONS = ("uniform", "gaussian")
SCALES = ("absolute", "weight", "filter")
_UNIT_VARIANCE = {"uniform": 1 / 3, "gaussian": 1.0}  # per-coordinate variance of U[−1, 1] and N(0, 1)
_BLOCK = 10  # noise draws (or antithetic pairs) generated at once; the stopping rule is checked after each block
MIN_ANTITHETIC_SAMPLES = 4  # two antithetic pairs: a standard error needs at least two
_MIN_UNITS = 10  # fewest draws (or pairs) before a CI may stop the sampling


@dataclass(frozen=True)
class ExpectedLoss(Result):
    """C̄(w) = E_u L(w+u) under random weight noise (SmoothOut, Wen et al. 2018), with its uncertainty.

    `samples` are the iid units whose mean is `mean` and whose spread gives `stderr`: the loss of
    each draw, or the mean of L(w+u) and L(w−u) for each antithetic pair. CIs are 95% Student-t with
    (units − 1) df, corrected for the samples' skewness (landscape.statistics.skew_corrected_interval, Hall 1992):
    the losses of a trained network under noise are right-skewed, and the plain t interval covered 86–93% there.
    The clean loss is exact on the fixed measurement set, so `increase` = C̄ − L(w) has the same stderr and interval.
    """

    mean: float
    stderr: float
    ci: tuple[float, float]
    clean_loss: float  # L(w) (with recalibrated BN statistics when bn_recalibration is set)
    increase: float
    increase_ci: tuple[float, float]
    accuracy: float | None  # mean top-1 accuracy under noise (None when targets are not class labels)
    accuracy_stderr: float | None
    clean_accuracy: float | None
    samples: np.ndarray
    accuracy_samples: np.ndarray | None
    radius: float
    distribution: str
    scale: str
    antithetic: bool
    n_draws: int  # perturbed points evaluated (two per antithetic pair)
    target_ci_halfwidth: float | None
    bn_recalibration: int | None  # batches per point used to re-estimate BN statistics, or None (running stats)
    n_forward: int  # loss evaluations over the measurement set: n_draws + 1 (the clean point)
    n_recalibration_forward: int  # single-batch forwards spent re-estimating BN statistics
    seconds: float
    seed: int
    setup: dict  # objective.describe(): measurement set, BN mode, parameter selection, dtype, device


@dataclass(frozen=True)
class SharpnessCurve(Result):
    """Expected-loss increase over radii with common random numbers, and its second-order prediction ½·tr(ΣH).

    Σ = Cov(u) = a²·S², S = diag(per-coordinate standard deviation of the unit noise), so ½·tr(ΣH) is
    (a²/6)·tr(H) for uniform absolute noise, (a²/2)·tr(H) for Gaussian, (a²/6)·tr(DHD), D = diag|w|,
    for uniform weight noise (SmoothOut / AdaSmoothOut, Wen et al. 2018); tr(SHS) by Hutchinson.
    """

    radii: np.ndarray
    increase: np.ndarray
    increase_stderr: np.ndarray
    increase_ci: np.ndarray  # (len(radii), 2)
    prediction: np.ndarray | None
    prediction_stderr: np.ndarray | None
    trace: TraceResult | None  # tr(SHS), whose stderr scales into prediction_stderr
    points: tuple[ExpectedLoss, ...]
    clean_loss: float
    distribution: str
    scale: str
    antithetic: bool
    n_forward: int
    n_matvecs: int
    seconds: float
    seed: int
    setup: dict


# ------------------------------------------------------------------------------------------- noise
def unit_noise(
    objective: Objective, n_draws: int, *, distribution: str = "uniform", scale: str = "absolute", generator: torch.Generator
) -> torch.Tensor:
    """`n_draws` weight-noise vectors at radius 1, one per row; noise at radius a is a times this.

    `absolute`: U[−1, 1] or N(0, 1) per coordinate; `weight`: that times |w| (SmoothOut's
    adaptive noise); `filter`: the same draw as a direction, each filter rescaled to norm ‖w_filter‖
    (landscape.engine.params.rescale_filters; AdaSmoothOut, filter-normalized as Li et al. 2018).
    """
    _check_noise(distribution, scale)
    check_int("n_draws", n_draws, 1)
    shape = (n_draws, objective.n_params)
    raw = draw(distribution, torch.empty(shape, dtype=objective.dtype, device=objective.device), generator)
    if scale == "absolute":
        return raw
    if scale == "weight":
        return raw * objective.w.abs()
    layout = objective.layout
    scaled = rescale_filters(layout.unflatten(raw), layout.unflatten(objective.w))
    return torch.cat([scaled[name].reshape(n_draws, -1) for name in layout.names], dim=1)


def noise_std(objective: Objective, *, distribution: str = "uniform", scale: str = "absolute") -> torch.Tensor:
    """Per-coordinate standard deviation s of `unit_noise`; its covariance is exactly diag(s²).

    For `filter` the direction within a filter of size d is a cube or Gaussian draw normalized
    to norm ‖w_filter‖: not uniform on the sphere for the cube, but sign-flip and permutation
    symmetry still give covariance (‖w_filter‖²/d)·I, the same for both distributions.
    """
    _check_noise(distribution, scale)
    if scale == "absolute":
        return torch.full_like(objective.w, math.sqrt(_UNIT_VARIANCE[distribution]))
    if scale == "weight":
        return math.sqrt(_UNIT_VARIANCE[distribution]) * objective.w.abs()
    layout = objective.layout
    return layout.flatten(rescale_filters(layout.unflatten(torch.ones_like(objective.w)), layout.unflatten(objective.w)))


# --------------------------------------------------------------------------------- expected loss
def expected_loss(
    objective: Objective,
    radius: float,
    *,
    distribution: str = "uniform",
    scale: str = "absolute",
    n_samples: int = 100,
    antithetic: bool = True,
    target_ci_halfwidth: float | None = None,
    seed: int = 0,
    bn_recalibration: int | None = None,
    recalibration_batches: Sequence[Batch] | None = None,
    progress: bool | str = False,
) -> ExpectedLoss:
    """Monte Carlo C̄(w) = E_u L(w+u), u = radius·unit_noise (SmoothOut, Wen et al. 2018), with a 95% CI.

    SmoothOut trains on this smoothed loss; measured here, its increase C̄(w) − L(w) is a
    sharpness: about ½·tr(ΣH) for small noise of covariance Σ (see `sharpness_curve`).
    Antithetic pairs (u, −u) cancel the gradient term and odd-order terms, and their pair means
    are the iid units of the stderr. They are the default: at equal forwards they cut the stderr
    1.5–15× wherever the gradient is not negligible (test split, partly trained nets, small radii)
    and cost at most √2 at an exact minimum.

    BatchNorm uses the objective's running statistics unless `bn_recalibration=k`: then at every
    point (the clean one too, so radius 0 changes nothing) BN statistics are re-estimated from k
    batches of `recalibration_batches` (default: the objective's) as a cumulative average in train
    mode, then the loss is taken in eval mode (SWA-style, Izmailov et al. 2018). This matters at
    large radii, where noise shifts activation statistics and stale running statistics overstate
    the loss increase of a network that would simply renormalize.

    Args:
        objective: the loss L and the point w.
        radius: the noise size a ≥ 0.
        distribution: "uniform" (U[−a, a] per coordinate, SmoothOut's) or "gaussian" (N(0, a²)).
        scale: "absolute" (the same size everywhere), "weight" (∝ |w_i|, SmoothOut's adaptive
            noise) or "filter" (each filter's draw rescaled to a·‖w_filter‖, AdaSmoothOut,
            filter-normalized as Li et al. 2018).
        n_samples: perturbed forward passes, even with antithetic pairs (at least 4; 2 without).
        antithetic: draw (u, −u) pairs.
        target_ci_halfwidth: stop once the CI half-width reaches it (checked every 10
            draws/pairs, after at least 10), capped at `n_samples`; None: spend them all.
        seed: seed of the noise.
        bn_recalibration: k: re-estimate BN statistics at every point from k batches; None: off.
        recalibration_batches: the batches BN statistics are re-estimated from (default: the objective's).
        progress: a progress bar (True, or a label), off by default.

    Returns:
        ExpectedLoss: `mean` C̄(w) with `stderr` and `ci`, `clean_loss`, `increase` C̄(w) − L(w)
            with `increase_ci`, accuracy under noise where targets are classes, the per-unit
            `samples`, the settings and the cost (`n_forward`, `seconds`).

    Raises:
        ValueError: a negative radius, an unknown distribution or scale, an odd or too small
            n_samples, or a non-positive target.

    Examples:
        L(w) = ((2w₁ − 2)² + (w₂ − 1)²)/2 at its minimum w = (1, 1), H = diag(4, 1): under
        U[−a, a] noise the increase is exactly (a²/6)·tr(H) = 5a²/6.

        >>> from landscape.examples import quadratic
        >>> objective = quadratic()                  # L = ((2w₀ − 2)² + (w₁ − 1)²)/2, H = diag(4, 1)
        >>> result = expected_loss(objective, 0.1)
        >>> low, high = result.increase_ci
        >>> bool(low < 5 * 0.1**2 / 6 < high), result.n_forward
        (True, 101)
    """
    radius = check_number("radius", radius, allow_zero=True)
    _check_noise(distribution, scale)
    check_int("n_samples", n_samples, MIN_ANTITHETIC_SAMPLES if antithetic else 2)
    if antithetic and n_samples % 2:
        raise ValueError(f"n_samples must be even with antithetic pairs (each pair is 2 forward passes), got {n_samples}")
    if target_ci_halfwidth is not None:
        target_ci_halfwidth = check_number("target_ci_halfwidth", target_ci_halfwidth, allow_zero=False)
    generator = seeded_generator(objective.device, seed)
    evaluate, recalibration_cost = noise_evaluator(objective, bn_recalibration, recalibration_batches)
    start = time.perf_counter()
    n_units = n_samples // 2 if antithetic else n_samples
    signs = (1, -1) if antithetic else (1,)
    losses: list[float] = []
    accuracies: list[float] = []
    with Progress(n_samples + 1, f"expected loss a={radius:g}", "forward", progress) as bar:
        clean = evaluate(objective.w)
        bar.update(1)
        while len(losses) < n_units:
            block = unit_noise(
                objective, min(_BLOCK, n_units - len(losses)), distribution=distribution, scale=scale, generator=generator
            )
            for u in block:
                points = [evaluate(objective.w + radius * s * u) for s in signs]
                bar.update(len(points))
                losses.append(sum(p.loss for p in points) / len(points))
                if clean.accuracy is not None:
                    accuracies.append(sum(p.accuracy for p in points) / len(points))
            if target_ci_halfwidth is not None and len(losses) >= _MIN_UNITS and _halfwidth(losses) <= target_ci_halfwidth:
                break
    samples = np.array(losses)
    mean, stderr, (low, high) = float(samples.mean()), _stderr(samples), skew_corrected_interval(samples)
    acc = np.array(accuracies) if clean.accuracy is not None else None
    n_draws = len(samples) * (2 if antithetic else 1)
    return ExpectedLoss(
        mean=mean,
        stderr=stderr,
        ci=(low, high),
        clean_loss=clean.loss,
        increase=mean - clean.loss,
        increase_ci=(low - clean.loss, high - clean.loss),
        accuracy=None if acc is None else float(acc.mean()),
        accuracy_stderr=None if acc is None else _stderr(acc),
        clean_accuracy=clean.accuracy,
        samples=samples,
        accuracy_samples=acc,
        radius=radius,
        distribution=distribution,
        scale=scale,
        antithetic=antithetic,
        n_draws=n_draws,
        target_ci_halfwidth=target_ci_halfwidth,
        bn_recalibration=bn_recalibration,
        n_forward=n_draws + 1,
        n_recalibration_forward=(n_draws + 1) * recalibration_cost,
        seconds=time.perf_counter() - start,
        seed=int(seed),
        setup=objective.describe(),
    )


def sharpness_curve(
    objective: Objective,
    radii: Sequence[float],
    *,
    distribution: str = "uniform",
    scale: str = "absolute",
    n_samples: int = 100,
    seed: int = 0,
    antithetic: bool = True,
    with_prediction: bool = True,
    n_probes: int = 100,
    probe_block: int = HUTCHINSON_BLOCK,
    bn_recalibration: int | None = None,
    progress: bool | str = False,
) -> SharpnessCurve:
    """Expected-loss increase at each radius (SmoothOut, Wen et al. 2018) and its second-order prediction.

    Every radius scales the same unit draws (common random numbers: the same seed and block
    sizes replay the generator), so the curve is smooth in the radius. The prediction
    ½·tr(ΣH) (see SharpnessCurve) takes tr(SHS) from `n_probes` Hutchinson (1989) probes; it
    describes running-statistics BN, not `bn_recalibration`. Where the two disagree, the noise
    sees more than the Hessian (e.g. ReLU kinks, or radii past the quadratic regime).

    Args:
        objective: the loss L and the point w.
        radii: the noise sizes a, at least one, each ≥ 0.
        distribution: "uniform" or "gaussian" (see `expected_loss`).
        scale: "absolute", "weight" or "filter" (see `expected_loss`).
        n_samples: perturbed forward passes per radius.
        seed: seed of the noise (shared by every radius) and of the trace probes.
        antithetic: draw (u, −u) pairs.
        with_prediction: also compute ½·tr(ΣH) (n_probes Hessian-vector products).
        n_probes: Hutchinson probes for tr(SHS).
        probe_block: probes per block of products (each probe of a block holds three n-vectors).
        bn_recalibration: k: re-estimate BN statistics at every point from k batches; None: off.
        progress: a progress bar (True, or a label), off by default.

    Returns:
        SharpnessCurve: `radii`, `increase` with `increase_stderr` and `increase_ci` per radius,
            `prediction` with `prediction_stderr` (None without), the trace estimate, every
            radius's ExpectedLoss in `points`, and the cost.

    Raises:
        ValueError: no radii, a negative radius, or the arguments `expected_loss` refuses.

    Examples:
        On a quadratic the prediction is exact, 5a²/6 for L of the `expected_loss` example:

        >>> from landscape.examples import quadratic
        >>> objective = quadratic()                  # L = ((2w₀ − 2)² + (w₁ − 1)²)/2, H = diag(4, 1)
        >>> curve = sharpness_curve(objective, [0.05, 0.1])
        >>> curve.prediction.round(6)
        array([0.002083, 0.008333])
        >>> bool(((curve.increase_ci[:, 0] < curve.prediction) & (curve.prediction < curve.increase_ci[:, 1])).all())
        True
    """
    radii = [check_number("radius", a, allow_zero=True) for a in radii]
    if not radii:
        raise ValueError("radii is empty: give at least one radius")
    check_int("n_probes", n_probes, 2)
    start = time.perf_counter()
    points = tuple(
        expected_loss(
            objective,
            a,
            distribution=distribution,
            scale=scale,
            n_samples=n_samples,
            antithetic=antithetic,
            seed=seed,
            bn_recalibration=bn_recalibration,
            progress=progress,
        )
        for a in radii
    )
    half_sq = 0.5 * np.array(radii) ** 2
    trace = None
    if with_prediction:
        curvature = DiagonalScaledOperator(
            HessianOperator(objective), noise_std(objective, distribution=distribution, scale=scale)
        )
        with working_on("second-order prediction ½·tr(ΣH)"):  # not the trace metric, which may run another method
            trace = hutchinson(curvature, n_probes, block_size=probe_block, seed=seed, progress=progress)
    return SharpnessCurve(
        radii=np.array(radii),
        increase=np.array([p.increase for p in points]),
        increase_stderr=np.array([p.stderr for p in points]),
        increase_ci=np.array([p.increase_ci for p in points]),
        prediction=None if trace is None else half_sq * trace.estimate,
        prediction_stderr=None if trace is None else half_sq * trace.stderr,
        trace=trace,
        points=points,
        clean_loss=points[0].clean_loss,
        distribution=distribution,
        scale=scale,
        antithetic=antithetic,
        n_forward=sum(p.n_forward for p in points),
        n_matvecs=0 if trace is None else trace.n_matvecs,
        seconds=time.perf_counter() - start,
        seed=int(seed),
        setup=objective.describe(),
    )


# ------------------------------------------------------------------------------------- internals
def _halfwidth(samples: Sequence[float]) -> float:
    """Half the width of the reported 95% interval of the samples' mean (the target of `target_ci_halfwidth`)."""
    low, high = skew_corrected_interval(samples)
    return (high - low) / 2


def _check_noise(distribution: str, scale: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")


def noise_evaluator(
    objective: Objective, bn_recalibration: int | None, recalibration_batches: Sequence[Batch] | None
) -> tuple[Callable[[torch.Tensor], Evaluation], int]:
    """Loss/accuracy at a point, with running BN statistics or re-estimated ones; and its recalibration forwards."""
    if bn_recalibration is None:
        if recalibration_batches is not None:
            raise ValueError("recalibration_batches is only used with bn_recalibration=k (the number of batches)")
        return objective.evaluate, 0
    inputs = recalibration_inputs(objective, bn_recalibration, recalibration_batches)

    def evaluate(w: torch.Tensor) -> Evaluation:
        return objective.evaluate(w, buffers=objective.bn_statistics(w, inputs))

    return evaluate, bn_recalibration
