"""The `landscape` command as a real subprocess: the happy path and one-line errors."""

import json

import pytest
import torch

from landscape.engine.objective import Objective
from landscape.inputs.checkpoints import load_checkpoint
from landscape.inputs.data import MeasurementSet, load_data
from landscape.sharpness.box import epsilon_sharpness
from tests.helpers import bad_files, run_cli


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run_cli(
        "train",
        "--data",
        "digits",
        "--model",
        "mlp",
        "--model-opt",
        "hidden=(16,)",
        "--epochs",
        "2",
        "--batch-size",
        "128",
        "--lr",
        "0.1",
        "--out",
        out,
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.cli
def test_train_then_measure_reports_the_objective(trained_run):
    final = trained_run / "final.pt"
    assert sorted(p.name for p in (trained_run / "trajectory").iterdir()) == ["epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt"]
    assert len((trained_run / "log.jsonl").read_text().splitlines()) == 2
    result = run_cli("measure", final, "--json", "--n-samples", "300", "--batch-size", "100")
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)
    model = load_checkpoint(final).build_model()
    batches = MeasurementSet("train", 300, 100).batches(load_data("digits"))
    objective = Objective(model, batches, device="cpu")
    assert report["loss"] == pytest.approx(objective.loss(), rel=1e-5)
    assert report["grad_norm"] == pytest.approx(float(objective.grad().norm()), rel=1e-4)
    assert report["n_params"] == sum(p.numel() for p in model.parameters())
    assert report["setup"]["measurement"]["n_samples"] == 300
    assert report["setup"]["checkpoint_sha256"]
    table = run_cli("measure", final)
    assert table.returncode == 0
    assert "λ1" in table.stdout and "trace (xtrace)" in table.stdout and "1437 samples" in table.stdout


