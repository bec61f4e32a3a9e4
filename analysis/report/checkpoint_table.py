"""The table `landscape measure` prints for each checkpoint: its measurement set, then one row per quantity.

The rows of a metric come from its result's type (`result_rows`, dispatched on EigResult, TraceResult,
Spectrum, ExpectedLoss, SharpnessCurve, EpsilonSharpness, WorstCase, MSharpness); a stored report (a
results file being resumed) is made typed again first, so a fresh and a resumed run print the same table.
"""

from __future__ import annotations

from functools import singledispatch
from typing import Any

from analysis.report.quantities import METRIC_RESULTS, as_result
from analysis.report.setup_text import batching, norm_mode, precision, sample_origin
from analysis.report.tables import format_table
from landscape.curvature.blocks import PerLayerResult
from landscape.curvature.density import Spectrum
from landscape.curvature.spectrum import EigResult
from landscape.curvature.trace import TraceResult
from landscape.engine.memory import format_size
from landscape.sharpness.balls import MSharpness, WorstCase
from landscape.sharpness.box import EpsilonSharpness
from landscape.sharpness.perturb import ExpectedLoss, SharpnessCurve

# how the table names each curvature and its matrix-vector products
CURVATURE_NAMES = {
    "hessian": ("Hessian", "HVPs"),
    "ggn": ("generalized Gauss-Newton", "GGN products"),
    "fisher": ("empirical Fisher", "Fisher products"),
}
HEADERS = ["quantity", "value ± uncertainty", "cost", "note"]


def format_measurement(report: dict) -> str:
    """A human-readable block per checkpoint: measurement set, then value ± uncertainty and cost."""
    setup = report["setup"]
    m = setup["measurement"]
    curvature, products = CURVATURE_NAMES[setup.get("curvature", "hessian")]
    sharded = f", sharded over {setup['world_size']} ranks" if setup.get("sharded") else ""
    if setup.get("parameters_sharded"):
        replicas = setup.get("shard_replicas", 1)
        ranks = f"{setup['world_size']} ranks"
        if replicas > 1:
            ranks = f"{setup['world_size'] // replicas} ranks in each of {replicas} replicas"
        sharded = f", parameters sharded over {ranks} ({setup['parameters_sharded'].upper()})"
    lines = [
        report["checkpoint"],
        f"  measured on the {m['split']} split of {setup['data']['spec']}: {setup['n_samples']} samples in "
        f"{batching(setup)}, {norm_mode(setup)}, "
        f"{precision(setup)} on {setup['device']}, params={setup['params']} ({report['n_params']}), "
        f"HVP {setup['hvp_method']}, curvature: {curvature}{sharded}",
    ]
    if sample_origin(setup):
        lines.append(f"  the {m['split']} split: {sample_origin(setup)}")
    if report.get("hvp_memory"):
        lines.append(f"  HVP memory: {report['hvp_memory']['summary']}")
    if report.get("memory") and report["memory"].get("measured_over_predicted"):
        m = report["memory"]
        lines.append(
            f"  process memory: peak {format_size(m['measured_peak_bytes'])}, predicted {format_size(m['predicted_peak_bytes'])} "
            f"(held {format_size(m['resident_at_plan_bytes'])} + HVPs + {m['solver_vectors']} solver vectors)"
        )
    if report.get("hvp_check"):
        lines.append(_hvp_check_line(report["hvp_check"]))
    if report.get("hvp_error"):
        lines.append(f"  HVP error: {report['hvp_error']['summary']}")
    rows: list[tuple] = [
        ("loss", f"{report['loss']:.6g}", "", ""),
        ("accuracy", "" if report["accuracy"] is None else f"{report['accuracy']:.4f}", "", ""),
        ("gradient norm", f"{report['grad_norm']:.4g}", "", ""),
    ]
    # typed, fresh or resumed; in one order whatever the order of --metrics
    results = {name: as_result(name, report["metrics"][name]) for name in METRIC_RESULTS if name in report["metrics"]}
    for name, result in results.items():
        rows += result_rows(result, name, products)
    lines.append(format_table(HEADERS, rows))
    trace = results.get("trace")
    if trace is not None and trace.blocks:
        block_rows = [(name, _pm(*estimate)) for name, estimate in trace.blocks.items()]
        lines.append("\ntrace by parameter tensor (same probes)\n" + format_table(["parameter", "trace ± stderr"], block_rows))
    if report.get("per_layer"):
        lines.append(format_per_layer(as_per_layer(report["per_layer"]), curvature))
    return "\n".join(lines)


