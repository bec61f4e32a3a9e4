"""Data-parallel training on real 2-process gloo groups: each method's meaning across ranks, checked step by step.

- SGD and Adam (with gradient accumulation) on two ranks equal one process on the same global batch.
- SAM with the local ascent equals one-process SAM with one ghost batch per rank's share (m-sharpness);
  with the global ascent it equals one-process SAM on the whole batch.
- SmoothOut, AdaSmoothOut, S-SGD, NSO and NRS equal a one-process emulation that gives each rank's share
  its own noise stream (rank_seed) and sums the shares' weighted gradients.
- BatchNorm statistics move once per step on each rank and are averaged; all ranks hold the same bits.
- The trainer: `torchrun --nproc_per_node 2 landscape train` equals one process, resumes after kill -9 to
  the same bits as an uninterrupted run, and refuses to resume on another number of processes.
"""

import copy
import functools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from analysis.experiments.recipes import run_name, train_all
from landscape.inputs.checkpoints import load_checkpoint
from landscape.inputs.models import MLP
from landscape.training.data_parallel import GradientSync, rank_seed
from landscape.training.loop import TrainConfig, train
from landscape.training.optim import make_optimizer
from tests.helpers import cli_command, tiny_convnet_bn
from tests.process_groups import process_env, run_on_ranks, torchrun

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3
N = 48  # global batch: 24 samples per rank
REL = 1e-10  # float64: only the order of the partial sums differs

# name: (optimizer, options, model) — every method in landscape.training.optim, on float64 models
SCENARIOS = {
    "sgd": ("sgd", {"weight_decay": 1e-3}, "mlp"),
    "adam-accumulate": ("adam", {"accumulate": 2}, "mlp"),
    "sam-local": ("sam", {"rho": 0.05}, "mlp"),
    "sam-global": ("sam", {"rho": 0.05, "ascent_gradient": "global"}, "mlp"),
    "asam-global-accumulate": ("asam", {"ascent_gradient": "global", "accumulate": 3}, "mlp"),
    "smoothout": ("smoothout", {"a": 0.02, "ghost_batch_size": 8}, "mlp"),
    "adasmoothout": ("adasmoothout", {"a": 0.05}, "mlp"),
    "ssgd": ("ssgd", {"sigma": 0.02}, "mlp"),
    "nso": ("nso", {"sigma": 0.02, "k": 2}, "mlp"),
    "nrs": ("nrs", {"radius": 0.05}, "mlp"),
    "sam-bn": ("sam", {"rho": 0.05}, "bn"),
    "nso-bn": ("nso", {"sigma": 0.02}, "bn"),
    "sam-fp16": ("sam", {"rho": 0.05, "amp": "fp16"}, "mlp-float32"),
}


def _data(kind: str):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 1, 4, 4, generator=g, dtype=torch.float32 if kind.endswith("float32") else torch.float64)
    return x, torch.randint(0, 3, (N,), generator=g)


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MLP((1, 4, 4), 3, (12,)) if kind.startswith("mlp") else tiny_convnet_bn()
    return (model if kind.endswith("float32") else model.double()).train()


def _optimizer(name: str, model, options: dict):
    return make_optimizer(name, model, lr=0.1, momentum=0.9, seed=7, **options)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _distributed_run(name: str) -> dict:
    method, options, kind = SCENARIOS[name]
    model = _model(kind)
    opt = _optimizer(method, model, options)
    sync = GradientSync()
    opt.distribute(sync)
    x, y = _data(kind)
    mine = sync.share(torch.arange(N))
    losses = []
    for _ in range(STEPS):
        loss, _ = opt.step(model, x[mine], y[mine], F.cross_entropy)
        sync.average_buffers(model)
        losses.append(float(loss))
    return {"state": _state(model), "losses": losses}


def _all_scenarios() -> dict:
    return {name: _distributed_run(name) for name in SCENARIOS}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_on_ranks(_all_scenarios, tmp_path_factory.mktemp("ranks"), WORLD)


def _one_process(name: str, **override) -> dict:
    """The plain one-process method on the whole global batch (options overridden)."""
    method, options, kind = SCENARIOS[name]
    model = _model(kind)
    opt = _optimizer(method, model, {**options, **override})
    x, y = _data(kind)
    losses = [float(opt.step(model, x, y, F.cross_entropy)[0]) for _ in range(STEPS)]
    return {"state": _state(model), "losses": losses}


