"""The user's own code named on the command line as `module:callable` (models, data, losses): imported, and asked
which keyword arguments it takes."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any


def import_callable(target: str, error: type[Exception] = ValueError) -> Callable:
    """The object named by 'package.module:attr' (attr may be dotted); `error` is raised on failure."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise error(f"{target!r} is not of the form module:callable")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise error(
            f"cannot import module {module_name!r} for {target!r} ({e}); install it or add its folder to PYTHONPATH"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"module {module_name!r} has no attribute {attr!r} (from {target!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{target!r} is not callable")
    return obj


def accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` takes a keyword argument `name` (explicitly or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
