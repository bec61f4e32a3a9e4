"""Frozen result dataclasses share one JSON conversion."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch


def to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays, dataclasses and containers into plain JSON types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
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
    """Mixin for frozen result dataclasses: `to_dict()` gives JSON-ready data."""

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)
