"""`landscape correlate` end to end on real training runs, and `correlate`/`track` split over two gloo ranks."""

import json
import subprocess

import numpy as np
import pytest
from scipy.stats import kendalltau

from analysis.cli import build_parser
from analysis.cli.measure import measure_checkpoint
from analysis.cli.specs import MeasureSpec
from landscape.inputs.checkpoints import load_checkpoint
from landscape.training.loop import TrainConfig, train
from tests.helpers import cli_command, run_cli
from tests.process_groups import process_env, torchrun

OPTIONS = ["--metrics", "eig,trace", "--k", "1", "--n-samples", "300", "--probes", "10", "--resamples", "200", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 methods × 2 learning rates × 2 seeds of a digits MLP (8 runs, 2 epochs each, a trajectory checkpoint per epoch)."""
    root = tmp_path_factory.mktemp("sweep")
    folders = []
    for method in ("sgd", "smoothout"):
        for lr in (0.05, 0.3):
            for seed in (0, 1):
                config = TrainConfig(
                    data="digits",
                    model="mlp",
                    model_kwargs={"hidden": [24]},
                    optimizer=method,
                    batch_size=128,
                    lr=lr,
                    epochs=2,
                    seed=seed,
                    save_every=1,
                )
                folders.append(root / f"{method}-{lr}-{seed}")
                train(config, folders[-1], progress=False)
    return folders


@pytest.mark.cli
def test_correlate_measures_every_run_alike_and_ranks_against_the_gaps(runs, tmp_path):
    out = tmp_path / "out"
    result = run_cli("correlate", *runs, *OPTIONS, "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert len(found["runs"]) == 8 and found["axes"] == ["method", "lr"]
    assert [(c["measure"], c["gap"]) for c in found["correlations"]] == [
        ("λ1", "error"),
        ("trace", "error"),
        ("λ1", "loss"),
        ("trace", "loss"),
    ]
    args = build_parser().parse_args(["measure", str(runs[0] / "final.pt"), *OPTIONS[:8]])
    alone = measure_checkpoint(str(runs[0] / "final.pt"), MeasureSpec.from_args(args)).to_dict()  # the same numbers
    assert found["runs"][0]["measures"]["λ1"]["value"] == pytest.approx(alone["metrics"]["eig"]["values"][0], rel=1e-6)
    for run, folder in zip(found["runs"], runs):
        g, recorded = run["generalization"], load_checkpoint(folder / "final.pt").meta["metrics"]
        assert run["hyperparameters"]["seed"] in (0, 1) and run["hyperparameters"]["batch_size"] == 128
        # the gaps on the whole splits equal what training recorded for the same weights
        assert g["train_loss"] == pytest.approx(recorded["train_loss"], rel=1e-5)
        assert g["loss"] == pytest.approx(recorded["test_loss"] - recorded["train_loss"], rel=1e-4, abs=1e-6)
        assert g["error"] == pytest.approx(recorded["train_accuracy"] - recorded["test_accuracy"], abs=1e-6)
    for c in found["correlations"]:
        measure = [r["measures"][c["measure"]]["value"] for r in found["runs"]]
        gap = [r["generalization"][c["gap"]] for r in found["runs"]]
        assert c["tau"]["value"] == pytest.approx(kendalltau(measure, gap).statistic, abs=1e-12)
        assert c["tau"]["low"] <= c["tau"]["value"] <= c["tau"]["high"]
        assert c["groups"] == {"method": 4, "lr": 4}  # (lr or method) × seed
    assert (out / "correlation.png").read_bytes()[:4] == b"\x89PNG"
    assert "granulated" in (out / "correlation.md").read_text()
    # killed after three runs: the rerun keeps them and measures the rest, to the same numbers
    stored = json.loads((out / "measurements.json").read_text())
    assert stored["complete"] and len(stored["checkpoints"]) == 8
    stored["checkpoints"], stored["complete"] = stored["checkpoints"][:3], False
    (out / "measurements.json").write_text(json.dumps(stored))
    again = run_cli("correlate", *runs, *OPTIONS, "--out", out, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["correlations"] == found["correlations"]
    changed = run_cli("correlate", *runs, *OPTIONS[:-3], "--probes", "12", "--out", out)
    assert changed.returncode == 2 and "resume with the same options" in changed.stderr


@pytest.mark.cli
def test_correlate_at_matched_train_loss_picks_trajectory_checkpoints(runs, tmp_path):
    result = run_cli(
        "correlate",
        *runs,
        *OPTIONS,
        "--metrics",
        "trace",
        "--at-train-loss",
        "matched",
        "--gap",
        "loss",
        "--out",
        tmp_path,
        "--json",
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    minima = [min(load_checkpoint(p).meta["metrics"]["train_loss"] for p in (f / "trajectory").glob("epoch_*.pt")) for f in runs]
    assert found["at_train_loss"] == pytest.approx(max(minima))
    assert all("/trajectory/epoch_" in r["checkpoint"] for r in found["runs"])
    assert {r["at_train_loss"]["epoch"] for r in found["runs"]} <= {0, 1, 2}
    assert [c["gap"] for c in found["correlations"]] == ["loss"]


def _main(*args) -> tuple[int, str]:
    """The command line's entry point in this process (the tests above run it as a program): exit code, stderr."""
    import contextlib
    import io

    from analysis.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in args])
    return code, stderr.getvalue()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gap", "accuracy"], "--gap accuracy: choose from error, loss"),
        (["--metrics", "surface"], "unknown metric surface"),
        (["--resamples", "20"], "at least 100"),
    ],
)
def test_correlate_refuses_bad_options_in_one_line(runs, tmp_path, extra, message):
    code, stderr = _main("correlate", *runs[:3], *OPTIONS, *extra, "--out", tmp_path)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_correlate_refuses_too_few_runs_and_a_folder_without_final(runs, tmp_path):
    code, stderr = _main("correlate", *runs[:2], *OPTIONS, "--out", tmp_path)
    assert code == 2 and "at least 3 runs" in stderr
    (tmp_path / "empty").mkdir()
    code, stderr = _main("correlate", *runs[:3], tmp_path / "empty", *OPTIONS, "--out", tmp_path)
    assert code == 2 and "needs final.pt" in stderr


