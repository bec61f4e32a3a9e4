"""hessian-diagonal: the curvature's diagonal per parameter (XDiag, Hutchinson, or exact for the GGN and Fisher), shown
as its sums per parameter tensor with their standard errors."""

from __future__ import annotations

from analysis.measures.options import MetricSpec
from analysis.measures.record import Measure
from analysis.measures.text import Row, pm
from landscape.curvature.diagonal import DIAGONAL_MATVEC_MINIMUMS, DiagonalResult, hessian_diagonal
from landscape.engine.objective import Objective


def diagonal(objective: Objective, spec: MetricSpec) -> DiagonalResult:
    return hessian_diagonal(
        objective, spec.diagonal_method, curvature=spec.curvature, n_matvecs=spec.probes, seed=spec.seed, progress=spec.progress
    )


def check_diagonal(spec: MetricSpec, params: str, n_params: int, n_samples: int | None) -> None:
    """--diagonal-method exact needs --curvature ggn or fisher; xdiag and hutchinson need their fewest --probes."""
    method = spec.diagonal_method
    if method == "exact" and spec.curvature == "hessian":
        raise ValueError(
            "--diagonal-method exact takes --curvature ggn (N·C backward passes) or fisher (N): the Hessian's diagonal "
            "has no exact shortcut; use --diagonal-method xdiag"
        )
    fewest = DIAGONAL_MATVEC_MINIMUMS[method]
    if spec.probes < fewest:
        raise ValueError(f"--probes must be at least {fewest} for --diagonal-method {method}, got {spec.probes}")


def diagonal_cost(r: DiagonalResult, products: str) -> str:
    if r.method == "exact":
        return f"{r.n_backward} backward passes, {r.seconds:.1f}s"
    return f"{r.n_matvecs} {products}, {r.seconds:.1f}s"


def diagonal_rows(r: DiagonalResult, name: str, products: str) -> list[Row]:
    """The total (the trace), then one row per parameter tensor with its share of the total, then the roles (if
    there are several)."""
    what = {"hessian": "diag H", "ggn": "diag GGN", "fisher": "diag F"}.get(r.curvature or "", "diag")
    rows: list[Row] = [(f"Σ {what} ({r.method})", pm(r.total, r.total_stderr), diagonal_cost(r, products), "= the trace")]
    for blocks in (r.tensors, r.groups if len(r.groups) > 1 else ()):
        for b in blocks:
            share = f"{b.sum / r.total:.1%} of the total, " if r.total else ""
            kind = " (all its layers)" if b.shape is None else ""
            rows.append((f"  {b.name}", pm(b.sum, b.stderr), "", f"{share}{b.numel:,} parameters{kind}"))
    return rows


MEASURES = (
    Measure(
        "hessian-diagonal",
        diagonal,
        DiagonalResult,
        diagonal_rows,
        options=("curvature", "diagonal_method", "probes"),
        check=check_diagonal,
        compared=False,  # per-tensor sums: measure's view (compare and correlate read the trace and --per-layer)
    ),
)
