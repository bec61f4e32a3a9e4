"""The library's parameter names as the command line's flags: one table, applied to a user error's line where the CLI
prints it (analysis.cli._error_line).

The library's errors name the Python parameter that would fix them, in the form a caller types: `n_samples=5000`,
`hvp_method='auto'`, `trust=True`, or `data=...` (the parameter, no value). The command line translates each into its
flag: `--n-samples 5000`, `--hvp auto`, `--trust-checkpoint`, `--data`; a value the command line spells otherwise (a
loss function, by its name) is spelled its way. Names the table does not hold, and words without `=`, stay as they are.
"""

from __future__ import annotations

import dataclasses
import re
from functools import cache

# parameter → flag, where the flag is not the parameter with dashes (the training settings' are added from TrainConfig)
PARAMETER_FLAGS = {
    "data": "--data",  # objective_from_checkpoint, TrainConfig
    "model": "--model",
    "n_samples": "--n-samples",  # MeasurementSet
    "batch_size": "--batch-size",
    "max_length": "--max-length",
    "hvp_method": "--hvp",  # Objective
    "loss": "--loss",
    "trust": "--trust-checkpoint",  # load_checkpoint
    "path": "--out",  # compute_surface, compute_spread, connect
    "resume": "--resume",
    "out_dir": "--out",  # train
    "model_kwargs": "--model-opt",  # TrainConfig
    "optimizer_kwargs": "--opt",
    "layer": "--relative-flatness-layer",  # relative_flatness
}
TRACE_METHODS = ("xtrace", "hutchpp", "hutchinson")  # estimators the command line picks with --trace-method


@cache
def flags() -> dict[str, str]:
    """Every parameter the table translates: PARAMETER_FLAGS, and each TrainConfig field as its --field-name (a
    resumed run's differences name every setting)."""
    from landscape.training.loop import TrainConfig

    fields = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)}
    return {**fields, **PARAMETER_FLAGS}


@cache
def _values() -> dict[str, dict[str, str]]:
    """Values the command line spells otherwise, by parameter: a loss function by its name (landscape.inputs.batches)."""
    from landscape.inputs.batches import LOSSES

    return {"loss": {getattr(loss, "__name__", name): name for name, loss in LOSSES.items()}}


@cache
def _pattern() -> re.Pattern:
    names = "|".join(re.escape(name) for name in sorted(flags(), key=len, reverse=True))
    calls = "|".join(re.escape(name) for name in TRACE_METHODS)
    return re.compile(rf"(?<![\w.-])(?:(?P<name>{names})=(?P<value>\.\.\.|'[^']*'|[^\s,;()']*)|(?P<call>{calls})\(\))")


def as_flags(message: str) -> str:
    """`message` with each `parameter=value` the table knows written as its flag (`n_samples=5000` → `--n-samples
    5000`, `trust=True` → `--trust-checkpoint`, `data=...` → `--data`), and `hutchinson()` as `--trace-method hutchinson`."""

    def flag(match: re.Match) -> str:
        if match.group("call"):
            return f"--trace-method {match.group('call')}"
        name, value = match.group("name"), match.group("value")
        if value in ("...", "True"):
            return flags()[name]
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        return f"{flags()[name]} {_values().get(name, {}).get(value, value)}"

    return _pattern().sub(flag, message)
