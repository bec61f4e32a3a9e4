"""Bad input to the `landscape` command, as real processes: one line on stderr, exit 2, nothing lost.

Each case is a subprocess; the digits MLP and 64-sample measurement sets keep them to the cost of
starting Python. The option checks that need no process (every option the CLI validates) run in
process at the end.
"""

import hashlib
import json
import os
import pickle
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.cli import build_parser, main
from analysis.cli.flag_names import as_flags
from analysis.cli.measure import build_objective
from analysis.cli.option_checks import validate_arguments
from analysis.cli.specs import ObjectiveSpec
from landscape.inputs.checkpoints import CheckpointError, load_checkpoint
from landscape.inputs.data import MeasurementSet, load_data
from tests.helpers import Exploit, cli_command, one_line, run_cli
from tests.model_zoo import CifarResNet

TRAIN = ["--data", "digits", "--model", "mlp", "--model-opt", "hidden=(16,)", "--epochs", "1", "--batch-size", "128"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch digits MLP run, trained by `landscape train --json` (its output is a test too)."""
    out = tmp_path_factory.mktemp("run")
    result = run_cli("train", *TRAIN, "--out", out, "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


# ------------------------------------------------------------------ data that does not fit the model
@pytest.mark.cli
def test_data_with_other_inputs_names_both_shapes(trained, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "wide.npz", x=rng.standard_normal((80, 40)).astype(np.float32), y=np.arange(80) % 10)
    line = one_line(run_cli("measure", trained[0] / "final.pt", "--data", f"npz:{tmp_path / 'wide.npz'}", "--n-samples", "64"))
    assert "inputs of shape (40,)" in line and "expects (1, 8, 8)" in line and "--data" in line and "'digits'" in line


@pytest.mark.cli
def test_labels_beyond_the_outputs_name_both_numbers(trained, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "twelve.npz", x=rng.standard_normal((80, 64)).astype(np.float32), y=np.arange(80) % 12)
    line = one_line(run_cli("measure", trained[0] / "final.pt", "--data", f"npz:{tmp_path / 'twelve.npz'}", "--n-samples", "64"))
    assert "labels up to 11" in line and "10 outputs" in line


# ------------------------------------------------------------------ options
@pytest.mark.cli
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(trained):
    line = one_line(run_cli("measure", trained[0] / "final.pt", "--device", "cuda", "--n-samples", "64"))
    assert "--device cuda: CUDA is not available" in line and "--device cpu" in line


@pytest.mark.cli
def test_k_above_the_parameter_count(trained):
    line = one_line(
        run_cli(
            "measure", trained[0] / "final.pt", "--metrics", "eig", "--k", "5000", "--max-matvecs", "6000", "--n-samples", "64"
        )
    )
    n_params = 64 * 16 + 16 + 16 * 10 + 10
    assert "--k 5000" in line and f"{n_params} parameters" in line


@pytest.mark.cli
def test_empty_metrics(trained):  # --metrics "" too, in process below
    line = one_line(run_cli("measure", trained[0] / "final.pt", "--metrics", ",", "--n-samples", "64"))
    assert "--metrics ',' names no metric" in line


@pytest.mark.cli
def test_estimator_limits_use_the_option_names(trained):
    line = one_line(run_cli("measure", trained[0] / "final.pt", "--probes", "2"))
    assert "--probes must be at least 4" in line and "n_matvecs" not in line  # xtrace's own check says n_matvecs


def test_a_subset_larger_than_the_split_names_the_option(trained):
    args = build_parser().parse_args(["measure", str(trained[0] / "final.pt"), "--n-samples", "5000"])
    with pytest.raises(ValueError) as info:
        build_objective(args.checkpoints[0], ObjectiveSpec.from_args(args))
    message = str(info.value)  # the library names its parameter; the command line's one line, the option
    assert "n_samples=5000: the train split of 'digits' has 1437 samples" in message
    assert "--n-samples 5000: the train split of 'digits' has 1437 samples" in as_flags(message)


# ------------------------------------------------------------------ checkpoints
class Custom:
    """A class of our own: torch's weights-only loader refuses to import it."""


@pytest.mark.cli
def test_a_pickle_that_runs_code_is_refused_by_name(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Exploit(marker)}, tmp_path / "bad.pt")
    line = one_line(run_cli("measure", tmp_path / "bad.pt", "--data", "digits"))
    assert (
        "bad.pt: unreadable pickle" in line and "posix.system" in line and "pass --trust-checkpoint only if you trust it" in line
    )
    assert not marker.exists()  # nothing ran


