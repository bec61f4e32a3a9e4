"""Command-line pieces every command shares: the output options, JSON on stdout, and one command's own parser.

Command modules import from here, never from analysis/cli/__init__.py, so the import graph of analysis/ stays a
tree under cli: cli imports the invoked command's module, and no module imports cli back.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--json, --quiet and --debug: on every command."""
    parser.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress (otherwise bars on a terminal, else a line per phase every "
        "$LANDSCAPE_PROGRESS_INTERVAL seconds, default 10)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def print_json(value: object) -> None:
    """`value` as indented JSON on stdout (tensors, arrays and dataclasses made JSON-ready first)."""
    from landscape.results import to_jsonable

    json.dump(to_jsonable(value), sys.stdout, indent=2)
    sys.stdout.write("\n")
