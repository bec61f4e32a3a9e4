"""The README's code runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_transformer_example_runs_as_written(capsys):
    pytest.importorskip("transformers")
    exec(compile(python_block_after("### Your own model"), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "Evaluation(loss=" in printed and "n_samples=16" in printed
