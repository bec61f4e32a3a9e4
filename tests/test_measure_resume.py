"""`landscape measure --out F`: a real process killed with kill -9, then with Ctrl-C, resumes to an uninterrupted run's numbers."""

import fcntl
import json
import os
import signal
import subprocess

import pytest
import torch

from analysis.cli import main
from tests.helpers import cli_command, digits_mlp_checkpoint

# eig first, then expected-loss: 1000 noisy forwards, each a plain progress line at interval 0, far more lines than
# the 4 KiB stderr pipe `_start` sets up holds, so a stopped reader pauses the run inside expected-loss
ARGS = [
    "--metrics",
    "eig,expected-loss,trace",
    "--n-samples",
    "100",
    "--noise-samples",
    "1000",
    "--radius",
    "0.01",
    "--k",
    "2",
    "--probes",
    "20",
    "--hvp",
    "double-backward",
]  # (linearize costs seconds to set up per process)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return digits_mlp_checkpoint(tmp_path_factory.mktemp("ckpt"), hidden=(32,))


def _start(checkpoint, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LANDSCAPE_PROGRESS_INTERVAL": "0"}
    # SIGINT at its default in the child, so Python installs its Ctrl-C handler even where this test runs as a
    # background job, whose SIGINT the shell sets to ignored (inherited by every child)
    process = subprocess.Popen(
        cli_command() + ["measure", str(checkpoint), *ARGS, "--out", str(out), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    if hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux: a small pipe, so the child waits for the reader
        fcntl.fcntl(process.stderr.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    return process


def _read_until(process, prefix):
    """Progress lines up to the first that starts with `prefix` (the run then waits on the full pipe)."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith(prefix):
            return seen
    raise AssertionError(f"no {prefix!r} line: {seen}")


def _run(checkpoint, out, *extra):
    """A whole run (same environment as the stopped ones, so the same threads and the same bits)."""
    process = _start(checkpoint, out, *extra)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def _saved(path):
    """The results file's metrics per checkpoint (it must be complete JSON whenever it exists: atomic writes)."""
    data = json.loads(path.read_text())
    assert data["format"] == "landscape-measure"
    return data


def _without_seconds(value):
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


@pytest.mark.slow
def test_killed_then_interrupted_measure_resumes_to_the_uninterrupted_result(tmp_path, checkpoint, capsys, monkeypatch):
    straight = tmp_path / "straight.json"
    monkeypatch.setenv("LANDSCAPE_PROGRESS_INTERVAL", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the OMP_NUM_THREADS=1 processes below, so the same bits
    try:
        code = main(["measure", str(checkpoint), *ARGS, "--out", str(straight), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and capsys.readouterr().err == ""  # --quiet: no progress at all, even at interval 0
    assert _saved(straight)["complete"]

    # kill -9 once eig is saved and expected-loss is running: the file keeps eig, whole
    out = tmp_path / "run.json"
    killed = _start(checkpoint, out)
    seen = _read_until(killed, "expected loss")
    assert any(line.startswith("lanczos: ") for line in seen)  # plain progress lines on a pipe
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    after_kill = _saved(out)
    assert not after_kill["complete"] and list(after_kill["checkpoints"][0]["metrics"]) == ["eig"]
    eig = after_kill["checkpoints"][0]["metrics"]["eig"]

    # --resume, and Ctrl-C inside expected-loss again
    interrupted = _start(checkpoint, out, "--resume")
    seen = _read_until(interrupted, "expected loss")
    interrupted.send_signal(signal.SIGINT)
    rest = interrupted.communicate(timeout=120)[1].splitlines()
    assert interrupted.returncode == 130, seen + rest
    assert rest[-1] == f"landscape measure: interrupted; 1 of 3 metrics saved to {out}; rerun with --resume"
    assert not any(line.startswith("lanczos") for line in seen + rest), seen  # the saved metric is not recomputed
    assert _saved(out)["checkpoints"][0]["metrics"] == {"eig": eig}

    code, stdout, stderr = _run(checkpoint, out, "--resume", "--json", "--quiet")
    assert code == 0, stderr
    final = _saved(out)
    assert final["complete"] and final["checkpoints"] == json.loads(stdout)
    assert final["checkpoints"][0]["metrics"]["eig"] == eig  # kept as the killed run saved it, its seconds included
    assert _without_seconds(final) == _without_seconds(_saved(straight))  # same seeds: the same numbers


def test_resume_refuses_other_settings_or_a_changed_checkpoint(tmp_path, checkpoint, capsys):
    def measure(path, out, *extra):
        code = main(
            [
                "measure",
                str(path),
                "--metrics",
                "expected-loss",
                "--n-samples",
                "50",
                "--noise-samples",
                "4",
                "--quiet",
                "--out",
                str(out),
                *extra,
            ]
        )
        return code, capsys.readouterr().err

    out = tmp_path / "run.json"
    assert measure(checkpoint, out) == (0, "")
    assert measure(checkpoint, out) == (
        2,
        f"landscape measure: error: {out} exists; pass --resume to continue it, or choose another --out\n",
    )
    code, stderr = measure(checkpoint, out, "--resume", "--noise-samples", "8")
    assert code == 2 and len(stderr.splitlines()) == 1 and f"{out} was measured with --noise-samples 4, not 8" in stderr
    assert measure(checkpoint, tmp_path / "new.json", "--resume")[0] == 0  # nothing to resume: a fresh file
    changed = tmp_path / "net.pt"
    changed.write_bytes(checkpoint.read_bytes())
    assert measure(changed, tmp_path / "c.json")[0] == 0
    assert digits_mlp_checkpoint(tmp_path, hidden=(32,), seed=1) == changed
    code, stderr = measure(changed, tmp_path / "c.json", "--resume")
    assert code == 2 and f"{changed} changed since its results were saved" in stderr
    assert measure(checkpoint, tmp_path / "x.json", "--resume", "--out", "") == (
        2,
        "landscape measure: error: --resume continues a results file: give it as --out FILE.json\n",
    )


def test_a_resumed_table_says_what_was_read_back_and_what_was_computed(tmp_path, checkpoint):
    """A resumed run prints the same table as a fresh one: a one-line note says which numbers came from the file."""
    from analysis.cli.measure import measure_all
    from analysis.cli.specs import MeasureSpec, ObjectiveSpec
    from analysis.measures.notes import ResumeNote
    from analysis.measures.options import MetricSpec

    def spec(metrics):
        return MeasureSpec(ObjectiveSpec(n_samples=50, device="cpu"), MetricSpec(metrics=metrics, k=1, probes=4))

    out = str(tmp_path / "r.json")
    measure_all([str(checkpoint)], spec(("eig",)), out=out)
    with pytest.warns(ResumeNote, match=f"^{checkpoint}: loss, eig read back from the results file; nothing recomputed$"):
        measure_all([str(checkpoint)], spec(("eig",)), out=out, resume=True)
    interrupted = json.loads((tmp_path / "r.json").read_text())
    interrupted["checkpoints"][0]["metrics"] = {}  # as a run killed before its first metric leaves it
    (tmp_path / "r.json").write_text(json.dumps(interrupted))
    with pytest.warns(ResumeNote, match="loss read back from the results file; computed now: eig$"):
        measure_all([str(checkpoint)], spec(("eig",)), out=out, resume=True)


def test_a_file_from_before_a_setting_existed_resumes_as_that_settings_default(tmp_path, checkpoint):
    """A results file lacks settings added after it was written: it was measured with their defaults."""
    from analysis.cli.measure import measure_all
    from analysis.cli.results_file import ResultsFileError
    from analysis.cli.specs import MeasureSpec, ObjectiveSpec
    from analysis.measures.options import MetricSpec

    def spec(**metric_options):
        return MeasureSpec(ObjectiveSpec(n_samples=50, device="cpu"), MetricSpec(metrics=("eig",), k=1, **metric_options))

    out = tmp_path / "old.json"
    measure_all([str(checkpoint)], spec(), out=str(out))
    written = json.loads(out.read_text())
    del written["settings"]["per_layer_by"], written["settings"]["max_length"]  # as an older release wrote it
    out.write_text(json.dumps(written))
    from analysis.measures.notes import ResumeNote

    with pytest.warns(ResumeNote, match="loss, eig read back from the results file; nothing recomputed$"):
        [report] = measure_all([str(checkpoint)], spec(), out=str(out), resume=True)
    assert report.to_dict()["metrics"]["eig"] == written["checkpoints"][0]["metrics"]["eig"]
    with pytest.raises(ResultsFileError, match="measured with --per-layer-by module, not role"):
        measure_all([str(checkpoint)], spec(per_layer_by="role"), out=str(out), resume=True)
