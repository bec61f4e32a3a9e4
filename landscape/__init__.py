"""landscape: how sharp is the minimum a trained network sits in?

The measurement engine, in the order every number takes (docs/architecture.md):
data and checkpoints → Objective → curvature operators → estimators (spectrum, trace, perturbation and
sharpness, surfaces) → typed results; the trainer apart. The names below are the public API:
`from landscape import Objective, HessianOperator, lanczos`. They load on first use (PEP 562), so
`import landscape` alone stays free of torch and the command line's `--help` stays fast. Functions
named like their module (`landscape.train.train`, `landscape.per_layer.per_layer`,
`landscape.perturb.epsilon_sharpness`, `landscape.worst_case.worst_case`) are imported from
the module: a package attribute of that name is the module once anything imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name → the module that defines it
_EXPORTS = {
    # data and checkpoints
    "load_data": "landscape.data", "MeasurementSet": "landscape.data", "Dataset": "landscape.data",
    "load_checkpoint": "landscape.checkpoints", "save_checkpoint": "landscape.checkpoints",
    "objective_from_checkpoint": "landscape.from_checkpoint",
    # the objective and its curvature operators
    "Objective": "landscape.objective",
    "HessianOperator": "landscape.operators", "GGNOperator": "landscape.operators",
    "FisherOperator": "landscape.operators", "curvature_operator": "landscape.operators",
    # estimators
    "lanczos": "landscape.spectrum", "slq_density": "landscape.spectrum",
    "hutchinson": "landscape.trace", "hutchpp": "landscape.trace", "xtrace": "landscape.trace",
    "expected_loss": "landscape.perturb", "sharpness_curve": "landscape.perturb",
    "average_case": "landscape.worst_case", "m_sharpness": "landscape.worst_case",
    # surfaces
    "random_directions": "landscape.directions", "between": "landscape.directions",
    "compute_surface": "landscape.surface", "grid_axis": "landscape.surface", "read_surface": "landscape.surface",
    # training
    "make_optimizer": "landscape.optim", "TrainConfig": "landscape.train",
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