@pytest.mark.parametrize("raw", [False, True])
def test_a_pickled_class_is_refused_by_name(tmp_path, raw):
    """A class of the user's, in torch's zip format or in a bare pickle (which torch rejects before naming it)."""
    payload = {"state_dict": {"w": torch.zeros(2)}, "extra": Custom()}
    if raw:
        (tmp_path / "bad.pt").write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bad.pt")
    assert "bad.pt: unreadable pickle" in str(info.value) and "test_bad_input.Custom" in str(info.value)


@pytest.fixture
def akamaster(tmp_path):
    """A checkpoint in the format widely published CIFAR ResNet-20s use (akamaster/pytorch_resnet_cifar10):
    {'state_dict': DataParallel keys ('module.' prefix), 'best_prec1': ...}, saved before PyTorch 0.4.1 (no
    num_batches_tracked), with BatchNorm statistics that differ from a fresh model's. The architecture
    (conv1, bn1, layer1-3, linear; option-A shortcuts) is tests/model_zoo.py's CifarResNet."""
    torch.manual_seed(0)
    model = CifarResNet()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar.npz", x=rng.standard_normal((40, 3, 32, 32)).astype(np.float32), y=np.arange(40) % 10)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return model, state, tmp_path, env


def _measure(path, data, env):
    return subprocess.run(
        cli_command()
        + [
            "measure",
            str(path),
            "--model",
            "tests.model_zoo:CifarResNet",
            "--data",
            f"npz:{data}",
            "--n-samples",
            "16",
            "--batch-size",
            "16",
            "--metrics",
            "expected-loss",
            "--noise-samples",
            "4",
            "--radius",
            "0.001",
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_akamaster_resnet20_without_num_batches_tracked_loads_with_a_note(akamaster):
    model, state, folder, env = akamaster
    torch.save({"state_dict": state, "best_prec1": 91.73}, folder / "resnet20-published.th")
    result = _measure(folder / "resnet20-published.th", folder / "cifar.npz", env)
    note = one_line(result, code=0)
    assert "note:" in note and "num_batches_tracked" in note and "19 BatchNorm layers" in note
    (report,) = json.loads(result.stdout)
    x, y = MeasurementSet("train", 16, 16).batches(load_data(f"npz:{folder / 'cifar.npz'}"))[0]
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model.eval()(x), y).item()
    assert report["loss"] == pytest.approx(expected, rel=1e-5)  # the published running statistics were used


def test_missing_running_statistics_are_still_an_error(akamaster):
    _, state, folder, env = akamaster
    gone = [k for k in state if k.endswith("running_mean")]
    torch.save({"state_dict": {k: v for k, v in state.items() if k not in gone}, "best_prec1": 91.73}, folder / "no-stats.th")
    line = one_line(_measure(folder / "no-stats.th", folder / "cifar.npz", env))
    assert "missing keys: bn1.running_mean, layer1.0.bn1.running_mean" in line and f"and {len(gone) - 5} more" in line
    assert "num_batches_tracked" not in line


# ------------------------------------------------------------------ surface files
@pytest.fixture(scope="module")
def busy_surface(trained, tmp_path_factory):
    """A slow surface run holding its file, and a second run on the same file started meanwhile."""
    folder = tmp_path_factory.mktemp("surface")
    out = folder / "s.h5"
    args = ["surface", trained[0] / "final.pt", "--n-samples", "64", "--dim", "2", "--quiet"]
    first = subprocess.Popen(
        cli_command() + [str(a) for a in args + ["--range", "-1:1:601", "--out", out]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.nice(19),
    )  # the second run gets the core
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and (folder / "s.h5.lock").exists()):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first surface run never started writing"
            time.sleep(0.1)
        started = time.monotonic()
        second = run_cli(*args, "--range", "-1:1:601", "--out", out, "--resume")
        waited = time.monotonic() - started
        assert first.poll() is None, "the first run must still hold the file"
    finally:
        first.kill()
        first.wait()
    return args, out, second, waited, hashlib.sha256((trained[0] / "final.pt").read_bytes()).hexdigest()[:12]


@pytest.mark.slow
def test_a_surface_file_in_use_is_refused_at_once(busy_surface):
    _, out, second, waited, _ = busy_surface
    line = one_line(second)
    assert f"{out} is in use by another landscape run (process" in line and "choose another --out" in line
    assert waited < 120  # it did not wait for the first run's 361,201 points


@pytest.mark.cli
def test_surface_resume_with_other_axes_names_both_grids(busy_surface):
    args, out, *_ = busy_surface
    line = one_line(run_cli(*args, "--range", "-1:1:41", "--out", out, "--resume"))
    assert "axes differs: -1:1:601 × -1:1:601 in the file, -1:1:41 × -1:1:41 asked" in line


@pytest.mark.cli
def test_surface_resume_from_another_checkpoint_names_both_hashes(busy_surface, trained):
    args, out, _, _, sha = busy_surface
    other = trained[0] / "trajectory" / "epoch_0000.pt"
    line = one_line(run_cli("surface", other, *args[2:], "--range", "-1:1:601", "--out", out, "--resume"))
    assert f"checkpoint differs: sha256 {sha} in the file, {hashlib.sha256(other.read_bytes()).hexdigest()[:12]} now" in line


# ------------------------------------------------------------------ training runs
def test_train_reports_final_loss_and_accuracy(trained, capsys):
    out, report = trained
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert report["metrics"][key] == pytest.approx(last[key])
    assert main(["train", *TRAIN, "--out", str(out), "--quiet", "--resume"]) == 0  # finished: nothing to train, same report
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("test "))
    assert row == ["test", f"{last['test_loss']:.4f}", f"{last['test_accuracy']:.4f}"]


