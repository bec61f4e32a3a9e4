"""Worst-case and m-sharpness in an ℓ2 or ℓ∞ ball, plain or adaptive (Foret et al. 2021; Kwon et al. 2021;
Andriushchenko et al. 2023): each a lower bound, the largest loss APGD found."""

from __future__ import annotations

from functools import partial

import numpy as np

from analysis.measures.box import best_of_row
from analysis.measures.options import MetricSpec
from analysis.measures.record import Measure
from analysis.measures.text import Row, ball_label
from landscape.engine.objective import Objective
from landscape.results import Quantity
from landscape.sharpness.balls import MSharpness, WorstCase, m_sharpness, worst_case


def ascent(spec: MetricSpec, adaptive: bool) -> dict:
    """The options worst-case and m-sharpness share: the ball, its adaptive scaling, and APGD's budget."""
    return dict(
        p=spec.p,
        adaptive=adaptive,
        eta=spec.eta if adaptive else 0.0,
        steps=spec.ascent_steps,
        restarts=spec.ascent_restarts,
        seed=spec.seed,
        progress=spec.progress,
        **preprocessing(spec),
    )


def preprocessing(spec: MetricSpec) -> dict:
    """Andriushchenko et al. (2023)'s two options, read by the worst-, m- and average-case measures."""
    return {"logit_normalization": spec.logit_normalization, "fold_bn": spec.fold_bn}


def worst(objective: Objective, spec: MetricSpec, *, adaptive: bool = False) -> WorstCase:
    return worst_case(objective, spec.rho, **ascent(spec, adaptive))


def m_batches(objective: Objective, spec: MetricSpec, *, adaptive: bool = False) -> MSharpness:
    return m_sharpness(objective, spec.m, spec.rho, **ascent(spec, adaptive))


def check_m(spec: MetricSpec, params: str, n_params: int, n_samples: int | None) -> None:
    if n_samples is not None and spec.m > n_samples:
        raise ValueError(
            f"--m {spec.m} exceeds the {n_samples} samples of the measurement set (--n-samples, --split); "
            f"give at most {n_samples}"
        )


def _scaled(r: WorstCase | MSharpness) -> str:
    scale = "" if not r.adaptive else f", T = |w| + {r.eta:g}" if r.eta else ", T = |w|"
    return scale + (", normalized logits" if r.logit_normalization else "") + (", BN folded" if r.fold_bn else "")


def worst_rows(r: WorstCase, name: str, products: str) -> list[Row]:
    return [best_of_row(r, f"{ball_label(name, r.p)}, ρ={r.rho:g}", f"APGD {r.steps} steps{_scaled(r)}")]


def worst_quantities(r: WorstCase, name: str) -> list[Quantity]:
    return [Quantity(name, r.value, r.spread, name)]


def m_rows(r: MSharpness, name: str, products: str) -> list[Row]:
    spread = "" if r.stderr is None else f" ± {r.stderr:.2g}"
    unused = f", {r.n_unused} samples left out" if r.n_unused else ""
    mean_spread = sum(r.batch_spreads) / len(r.batch_spreads)
    return [
        (
            f"{ball_label(name, r.p)}, ρ={r.rho:g}, m={r.m}",
            f"≥ {r.value:.4g}{spread} (mean ± stderr over {r.n_batches} batches)",
            f"{r.n_forward} forwards, {r.n_grad} gradients on {r.m}-sample batches, {r.seconds:.1f}s",
            f"a lower bound: each batch's maximum is its best start's; {r.n_batches} batches of {r.m}{unused}; "
            f"APGD {r.steps} steps, {1 + r.restarts} starts{_scaled(r)}; "
            f"mean start spread {mean_spread:.2g}",
        )
    ]


def m_quantities(r: MSharpness, name: str) -> list[Quantity]:  # the same batches for every checkpoint: paired per batch
    return [Quantity(name, r.value, r.stderr or 0.0, name, tuple(np.asarray(r.batch_values).tolist()))]


BALL = ("rho", "p", "ascent_steps", "ascent_restarts", "logit_normalization", "fold_bn")
MEASURES = (
    Measure("worst-case", worst, WorstCase, worst_rows, worst_quantities, options=BALL, lower_bound=True),
    Measure(
        "adaptive-worst-case",
        partial(worst, adaptive=True),
        WorstCase,
        worst_rows,
        worst_quantities,
        options=(*BALL, "eta"),
        lower_bound=True,
        scale_invariant=True,  # at η = 0, the default: T = |w| scales with w
    ),
    Measure("m-sharpness", m_batches, MSharpness, m_rows, m_quantities, options=(*BALL, "m"), check=check_m, lower_bound=True),
    Measure(
        "adaptive-m-sharpness",
        partial(m_batches, adaptive=True),
        MSharpness,
        m_rows,
        m_quantities,
        options=(*BALL, "m", "eta"),
        check=check_m,
        lower_bound=True,
        scale_invariant=True,  # at η = 0, the default
    ),
)
