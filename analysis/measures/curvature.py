"""eig, trace and density: Lanczos eigenvalues (certified), the trace estimate and the SLQ spectral density of
the curvature --curvature names (the Hessian, the generalized Gauss-Newton matrix or the empirical Fisher)."""

from __future__ import annotations

from analysis.measures.options import MetricSpec
from analysis.measures.record import Measure
from analysis.measures.solver_memory import (
    free_beside_hvps,
    hutchinson_block,
    lanczos_vectors,
    sketch_fits,
    vector_bytes,
)
from analysis.measures.text import Row, eigenvalue_label, pm, uncertified_eigenvalue
from landscape.curvature.density import Spectrum, slq_density
from landscape.curvature.spectrum import EigResult, lanczos, minimum_vectors
from landscape.curvature.trace import TraceResult, hutchinson, hutchpp, xtrace
from landscape.engine.inner import LOCAL
from landscape.engine.objective import Objective
from landscape.engine.operators import curvature_operator
from landscape.results import Quantity

TRACE_METHODS = {"xtrace": xtrace, "hutchpp": hutchpp, "hutchinson": hutchinson}


def sharded(objective: Objective) -> bool:
    """Whether each rank holds only pieces of the parameters (--shard)."""
    return getattr(objective, "inner", LOCAL).sharded


# ---------------------------------------------------------------------------------------------------- eig
def eig(objective: Objective, spec: MetricSpec) -> EigResult:
    """Lanczos (certified, with thick restarts where memory is short); warm-started from the last top eigenvector
    when `spec.warm_start` holds a WarmStart (`landscape track`)."""
    warm = spec.warm_start
    run = warm.lanczos if warm is not None else lanczos
    op = curvature_operator(objective, spec.curvature)
    vectors = lanczos_vectors(objective, op.shape[0], op.dtype, spec.k, spec.max_matvecs, spec.max_vectors, op.length)
    return run(
        op,
        spec.k,
        which=spec.which,
        tol=spec.tol,
        max_matvecs=spec.max_matvecs,
        seed=spec.seed,
        progress=spec.progress,
        max_vectors=vectors,
    )


def check_eig(spec: MetricSpec, params: str, n_params: int, n_samples: int | None) -> None:
    """--k at most the parameters measured, a Lanczos budget of at least --k, room to restart in --max-vectors."""
    if spec.k > n_params:
        raise ValueError(
            f"--k {spec.k} asks for more eigenvalues than the {n_params} parameters measured (--params {params}); "
            f"give at most {n_params}"
        )
    if spec.max_matvecs is not None and spec.max_matvecs < spec.k:  # None: the default budget, ≥ k
        raise ValueError(f"--max-matvecs {spec.max_matvecs} cannot find --k {spec.k} eigenvalues; give at least {spec.k}")
    fewest = minimum_vectors(min(spec.k, n_params))
    if spec.max_vectors is not None and spec.max_vectors < fewest:
        raise ValueError(
            f"--max-vectors {spec.max_vectors} leaves Lanczos no room to restart for --k {spec.k}; give at least {fewest}"
        )


def eig_rows(r: EigResult, name: str, products: str) -> list[Row]:
    """One row per eigenvalue: certified ones with the error bound, the others as the bound interlacing gives."""
    label = {"LA": "λ", "SA": "λ_min,", "LM": "|λ|"}[r.which]
    rows = []
    restarted = f"; {r.restarts} restarts in {r.stored_vectors} vectors" if r.restarts else ""
    for i, (value, bound) in enumerate(zip(r.values, r.error_bounds), 1):
        cost = f"{r.n_matvecs} {products}, {r.seconds:.1f}s{restarted}" if i == 1 else ""
        if r.certified:
            rows.append((f"{label}{i}", pm(value, bound), cost, ""))
            continue
        if not r.converged or r.stop == "certified":
            unfinished = "not converged" if not r.converged else "its check unfinished"
            why = f"{unfinished} in {r.n_matvecs} {products}; raise --max-matvecs"
        else:
            why = f"stop={r.stop}"
        rows.append((f"{label}{i}", uncertified_eigenvalue(value, r.which), cost, f"not certified ({why})"))
    return rows


def eig_quantities(r: EigResult, name: str) -> list[Quantity]:  # the Lanczos residual bounds each value
    return [Quantity(eigenvalue_label(i), float(v), float(e), name) for i, (v, e) in enumerate(zip(r.values, r.residuals), 1)]


# ---------------------------------------------------------------------------------------------------- trace
def trace(objective: Objective, spec: MetricSpec) -> TraceResult:
    """The trace estimate, refused in one line where its vectors do not fit (Hutchinson's takes smaller blocks)."""
    op = curvature_operator(objective, spec.curvature)
    n, size = op.shape[0], vector_bytes(op)
    options = {}
    if spec.trace_method == "hutchinson":
        options["block_size"] = hutchinson_block(objective, n, size, spec.probes)
    else:
        sketch_fits(objective, spec.trace_method, spec.probes, n, size)
    return TRACE_METHODS[spec.trace_method](
        op,
        spec.probes,
        **options,
        seed=spec.seed,
        blocks=None if sharded(objective) else objective.layout.slices(),  # a rank holds no whole parameter
        progress=spec.progress,
    )


def trace_rows(r: TraceResult, name: str, products: str) -> list[Row]:
    return [(f"trace ({r.method})", pm(r.estimate, r.stderr), f"{r.n_matvecs} {products}, {r.seconds:.1f}s", "")]


def trace_quantities(r: TraceResult, name: str) -> list[Quantity]:
    return [Quantity("trace", r.estimate, r.stderr, name)]


# ---------------------------------------------------------------------------------------------------- density
def density(objective: Objective, spec: MetricSpec) -> Spectrum:
    """SLQ, keeping every Lanczos vector only where they fit in half of what the memory plan leaves free."""
    return slq_density(
        curvature_operator(objective, spec.curvature),
        n_runs=spec.density_runs,
        n_steps=spec.density_steps,
        seed=spec.seed,
        progress=spec.progress,
        free_bytes=free_beside_hvps(objective),
    )


def density_rows(r: Spectrum, name: str, products: str) -> list[Row]:
    cost = f"{r.n_matvecs} {products}, {r.seconds:.1f}s"
    bounded = "; three-term recurrence (bounded memory)" if r.reorthogonalization == "none" else ""
    return [("spectral density", f"{len(r.nodes)} SLQ runs, σ={r.sigma:.3g}", cost + bounded, "")]


MEASURES = (
    Measure(
        "eig",
        eig,
        EigResult,
        eig_rows,
        eig_quantities,
        options=("curvature", "k", "which", "tol", "max_matvecs", "max_vectors"),
        check=check_eig,
        sharded=True,
    ),
    Measure(
        "trace", trace, TraceResult, trace_rows, trace_quantities, options=("curvature", "trace_method", "probes"), sharded=True
    ),
    Measure("density", density, Spectrum, density_rows, options=("curvature", "density_runs", "density_steps"), sharded=True),
)
