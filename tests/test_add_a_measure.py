"""A new measure is one module and one `register` line: this file is that module, and the commands take it.

The toy measure is the squared norm of the measured weights, ‖w‖², whose value is known exactly; it runs
through `measure` (the table, --json, --out and --resume), `compare` (the value table and the differences) and
`correlate` (a ranking), with no other edit anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from analysis.cli import main
from analysis.measures.options import MetricSpec
from analysis.measures.record import Measure
from analysis.measures.registry import MEASURES, register, unregister
from landscape.engine.objective import Objective
from landscape.inputs.checkpoints import load_checkpoint
from landscape.results import Quantity, Result
from tests.helpers import digits_mlp_checkpoint


# ----------------------------------------------------------------------- the measure's module, as a user writes it
@dataclass(frozen=True)
class WeightNorm(Result):
    """‖w‖² of the measured parameters."""

    value: float
    n_params: int


def weight_norm(objective: Objective, spec: MetricSpec) -> WeightNorm:
    return WeightNorm(float(objective.w.double().square().sum()), objective.n_params)


def weight_norm_rows(r: WeightNorm, name: str, products: str) -> list[tuple[str, str, str, str]]:
    return [("‖w‖²", f"{r.value:.6g}", "", f"{r.n_params} parameters")]


def weight_norm_quantities(r: WeightNorm, name: str) -> list[Quantity]:
    return [Quantity("‖w‖²", r.value, 0.0, name)]


TOY = Measure("weight-norm", weight_norm, WeightNorm, weight_norm_rows, weight_norm_quantities)


# ----------------------------------------------------------------------- the one registration line, then the commands
@pytest.fixture
def registered():
    register(TOY)
    yield TOY
    unregister(TOY.name)


def _squared_norm(path) -> float:
    state = load_checkpoint(path).state_dict
    return float(sum(t.double().square().sum() for t in state.values() if torch.is_floating_point(t)))


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="a measure named 'eig' is registered already"):
        register(MEASURES["eig"])


@pytest.mark.slow
def test_a_registered_measure_runs_through_measure_compare_and_correlate(registered, tmp_path, capsys):
    paths = [digits_mlp_checkpoint(tmp_path / f"run{seed}", (8,), seed=seed) for seed in range(3)]
    common = ["--n-samples", "100", "--device", "cpu", "--quiet"]

    out = tmp_path / "measured.json"
    assert main(["measure", str(paths[0]), "--metrics", "weight-norm,trace", "--probes", "4", "--out", str(out), *common]) == 0
    table = capsys.readouterr().out
    exact = _squared_norm(paths[0])
    assert f"‖w‖²                 {exact:.6g}" in table or f"{exact:.6g}" in table.split("‖w‖²")[1].splitlines()[0]
    assert json.loads(out.read_text())["checkpoints"][0]["metrics"]["weight-norm"]["value"] == pytest.approx(exact, rel=1e-6)
    assert (
        main(
            ["measure", str(paths[0]), "--metrics", "weight-norm,trace", "--probes", "4", "--out", str(out), "--resume", *common]
        )
        == 0
    )
    assert capsys.readouterr().out == table  # the stored result read back typed, rendered the same

    compared = tmp_path / "compared"
    argv = ["compare", *map(str, paths[:2]), "--metrics", "weight-norm", "--labels", "a,b", "--out", str(compared), "--json"]
    assert main([*argv, *common]) == 0
    result = json.loads(capsys.readouterr().out)
    values = [c["quantities"]["‖w‖²"]["value"] for c in result["checkpoints"]]
    assert values == pytest.approx([_squared_norm(p) for p in paths[:2]], rel=1e-6)
    assert result["differences"]["b"]["‖w‖²"]["diff"] == pytest.approx(values[1] - values[0], rel=1e-6)

    argv = ["correlate", *map(str, paths), "--metrics", "weight-norm", "--out", str(tmp_path / "corr"), "--json"]
    assert main([*argv, "--resamples", "100", *common]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert {c["measure"] for c in ranked["correlations"]} == {"‖w‖²"}


def test_every_metric_option_is_read_by_a_measure_and_says_which():
    """Each flag of the metrics group is a MetricSpec field that some measure's record lists, and its --help names
    the measures reading it; each record lists only real fields."""
    from dataclasses import fields

    from analysis.cli import build_parser
    from analysis.measures.options import flag_fields

    names = {f.name for f in fields(MetricSpec)}
    for measure in MEASURES.values():
        assert set(measure.options) <= names, measure.name
    read = {option for measure in MEASURES.values() for option in measure.options}
    assert {f.name for f in flag_fields()} <= read
    text = " ".join(build_parser(["measure"])._subparsers._group_actions[0].choices["measure"].format_help().split())
    assert "(default 5) [eig]" in text and "[trace, sharpness-curve" in text
