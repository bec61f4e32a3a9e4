"""Progress of long work: plain lines off a terminal (throttled, with a final line), nothing when quiet or short."""

import io
import time

import pytest

from landscape.engine import progress
from landscape.engine.progress import Progress


@pytest.fixture
def fresh_clock(monkeypatch):
    """Every test starts as a new process would: no progress line printed yet."""
    monkeypatch.setattr(progress, "_last_line", [None])


def test_lines_every_interval_while_a_long_step_runs_then_a_final_line(fresh_clock, monkeypatch):
    monkeypatch.setenv("LANDSCAPE_PROGRESS_INTERVAL", "0.1")
    stream = io.StringIO()
    with Progress(10, "lanczos", "matvec", "lines", stream=stream) as bar:
        bar.update(3)
        time.sleep(0.45)  # one long step: the background thread keeps reporting
    lines = stream.getvalue().splitlines()
    assert 3 <= len(lines) <= 6, lines
    assert all(line.startswith("lanczos: 3/10 matvecs, ") for line in lines)
    assert lines[-1].endswith(", done") and not any(line.endswith("done") for line in lines[:-1])
    seconds = [float(line.split(", ")[1].removesuffix(" s")) for line in lines[:-1]]
    assert all(b - a >= 0.09 for a, b in zip(seconds, seconds[1:])), seconds  # at most one line per interval


def test_work_shorter_than_the_interval_prints_nothing(fresh_clock, monkeypatch):
    monkeypatch.setenv("LANDSCAPE_PROGRESS_INTERVAL", "30")
    stream = io.StringIO()
    for desc in ("expected loss", "hutchinson"):
        with Progress(5, desc, "forward", "lines", stream=stream) as bar:
            bar.update(5)
    assert stream.getvalue() == ""


def test_interval_zero_prints_every_update_and_an_interrupted_phase_no_final_line(fresh_clock, monkeypatch):
    monkeypatch.setenv("LANDSCAPE_PROGRESS_INTERVAL", "0")
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with Progress(None, "train sgd", "epoch", "lines", stream=stream) as bar:
            for _ in bar.iterate(range(3)):
                bar.set_postfix(loss="0.500")
                if bar.n == 1:
                    raise KeyboardInterrupt
    assert [line.split(", ")[0] for line in stream.getvalue().splitlines()] == ["train sgd: 1 epochs"]
    assert "loss=0.500" in stream.getvalue() and "done" not in stream.getvalue()


def test_quiet_or_off_prints_nothing_and_bad_settings_are_refused(monkeypatch):
    monkeypatch.setenv("LANDSCAPE_PROGRESS_INTERVAL", "0")
    stream = io.StringIO()
    assert progress.style(quiet=True) == "off" and progress.style(stream=stream) == "lines"
    for setting in (False, None, "off"):
        with Progress(2, "x", "step", setting, stream=stream) as bar:
            bar.update(2)
    assert stream.getvalue() == ""
    with pytest.raises(ValueError, match="progress must be"):
        Progress(2, "x", "step", "loud")
    monkeypatch.setenv("LANDSCAPE_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="LANDSCAPE_PROGRESS_INTERVAL='soon'"):
        Progress(2, "x", "step", "lines")


def test_each_line_names_what_its_work_is_for(fresh_clock, monkeypatch, capsys, mlp_problem):
    """compare, correlate and the demo name the checkpoint or run; the sharpness curve's own trace says it is its own."""
    from landscape.engine.objective import Objective
    from landscape.engine.progress import working_on
    from landscape.sharpness.perturb import sharpness_curve

    monkeypatch.setenv("LANDSCAPE_PROGRESS_INTERVAL", "0")
    model, _, _, batches = mlp_problem
    with working_on("checkpoint 2/6 runs/sgd-b32-seed1/final.pt"):
        sharpness_curve(Objective(model, batches, device="cpu"), [0.01], n_samples=4, n_probes=2, progress="lines")
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("checkpoint 2/6 runs/sgd-b32-seed1/final.pt: ") for line in lines)
    assert any(": second-order prediction ½·tr(ΣH): hutchinson: " in line for line in lines), lines
    with Progress(1, "lanczos", enabled=False) as bar:  # outside, nothing is prefixed
        assert bar.desc == "lanczos"
