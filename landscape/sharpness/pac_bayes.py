"""PAC-Bayes flatness (Jiang et al. 2020): σ′, the largest noise scale whose expected loss increase stays at a target.

Jiang et al. ("Fantastic generalization measures and where to find them", ICLR 2020) take from the PAC-Bayes
bound the noise scale σ′ of the posterior N(w, σ′²I): the largest σ with E_u L(w+u) − L(w) ≤ target,
u ~ N(0, σ²I). Their "pacbayes.flatness" is 1/σ′²; "pacbayes.orig" puts σ′ in the bound's complexity term,
‖w − w₀‖²/(4σ′²) + log(m/δ) + 10. A checkpoint does not carry its initialization w₀, so w₀ = 0 here (a prior
centred at the origin, which the PAC-Bayes bound allows when it is chosen before the data): ‖w‖² replaces
‖w − w₀‖², and m is the measurement set's sample count. The magnitude-aware variant ("pacbayes.mag") draws
u_i ~ N(0, σ²w_i² + ε²): noise relative to each weight, so rescaling a ReLU layer by α and the next by 1/α leaves
it unchanged, where the plain σ′ changes.

σ′ is found by bisection in log σ on forward passes only. At each σ antithetic pairs (u, −u) are drawn (the
same draws at every σ, scaled: common random numbers) until the confidence interval of the mean increase lies
wholly below or above the target, or the sample cap is reached: then the step is undecided and counted. The
result is a bracket [σ_low, σ_high]: σ_low decided below the target, σ_high above it, and σ′ its geometric middle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from landscape.engine.checks import check_int, check_number
from landscape.engine.inner import LOCAL
from landscape.engine.objective import Objective
from landscape.engine.probes import seeded_generator
from landscape.engine.progress import Progress
from landscape.results import Result
from landscape.sharpness.perturb import MIN_ANTITHETIC_SAMPLES, noise_evaluator, unit_noise
from landscape.statistics import CONFIDENCE, skew_corrected_interval, stderr

BELOW, UNDECIDED, ABOVE = -1, 0, 1  # a step's verdict: the mean increase at σ against the target
_FIRST_LOOK = 10  # antithetic pairs before the first look at the interval; the looks double from there
_MAX_DOUBLINGS = 60  # the most times σ is doubled (or halved) to bracket the target


@dataclass(frozen=True)
class PacBayesFlatness(Result):
    """σ′ of Jiang et al. (2020)'s PAC-Bayes flatness, as a bracket: the mean increase E L(w+u) − L(w) is decided
    ≤ `target` at `sigma_low` and > `target` at `sigma_high`; `sigma` is their geometric middle.

    `flatness` = 1/σ′² with its bracket [`flatness_low`, `flatness_high`] = [1/σ_high², 1/σ_low²]; `bound` =
    ‖w‖²/(4σ′²) + log(m/δ) + 10 (w₀ = 0) with its bracket, None for the magnitude-aware noise. `increase_low` and
    `increase_high` (with stderrs) are the sampled increases at the two ends. Every σ tested is kept in order
    (`sigmas`, `increases`, `increase_stderrs`, `verdicts` −1 below / 0 undecided / +1 above, `pairs` spent);
    `n_undecided` counts the steps that reached the cap of `n_samples` forwards undecided. `converged`: the bracket
    (or its parts outside the undecided steps) narrowed to `rtol` within the step budget.
    """

    flatness: float
    flatness_low: float
    flatness_high: float
    bound: float | None
    bound_low: float | None
    bound_high: float | None
    sigma: float
    sigma_low: float
    sigma_high: float
    increase_low: float
    increase_low_stderr: float
    increase_high: float
    increase_high_stderr: float
    target: float
    magnitude_eps: float | None
    clean_loss: float
    weight_norm_sq: float
    m: int
    delta: float
    sigmas: np.ndarray
    increases: np.ndarray
    increase_stderrs: np.ndarray
    verdicts: np.ndarray
    pairs: np.ndarray
    n_undecided: int
    converged: bool
    confidence: float
    rtol: float
    n_samples: int
    n_forward: int
    n_recalibration_forward: int
    bn_recalibration: int | None
    seconds: float
    seed: int
    setup: dict


def pac_bayes_flatness(
    objective: Objective,
    *,
    target: float = 0.1,
    magnitude_eps: float | None = None,
    n_samples: int = 100,
    rtol: float = 0.02,
    max_steps: int = 30,
    delta: float = 0.1,
    seed: int = 0,
    bn_recalibration: int | None = None,
    progress: bool | str = False,
) -> PacBayesFlatness:
    """Jiang et al. (2020)'s PAC-Bayes σ′: the largest σ with E_u L(w+u) − L(w) ≤ `target`, bracketed by bisection.

    u ~ N(0, σ²I), or with `magnitude_eps` = ε the magnitude-aware u_i ~ N(0, σ²w_i² + ε²) (Jiang's pacbayes.mag,
    ε = 1e-3 there). Each σ draws antithetic pairs from the same seed (so every σ scales the same Gaussian draws)
    and looks at the 95% interval of the mean increase after 10, 20, 40, ... pairs and at the cap of `n_samples`
    forwards, each look at level 1 − 0.05/(number of looks) (Bonferroni), so a step decides wrongly with probability
    at most 2.5% however many looks it takes. A step whose interval still holds the target at the cap is undecided:
    the search then narrows the bracket from its two ends and keeps the undecided σ inside it. On a quadratic,
    where every σ scales one set of sampled curvatures, the bracket holds the true σ′ with probability ≥ 95% as far
    as the intervals are exact (it missed 8 of 400 random least-squares problems in tests/test_pac_bayes.py).

    w₀ = 0 in the bound: a checkpoint does not carry its initialization, and a prior centred at the origin is
    one the bound allows (chosen before the data); the bound's ‖w‖² is then the weights' own norm.

    Args:
        objective: the loss L and the point w (its parameter selection is what the noise perturbs).
        target: the mean loss increase that defines σ′ (Jiang et al. use 0.1).
        magnitude_eps: None for u ~ N(0, σ²I); ε for the magnitude-aware u_i ~ N(0, σ²w_i² + ε²).
        n_samples: the cap of perturbed forward passes per σ, in antithetic pairs (even, at least 4).
        rtol: stop bisecting when σ_high/σ_low ≤ 1 + rtol (or each end's distance to the undecided σ is as small).
        max_steps: the most σ tested after the first bracket is found.
        delta: the bound's confidence parameter δ.
        seed: seed of the noise (the same draws at every σ, and for every checkpoint).
        bn_recalibration: k: re-estimate BN statistics at every point from k batches; None: off.
        progress: a progress bar (True, or a label), off by default.

    Returns:
        The bracket and its σ′, 1/σ′² and the bound with their brackets, every step, and the cost.

    Raises:
        ValueError: a bad argument, or no σ within 60 doublings (halvings) whose increase is decided above (below)
            the target.

    Examples:
        L(w) = ((2w₀ − 2)² + (w₁ − 1)²)/2 at its minimum, H = diag(4, 1): the increase is exactly σ²·tr(H)/2 =
        5σ²/2, so σ′ = √(2·0.1/5) = 0.2.

        >>> from landscape.examples import quadratic
        >>> r = pac_bayes_flatness(quadratic(), target=0.1)
        >>> bool(r.sigma_low <= 0.2 <= r.sigma_high), bool(r.flatness_low <= 25 <= r.flatness_high)
        (True, True)
        >>> r.increase_low <= 0.1 < r.increase_high, bool(r.sigma_low < r.sigma < r.sigma_high)
        (True, True)
    """
    target = check_number("target", target, allow_zero=False)
    if magnitude_eps is not None:
        magnitude_eps = check_number("magnitude_eps", magnitude_eps, allow_zero=True)
    check_int("n_samples", n_samples, MIN_ANTITHETIC_SAMPLES)
    if n_samples % 2:
        raise ValueError(f"n_samples must be even (antithetic pairs, 2 forward passes each), got {n_samples}")
    rtol = check_number("rtol", rtol, allow_zero=False)
    check_int("max_steps", max_steps, 1)
    delta = check_number("delta", delta, allow_zero=False)
    if delta > 1:
        raise ValueError(f"delta must be in (0, 1], got {delta!r}")
    start = time.perf_counter()
    evaluate, recalibration_cost = noise_evaluator(objective, bn_recalibration, None)
    w = objective.w
    looks = _looks(n_samples // 2)
    level = 1 - (1 - CONFIDENCE) / len(looks)
    steps: list[_Step] = []

    with Progress(None, "pac-bayes σ′", "forward", progress) as bar:
        clean = evaluate(w).loss
        bar.update(1)

        def test(sigma: float) -> int:
            noise_std = sigma if magnitude_eps is None else torch.sqrt(sigma**2 * w.square() + magnitude_eps**2)
            generator = seeded_generator(objective.device, seed)  # the same draws at every σ
            units: list[float] = []
            verdict = UNDECIDED
            for look in looks:
                while len(units) < look:
                    for z in unit_noise(
                        objective, min(_FIRST_LOOK, look - len(units)), distribution="gaussian", generator=generator
                    ):
                        u = noise_std * z
                        units.append((evaluate(w + u).loss + evaluate(w - u).loss) / 2 - clean)
                        bar.update(2)
                low, high = skew_corrected_interval(units, level)
                verdict = ABOVE if low > target else BELOW if high <= target else UNDECIDED
                if verdict != UNDECIDED:
                    break
            steps.append(_Step(sigma, float(np.mean(units)), float(stderr(units)), verdict, len(units)))
            bar.set_postfix(sigma=f"{sigma:.3g}")
            return verdict

        low, high = _bracket(test, _first_sigma(w, magnitude_eps), target, magnitude_eps)
        converged = False
        for step in range(max_steps + 1):
            gaps = _gaps(low, high, [s.sigma for s in steps if s.verdict == UNDECIDED], rtol)
            if not gaps:
                converged = True
                break
            if step == max_steps:
                break
            a, b = max(gaps, key=lambda gap: gap[1] / gap[0])
            middle = math.sqrt(a * b)
            if (verdict := test(middle)) == BELOW:
                low = middle
            elif verdict == ABOVE:
                high = middle

    at = {s.sigma: s for s in steps}
    sigma = math.sqrt(low * high)
    norm_sq = float(getattr(objective, "inner", LOCAL).norm(w)) ** 2
    m = int(objective.n_samples)

    def bound(s: float) -> float | None:
        return None if magnitude_eps is not None else norm_sq / (4 * s**2) + math.log(m / delta) + 10

    n_draws = 2 * sum(s.pairs for s in steps)
    return PacBayesFlatness(
        flatness=1 / sigma**2,
        flatness_low=1 / high**2,
        flatness_high=1 / low**2,
        bound=bound(sigma),
        bound_low=bound(high),
        bound_high=bound(low),
        sigma=sigma,
        sigma_low=low,
        sigma_high=high,
        increase_low=at[low].increase,
        increase_low_stderr=at[low].stderr,
        increase_high=at[high].increase,
        increase_high_stderr=at[high].stderr,
        target=target,
        magnitude_eps=magnitude_eps,
        clean_loss=clean,
        weight_norm_sq=norm_sq,
        m=m,
        delta=delta,
        sigmas=np.array([s.sigma for s in steps]),
        increases=np.array([s.increase for s in steps]),
        increase_stderrs=np.array([s.stderr for s in steps]),
        verdicts=np.array([s.verdict for s in steps], dtype=int),
        pairs=np.array([s.pairs for s in steps], dtype=int),
        n_undecided=sum(s.verdict == UNDECIDED for s in steps),
        converged=converged,
        confidence=CONFIDENCE,
        rtol=rtol,
        n_samples=n_samples,
        n_forward=n_draws + 1,
        n_recalibration_forward=(n_draws + 1) * recalibration_cost,
        bn_recalibration=bn_recalibration,
        seconds=time.perf_counter() - start,
        seed=int(seed),
        setup=objective.describe(),
    )


# ------------------------------------------------------------------------------------- internals
@dataclass(frozen=True)
class _Step:
    sigma: float
    increase: float
    stderr: float
    verdict: int
    pairs: int


def _looks(n_pairs: int) -> list[int]:
    """The pair counts at which a step looks at its interval: 10, 20, 40, ... and the cap."""
    looks = []
    look = _FIRST_LOOK
    while look < n_pairs:
        looks.append(look)
        look *= 2
    return [*looks, n_pairs]


def _first_sigma(w: torch.Tensor, magnitude_eps: float | None) -> float:
    """Where the search starts: a tenth of the weights' root mean square (plain noise), or 0.1 (relative noise)."""
    if magnitude_eps is not None:
        return 0.1
    rms = float(w.double().square().mean().sqrt())
    return 0.1 * rms if rms > 0 else 0.01


def _bracket(test: Callable[[float], int], sigma: float, target: float, magnitude_eps: float | None) -> tuple[float, float]:
    """A σ decided below the target and a larger one decided above it: doubling up from `sigma`, then halving down."""
    verdicts = {sigma: test(sigma)}
    top = bottom = sigma
    for _ in range(_MAX_DOUBLINGS):
        if ABOVE in verdicts.values():
            break
        top *= 2
        verdicts[top] = test(top)
    else:
        raise ValueError(
            f"the mean loss increase stays at or below target={target:g} up to σ={top:g} "
            f"({_MAX_DOUBLINGS} doublings): the loss does not rise that far under this noise"
        )
    for _ in range(_MAX_DOUBLINGS):
        if BELOW in verdicts.values():
            break
        bottom /= 2
        verdicts[bottom] = test(bottom)
    else:
        floor = "" if magnitude_eps is None else f" (the noise keeps ε = magnitude_eps = {magnitude_eps:g} at any σ)"
        raise ValueError(f"the mean loss increase is above target={target:g} even at σ={bottom:g}{floor}")
    low = max(s for s, v in verdicts.items() if v == BELOW)
    return low, min(s for s, v in verdicts.items() if v == ABOVE and s > low)


def _gaps(low: float, high: float, undecided: list[float], rtol: float) -> list[tuple[float, float]]:
    """The parts of [low, high] still to bisect: the whole bracket, or its two ends outside the undecided σ while
    they are wider than 1 + rtol and than the undecided span (the resolution the noise allows)."""
    inside = sorted(s for s in undecided if low < s < high)
    if not inside:
        return [(low, high)] if high / low > 1 + rtol else []
    finest = max(1 + rtol, inside[-1] / inside[0])
    return [(a, b) for a, b in ((low, inside[0]), (inside[-1], high)) if b / a > finest]
