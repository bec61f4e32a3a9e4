"""The `landscape` command line: one-line errors, --json on every command, --debug for tracebacks."""

from __future__ import annotations

import argparse
import json
import sys

from landscape.results import to_jsonable

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, OSError)


def build_parser() -> argparse.ArgumentParser:
    from analysis import figures, measure, training

    parser = argparse.ArgumentParser(prog="landscape", description="How sharp is the minimum a trained network sits in?")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("measure", help="loss, gradient and curvature of checkpoints")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    measure.add_objective_arguments(p)
    measure.add_metric_arguments(p)
    _add_output_arguments(p)
    p.set_defaults(run=_run_measure)

    p = commands.add_parser("train", help="train a model with a chosen optimizer, writing checkpoints")
    training.add_arguments(p)
    _add_output_arguments(p)
    p.set_defaults(run=training.run)

    p = commands.add_parser("figures", help="regenerate every figure in figures/ from scratch")
    figures.add_arguments(p)
    _add_output_arguments(p)
    p.set_defaults(run=figures.run)
    return parser


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _run_measure(args: argparse.Namespace) -> None:
    from analysis.measure import format_measurement, measure_checkpoint

    args.progress = not args.quiet and sys.stderr.isatty()
    results = [measure_checkpoint(path, args) for path in args.checkpoints]
    if args.json:
        print_json(results)
    else:
        print("\n\n".join(format_measurement(r) for r in results))


def print_json(value: object) -> None:
    json.dump(to_jsonable(value), sys.stdout, indent=2)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = str(error) or type(error).__name__
        print(f"landscape {args.command}: error: {message.splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"landscape {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
