"""Argument checks shared by the estimators: one message per kind of bad value, naming the argument."""

from __future__ import annotations

import math

import numpy as np


def check_int(name: str, value: int, minimum: int) -> None:
    """Raise a ValueError naming `name` unless `value` is an integer ≥ `minimum`."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def check_number(name: str, value: float, *, allow_zero: bool) -> float:
    """A finite real number, > 0 (or ≥ 0 with allow_zero), as a float."""
    real = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'≥' if allow_zero else '>'} 0, got {value!r}")
    return float(value)
