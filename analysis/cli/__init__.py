"""The `landscape` command line: one-line errors, --json on every command, --debug for tracebacks."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import NoReturn

import landscape
from analysis.cli.output import add_output_arguments
from analysis.measures.notes import OptionNote

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, OSError)


# name: (one-line help, its module under analysis/: cli/ for the commands, experiments/ for demo and figures).
# The top-level --help reads only this table: a command's module (and torch) is imported when it is configured.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("train SGD and SmoothOut at small and large batch, compare them, write a report", "experiments.demo"),
    "measure": ("loss, gradient and curvature of checkpoints", "cli.measure"),
    "surface": ("1-D/2-D loss surface around a checkpoint, to a resumable HDF5 file", "cli.surface"),
    "connect": (
        "train a Bézier curve or chain between two checkpoints (mode connectivity) against the straight line, resumable",
        "cli.connect",
    ),
    "plot": ("draw surface files: line, contour, heatmap, 3-D, PCA trajectory → PNG/PDF", "cli.plot"),
    "compare": ("the same measurements on several checkpoints, side by side with CIs, as a report", "cli.compare"),
    "train": ("train a model with a chosen optimizer, writing checkpoints", "cli.train"),
    "track": ("measure every trajectory checkpoint of a training run: curvature over training, resumable", "cli.track"),
    "correlate": (
        "rank sharpness measures against the generalization gap over a sweep of runs (Kendall's τ, granulated τ, bootstrap CIs)",
        "cli.correlate",
    ),
    "figures": ("regenerate every figure in figures/ from scratch", "experiments.figures"),
}


def build_parser(configured: Iterable[str] = COMMANDS) -> argparse.ArgumentParser:
    """The `landscape` parser: every command listed, with the arguments of the `configured` ones (by default all).

    A command left unconfigured has no arguments and no run function, and its module is not imported.
    """
    parser = argparse.ArgumentParser(prog="landscape", description="How sharp is the minimum a trained network sits in?")
    parser.add_argument("--version", action="version", version=f"landscape {landscape.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    subparsers = {name: commands.add_parser(name, help=text) for name, (text, _) in COMMANDS.items()}
    for name in configured:
        _configure(name, subparsers[name])
    return parser


def _configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Import command `name`'s module; add its arguments and its run function to its subparser."""
    module = importlib.import_module(f"analysis.{COMMANDS[name][1]}")
    module.add_arguments(parser)
    add_output_arguments(parser)
    parser.set_defaults(run=module.run)


def invoked_command(argv: Sequence[str]) -> list[str]:
    """The command `argv` runs, as a list of zero or one name for `build_parser`.

    Only the first token can name it: the top-level options (--help, --version) take no value and exit,
    so anything else before a command is an error either way.
    """
    return list(argv[:1]) if argv and argv[0] in COMMANDS else []


# Options whose value may start with "-" (argparse would read "--range -1:1:51" as two options).
SIGNED_VALUE_OPTIONS = ("--range", "--yrange")


def _join_signed_values(argv: list[str]) -> list[str]:
    """["--range", "-1:1:51"] → ["--range=-1:1:51"], so grids may start at negative coordinates."""
    out: list[str] = []
    for token in argv:
        if out and out[-1] in SIGNED_VALUE_OPTIONS and token.startswith("-"):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _join_signed_values(sys.argv[1:] if argv is None else argv)
    args = build_parser(invoked_command(argv)).parse_args(argv)
    from analysis.cli.option_checks import (
        validate_arguments,  # torch: after --help and usage errors have exited
    )
    from landscape.engine import progress

    joined = False
    shown = warnings.showwarning
    warnings.showwarning = _one_line_notes(args.command, shown)
    try:
        validate_arguments(args)
        joined = _join_process_group(args)
        args.progress = progress.style(args.quiet)
        args.run(args)
        code = 0
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"landscape {args.command}: error: {_error_line(error)}", file=sys.stderr)
        code = 2
    except (RuntimeError, MemoryError) as error:  # out of memory, or a collective failed (another rank died or hung)
        if args.debug:
            raise
        code = _report_out_of_memory(args, error) if _out_of_memory(error) else _report_distributed_failure(args, error)
    except KeyboardInterrupt as interrupt:  # a command may say what it kept, e.g. "2 of 4 metrics saved to F"
        print(f"landscape {args.command}: interrupted" + (f"; {interrupt}" if str(interrupt) else ""), file=sys.stderr)
        code = 130
    warnings.showwarning = shown
    if joined:
        _leave_process_group(args, code)
    return code