def _emulated(name: str) -> dict:
    """Each rank's share through its own method object (its own noise stream, rank_seed), in one process: the
    shares' gradients weighted by n/N and summed, one base step, BN buffers from each share averaged."""
    method, options, kind = SCENARIOS[name]
    model = _model(kind)
    methods = [_optimizer(method, model, options) for _ in range(WORLD)]
    for r, m in enumerate(methods):
        m.generator.manual_seed(rank_seed(m.seed, r))
    x, y = _data(kind)
    losses = []
    for _ in range(STEPS):
        start = {k: b.clone() for k, b in model.named_buffers()}
        total_loss, total, moved = 0.0, [None] * len(methods[0].params), []
        for r, m in enumerate(methods):
            for k, b in model.named_buffers():
                b.copy_(start[k])
            xs, ys = x.tensor_split(WORLD)[r], y.tensor_split(WORLD)[r]
            loss, grads, _ = m._sweep(model, m.chunks(xs, ys), N, F.cross_entropy)
            total_loss += float(loss)
            total = [g if t is None else t if g is None else t + g for t, g in zip(total, grads)]
            moved.append({k: b.clone() for k, b in model.named_buffers()})
        for k, b in model.named_buffers():
            b.copy_(sum(mv[k] for mv in moved) / WORLD if b.is_floating_point() else moved[0][k])
        methods[0]._descend(total)
        for m in methods[1:]:
            m.steps += 1
        losses.append(total_loss)
    return {"state": _state(model), "losses": losses}


def _assert_close(got: dict, expected: dict, rel: float = REL) -> None:
    for key, value in expected["state"].items():
        torch.testing.assert_close(got["state"][key], value, rtol=rel, atol=rel, msg=key)
    assert got["losses"] == pytest.approx(expected["losses"], rel=1e-9)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rank_holds_the_same_bits_after_each_method(two_ranks, name):
    """De-noising restores each rank's own copy and the all-reduce gives every rank the same gradient: after every
    method, including the noisy ones with their different per-rank noise, both ranks hold identical weights and buffers."""
    first, second = two_ranks[0][name], two_ranks[1][name]
    for key in first["state"]:
        assert torch.equal(first["state"][key], second["state"][key]), key
    assert first["losses"] == second["losses"]


