"""Frozen result dataclasses share one JSON conversion, both ways; a measured scalar is a `Quantity`.

Results stay typed until they are rendered: `to_dict()` makes them JSON for files and `--json`, and
`from_dict()` makes a stored result (a results file being resumed, a cache) the same type again, so
formatters, tables and plots read attributes, never string keys.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays, dataclasses and containers into plain JSON types (a dataclass field whose metadata says
    {"json": False}, e.g. a whole diagonal of n floats, is left out: it must have a default for from_dict)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # fields marked {"json": False} stay in memory
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value) if f.metadata.get("json", True)}
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


class Result:
    """Mixin for frozen result dataclasses: `to_dict()` gives JSON-ready data, `from_dict()` the result again."""

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """The result `to_dict()` wrote: arrays, tensors, tuples, nested results and non-finite floats restored."""
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: revive(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data})


def revive(kind: Any, value: Any) -> Any:
    """`value` as JSON holds it, converted back to the annotated type `kind`."""
    if value is None:
        return None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return revive(options[0], value) if len(options) == 1 else value
    if isinstance(kind, type) and dataclasses.is_dataclass(kind) and isinstance(value, dict):
        return kind.from_dict(value) if issubclass(kind, Result) else kind(**value)
    if kind is np.ndarray:
        return np.asarray(_finite_floats(value))
    if kind is torch.Tensor:
        return torch.tensor(_finite_floats(value))
    if kind is float:
        return float(value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(revive(args[0], v) for v in value)
        return tuple(revive(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if origin is dict and len(args) == 2:
        return {k: revive(args[1], v) for k, v in value.items()}
    return value


def _finite_floats(value: Any) -> Any:
    """ "nan", "inf" and "-inf" (how to_jsonable writes them) back to floats, in nested lists."""
    if isinstance(value, list):
        return [_finite_floats(v) for v in value]
    return float(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class Quantity(Result):
    """One measured scalar: its label, value and standard error, the measure it comes from, and the paired draws
    behind it where there are any (noise draws or batches shared across checkpoints: common random numbers)."""

    label: str  # "λ1", "ΔL a=0.02", "test accuracy": what tables and findings call it
    value: float
    stderr: float = 0.0
    metric: str | None = None  # the measure (eig, sharpness-curve, ...); None for loss, accuracy, gradient norm
    samples: tuple[float, ...] | None = None