def _error_line(error: BaseException) -> str:
    """A user error's first line: an OSError's in words ("out: not a directory", not "[Errno 20] ..."), the library's
    parameters as this command line's flags (`n_samples=50` → `--n-samples 50`, analysis/cli/flag_names.py), and the
    failure of the user's own code (a UserCodeError, or what it caused) with where its traceback is."""
    from analysis.cli.flag_names import as_flags
    from landscape.inputs.user_code import UserCodeError

    if isinstance(error, OSError) and error.strerror:
        words = error.strerror[:1].lower() + error.strerror[1:]
        message = f"{error.filename}: {words}" if error.filename else words
    else:
        message = as_flags((str(error).splitlines() or [type(error).__name__])[0])
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, UserCodeError):
        cause = cause.__cause__
    return message + (" (--debug shows its traceback)" if cause is not None else "")


def _out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, or a CPU allocation the system refused."""
    text = str(error)
    return isinstance(error, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text


def _report_out_of_memory(args: argparse.Namespace, error: BaseException) -> int:
    """One line instead of the allocator's traceback, with the options that need less memory."""
    first = (str(error).splitlines() or [type(error).__name__])[0]
    print(
        f"landscape {args.command}: error: out of memory ({first[:160]}); use a smaller --batch-size, "
        f"--hvp double-backward or fewer --n-samples",
        file=sys.stderr,
    )
    return 2


def _one_line_notes(command: str, show: Callable) -> Callable:
    """A warnings.showwarning that prints the library's notes and warnings as one line each, others as before."""
    from landscape.engine.hvp_check import HVPCheckWarning
    from landscape.inputs.checkpoints import CheckpointNote

    kinds = {CheckpointNote: "note", OptionNote: "note", HVPCheckWarning: "warning"}

    def show_note(message, category, filename, lineno, file=None, line=None):
        kind = next((word for cls, word in kinds.items() if issubclass(category, cls)), None)
        if kind is not None:
            print(f"landscape {command}: {kind}: {str(message).splitlines()[0]}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return show_note


def _leave_process_group(args: argparse.Namespace, code: int) -> NoReturn:
    """End a torchrun process without tearing its process group down.

    gloo's teardown can abort the process ("terminate called without an active exception", SIGABRT)
    while it joins its worker threads: seen in CI after a collective timed out, and after a clean
    run while the other rank was still busy. So a rank that succeeded first waits for the others at
    a barrier (a rank that died after the last collective then shows up as exit 1 here), and every
    rank exits at once. Its files are already closed and flushed, as after any run.
    """
    from landscape.engine import distributed

    if code == 0:
        try:
            distributed.barrier()
        except RuntimeError as error:
            code = _report_distributed_failure(args, error)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report_distributed_failure(args: argparse.Namespace, error: RuntimeError) -> int:
    """One line for a collective that failed (exit code 1); any other RuntimeError is re-raised."""
    from landscape.engine import distributed

    if not distributed.is_failure(error):
        raise error
    print(f"landscape {args.command}: error: distributed: {distributed.failure_message(error)}", file=sys.stderr)
    return 1


def _join_process_group(args: argparse.Namespace) -> bool:
    """Under torchrun, join the process group (True); then only rank 0 prints: the others get no stdout or progress bars."""
    from landscape.engine import distributed
    from landscape.engine.objective import default_device

    joined = distributed.init_from_env(getattr(args, "device", None) or default_device())
    if joined and not distributed.is_main():
        sys.stdout = open(os.devnull, "w")
        args.quiet = True
    return joined
