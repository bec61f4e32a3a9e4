"""landscape: how sharp is the minimum a trained network sits in?

The measurement engine, in the order every number takes (docs/architecture.md), one folder per stage:
inputs/ (data and checkpoints) → engine/ (the Objective and its curvature operators) → the estimators in
curvature/ (spectrum, trace, per-layer), sharpness/ (perturbation and sharpness) and surfaces/ → typed results
(results.py, statistics.py); training/ apart. The names below are the public API:
`from landscape import Objective, HessianOperator, lanczos`. They load on first use (PEP 562), so
`import landscape` alone stays free of torch and the command line's `--help` stays fast. No module shares
its name with a public function, so every estimator is exported here.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name → the module that defines it
_EXPORTS = {
    # data and checkpoints
    "load_data": "landscape.inputs.data",
    "MeasurementSet": "landscape.inputs.data",
    "Dataset": "landscape.inputs.data",
    "load_checkpoint": "landscape.inputs.checkpoints",
    "save_checkpoint": "landscape.inputs.checkpoints",
    "fold_batch_norm": "landscape.inputs.fold_bn",
    "normalize_logits": "landscape.inputs.batches",
    "objective_from_checkpoint": "landscape.engine.from_checkpoint",
    # the objective and its curvature operators
    "Objective": "landscape.engine.objective",
    "ShardedObjective": "landscape.engine.sharded",
    "HessianOperator": "landscape.engine.operators",
    "GGNOperator": "landscape.engine.operators",
    "FisherOperator": "landscape.engine.operators",
    "curvature_operator": "landscape.engine.operators",
    # estimators
    "lanczos": "landscape.curvature.spectrum",
    "slq_density": "landscape.curvature.density",
    "hutchinson": "landscape.curvature.trace",
    "hutchpp": "landscape.curvature.trace",
    "xtrace": "landscape.curvature.trace",
    "per_layer": "landscape.curvature.blocks",
    "fisher_rao_norm": "landscape.curvature.fisher_rao",
    "batch_sharpness": "landscape.curvature.per_batch",
    "preconditioned_sharpness": "landscape.curvature.preconditioned",
    "preconditioner_of": "landscape.curvature.preconditioned",
    "preconditioner_from_state": "landscape.curvature.preconditioned",
    "gradient_descent": "landscape.curvature.stability",
    "GDConfig": "landscape.curvature.stability",
    "hessian_diagonal": "landscape.curvature.diagonal",
    "xdiag": "landscape.curvature.diagonal",
    "hutchinson_diagonal": "landscape.curvature.diagonal",
    "relative_flatness": "landscape.curvature.relative",
    "expected_loss": "landscape.sharpness.perturb",
    "sharpness_curve": "landscape.sharpness.perturb",
    "epsilon_sharpness": "landscape.sharpness.box",
    "worst_case": "landscape.sharpness.balls",
    "average_case": "landscape.sharpness.balls",
    "m_sharpness": "landscape.sharpness.balls",
    "preprocessed": "landscape.sharpness.balls",
    "critical_sharpness": "landscape.sharpness.critical",
    "pac_bayes_flatness": "landscape.sharpness.pac_bayes",
    # surfaces
    "random_directions": "landscape.surfaces.directions",
    "between": "landscape.surfaces.directions",
    "eigenvector_directions": "landscape.surfaces.directions",
    "gradient_direction": "landscape.surfaces.directions",
    "checkpoint_plane": "landscape.surfaces.directions",
    "pca_directions": "landscape.surfaces.directions",
    "compute_surface": "landscape.surfaces.surface",
    "grid_axis": "landscape.surfaces.surface",
    "read_surface": "landscape.surfaces.surface",
    "compute_spread": "landscape.surfaces.spread",
    "read_spread": "landscape.surfaces.spread",
    "sharpness_radius": "landscape.surfaces.spread",
    "register_quantity": "landscape.surfaces.quantities",
    # training
    "make_optimizer": "landscape.training.optim",
    "train": "landscape.training.loop",
    "TrainConfig": "landscape.training.loop",
    "CurvatureTracker": "landscape.training.train_tracking",
    "CurvatureCallback": "landscape.training.hf_callback",  # imports transformers on first use
    "LightningCurvatureCallback": "landscape.training.lightning_callback",  # imports lightning on first use
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'landscape' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
