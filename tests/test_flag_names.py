"""The library's errors name its Python parameters; the command line shows the same failure with its flags."""

import ast
import re
from pathlib import Path

import pytest

from analysis.cli import main
from analysis.cli.flag_names import as_flags, flags
from landscape.engine.from_checkpoint import objective_from_checkpoint
from landscape.inputs.checkpoints import load_checkpoint
from landscape.inputs.data import DataError, MeasurementSet
from tests.helpers import digits_mlp_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOO_MANY = "the train split of 'digits' has 1437 samples; ask for at most 1437"


def test_a_library_error_names_the_parameter_and_the_cli_names_the_flag(tmp_path, capsys):
    checkpoint = digits_mlp_checkpoint(tmp_path, (8,))
    with pytest.raises(DataError) as error:
        objective_from_checkpoint(load_checkpoint(checkpoint), measurement=MeasurementSet(n_samples=5000))
    assert str(error.value) == f"n_samples=5000: {TOO_MANY}"
    assert main(["measure", str(checkpoint), "--n-samples", "5000", "--quiet"]) == 2
    assert capsys.readouterr().err == f"landscape measure: error: --n-samples 5000: {TOO_MANY}\n"


@pytest.mark.parametrize(
    ("library", "cli"),
    [
        ("n_samples=5000: the train split", "--n-samples 5000: the train split"),
        ("use hvp_method='auto' (keeps what fits)", "use --hvp auto (keeps what fits)"),
        ("max_length=120 or batch_size=8 or smaller", "--max-length 120 or --batch-size 8 or smaller"),
        (
            "pass data=... (digits, mnist1d) or a model=... for this data",
            "pass --data (digits, mnist1d) or a --model for this data",
        ),
        ("pass trust=True only if you trust it", "pass --trust-checkpoint only if you trust it"),
        ("pass resume=True, or choose another path=...", "pass --resume, or choose another --out"),
        ("(class labels? use loss=class_cross_entropy)", "(class labels? use --loss cross-entropy)"),
        ("needs hutchinson() here", "needs --trace-method hutchinson here"),
        (
            'lr=0.05 in the run, 0.1 asked; model_kwargs={"hidden": [8]} in the run, {} asked; data=(unset) in the run',
            '--lr 0.05 in the run, 0.1 asked; --model-opt {"hidden": [8]} in the run, {} asked; --data (unset) in the run',
        ),
        ("give data='cifar10:DIR', not data='cifar100:/x'", "give --data cifar10:DIR, not --data cifar100:/x"),
    ],
)
def test_parameters_become_flags(library, cli):
    assert as_flags(library) == cli


def test_words_that_are_not_parameters_stay():
    for text in (
        "the model (MLP) cannot take the data's inputs",  # parameter names as words: no `=`, no flag
        "n_samples must be at least 1 (or None for the whole split); got 0",
        "replicas=3 must divide the 2 ranks",  # not a parameter the command line has a flag for
        "loss_scale=3: use a power of two",
        "--hvp finite-differences: use one of",  # a flag already
    ):
        assert as_flags(text) == text


def test_no_library_error_names_a_flag():
    """What landscape/ raises names Python parameters (analysis/cli/flag_names.py turns them into flags); torchrun's
    own --nproc_per_node is a launcher's option, not ours."""
    flag = re.compile(r"(?<![\w-])--(?!nproc_per_node)[a-z]")
    found = []
    for path in sorted((ROOT / "landscape").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = " ".join(c.value for c in ast.walk(node.exc) if isinstance(c, ast.Constant) and isinstance(c.value, str))
                if flag.search(text):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_every_parameter_has_one_flag():
    table = flags()
    assert table["hvp_method"] == "--hvp" and table["trust"] == "--trust-checkpoint" and table["lr"] == "--lr"
    assert all(f.startswith("--") and " " not in f for f in table.values())
