"""The README's Python example runs as written, and so does the transformer example it used to hold, now on the
own-model page."""

import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import digits_mlp_checkpoint

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OWN_MODEL = ROOT / "docs" / "how-to" / "own-model.md"


def python_block_after(page: Path, heading: str) -> str:
    text = page.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written_on_a_stand_in_checkpoint(tmp_path, monkeypatch, capsys, one_thread):
    """The example reads a checkpoint of `landscape demo`; an untrained digits MLP stands in for it at that path."""
    block = python_block_after(README, "## Measure a checkpoint")
    assert len(block.strip().splitlines()) <= 12, "the README's example stays short"
    path = re.search(r'load_checkpoint\("([^"]+)"\)', block).group(1)
    target = tmp_path / path
    target.parent.mkdir(parents=True)
    shutil.move(digits_mlp_checkpoint(tmp_path, hidden=(16,)), target)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_the_transformer_example_runs_as_written(capsys):
    pytest.importorskip("transformers")
    exec(compile(python_block_after(OWN_MODEL, "## Transformers"), "own-model.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "Evaluation(loss=" in printed and "n_samples=16" in printed