def test_fp16_steps_agree_across_ranks_and_with_one_process(two_ranks):
    """The scaled gradients are summed, then unscaled and checked once: every rank takes (or skips) the same step."""
    torch.testing.assert_close(
        two_ranks[0]["sam-fp16"]["state"]["1.weight"],
        _one_process("sam-fp16", ghost_batch_size=N // WORLD)["state"]["1.weight"],
        rtol=2e-3,
        atol=2e-3,
    )


@pytest.mark.parametrize("name", ["sgd", "adam-accumulate", "sam-global"])
def test_deterministic_methods_on_two_ranks_equal_one_process_on_the_global_batch(two_ranks, name):
    _assert_close(two_ranks[0][name], _one_process(name, accumulate=1))


def test_asam_global_ascent_with_accumulation_equals_one_process_on_the_whole_batch(two_ranks):
    """ε̂ from the gradient of all 6 micro-batches on both ranks is the whole batch's ε̂."""
    _assert_close(two_ranks[0]["asam-global-accumulate"], _one_process("asam-global-accumulate", accumulate=1))


def test_sam_local_ascent_is_m_sharpness_over_each_ranks_share(two_ranks):
    """Each rank ascends along its own share's gradient: one process with one ghost batch per share."""
    _assert_close(two_ranks[0]["sam-local"], _one_process("sam-local", ghost_batch_size=N // WORLD))
    whole = _one_process("sam-local")
    assert not torch.allclose(two_ranks[0]["sam-local"]["state"]["1.weight"], whole["state"]["1.weight"], rtol=1e-6)


@pytest.mark.parametrize("name", ["smoothout", "adasmoothout", "ssgd", "nso", "nrs", "sam-bn", "nso-bn"])
def test_noisy_methods_equal_one_process_with_the_same_per_rank_noise(two_ranks, name):
    _assert_close(two_ranks[0][name], _emulated(name))


def test_the_ranks_draw_different_noise():
    """Rank 1's stream is not rank 0's (the emulation would pass with identical noise too)."""
    a, b = (torch.Generator().manual_seed(rank_seed(7, r)) for r in range(2))
    assert not torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert rank_seed(7, 0) == 7


@pytest.mark.parametrize("name", ["sam-bn", "nso-bn"])
def test_batchnorm_statistics_move_once_per_step(two_ranks, name):
    """SAM's ascended pass and NSO's perturbed passes leave the statistics alone; SAM moves them in its first pass,
    NSO in its clean pass (davda54/sam #17: updated twice under DDP)."""
    counters = [v for k, v in two_ranks[0][name]["state"].items() if k.endswith("num_batches_tracked")]
    assert counters and all(int(c) == STEPS for c in counters)


# ---------------------------------------------------------------- the trainer under torchrun
TRAIN = ["--data", "digits", "--model", "mlp", "--model-opt", "hidden=(16,)", "--batch-size", "64", "--lr", "0.05", "--quiet"]


def _env() -> dict:
    return process_env(LANDSCAPE_DIST_TIMEOUT="120")


def _torchrun(*args, nproc: int = WORLD) -> list[str]:
    return [*torchrun(nproc), *cli_command(), *map(str, args)]


@pytest.mark.cli
def test_torchrun_train_equals_one_process_and_writes_once(tmp_path):
    """Weights, the logged metrics and the tracked λ1 (measured data-parallel, on each rank's shard) agree."""
    tracked = ["--track-every", "2", "--track-samples", "500"]
    two = subprocess.run(
        _torchrun("train", *TRAIN, *tracked, "--epochs", "2", "--out", tmp_path / "two"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote ") == 1  # rank 0 alone prints
    one = subprocess.run(
        cli_command() + ["train", *TRAIN, *tracked, "--epochs", "2", "--out", str(tmp_path / "one")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    a, b = load_checkpoint(tmp_path / "one" / "final.pt"), load_checkpoint(tmp_path / "two" / "final.pt")
    for key, value in a.state_dict.items():
        torch.testing.assert_close(b.state_dict[key], value, rtol=1e-5, atol=1e-6)
    assert b.meta["world_size"] == 2 and a.meta["world_size"] == 1
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [0, 1, 2]  # one line per epoch: rank 1 did not write
    single = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    for key in ("train_loss", "test_accuracy", "lambda1"):
        assert log[-1][key] == pytest.approx(single[-1][key], rel=1e-3), key
    # and torchrun with one process is the plain one-process run, bit for bit
    alone = subprocess.run(
        _torchrun("train", *TRAIN, "--epochs", "2", "--out", tmp_path / "alone", nproc=1),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert alone.returncode == 0, alone.stderr
    c = load_checkpoint(tmp_path / "alone" / "final.pt").state_dict
    assert all(torch.equal(c[k], v) for k, v in a.state_dict.items())


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.cli
@pytest.mark.slow
def test_torchrun_train_resumes_after_kill_to_the_same_bits(tmp_path):
    """kill -9 the whole torchrun job mid-run, resume under torchrun: the same bits as an uninterrupted 2-rank run,
    each rank's noise stream continuing where it stopped (SmoothOut, ghost batches)."""
    args = [*TRAIN, "--optimizer", "smoothout", "--noise", "0.01", "--ghost-batch-size", "16", "--epochs", "12"]
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _torchrun("train", *args, "--out", killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "trajectory" / "epoch_0003.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    _kill_tree(process.pid)
    process.wait()
    assert not (killed / "final.pt").exists()
    # resuming it in one process is a one-line refusal that names the command to use, and changes nothing
    state = (killed / "state.pt").read_bytes()
    refused = subprocess.run(
        cli_command() + ["train", *args, "--out", str(killed), "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "trained on 2 process(es)" in refused.stderr and "--nproc_per_node 2" in refused.stderr
    assert (killed / "state.pt").read_bytes() == state
    resumed = subprocess.run(
        _torchrun("train", *args, "--out", killed, "--resume"), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run(
        _torchrun("train", *args, "--out", tmp_path / "whole"), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert whole.returncode == 0, whole.stderr
    a, b = load_checkpoint(killed / "final.pt").state_dict, load_checkpoint(tmp_path / "whole" / "final.pt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished run is reusable from one process (demo and figures caches): nothing left to train
    single = subprocess.run(
        cli_command() + ["train", *args, "--out", str(killed), "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr


# ---------------------------------------------------------------- demo and figures: runs split over the ranks
RUNS = [TrainConfig(data="digits", model="mlp", model_kwargs={"hidden": [8]}, epochs=1, seed=s, batch_size=128) for s in range(3)]


def _train_all(cache: Path) -> list[Path]:
    return train_all(RUNS, cache)


def test_train_all_splits_the_runs_over_the_ranks(tmp_path):
    """Under torchrun `demo` and `figures` train each run once, on one rank, and every rank gets every path."""
    results = run_on_ranks(functools.partial(_train_all, tmp_path / "cache"), tmp_path, WORLD)
    expected = [tmp_path / "cache" / run_name(run) / "final.pt" for run in RUNS]
    assert results[0] == results[1] == expected
    for run, path in zip(RUNS, expected):
        meta = load_checkpoint(path).meta
        assert meta["world_size"] == 1  # trained whole by one rank, not data-parallel
        alone = load_checkpoint(train(run, tmp_path / "alone" / run_name(run), progress=False)).state_dict
        assert all(torch.equal(alone[k], v) for k, v in load_checkpoint(path).state_dict.items())


def test_one_process_training_is_unchanged_by_data_parallel_code(tmp_path):
    """Without torchrun the trainer builds no GradientSync: the optimizer is the plain one (rank 0's seed)."""
    config = RUNS[0]
    model_a = copy.deepcopy(_model("mlp"))
    assert make_optimizer("sgd", model_a, lr=0.1).sync is None
    final = train(config, tmp_path / "run", progress=False)
    assert load_checkpoint(final).meta["world_size"] == 1