def _hvp_check_line(check: dict) -> str:
    if check.get("skipped"):
        return f"  HVP self-check: skipped, {check['skipped']}; {check['seconds']:.2f}s"
    if check["passed"] and check.get("estimated_error") is not None:
        verdict = (
            f"agrees with double backward to {check['difference']:.1g}, within twice its estimated error "
            f"{check['estimated_error']:.1g}"
        )
    elif check["passed"]:
        verdict = f"agrees with double backward to {check['difference']:.1g} (a repeat to {check['repeat_difference']:.1g})"
    else:
        verdict = f"{check['path']} differed from double backward by {check['difference']:.2g}, so double backward was used"
    return f"  HVP self-check: {verdict}; {check['seconds']:.2f}s"


def _pm(value: float, err: float) -> str:
    return f"{value:.6g} ± {err:.2g}"


@singledispatch
def result_rows(result: Any, metric: str, products: str) -> list[tuple]:
    """The table rows (quantity, value ± uncertainty, cost, note) of one metric's result."""
    raise TypeError(f"no table rows for {type(result).__name__} ({metric})")


@result_rows.register
def _(r: EigResult, metric: str, products: str) -> list[tuple]:
    label = {"LA": "λ", "SA": "λ_min,", "LM": "|λ|"}[r.which]
    rows = []
    restarted = f"; {r.restarts} restarts in {r.stored_vectors} vectors" if r.restarts else ""
    for i, (value, bound) in enumerate(zip(r.values, r.error_bounds), 1):
        cost = f"{r.n_matvecs} {products}, {r.seconds:.1f}s{restarted}" if i == 1 else ""
        if r.certified:
            rows.append((f"{label}{i}", _pm(value, bound), cost, ""))
            continue
        if not r.converged or r.stop == "certified":
            unfinished = "not converged" if not r.converged else "its check unfinished"
            why = f"{unfinished} in {r.n_matvecs} {products}; raise --max-matvecs"
        else:
            why = f"stop={r.stop}"
        rows.append((f"{label}{i}", uncertified_eigenvalue(value, r.which), cost, f"not certified ({why})"))
    return rows


def uncertified_eigenvalue(value: float, which: str) -> str:
    """A Ritz value with no evidence of its index: no ±, only what interlacing guarantees (θ_i ≤ λ_i for the largest,
    θ_i ≥ λ_i for the smallest)."""
    return {"LA": f"≥ {value:.6g}", "SA": f"≤ {value:.6g}"}.get(which, f"{value:.6g}")


@result_rows.register
def _(r: TraceResult, metric: str, products: str) -> list[tuple]:
    return [(f"trace ({r.method})", _pm(r.estimate, r.stderr), f"{r.n_matvecs} {products}, {r.seconds:.1f}s", "")]


@result_rows.register
def _(r: Spectrum, metric: str, products: str) -> list[tuple]:
    cost = f"{r.n_matvecs} {products}, {r.seconds:.1f}s"
    bounded = "; three-term recurrence (bounded memory)" if r.reorthogonalization == "none" else ""
    return [("spectral density", f"{len(r.nodes)} SLQ runs, σ={r.sigma:.3g}", cost + bounded, "")]


@result_rows.register
def _(r: ExpectedLoss, metric: str, products: str) -> list[tuple]:
    lo, hi = r.increase_ci
    value, cost = f"{r.increase:.4g} [95% CI {lo:.4g}, {hi:.4g}]", f"{r.n_forward} forwards, {r.seconds:.1f}s"
    if metric == "expected-loss":
        return [(f"E[L(w+u)] − L(w), a={r.radius:g}", value, cost, f"{r.distribution}, {r.scale}")]
    # average-case sharpness (Andriushchenko et al. 2023): Gaussian noise in the ℓ2 ball's version, uniform in ℓ∞'s
    p = "2" if r.distribution == "gaussian" else "inf"
    noise = "N(0, ρ²I)" if p == "2" else "U[−ρ, ρ]^d"
    scale = "|w|" if r.scale == "weight" else "1"
    return [(f"{_ball(metric, p)}, ρ={r.radius:g}", value, cost, f"E L(w + T⊙δ') − L(w), δ' ~ {noise}, T = {scale}")]


@result_rows.register
def _(r: SharpnessCurve, metric: str, products: str) -> list[tuple]:
    rows = []
    for i, radius in enumerate(r.radii):
        lo, hi = r.increase_ci[i]
        note = "" if r.prediction is None else f"½·tr(ΣH): {r.prediction[i]:.4g} ± {r.prediction_stderr[i]:.2g}"
        cost = f"{r.n_forward} forwards, {r.n_matvecs} HVPs, {r.seconds:.1f}s" if i == 0 else ""
        rows.append((f"increase at a={radius:g}", f"{r.increase[i]:.4g} [95% CI {lo:.4g}, {hi:.4g}]", cost, note))
    return rows