@pytest.mark.cli
@pytest.mark.parametrize(
    "kind",
    [
        "missing.pt",
        "truncated.pt",
        "text.pt",
        "garbage.pt",
        "legacy.pt",
        "nostate.pt",
        "bare.pt",
        "mismatch.pt",
        "nan.pt",
        "pickled-module.pt",
    ],
)
def test_bad_checkpoints_exit_with_one_line(tmp_path, kind):
    from landscape.inputs.models import model_for_data

    model, spec = model_for_data("mlp", (1, 8, 8), num_classes=10, hidden=(16,))
    messages = bad_files(tmp_path, model, spec)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save({k: torch.zeros(1) for k in model.state_dict()}, tmp_path / "mismatch.pt")
    nan_state = {k: v.clone() for k, v in model.state_dict().items()}
    next(iter(nan_state.values())).view(-1)[0] = float("nan")
    torch.save(nan_state, tmp_path / "nan.pt")
    torch.save(model, tmp_path / "pickled-module.pt")
    messages.update(
        {
            "bare.pt": "no model spec",
            "mismatch.pt": "shape mismatch",
            "nan.pt": "non-finite",
            "pickled-module.pt": "--trust-checkpoint",
        }
    )
    extra = ["--model", "mlp", "--model-opt", "hidden=(16,)"] if kind in ("mismatch.pt", "nan.pt") else []
    result = run_cli("measure", tmp_path / kind, "--data", "digits", *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert any(m in lines[0] for m in messages[kind].split("|")), lines[0]


@pytest.mark.cli
def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("measure", tmp_path / "none.pt", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.cli
def test_resume_refuses_an_existing_run_without_flag(trained_run):
    result = run_cli("train", "--data", "digits", "--model", "mlp", "--epochs", "1", "--out", trained_run, "--quiet")
    assert result.returncode == 2 and "--resume" in result.stderr


@pytest.mark.cli
def test_measure_curvature_and_noise_metrics_match_ground_truth(trained_run):
    """λ1..λ3 and the trace printed by the CLI agree with the dense Hessian of the same measurement set."""
    final = trained_run / "final.pt"
    result = run_cli(
        "measure",
        final,
        "--json",
        "--dtype",
        "float64",
        "--n-samples",
        "200",
        "--batch-size",
        "64",
        "--metrics",
        "eig,trace,expected-loss,eps-sharpness",
        "--k",
        "3",
        "--tol",
        "1e-8",
        "--radius",
        "0.01",
        "--noise-samples",
        "20",
        "--restarts",
        "2",
    )
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)
    model = load_checkpoint(final).build_model()
    batches = MeasurementSet("train", 200, 64).batches(load_data("digits"))
    objective = Objective(model, batches, dtype=torch.float64, device="cpu")
    dense = objective.hvp_batched(torch.eye(objective.n_params, dtype=torch.float64))
    exact = torch.linalg.eigvalsh((dense + dense.T) / 2).flip(0)
    eig = report["metrics"]["eig"]
    assert eig["values"] == pytest.approx(exact[:3].tolist(), rel=1e-6)
    trace = report["metrics"]["trace"]
    assert abs(trace["estimate"] - float(dense.trace())) <= 4 * trace["stderr"] + 1e-6
    assert set(trace["blocks"]) == {n for n, _ in model.named_parameters()}
    noise = report["metrics"]["expected-loss"]
    assert noise["increase_ci"][0] <= noise["increase"] <= noise["increase_ci"][1] and noise["n_forward"] == 21
    api = epsilon_sharpness(objective, 5e-4, restarts=2, seed=0)  # the CLI's defaults: --eps 5e-4, --seed 0
    assert report["metrics"]["eps-sharpness"]["value"] == pytest.approx(api.value, rel=1e-9) and api.value > 0


@pytest.mark.cli
def test_surface_on_the_pca_plane_of_a_training_run(trained_run, tmp_path):
    """`landscape surface --pca DIR`: the plane of the run's own trajectory, which the default grid covers."""
    result = run_cli(
        "surface",
        trained_run / "final.pt",
        "--pca",
        trained_run / "trajectory",
        "--n-samples",
        "200",
        "--out",
        tmp_path / "pca.h5",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    directions = report["directions"]
    assert directions["kind"] == "pca" and directions["labels"] == ["epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt"]
    trajectory = torch.tensor(directions["trajectory"])
    assert trajectory.shape == (3, 2) and torch.allclose(trajectory[-1], torch.zeros(2), atol=1e-4)  # final = origin
    ratios = directions["spec"]["explained_variance_ratio"]
    assert 0 < ratios[1] <= ratios[0] and sum(ratios) == pytest.approx(1, abs=1e-9)  # 3 centred points: a plane
    assert max(report["axes"][0]) >= trajectory.abs().max().item()  # the grid covers the trajectory
    assert report["n_done"] == report["n_points"] == 21 * 21


@pytest.mark.parametrize(
    "command, defaults",
    [
        (
            "measure",
            {"--metrics": "eig,trace", "--k": "5", "--radius": "0.001,0.005,0.01", "--noise-samples": "100", "--probes": "100"},
        ),
        (
            "compare",
            {
                "--metrics": "eig,trace,sharpness-curve,surface",
                "--k": "3",
                "--radius": "0.005,0.01,0.02",
                "--noise-samples": "40",
                "--probes": "60",
            },
        ),
        (
            "correlate",
            {
                "--metrics": "eig,trace,sharpness-curve,eps-sharpness,critical-sharpness,fisher-rao,relative-flatness,"
                "pac-bayes,pac-bayes-mag",
                "--relative-flatness-method": "estimate",
                "--k": "1",
                "--radius": "0.02",
                "--noise-samples": "40",
                "--probes": "60",
            },
        ),
    ],
)
def test_help_shows_the_defaults_each_command_uses(command, defaults):
    """Commands share the metric options but set their own defaults; --help states the ones that command uses."""
    from analysis.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    used = vars(parser.parse_args([command, "x", "y", "z"] if command == "correlate" else [command, "x"]))
    for option, value in defaults.items():
        assert str(used[option.lstrip("-").replace("-", "_")]) == value, option
        action = next(a for a in sub._actions if option in a.option_strings)
        # the help as printed, before argparse wraps it (textwrap may break "sharpness-curve" at its hyphen)
        assert "%(default)s" in action.help and f"(default {value})" in sub._get_formatter()._expand_help(action), option
