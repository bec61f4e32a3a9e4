"""KEY=VALUE options on the command line."""

from __future__ import annotations

import ast


def parse_options(pairs: list[str] | None) -> dict:
    """KEY=VALUE pairs to a dict; values are Python literals where they parse (0.02, True, (16, 32)), else strings."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"option {pair!r} is not KEY=VALUE")
        try:
            options[key.replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key.replace("-", "_")] = value
    return options
