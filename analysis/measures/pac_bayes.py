"""pac-bayes and pac-bayes-mag: Jiang et al. (2020)'s PAC-Bayes flatness 1/σ′², σ′ the largest noise scale whose mean
loss increase stays at --pac-bayes-target, bracketed by bisection; plain noise N(0, σ²I) or magnitude-aware N(0, σ²w² + ε²)."""

from __future__ import annotations

from analysis.measures.options import MetricSpec
from analysis.measures.record import Measure
from analysis.measures.text import Row
from landscape.engine.objective import Objective
from landscape.results import Quantity
from landscape.sharpness.pac_bayes import PacBayesFlatness, pac_bayes_flatness

MAGNITUDE_EPS = 1e-3  # ε of the magnitude-aware noise, Jiang et al.'s
OPTIONS = ("pac_bayes_target", "noise_samples", "bn_recalibration")


def plain(objective: Objective, spec: MetricSpec) -> PacBayesFlatness:
    return _search(objective, spec, None)


def magnitude(objective: Objective, spec: MetricSpec) -> PacBayesFlatness:
    return _search(objective, spec, MAGNITUDE_EPS)


def _search(objective: Objective, spec: MetricSpec, magnitude_eps: float | None) -> PacBayesFlatness:
    return pac_bayes_flatness(
        objective,
        target=spec.pac_bayes_target,
        magnitude_eps=magnitude_eps,
        n_samples=spec.noise_samples,
        seed=spec.seed,
        bn_recalibration=spec.bn_recalibration,
        progress=spec.progress,
    )


def pac_bayes_rows(r: PacBayesFlatness, name: str, products: str) -> list[Row]:
    noise = "N(0, σ²I)" if r.magnitude_eps is None else f"N(0, σ²w² + {r.magnitude_eps:g}²)"
    undecided = f"; {r.n_undecided} σ undecided" if r.n_undecided else ""
    unfinished = "" if r.converged else "; step budget spent"
    note = (
        f"σ′ {r.sigma:.4g} ∈ [{r.sigma_low:.4g}, {r.sigma_high:.4g}], ΔL there {r.increase_low:.3g} ± "
        f"{r.increase_low_stderr:.2g} and {r.increase_high:.3g} ± {r.increase_high_stderr:.2g} (target {r.target:g}); "
        f"u ~ {noise}{undecided}{unfinished}"
    )
    cost = f"{r.n_forward} forwards, {r.seconds:.1f}s"
    rows = [(f"{name} 1/σ′²", f"{r.flatness:.6g} [bracket {r.flatness_low:.6g}, {r.flatness_high:.6g}]", cost, note)]
    if r.bound is not None:
        value = f"{r.bound:.6g} [bracket {r.bound_low:.6g}, {r.bound_high:.6g}]"
        rows.append((f"{name} bound", value, "", f"‖w‖²/(4σ′²) + log(m/δ) + 10, w₀ = 0, m = {r.m}, δ = {r.delta:g}"))
    return rows


def pac_bayes_quantities(r: PacBayesFlatness, name: str) -> list[Quantity]:
    # the bracket's half-width stands in for the uncertainty (it holds σ′ at 95%, not a standard error)
    quantities = [Quantity(f"{name} 1/σ′²", r.flatness, (r.flatness_high - r.flatness_low) / 2, name)]
    if r.bound is not None:
        quantities.append(Quantity(f"{name} bound", r.bound, (r.bound_high - r.bound_low) / 2, name))
    return quantities


MEASURES = (
    Measure("pac-bayes", plain, PacBayesFlatness, pac_bayes_rows, pac_bayes_quantities, options=OPTIONS),
    Measure(
        "pac-bayes-mag",
        magnitude,
        PacBayesFlatness,
        pac_bayes_rows,
        pac_bayes_quantities,
        options=OPTIONS,
        scale_invariant=True,  # up to its ε floor (tests/test_scale_invariance.py)
    ),
)
