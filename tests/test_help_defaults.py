"""`landscape COMMAND --help` says the defaults the command uses, and analysis/ imports as a tree under cli.

Issue 18 found `compare --help` showing measure's defaults (k 5, radius 0.001,0.005,0.01, noise samples 100,
metrics eig,trace) while compare used others, and listing a metric compare refuses.
"""

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from analysis.cli import COMMANDS, build_parser
from landscape.training.loop import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = re.compile(r"\(default:? ([^)]*)\)")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _used(command: str, action: argparse.Action) -> object:
    """The value the command uses when the option is left out: the parser's default, or (train) TrainConfig's."""
    if action.default is None and command == "train":
        fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
        if action.dest in fields:
            return fields[action.dest].default
    return action.default


def _said(text: str) -> str:
    """The first word of the help's "(default …)": the value itself, before any explanation."""
    return text.split("; ")[0].split(", ")[0].split(" ")[0].rstrip(":;,")


def _same(said: str, used: object) -> bool:
    try:
        return float(said) == float(used)
    except (TypeError, ValueError):
        return said == str(used)


CASES = [
    (name, action)
    for name, parser in _subparsers().items()
    for action in parser._actions
    if action.help and action.help != argparse.SUPPRESS
]


@pytest.mark.parametrize("name, action", CASES, ids=[f"{n}{(a.option_strings or [a.dest])[0]}" for n, a in CASES])
def test_every_stated_default_is_the_one_used(name, action):
    parser = _subparsers()[name]
    text = parser._get_formatter()._expand_help(action)
    found = DEFAULT.search(text)
    if found is None:
        return
    said, used = _said(found.group(1)), _used(name, action)
    if used is None:  # a default computed at run time: described in words, or a value that depends on another option
        conditional = re.search(r"(with|--quick|--paper)", found.group(1))
        assert conditional or not re.fullmatch(r"[-+]?[0-9.e-]+", said), f"{name} {action.option_strings}: says {said}"
        return
    named = f"{used} (default" in text  # "xtrace (default: the lowest error …)" names the default before the bracket
    assert _same(said, used) or named, f"{name} {action.option_strings}: help says {found.group(1)!r}, the command uses {used!r}"


def test_compare_help_lists_only_the_metrics_compare_takes():
    from analysis.cli.compare import compare_metrics
    from analysis.measures.registry import MEASURES as METRICS

    COMPARE_METRICS = compare_metrics()

    metrics = next(a for a in _subparsers()["compare"]._actions if a.dest == "metrics")
    listed = re.search(r"comma list of (.*) \(default", metrics.help).group(1).split(", ")
    assert listed == list(COMPARE_METRICS)
    assert set(METRICS) - set(COMPARE_METRICS)  # measure has metrics compare refuses, so the check can fail
    assert metrics.default == "eig,trace,sharpness-curve,surface"


def test_compare_defaults_are_its_own():
    args = build_parser().parse_args(["compare", "a.pt", "b.pt"])
    assert (args.k, args.radius, args.noise_samples, args.probes) == (3, "0.005,0.01,0.02", 40, 60)
    measure = build_parser().parse_args(["measure", "a.pt"])
    assert (measure.k, measure.radius, measure.noise_samples, measure.probes) == (5, "0.001,0.005,0.01", 100, 100)


def test_expected_loss_says_which_radius_it_takes(tmp_path, capsys):
    from analysis.cli import main
    from tests.helpers import digits_mlp_checkpoint

    checkpoint = digits_mlp_checkpoint(tmp_path, (8,))
    code = main(
        [
            "measure",
            str(checkpoint),
            "--metrics",
            "expected-loss",
            "--radius",
            "0.01,0.002",
            "--noise-samples",
            "4",
            "--n-samples",
            "64",
            "--quiet",
            "--json",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert "landscape measure: note: expected-loss is measured at the largest --radius, 0.01" in err


# ------------------------------------------------------------------ the import graph of analysis/
def _imports(path: Path) -> set[str]:
    """Every analysis.* module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("analysis"):
            found |= {node.module} if node.module != "analysis" else {f"analysis.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("analysis.")}
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# the folders of analysis/ by job, and the folders each may import: experiments → cli → report → measures → landscape
JOBS = {"measures": set(), "report": {"measures"}, "cli": {"report", "measures"}, "experiments": {"cli", "report", "measures"}}


def test_analysis_is_grouped_by_job_and_imports_go_downward_without_cycles():
    paths = [p for p in (ROOT / "analysis").rglob("*.py")]
    graph = {_module_name(p): _imports(p) - {_module_name(p)} for p in paths}
    assert {p.relative_to(ROOT / "analysis").parts[0] for p in paths} == {*JOBS, "__init__.py"}
    importers = [m for m, deps in graph.items() if "analysis.cli" in deps and m != "analysis.cli.__main__"]
    assert not importers, f"only python -m analysis.cli imports the command line's parser: {importers}"
    for module, deps in graph.items():
        job = module.split(".")[1] if module.count(".") else ""
        for dep in deps:
            target = dep.split(".")[1]
            assert target == job or target in JOBS.get(job, ()), f"{module} imports {dep}: {job}/ may not import {target}/"
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", f"import cycle: {' → '.join([*path, module, dep])}"
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert set(COMMANDS) and all(f"analysis.{m}" in graph for _, m in COMMANDS.values())
    commands = {m.split(".")[-1] for _, m in COMMANDS.values()}
    assert commands == set(COMMANDS), "each command's module is named as the command"


def test_renamed_options_keep_their_old_spelling():
    for spelling in ("--bias-bn", "--one-d"):
        assert build_parser().parse_args(["surface", "c.pt", spelling, "copy"]).one_d == "copy"
    for spelling in ("--recipe", "--preset"):
        assert build_parser().parse_args(["train", "--out", "o", spelling, "smoothout-reference"]).preset == "smoothout-reference"
