"""preconditioned-sharpness: λ1(P⁻¹H) with P from the checkpoint's Adam/RMSprop/Adagrad state (Cohen et al. 2022),
against the optimizer's stability threshold (38/η for Adam at β1 = 0.9)."""

from __future__ import annotations

from analysis.measures.curvature import check_eig, eig_rows
from analysis.measures.options import MetricSpec
from analysis.measures.record import Measure
from analysis.measures.solver_memory import lanczos_vectors
from analysis.measures.text import Row
from landscape.curvature.preconditioned import PreconditionedSharpness, preconditioned_sharpness, preconditioner_from_state
from landscape.engine.objective import Objective
from landscape.inputs.checkpoints import load_optimizer_state
from landscape.results import Quantity

THRESHOLDS = {"averaged": "(2+2β1)/(η(1−β1))", "heavy-ball": "(2+2β)/η", "none": "2/η"}


def preconditioned(objective: Objective, spec: MetricSpec) -> PreconditionedSharpness:
    """P from --optimizer-state, or else from the optimizer state the measured checkpoint keeps."""
    source = spec.optimizer_state or objective.metadata.get("checkpoint")
    if source is None:
        raise ValueError("preconditioned sharpness needs an optimizer state: give optimizer_state (a file)")
    state = load_optimizer_state(source)
    names = [n for n, _ in objective.model.named_parameters()]
    shapes = dict(zip(objective.layout.names, objective.layout.shapes))
    preconditioner = preconditioner_from_state(state, names, shapes)
    n = objective.n_params
    vectors = lanczos_vectors(objective, n, objective.dtype, spec.k, spec.max_matvecs, spec.max_vectors)
    return preconditioned_sharpness(
        objective,
        preconditioner,
        k=spec.k,
        tol=spec.tol,
        max_matvecs=spec.max_matvecs,
        max_vectors=vectors,
        seed=spec.seed,
        progress=spec.progress,
        warm_start=spec.warm_start.named("preconditioned-sharpness") if spec.warm_start is not None else None,
    )


def preconditioned_rows(r: PreconditionedSharpness, name: str, products: str) -> list[Row]:
    rows = [(f"{label}(P⁻¹H)", value, cost, note) for label, value, cost, note in eig_rows(r.spectrum, name, products)]
    o = r.settings
    note = f"{o.optimizer}, η {o.lr:g}, β {o.momentum:g}, step {o.step}; λ1(P⁻¹H)/threshold = {r.ratio:.3f}"
    if o.weight_decay:
        note += f"; weight decay {o.weight_decay:g} not in P⁻¹H"
    rows.append((f"threshold {THRESHOLDS[o.momentum_style]}", f"{r.threshold:.6g}", "", note))
    return rows


def preconditioned_quantities(r: PreconditionedSharpness, name: str) -> list[Quantity]:
    residual = float(r.spectrum.residuals[0])  # some eigenvalue of P⁻¹H lies within it
    return [
        Quantity("λ1(P⁻¹H)", r.value, residual, name),
        Quantity("λ1(P⁻¹H)/threshold", r.ratio, residual / r.threshold, name),
    ]


MEASURES = (
    Measure(
        "preconditioned-sharpness",
        preconditioned,
        PreconditionedSharpness,
        preconditioned_rows,
        preconditioned_quantities,
        options=("optimizer_state", "k", "tol", "max_matvecs", "max_vectors"),
        check=check_eig,
    ),
)
