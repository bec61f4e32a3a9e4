"""The user's own code named on the command line as `module:callable` (models, data, losses): imported, asked
which keyword arguments it takes, and called so that its failure is one line naming it."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class UserCodeError(ValueError):
    """The user's own code (a model factory, a data callable, the module holding it) raised: the message names the
    function and the exception's type and first line; the exception itself is chained (its traceback: `--debug`)."""


def import_callable(target: str, error: type[Exception] = ValueError, *, folders: Sequence[str] = ()) -> Callable:
    """The object named by 'package.module:attr' (attr may be dotted); `error` is raised on failure.

    A module not found on sys.path is looked for in `folders` (where it was found when a checkpoint was written,
    `import_folder`) and then in the current folder, as `python -m` would find it.
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise error(f"{target!r} is not of the form module:callable")
    obj: Any = _import(module_name, target, error, folders)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"module {module_name!r} has no attribute {attr!r} (from {target!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{target!r} is not callable")
    return obj


def _import(module_name: str, target: str, error: type[Exception], folders: Sequence[str]) -> Any:
    """The module, trying `folders` and the current folder when sys.path lacks it; the user's module raising while it
    is imported (a syntax error, a missing dependency) is a UserCodeError."""
    extra = [str(f) for f in (*folders, os.getcwd()) if f and str(f) not in sys.path]
    while True:
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            top = module_name.split(".")[0]
            if e.name not in (top, module_name) and not module_name.startswith(f"{e.name}."):
                raise UserCodeError(f"importing {module_name} (for {target}) raised ModuleNotFoundError: {e}") from e
            if extra:
                sys.path.append(extra.pop(0))
                continue
            fix = (
                f"it was in {folders[0]} when the checkpoint was written: put the folder that holds it now on PYTHONPATH"
                if folders
                else "install it or add its folder to PYTHONPATH"
            )
            raise error(f"cannot import module {module_name!r} for {target!r} ({e}); {fix}") from e
        except Exception as e:  # the user's module itself fails: one line naming it
            raise UserCodeError(f"importing {module_name} (for {target}) raised {_first_line(e)}") from e


def import_folder(target: str) -> str | None:
    """The folder that makes `target`'s module importable (the sys.path entry it was found under), absolute; None
    for a module without a file. A checkpoint records it so that the module is found again from any folder."""
    module_name = target.partition(":")[0]
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    depth = module_name.count(".") + (2 if path.name == "__init__.py" else 1)
    return str(path.parents[depth - 1])


def call_user(target: str, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) for the user's callable named `target`: whatever it raises becomes one UserCodeError
    naming `target` and the exception (chained, so `--debug` shows the user's traceback)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise UserCodeError(f"{target} raised {_first_line(e)}") from e


def _first_line(error: BaseException) -> str:
    """'KeyError: 'width'': the exception's type and the first line of its message."""
    message = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` takes a keyword argument `name` (explicitly or through **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
