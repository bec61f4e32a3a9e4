"""Measures of random weight noise: expected-loss and the sharpness curve (SmoothOut's E L(w+u), Wen et al. 2018)
and the average case of Andriushchenko et al. (2023), plain and adaptive."""

from __future__ import annotations

import warnings

import numpy as np

from analysis.measures.balls import preprocessing
from analysis.measures.notes import OptionNote
from analysis.measures.options import MetricSpec
from analysis.measures.record import Measure, no_quantities
from analysis.measures.solver_memory import hutchinson_block, vector_bytes
from analysis.measures.text import Row, ball_label, noise_increase_label
from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator
from landscape.results import Quantity
from landscape.sharpness.balls import average_case
from landscape.sharpness.perturb import ExpectedLoss, SharpnessCurve, expected_loss, sharpness_curve


def weight_noise(spec: MetricSpec) -> dict:
    """The options expected-loss and the sharpness curve share: the noise, its draws and BN recalibration."""
    return dict(
        distribution=spec.distribution,
        scale=spec.scale,
        n_samples=spec.noise_samples,
        seed=spec.seed,
        bn_recalibration=spec.bn_recalibration,
        progress=spec.progress,
    )


NOISE_OPTIONS = ("radius", "distribution", "scale", "noise_samples", "bn_recalibration")


# ---------------------------------------------------------------------------------------------------- expected-loss
def expected(objective: Objective, spec: MetricSpec) -> ExpectedLoss:
    """E[L(w+u)] − L(w) at the largest --radius (said in a note where several are given)."""
    radii = list(spec.radius)
    radius = max(radii)
    if len(radii) > 1 and spec.radius != MetricSpec.radius:  # the default's use is in --radius's help
        warnings.warn(
            OptionNote(f"expected-loss is measured at the largest --radius, {radius:g} (sharpness-curve measures every radius)"),
            stacklevel=3,
        )
    return expected_loss(objective, radius, **weight_noise(spec))


def expected_rows(r: ExpectedLoss, name: str, products: str) -> list[Row]:
    lo, hi = r.increase_ci
    value, cost = f"{r.increase:.4g} [95% CI {lo:.4g}, {hi:.4g}]", f"{r.n_forward} forwards, {r.seconds:.1f}s"
    if name == "expected-loss":
        return [(f"E[L(w+u)] − L(w), a={r.radius:g}", value, cost, f"{r.distribution}, {r.scale}")]
    # average-case sharpness (Andriushchenko et al. 2023): Gaussian noise in the ℓ2 ball's version, uniform in ℓ∞'s
    p = "2" if r.distribution == "gaussian" else "inf"
    noise = "N(0, ρ²I)" if p == "2" else "U[−ρ, ρ]^d"
    scale = "|w|" if r.scale == "weight" else "1"
    return [(f"{ball_label(name, p)}, ρ={r.radius:g}", value, cost, f"E L(w + T⊙δ') − L(w), δ' ~ {noise}, T = {scale}")]


# ---------------------------------------------------------------------------------------------------- sharpness-curve
def curve(objective: Objective, spec: MetricSpec) -> SharpnessCurve:
    """E[L(w+u)] − L(w) at every --radius with the second-order prediction ½·tr(ΣH) from --probes Hutchinson probes."""
    block = hutchinson_block(objective, objective.n_params, vector_bytes(HessianOperator(objective)), spec.probes)
    return sharpness_curve(objective, list(spec.radius), n_probes=spec.probes, probe_block=block, **weight_noise(spec))


def curve_rows(r: SharpnessCurve, name: str, products: str) -> list[Row]:
    rows = []
    for i, radius in enumerate(r.radii):
        lo, hi = r.increase_ci[i]
        note = "" if r.prediction is None else f"½·tr(ΣH): {r.prediction[i]:.4g} ± {r.prediction_stderr[i]:.2g}"
        cost = f"{r.n_forward} forwards, {r.n_matvecs} HVPs, {r.seconds:.1f}s" if i == 0 else ""
        rows.append((f"increase at a={radius:g}", f"{r.increase[i]:.4g} [95% CI {lo:.4g}, {hi:.4g}]", cost, note))
    return rows


def curve_quantities(r: SharpnessCurve, name: str) -> list[Quantity]:  # the same noise draws for every checkpoint: paired
    return [
        Quantity(
            noise_increase_label(float(p.radius)),
            p.increase,
            p.stderr,
            name,
            tuple((np.asarray(p.samples) - p.clean_loss).tolist()),
        )
        for p in r.points
    ]


# ---------------------------------------------------------------------------------------------------- average-case
def average(objective: Objective, spec: MetricSpec, *, adaptive: bool = False) -> ExpectedLoss:
    options = dict(n_samples=spec.noise_samples, seed=spec.seed, progress=spec.progress, **preprocessing(spec))
    return average_case(objective, spec.rho, p=spec.p, adaptive=adaptive, **options)


def adaptive_average(objective: Objective, spec: MetricSpec) -> ExpectedLoss:
    return average(objective, spec, adaptive=True)


def average_quantities(r: ExpectedLoss, name: str) -> list[Quantity]:
    samples = tuple((np.asarray(r.samples) - r.clean_loss).tolist())  # the same draws for every checkpoint
    return [Quantity(name, r.increase, r.stderr, name, samples)]


AVERAGE_OPTIONS = ("rho", "p", "noise_samples", "logit_normalization", "fold_bn")
MEASURES = (
    # measure's single-radius row; compare's quantity is the sharpness curve's
    Measure("expected-loss", expected, ExpectedLoss, expected_rows, no_quantities, options=NOISE_OPTIONS, compared=False),
    Measure("sharpness-curve", curve, SharpnessCurve, curve_rows, curve_quantities, options=(*NOISE_OPTIONS, "probes")),
    Measure("average-case", average, ExpectedLoss, expected_rows, average_quantities, options=AVERAGE_OPTIONS),
    Measure(
        "adaptive-average-case",
        adaptive_average,
        ExpectedLoss,
        expected_rows,
        average_quantities,
        options=AVERAGE_OPTIONS,
        scale_invariant=True,
    ),
)
