"""eps-sharpness: Keskar et al. (2017)'s largest loss in a box around the weights, a lower bound from ascents."""

from __future__ import annotations

from analysis.measures.options import MetricSpec
from analysis.measures.record import Measure
from analysis.measures.text import EPSILON_SHARPNESS, LOWER_BOUND, Row
from landscape.engine.objective import Objective
from landscape.results import Quantity
from landscape.sharpness.balls import WorstCase
from landscape.sharpness.box import EpsilonSharpness, epsilon_sharpness


def eps_sharpness(objective: Objective, spec: MetricSpec) -> EpsilonSharpness:
    return epsilon_sharpness(
        objective,
        spec.eps,
        subspace_dim=spec.subspace_dim,
        max_iter=spec.eps_iters,
        restarts=spec.restarts,
        seed=spec.seed,
        method=spec.eps_method,
        progress=spec.progress,
    )


def check_subspace(spec: MetricSpec, params: str, n_params: int, n_samples: int | None) -> None:
    if spec.subspace_dim is not None and spec.subspace_dim > n_params:
        raise ValueError(
            f"--subspace-dim {spec.subspace_dim} exceeds the {n_params} parameters measured (--params {params}); "
            f"give at most {n_params}"
        )


def best_of_row(r: EpsilonSharpness | WorstCase, label: str, ascent: str) -> Row:
    """The row of a best-of-starts maximum: marked ≥ (the true maximum can only be higher), its cost, and the
    `ascent` that found it with the value each start reached."""
    starts = ", ".join(f"{kind} {v:.4g}" for kind, v in zip(r.start_kinds, r.values))
    value = f"≥ {r.value:.4g} (best of {len(r.values)} starts, spread {r.spread:.2g})"
    cost = f"{r.n_forward} forwards, {r.n_grad} gradients, {r.seconds:.1f}s"
    return (label, value, cost, f"{LOWER_BOUND}; {ascent}; starts: {starts}")


def eps_rows(r: EpsilonSharpness, name: str, products: str) -> list[Row]:
    space = "full space" if r.subspace_dim is None else f"{r.subspace_dim}-dim subspace"
    return [best_of_row(r, f"ε-sharpness, ε={r.eps:g}", f"{r.method}, {r.max_iter} iterations, {space}")]


def eps_quantities(r: EpsilonSharpness, name: str) -> list[Quantity]:
    # a best-of-starts maximum has no standard error: how much the start mattered stands in
    return [Quantity(EPSILON_SHARPNESS, r.value, r.spread, name)]


MEASURES = (
    Measure(
        "eps-sharpness",
        eps_sharpness,
        EpsilonSharpness,
        eps_rows,
        eps_quantities,
        options=("eps", "subspace_dim", "restarts", "eps_method", "eps_iters"),
        check=check_subspace,
        lower_bound=True,
    ),
)
