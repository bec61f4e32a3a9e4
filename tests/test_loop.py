"""The trainer: checkpoints carry what made them, and a resumed run equals an uninterrupted one."""

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from landscape.inputs.checkpoints import load_checkpoint
from landscape.training.loop import TrainConfig, _lr_factor, train
from tests.helpers import cli_command, run_cli

SMALL = dict(data="digits", model="mlp", model_kwargs={"hidden": [16]}, batch_size=256, lr=0.1)


def test_checkpoints_record_config_metrics_and_optimizer(tmp_path):
    from landscape.inputs.data import load_data

    config = TrainConfig(**SMALL, optimizer="smoothout", optimizer_kwargs={"a": 0.01}, epochs=2)
    final = train(config, tmp_path / "run", progress=False)
    ckpt = load_checkpoint(final)
    assert ckpt.meta["train"] == config.to_dict()
    assert ckpt.meta["optimizer"]["a"] == 0.01
    x_test, y_test = load_data("digits").split("test")
    with torch.no_grad():
        accuracy = (ckpt.build_model().eval()(x_test).argmax(1) == y_test).double().mean().item()
    assert ckpt.meta["epoch"] == 2 and ckpt.meta["metrics"]["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert ckpt.data_spec["spec"] == "digits" and ckpt.model_spec["name"] == "mlp"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2]
    assert log[1]["train_loss"] < load_checkpoint(tmp_path / "run" / "trajectory" / "epoch_0000.pt").meta["metrics"]["train_loss"]


@pytest.mark.cli
def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    """kill -9 a real `landscape train` process mid-run, resume it, compare with an uninterrupted run."""
    args = [
        "--data",
        "digits",
        "--model",
        "mlp",
        "--model-opt",
        "hidden=(16,)",
        "--optimizer",
        "smoothout",
        "--noise",
        "0.01",
        "--ghost-batch-size",
        "16",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--epochs",
        "40",
        "--quiet",
    ]
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        cli_command() + ["train", *args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (killed / "trajectory" / "epoch_0003.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = sorted((killed / "trajectory").glob("epoch_*.pt"))
    assert 3 <= len(done) - 1 < 40 and not (killed / "final.pt").exists()
    assert run_cli("train", *args, "--out", killed, "--resume").returncode == 0
    config = TrainConfig(
        data="digits",
        model="mlp",
        model_kwargs={"hidden": [16]},
        optimizer="smoothout",
        optimizer_kwargs={"a": 0.01, "ghost_batch_size": 16},
        batch_size=32,
        lr=0.05,
        epochs=40,
    )
    reference = load_checkpoint(train(config, tmp_path / "whole", progress=False)).state_dict
    resumed = load_checkpoint(killed / "final.pt").state_dict
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_learning_rate_schedules():
    step = TrainConfig(epochs=10, lr_schedule="step", lr_milestones=(3, 6), lr_gamma=0.1)
    assert [_lr_factor(step, e) for e in (0, 2, 3, 5, 6, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = TrainConfig(epochs=10, lr_schedule="cosine")
    assert [_lr_factor(cosine, e) for e in (0, 5)] == pytest.approx([1.0, 0.5])


def test_learning_rate_scaling_and_bad_settings():
    assert TrainConfig(lr=0.1, batch_size=512, lr_scaling="sqrt", lr_reference_batch=128).scaled_lr == pytest.approx(0.2)
    assert TrainConfig(lr=0.1, batch_size=512, lr_scaling="linear", lr_reference_batch=128).scaled_lr == pytest.approx(0.4)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="warp")


def test_divergence_is_reported(tmp_path):
    with pytest.raises(ValueError, match="diverged"):
        train(TrainConfig(**{**SMALL, "lr": 1e38}, epochs=1), tmp_path / "boom", progress=False)


def test_validation_hold_out_trains_on_the_rest_and_logs_validation_metrics(tmp_path):
    from landscape.inputs.data import load_data
    from landscape.training.loop import hold_out

    full = load_data("digits")
    rest, (xv, yv) = hold_out(full, 100, seed=0)
    assert len(rest.y_train) == len(full.y_train) - 100 and len(yv) == 100
    # the held-out samples are exactly the training samples missing from the rest
    joined = torch.cat([rest.x_train, xv]).sort(dim=0).values
    assert torch.equal(joined, full.x_train.sort(dim=0).values)
    assert torch.equal(hold_out(full, 100, seed=0)[1][0], xv) and not torch.equal(hold_out(full, 100, seed=1)[1][0], xv)
    final = train(TrainConfig(**SMALL, epochs=1, validation=100), tmp_path / "run", progress=False)
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    with torch.no_grad():
        logits = load_checkpoint(final).build_model().eval()(xv)
    assert logged["validation_accuracy"] == pytest.approx((logits.argmax(1) == yv).double().mean().item(), abs=1e-12)
    assert logged["validation_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, yv).item(), rel=1e-5)
    with pytest.raises(ValueError, match="leaves no training samples"):
        hold_out(full, len(full.y_train), seed=0)


def test_runs_written_before_the_validation_and_recipe_fields_still_resume(tmp_path):
    config = TrainConfig(**SMALL, epochs=1)
    train(config, tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    for key in ("validation", "recipe"):
        del state["config"][key]
    state["epoch"] = 0  # as if killed before its first epoch ended
    torch.save(state, tmp_path / "run" / "state.pt")
    train(TrainConfig(**SMALL, epochs=1, recipe="named later"), tmp_path / "run", resume=True, progress=False)
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2


def test_resuming_a_finished_run_leaves_its_files_untouched(tmp_path):
    config = TrainConfig(**SMALL, epochs=1)
    final = train(config, tmp_path / "run", progress=False)
    before = final.stat().st_mtime_ns, final.read_bytes()
    time.sleep(0.01)
    assert train(config, tmp_path / "run", resume=True, progress=False) == final
    assert (final.stat().st_mtime_ns, final.read_bytes()) == before


def test_tracked_curvature_is_the_checkpoints_and_leaves_training_unchanged(tmp_path):
    from landscape.curvature.spectrum import lanczos
    from landscape.curvature.trace import xtrace
    from landscape.engine.objective import Objective
    from landscape.engine.operators import HessianOperator
    from landscape.inputs.data import MeasurementSet, load_data

    base = dict(SMALL, model_kwargs={}, epochs=3, save_every=1)  # the default 64-100-100-10 MLP: 17,610 parameters
    plain = train(TrainConfig(**base), tmp_path / "plain", progress=False)
    start = time.perf_counter()
    tracked = train(
        TrainConfig(**base, track_every=1, track="eig,trace", track_samples=300), tmp_path / "tracked", progress=False
    )
    wall = time.perf_counter() - start
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (plain, tracked))
    assert all(torch.equal(a[k], b[k]) for k in a)  # measuring never touches the weights, gradients or random state
    logged = [json.loads(line) for line in (tmp_path / "tracked" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [0, 1, 2, 3]
    batches = MeasurementSet("train", 300, 1024, seed=0).batches(load_data("digits"))
    for row in logged:
        model = load_checkpoint(tmp_path / "tracked" / "trajectory" / f"epoch_{row['epoch']:04d}.pt").build_model()
        op = HessianOperator(Objective(model, batches, device="cpu", hvp_method="double-backward"))
        cold = lanczos(op, 1, tol=1e-8, stop="residual")
        assert row["lambda1"] == pytest.approx(float(cold.values[0]), rel=2e-3)
        assert row["lambda1_residual"] <= 1e-3 * row["lambda1"] * 1.01
        assert row["trace"] == pytest.approx(xtrace(op, 30, seed=0).estimate, rel=1e-4)
        assert row["track_hvps"] == row["lambda1_hvps"] + 30 and 0 < row["track_seconds"] < wall
    assert all(r["track_fraction"] > 0 for r in logged[1:])
    with pytest.raises(ValueError, match=r"track=\.\.\. takes a comma list of eig, trace, critical-sharpness, .*; got hessian"):
        train(TrainConfig(**base, track_every=1, track="hessian"), tmp_path / "bad", progress=False)


def test_tracked_critical_batch_and_preconditioned_sharpness_are_the_checkpoints(tmp_path):
    """Adam training tracked by the optimizer-aware measures: each logged value equals the estimator run afresh on
    the saved checkpoint (its optimizer state included); the weights equal an untracked run's."""
    from landscape.curvature.per_batch import batch_sharpness
    from landscape.curvature.preconditioned import preconditioned_sharpness, preconditioner_from_state
    from landscape.engine.objective import Objective
    from landscape.inputs.data import MeasurementSet, load_data
    from landscape.sharpness.critical import critical_sharpness

    base = dict(SMALL, optimizer="adam", lr=0.003, epochs=2, save_every=1, batch_size=100)
    plain = train(TrainConfig(**base), tmp_path / "plain", progress=False)
    track = "critical-sharpness,batch-sharpness,preconditioned-sharpness"
    tracked = train(TrainConfig(**base, track_every=1, track=track, track_samples=300), tmp_path / "tracked", progress=False)
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (plain, tracked))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "tracked" / "log.jsonl").read_text().splitlines()]
    assert "preconditioned_sharpness" not in logged[0]  # Adam has no second moment before its first step
    batches = MeasurementSet("train", 300, 1024, seed=0).batches(load_data("digits"))
    x, y = batches[0]
    for row in logged:
        checkpoint = load_checkpoint(tmp_path / "tracked" / "trajectory" / f"epoch_{row['epoch']:04d}.pt")
        model = checkpoint.build_model()
        objective = Objective(model, batches, device="cpu", hvp_method="double-backward")
        assert row["critical_sharpness"] == pytest.approx(critical_sharpness(objective).value, rel=1e-9)
        cut = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 300, 100)]
        alone = batch_sharpness(Objective(model, cut, device="cpu", hvp_method="double-backward"))
        assert row["batch_sharpness"] == pytest.approx(alone.value, rel=1e-6)
        if row["epoch"]:
            P = preconditioner_from_state(checkpoint.optimizer_state)
            cold = preconditioned_sharpness(objective, P, tol=1e-8)
            assert row["preconditioned_sharpness"] == pytest.approx(cold.value, rel=2e-3)
            assert row["preconditioned_threshold"] == pytest.approx(38 / 0.003)


@pytest.mark.cli
def test_track_measures_every_trajectory_checkpoint_warm_started_and_resumes(tmp_path):
    import h5py

    from analysis.cli.track import stability_threshold
    from landscape.curvature.spectrum import lanczos
    from landscape.engine.objective import Objective
    from landscape.engine.operators import HessianOperator
    from landscape.inputs.data import MeasurementSet, load_data

    train(TrainConfig(**dict(SMALL, model_kwargs={}), epochs=3, save_every=1), tmp_path / "run", progress=False)  # 17,610 params
    args = (
        "track",
        tmp_path / "run",
        "--metrics",
        "eig,trace",
        "--k",
        "1",
        "--n-samples",
        "300",
        "--probes",
        "20",
        "--stability-line",
        "--quiet",
        "--json",
    )
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    series = json.loads(result.stdout)["series"]
    assert series["epoch"] == [0.0, 1.0, 2.0, 3.0]
    batches = MeasurementSet("train", 300, 256, 0).batches(load_data("digits"))
    for epoch, value in zip(series["epoch"], series["λ1"]):  # the warm-started series equals cold Lanczos per checkpoint
        model = load_checkpoint(tmp_path / "run" / "trajectory" / f"epoch_{int(epoch):04d}.pt").build_model()
        cold = lanczos(HessianOperator(Objective(model, batches, device="cpu")), 1, tol=1e-8, stop="residual")
        assert value == pytest.approx(float(cold.values[0]), rel=2e-3)
    stored = json.loads((tmp_path / "run" / "track" / "track.json").read_text())
    hvps = [c["metrics"]["eig"]["n_matvecs"] for c in stored["checkpoints"]]
    assert stored["complete"] and sum(hvps[1:]) / 3 < hvps[0]  # the warm starts need fewer products than the cold one
    with h5py.File(tmp_path / "run" / "track" / "track.h5") as f:
        np.testing.assert_allclose(f["λ1"][()], series["λ1"])
    assert (tmp_path / "run" / "track" / "track.png").read_bytes()[:4] == b"\x89PNG"
    # killed after two checkpoints: the rerun keeps them and measures the rest
    stored["checkpoints"], stored["complete"] = stored["checkpoints"][:2], False
    (tmp_path / "run" / "track" / "track.json").write_text(json.dumps(stored))
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    np.testing.assert_allclose(json.loads(again.stdout)["series"]["λ1"], series["λ1"], rtol=2e-3)
    changed = run_cli("track", tmp_path / "run", "--metrics", "eig", "--k", "2", "--quiet")
    assert changed.returncode == 2 and "resume with the same options" in changed.stderr
    assert stability_threshold({"lr": 0.1, "momentum": 0.9})[0] == pytest.approx(38.0)
    assert stability_threshold({"lr": 0.5, "momentum": 0.0}) == (4.0, "2/η = 4")
    assert stability_threshold({"lr": 0.1, "base": "adam"}) is None