TORCHRUN = torchrun(2)


@pytest.mark.distributed
def test_torchrun_splits_correlate_runs_and_track_checkpoints_over_ranks(runs, tmp_path):
    """Each rank measures its share alone (not data-parallel): correlate's numbers equal one process exactly; track's
    trace too (the same probes), and its λ1 to Lanczos' tolerance (each rank's first checkpoint starts cold)."""
    options = [*OPTIONS, "--dtype", "float64"]
    outputs = {}
    for name, prefix in (("two", TORCHRUN), ("one", [])):
        out = tmp_path / name
        result = subprocess.run(
            [*prefix, *cli_command(), "correlate", *map(str, runs[:5]), *options, "--out", str(out)],
            capture_output=True,
            text=True,
            env=process_env(),
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("wrote ") == 1  # one rank printed
        outputs[name] = json.loads((out / "correlation.json").read_text())
        assert not json.loads((out / "measurements.json").read_text())["checkpoints"][0]["setup"]["sharded"]
    for a, b in zip(outputs["two"]["runs"], outputs["one"]["runs"]):
        assert a["checkpoint"] == b["checkpoint"] and a["measures"] == b["measures"]
    assert outputs["two"]["correlations"] == outputs["one"]["correlations"]
    series = {}
    for name, prefix in (("two", TORCHRUN), ("one", [])):
        out = tmp_path / f"track-{name}"
        result = subprocess.run(
            [
                *prefix,
                *cli_command(),
                "track",
                str(runs[0]),
                "--metrics",
                "eig,trace",
                "--k",
                "1",
                "--n-samples",
                "300",
                "--probes",
                "10",
                "--dtype",
                "float64",
                "--tol",
                "1e-6",
                "--out",
                str(out),
                "--json",
                "--quiet",
            ],
            capture_output=True,
            text=True,
            env=process_env(),
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        series[name] = json.loads(result.stdout)["series"]
    assert series["two"]["epoch"] == series["one"]["epoch"] == [0.0, 1.0, 2.0]
    np.testing.assert_allclose(series["two"]["trace"], series["one"]["trace"], rtol=1e-10)
    np.testing.assert_allclose(series["two"]["λ1"], series["one"]["λ1"], rtol=3e-6)