LOWER_BOUND = "a lower bound on the maximum (the largest loss an ascent found)"


def _best_of(r: EpsilonSharpness | WorstCase) -> tuple[str, str]:
    """A best-of-starts maximum, marked ≥ (the true maximum can only be higher), and the value each start reached."""
    starts = ", ".join(f"{kind} {v:.4g}" for kind, v in zip(r.start_kinds, r.values))
    return f"≥ {r.value:.4g} (best of {len(r.values)} starts, spread {r.spread:.2g})", starts


@result_rows.register
def _(r: EpsilonSharpness, metric: str, products: str) -> list[tuple]:
    space = "full space" if r.subspace_dim is None else f"{r.subspace_dim}-dim subspace"
    value, starts = _best_of(r)
    cost = f"{r.n_forward} forwards, {r.n_grad} gradients, {r.seconds:.1f}s"
    note = f"{LOWER_BOUND}; {r.method}, {r.max_iter} iterations, {space}; starts: {starts}"
    return [(f"ε-sharpness, ε={r.eps:g}", value, cost, note)]


@result_rows.register
def _(r: WorstCase, metric: str, products: str) -> list[tuple]:  # Foret et al. 2021; Kwon et al. 2021
    value, starts = _best_of(r)
    cost = f"{r.n_forward} forwards, {r.n_grad} gradients, {r.seconds:.1f}s"
    return [
        (f"{_ball(metric, r.p)}, ρ={r.rho:g}", value, cost, f"{LOWER_BOUND}; APGD {r.steps} steps{_scaled(r)}; starts: {starts}")
    ]


@result_rows.register
def _(r: MSharpness, metric: str, products: str) -> list[tuple]:  # Andriushchenko et al. 2023
    spread = "" if r.stderr is None else f" ± {r.stderr:.2g}"
    unused = f", {r.n_unused} samples left out" if r.n_unused else ""
    mean_spread = sum(r.batch_spreads) / len(r.batch_spreads)
    return [
        (
            f"{_ball(metric, r.p)}, ρ={r.rho:g}, m={r.m}",
            f"≥ {r.value:.4g}{spread} (mean ± stderr over {r.n_batches} batches)",
            f"{r.n_forward} forwards, {r.n_grad} gradients on {r.m}-sample batches, {r.seconds:.1f}s",
            f"a lower bound: each batch's maximum is its best start's; {r.n_batches} batches of {r.m}{unused}; "
            f"APGD {r.steps} steps, {1 + r.restarts} starts{_scaled(r)}; "
            f"mean start spread {mean_spread:.2g}",
        )
    ]


def _ball(name: str, p: str) -> str:
    """The row label: ("adaptive-worst-case", "inf") → adaptive worst-case ℓ∞."""
    adaptive = name.startswith("adaptive-")
    return f"{'adaptive ' if adaptive else ''}{name.removeprefix('adaptive-')} ℓ{'∞' if p == 'inf' else '2'}"


def _scaled(r: WorstCase | MSharpness) -> str:
    return "" if not r.adaptive else f", T = |w| + {r.eta:g}" if r.eta else ", T = |w|"


def as_per_layer(result: PerLayerResult | dict) -> PerLayerResult:
    return result if isinstance(result, PerLayerResult) else PerLayerResult.from_dict(result)


def format_per_layer(result: PerLayerResult, curvature: str = "Hessian") -> str:
    """One row per block: its parameter count, λ1 ± Lanczos residual and trace ± stderr (— where not measured)."""
    rows = []
    for b in result.blocks:
        if b.lambda1 is None:
            eig = "—"
        elif b.certified is False or not b.converged:  # None: stored before certification existed
            eig = uncertified_eigenvalue(b.lambda1, "LA") + (" (not certified)" if b.converged else " (not converged)")
        else:
            eig = _pm(b.lambda1, b.residual)
        trace = "—" if b.trace is None else _pm(b.trace, b.trace_stderr)
        rows.append((b.name, b.n_params, eig, trace))
    blocks = PER_LAYER_BLOCKS.get(result.grouping, "diagonal block of each given block of parameters")
    title = f"\nper-layer {curvature} ({blocks}; {result.n_matvecs} products, {result.seconds:.1f}s)"
    table = format_table(["block", "n params", "λ1 ± residual", "trace ± stderr"], rows)
    if "density" in result.metrics:
        table += "\nspectral density of each block (SLQ): in the JSON (--json, --out) and --per-layer-figure"
    return title + "\n" + table


PER_LAYER_BLOCKS = {  # what a PerLayerResult's grouping means, for the table's title
    "module": "diagonal block of each module's own parameters",
    "role": "diagonal block of each role's parameters, all layers together",
}
