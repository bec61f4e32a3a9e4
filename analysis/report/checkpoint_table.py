"""The table `landscape measure` prints for each checkpoint: its measurement set, then one row per quantity.

A measure's rows come from its record (analysis/measures/: `Measure.rows`); a resumed measurement is typed
again when its results file is read, so a fresh and a resumed run print the same table.
"""

from __future__ import annotations

from analysis.measures.measurement import Measurement
from analysis.measures.registry import MEASURES, is_scale_invariant
from analysis.measures.text import SCALE_INVARIANT, pm, uncertified_eigenvalue
from analysis.report.setup_text import batching, norm_mode, precision, sample_origin
from analysis.report.tables import format_table
from landscape.curvature.blocks import PerLayerResult
from landscape.engine.hvp_check import HVPCheck
from landscape.engine.memory import format_size

# how the table names each curvature and its matrix-vector products
CURVATURE_NAMES = {
    "hessian": ("Hessian", "HVPs"),
    "ggn": ("generalized Gauss-Newton", "GGN products"),
    "fisher": ("empirical Fisher", "Fisher products"),
}
HEADERS = ["quantity", "value ± uncertainty", "cost", "note"]


def format_measurement(report: Measurement) -> str:
    """A human-readable block per checkpoint: measurement set, then value ± uncertainty and cost."""
    setup = report.setup
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
        report.checkpoint,
        f"  measured on the {m['split']} split of {setup['data']['spec']}: {setup['n_samples']} samples in "
        f"{batching(setup)}, {norm_mode(setup)}, "
        f"{precision(setup)} on {setup['device']}, params={setup['params']} ({report.n_params}), "
        f"HVP {setup['hvp_method']}, curvature: {curvature}{sharded}",
    ]
    if sample_origin(setup):
        lines.append(f"  the {m['split']} split: {sample_origin(setup)}")
    if report.hvp_memory:
        lines.append(f"  HVP memory: {report.hvp_memory.describe()}")
    if report.memory and report.memory.measured_over_predicted:
        m = report.memory
        lines.append(
            f"  process memory: peak {format_size(m.measured_peak_bytes)}, predicted {format_size(m.predicted_peak_bytes)} "
            f"(held {format_size(m.resident_at_plan_bytes)} + HVPs + {m.solver_vectors} solver vectors)"
        )
    if report.hvp_check:
        lines.append(_hvp_check_line(report.hvp_check))
    if report.hvp_error:
        lines.append(f"  HVP error: {report.hvp_error.describe()}")
    rows: list[tuple] = [
        ("loss", f"{report.loss:.6g}", "", ""),
        ("accuracy", "" if report.accuracy is None else f"{report.accuracy:.4f}", "", ""),
        ("gradient norm", f"{report.grad_norm:.4g}", "", ""),
    ]
    # in the registry's order whatever the order of --metrics
    results = {name: report.metrics[name] for name in MEASURES if name in report.metrics}
    for name, result in results.items():
        found = MEASURES[name].rows(result, name, products)
        if found and is_scale_invariant(name, result):  # said once, on the measure's first row
            quantity, value, cost, note = found[0]
            found = [(quantity, value, cost, f"{SCALE_INVARIANT}; {note}" if note else SCALE_INVARIANT), *found[1:]]
        rows += found
    lines.append(format_table(HEADERS, rows))
    trace = results.get("trace")
    if trace is not None and trace.blocks:
        block_rows = [(name, pm(*estimate)) for name, estimate in trace.blocks.items()]
        lines.append("\ntrace by parameter tensor (same probes)\n" + format_table(["parameter", "trace ± stderr"], block_rows))
    if report.per_layer is not None:
        lines.append(format_per_layer(report.per_layer, curvature))
    return "\n".join(lines)


def _hvp_check_line(check: HVPCheck) -> str:
    if check.skipped:
        return f"  HVP self-check: skipped, {check.skipped}; {check.seconds:.2f}s"
    if check.passed and check.estimated_error is not None:
        verdict = (
            f"agrees with double backward to {check.difference:.1g}, within twice its estimated error {check.estimated_error:.1g}"
        )
    elif check.passed:
        verdict = f"agrees with double backward to {check.difference:.1g} (a repeat to {check.repeat_difference:.1g})"
    else:
        verdict = f"{check.path} differed from double backward by {check.difference:.2g}, so double backward was used"
    return f"  HVP self-check: {verdict}; {check.seconds:.2f}s"


def format_per_layer(result: PerLayerResult, curvature: str = "Hessian") -> str:
    """One row per block: its parameter count, λ1 ± Lanczos residual and trace ± stderr (— where not measured)."""
    rows = []
    for b in result.blocks:
        if b.lambda1 is None:
            eig = "—"
        elif b.certified is False or not b.converged:  # None: stored before certification existed
            eig = uncertified_eigenvalue(b.lambda1, "LA") + (" (not certified)" if b.converged else " (not converged)")
        else:
            eig = pm(b.lambda1, b.residual)
        trace = "—" if b.trace is None else pm(b.trace, b.trace_stderr)
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
