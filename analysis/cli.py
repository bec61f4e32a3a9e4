"""The `landscape` command line: one-line errors, --json on every command, --debug for tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Callable, NoReturn

import landscape
from analysis.validation import validate_arguments
from landscape import distributed, progress
from landscape.results import to_jsonable

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, OSError)


def build_parser() -> argparse.ArgumentParser:
    from analysis import compare, correlate, demo, figures, measure, plot_cli, surfaces, track, training

    def checkpoints(p: argparse.ArgumentParser) -> None:
        p.add_argument("checkpoints", nargs="+", metavar="CKPT")

    def checkpoint(p: argparse.ArgumentParser) -> None:
        p.add_argument("checkpoint", metavar="CKPT")

    objective, metrics = measure.add_objective_arguments, measure.add_metric_arguments
    table = [  # name, help, argument adders, run
        ("demo", "train SGD and SmoothOut at small and large batch, compare them, write a report", [demo.add_arguments], demo.run),
        ("measure", "loss, gradient and curvature of checkpoints", [checkpoints, objective, metrics, measure.add_arguments],
         _run_measure),
        ("surface", "1-D/2-D loss surface around a checkpoint, to a resumable HDF5 file",
         [checkpoint, objective, surfaces.add_arguments], surfaces.run),
        ("plot", "draw surface files: line, contour, heatmap, 3-D, PCA trajectory → PNG/PDF", [plot_cli.add_arguments], plot_cli.run),
        ("compare", "the same measurements on several checkpoints, side by side with CIs, as a report",
         [checkpoints, objective, metrics, compare.add_arguments], compare.run),
        ("train", "train a model with a chosen optimizer, writing checkpoints", [training.add_arguments], training.run),
        ("track", "measure every trajectory checkpoint of a training run: curvature over training, resumable",
         [objective, metrics, track.add_arguments], track.run),
        ("correlate", "rank sharpness measures against the generalization gap over a sweep of runs (Kendall's τ, "
         "granulated τ, bootstrap CIs)", [objective, metrics, correlate.add_arguments], correlate.run),
        ("figures", "regenerate every figure in figures/ from scratch", [figures.add_arguments], figures.run),
    ]
    parser = argparse.ArgumentParser(prog="landscape", description="How sharp is the minimum a trained network sits in?")
    parser.add_argument("--version", action="version", version=f"landscape {landscape.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text, adders, run in table:
        p = commands.add_parser(name, help=text)
        for add in adders:
            add(p)
        _add_output_arguments(p)
        p.set_defaults(run=run)
    return parser


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress (otherwise bars on a terminal, else a line per phase every "
                             "$LANDSCAPE_PROGRESS_INTERVAL seconds, default 10)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _run_measure(args: argparse.Namespace) -> None:
    from analysis.measure import format_measurement, measure_all

    if getattr(args, "per_layer_figure", None) and not args.per_layer:
        raise ValueError("--per-layer-figure draws --per-layer results: pass --per-layer eig,trace too")
    results = measure_all(args)
    if args.per_layer_figure and distributed.is_main():
        from analysis.plots import plot_per_layer, save

        labels = [f"{i}: {r['checkpoint']}" if len(results) > 1 else r["checkpoint"] for i, r in enumerate(results, 1)]
        save(plot_per_layer({label: r["per_layer"] for label, r in zip(labels, results)}), args.per_layer_figure)
    if args.json:
        print_json(results)
    else:
        print("\n\n".join(format_measurement(r) for r in results))


def print_json(value: object) -> None:
    json.dump(to_jsonable(value), sys.stdout, indent=2)
    sys.stdout.write("\n")


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
    args = build_parser().parse_args(_join_signed_values(sys.argv[1:] if argv is None else argv))
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
        message = str(error) or type(error).__name__
        print(f"landscape {args.command}: error: {message.splitlines()[0]}", file=sys.stderr)
        code = 2
    except RuntimeError as error:  # a collective failed: another rank died or hung past the timeout
        if args.debug:
            raise
        code = _report_distributed_failure(args, error)
    except KeyboardInterrupt as interrupt:  # a command may say what it kept, e.g. "2 of 4 metrics saved to F"
        print(f"landscape {args.command}: interrupted" + (f"; {interrupt}" if str(interrupt) else ""), file=sys.stderr)
        code = 130
    warnings.showwarning = shown
    if joined:
        _leave_process_group(args, code)
    return code


def _one_line_notes(command: str, show: Callable) -> Callable:
    """A warnings.showwarning that prints the library's notes and warnings as one line each, others as before."""
    from landscape.checkpoints import CheckpointNote
    from landscape.objective import HVPCheckWarning, HVPFallbackNote

    kinds = {CheckpointNote: "note", HVPFallbackNote: "note", HVPCheckWarning: "warning"}

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
    if not distributed.is_failure(error):
        raise error
    print(f"landscape {args.command}: error: distributed: {distributed.failure_message(error)}", file=sys.stderr)
    return 1


def _join_process_group(args: argparse.Namespace) -> bool:
    """Under torchrun, join the process group (True); then only rank 0 prints: the others get no stdout or progress bars."""
    from landscape.objective import default_device

    joined = distributed.init_from_env(getattr(args, "device", None) or default_device())
    if joined and not distributed.is_main():
        sys.stdout = open(os.devnull, "w")
        args.quiet = True
    return joined


if __name__ == "__main__":
    sys.exit(main())