@pytest.mark.cli
def test_train_resume_with_other_settings_names_each_one(trained):
    line = one_line(run_cli("train", *TRAIN, "--lr", "0.1", "--seed", "3", "--out", trained[0], "--resume"))
    assert "--lr 0.05 in the run, 0.1 asked" in line and "--seed 0 in the run, 3 asked" in line
    assert "--epochs" not in line


@pytest.mark.cli
def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == "landscape 0.1.0"


# ------------------------------------------------------------------ the user's own code
USER_CODE = """
import torch

def make_net(**kwargs):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

def broken(**kwargs):
    raise RuntimeError("size mismatch in my layer")
"""


@pytest.fixture
def user_code(tmp_path):
    """CODE/nets28.py, a folder on no sys.path, and a bare state dict of its make_net in TMP."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "nets28.py").write_text(USER_CODE)
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).state_dict(), tmp_path / "bare.pt")
    return code


@pytest.mark.cli
def test_a_failing_model_factory_is_one_line_and_debug_shows_its_traceback(user_code, tmp_path):
    args = ["measure", tmp_path / "bare.pt", "--model", "nets28:broken", "--data", "digits", "--n-samples", "64"]
    line = one_line(run_cli(*args, cwd=user_code))  # and the current folder is importable, as with python -m
    assert "nets28:broken raised RuntimeError: size mismatch in my layer" in line and "--debug" in line
    debug = run_cli(*args, "--debug", cwd=user_code)
    assert debug.returncode != 0 and 'raise RuntimeError("size mismatch in my layer")' in debug.stderr


@pytest.mark.cli
def test_a_run_of_a_factory_in_the_current_folder_is_measured_from_anywhere(user_code, tmp_path):
    trained = run_cli("train", *TRAIN[:2], "--model", "nets28:make_net", *TRAIN[6:], "--out", "run", "--quiet", cwd=user_code)
    assert trained.returncode == 0, trained.stderr  # no PYTHONPATH=.: the current folder is importable
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    measure = ["measure", user_code / "run" / "final.pt", "--metrics", "expected-loss", "--noise-samples", "4"]
    measure += ["--n-samples", "64", "--quiet"]
    assert run_cli(*measure, cwd=elsewhere).returncode == 0  # the checkpoint says where nets28 was found
    moved = user_code.rename(tmp_path / "moved")
    line = one_line(run_cli(*measure[:1], moved / "run" / "final.pt", *measure[2:], cwd=elsewhere))
    assert "cannot import module 'nets28'" in line and f"it was in {user_code.resolve()}" in line and "PYTHONPATH" in line


# ------------------------------------------------------------------ the rest of the catalogue
@pytest.mark.cli
def test_resume_of_a_file_written_for_another_checkpoint_is_refused_unless_added(trained, tmp_path):
    final, other, out = trained[0] / "final.pt", trained[0] / "trajectory" / "epoch_0000.pt", tmp_path / "results.json"
    options = ["--metrics", "expected-loss", "--n-samples", "50", "--noise-samples", "4", "--quiet", "--out", str(out)]
    assert main(["measure", str(final), *options]) == 0
    before = out.read_bytes()
    line = one_line(run_cli("measure", other, *options, "--resume"))
    assert f"{out} holds the results of {final}, not of {other}" in line and "pass --add-checkpoint" in line
    assert out.read_bytes() == before
    assert main(["measure", str(other), *options, "--resume", "--add-checkpoint"]) == 0
    saved = json.loads(out.read_text())
    assert [r["checkpoint"] for r in saved["checkpoints"]] == saved["checkpoint_paths"] == [str(final), str(other)]
    assert main(["measure", str(final), str(other), *options, "--resume"]) == 0  # both are the file's now


@pytest.mark.cli
def test_compare_with_one_checkpoint_is_refused(trained, tmp_path):
    line = one_line(run_cli("compare", trained[0] / "final.pt", "--out", tmp_path / "cmp"))
    assert "landscape compare needs at least two checkpoints" in line and "landscape measure" in line
    assert not (tmp_path / "cmp").exists()


@pytest.mark.cli
def test_radius_zero_is_refused_at_once(trained):
    line = one_line(run_cli("measure", trained[0] / "final.pt", "--metrics", "expected-loss", "--radius", "0"))
    assert "--radius '0': a radius of 0 perturbs nothing" in line


@pytest.mark.cli
def test_train_out_on_a_file_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        line = one_line(run_cli("train", *TRAIN, "--out", out))
        assert f"{tmp_path / 'notes.txt'} is a file; a run is a folder" in line and "Errno" not in line
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.cli
def test_a_truncated_checkpoint_says_so_without_an_os_error(trained, tmp_path):
    data = (trained[0] / "final.pt").read_bytes()

    def os_error(cut):  # torch's zip reader fails on some cuts with a bare "[Errno 22] Invalid argument"
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        try:
            torch.load(tmp_path / "cut.pt", weights_only=True)
        except OSError:
            return True
        except Exception:
            return False

    assert any(os_error(c) for c in range(len(data) // 4, len(data), 61))  # cut.pt is the first such cut
    line = one_line(run_cli("measure", tmp_path / "cut.pt"))
    assert "cut.pt is truncated or corrupt" in line and "Errno" not in line


@pytest.mark.cli
def test_track_without_a_trajectory_names_what_track_needs(trained, tmp_path):
    line = one_line(run_cli("track", tmp_path))
    assert "no trajectory/epoch_*.pt in it; landscape track needs a run written by `landscape train`" in line
    assert "--at-train-loss" not in line
    line = one_line(run_cli("track", trained[0] / "final.pt"))
    assert "final.pt is not a folder; landscape track takes the folder" in line


# ------------------------------------------------------------------ every validated option, in process
@pytest.mark.parametrize(
    "argv, wanted",
    [
        (["--probes", "3"], "--probes must be at least 4"),
        (["--probes", "1", "--trace-method", "hutchinson"], "--probes must be at least 2"),
        (["--k", "0"], "--k must be at least 1"),
        (["--max-matvecs", "0"], "--max-matvecs must be at least 1"),
        (["--noise-samples", "5"], "--noise-samples must be an even number"),
        (["--noise-samples", "2"], "--noise-samples must be an even number"),
        (["--radius", "0.01,abc"], "--radius '0.01,abc': 'abc'"),
        (["--radius", "-0.1"], "--radius"),
        (["--radius", ","], "--radius ',' names no radius"),
        (["--radius", "0"], "--radius '0': a radius of 0 perturbs nothing, so its loss increase is 0 by definition"),
        (["--radius", "0.01,0.0"], "--radius '0.01,0.0': a radius of 0 perturbs nothing"),
        (["--eps", "0"], "--eps must be a finite number > 0"),
        (["--eps", "nan"], "--eps must be a finite number > 0"),
        (["--tol", "-1"], "--tol must be a finite number ≥ 0"),
        (["--restarts", "-1"], "--restarts must be at least 0"),
        (["--density-runs", "0"], "--density-runs must be at least 1"),
        (["--density-steps", "0"], "--density-steps must be at least 1"),
        (["--n-samples", "0"], "--n-samples must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--subspace-dim", "0"], "--subspace-dim must be at least 1"),
        (["--metrics", ""], "--metrics '' names no metric"),
        (["--metrics", "eig,bogus"], "unknown metric bogus"),
        (["--device", "nonsense"], "--device nonsense: not a device name"),
        (["--hvp", "magic"], "--hvp magic: use one of auto, reuse"),
        (["--hvp-memory", "8 apples"], "cannot read '8 apples' as a memory size"),
    ],
)
def test_measure_options_are_checked_by_name(argv, wanted):
    args = build_parser().parse_args(["measure", "x.pt", *argv])
    with pytest.raises(ValueError) as info:
        validate_arguments(args)
    assert wanted in str(info.value) and "\n" not in str(info.value)


def test_valid_defaults_pass_for_every_command():
    for argv in (["measure", "x.pt"], ["compare", "x.pt", "y.pt"], ["surface", "x.pt"], ["train", "--out", "o"]):
        validate_arguments(build_parser().parse_args(argv))
    with pytest.raises(ValueError, match="needs at least two checkpoints, got only x.pt"):
        validate_arguments(build_parser().parse_args(["compare", "x.pt"]))
    with pytest.raises(ValueError, match="--epochs must be at least 1"):
        validate_arguments(build_parser().parse_args(["train", "--out", "o", "--epochs", "0"]))
    with pytest.raises(ValueError, match="unknown metric eps"):  # compare has its own metric names
        validate_arguments(build_parser().parse_args(["compare", "x.pt", "y.pt", "--metrics", "surface,eps"]))
