"""Sharded vectors on real 2-process gloo groups: the solvers' reductions, and FSDP2-sharded objectives.

Every solver on a dense operator whose vectors are split over the ranks gives one process's numbers (float64:
only the order of partial sums differs). The FSDP2 objective (finite-difference HVPs, the one path FSDP2 allows)
gives the loss and gradient of one process, and λ1..λ5 and the Hutchinson trace of one process's exact
Hessian within its stated error, for a BatchNorm ConvNet in both BN modes and a two-layer GPT-2.
"""

import functools
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from analysis.cli import build_parser, main
from analysis.cli.measure import measure_checkpoint
from analysis.cli.specs import MeasureSpec
from landscape.curvature.density import slq_density
from landscape.curvature.spectrum import lanczos, power_iteration
from landscape.curvature.trace import hutchinson, hutchpp, xtrace
from landscape.engine import distributed as ranks
from landscape.engine.hvp_paths import FINITE_DIFFERENCE_HVP
from landscape.engine.inner import ShardedInnerProduct
from landscape.engine.objective import Objective, ObjectiveError
from landscape.engine.operators import DenseOperator, HessianOperator, LinearOperator
from landscape.inputs.batches import token_cross_entropy
from tests.ground_truth import dense_hessian
from tests.helpers import classification_batches, cli_command, dense, digits_mlp_checkpoint, tiny_convnet_bn, two_layer_gpt2
from tests.process_groups import process_env, run_on_ranks, torchrun

pytestmark = pytest.mark.distributed  # every test here starts real process groups

N = 37
EIGENVALUES = np.concatenate([[9.0, 7.5, 7.4, 5.0, 3.0], np.linspace(-1.0, 2.0, N - 5)])
# each rank's pieces of the whole vector, interleaved and uneven as FSDP2's shards of several parameters are
PIECES = {0: [(0, 10), (20, 5)], 1: [(10, 10), (25, 12)]}
K = 5


class ShardedDense(LinearOperator):
    """A dense matrix acting on vectors split over the ranks (PIECES): products gather the whole vector (a test
    operator; the solvers never see anything but this rank's piece)."""

    def __init__(self, matrix: torch.Tensor, draws: str = "whole") -> None:
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device, ShardedInnerProduct(PIECES[ranks.rank()], draws=draws))
        self.matrix = matrix

    def products(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[0]
        parts = [None] * ranks.world_size()
        dist.all_gather_object(parts, V)
        whole = torch.zeros(V.shape[0], self.shape[0], dtype=V.dtype)
        for rank, part in enumerate(parts):
            whole[:, torch.cat([torch.arange(s, s + n) for s, n in PIECES[rank]])] = part
        return self.inner.piece(whole @ self.matrix.T)


def _solvers(op: LinearOperator) -> dict:
    eig = lanczos(op, K, tol=1e-10, seed=2)
    small = lanczos(op, 2, which="SA", tol=1e-10, seed=3, max_vectors=14)  # a bounded basis: thick restarts
    power = power_iteration(op, 2, tol=1e-12, max_matvecs=400, seed=4)
    density = slq_density(op, n_runs=3, n_steps=12, seed=5)
    return {
        "eig": eig.values,
        "eig_residuals": eig.residuals,
        "eig_matvecs": eig.n_matvecs,
        "certified": eig.certified,
        "restarted": small.values,
        "restarts": small.restarts,
        "power": power.values,
        "hutchinson": hutchinson(op, 12, seed=6, block_size=5).estimate,
        "hutchpp": hutchpp(op, 24, seed=7).estimate,
        "xtrace": xtrace(op, 24, seed=8).estimate,
        "nodes": density.nodes,
        "weights": density.weights,
    }


def _dense_on_a_rank() -> dict:
    torch.manual_seed(0)
    matrix = torch.tensor(dense(EIGENVALUES, seed=1)[0])
    return {"whole": _solvers(ShardedDense(matrix)), "pieces": _solvers(ShardedDense(matrix, draws="pieces"))}


@pytest.fixture(scope="module")
def dense_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    return run_on_ranks(_dense_on_a_rank, out)


def test_every_solver_on_sharded_vectors_equals_one_process(dense_ranks):
    matrix, _ = dense(EIGENVALUES, seed=1)
    single = _solvers(DenseOperator(torch.tensor(matrix)))
    rank0, rank1 = (r["whole"] for r in dense_ranks)
    for key, value in single.items():
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)  # identical on every rank
        if isinstance(value, (bool, int)):
            assert rank0[key] == value, key  # the same iterations, restarts and certification
        else:
            np.testing.assert_allclose(rank0[key], value, rtol=1e-10, atol=1e-10, err_msg=key)
    np.testing.assert_allclose(single["eig"], EIGENVALUES[:K], rtol=1e-9)


def test_probes_drawn_piece_by_piece_give_the_same_spectrum_and_the_same_steps_on_every_rank(dense_ranks):
    rank0, rank1 = (r["pieces"] for r in dense_ranks)
    for key in rank0:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
    np.testing.assert_allclose(rank0["eig"], EIGENVALUES[:K], rtol=1e-9)  # converged: the start does not matter
    assert rank0["certified"]
    whole = dense_ranks[0]["whole"]
    assert rank0["hutchinson"] != whole["hutchinson"]  # other probes: other samples of the same estimator
    assert abs(rank0["hutchinson"] - EIGENVALUES.sum()) < 4 * np.sqrt(2 * np.sum(dense(EIGENVALUES, seed=1)[0] ** 2) / 12)


def test_pieces_are_drawn_alone_and_the_shared_generator_moves_by_one_draw():
    inner = ShardedInnerProduct([(0, 3), (10, 2)], draws="pieces")
    lengths = []

    def draw(generator, m):
        lengths.append(m)
        return torch.randn(m, generator=generator, dtype=torch.float64)

    shared, twin = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    first = inner.random(shared, draw, 20)
    torch.randint(0, 2**62, (1,), generator=twin)
    assert lengths == [5] and first.shape == (5,)
    assert torch.equal(torch.rand(3, generator=shared), torch.rand(3, generator=twin))  # in step on every rank
    other = ShardedInnerProduct([(3, 7), (12, 8)], draws="pieces").random(torch.Generator().manual_seed(4), draw, 20)
    assert not torch.equal(first[:5], other[:5])  # another rank's pieces: another stream
    with pytest.raises(ValueError, match="draws='all'"):
        ShardedInnerProduct([(0, 1)], draws="all")


def test_per_block_traces_are_refused_for_sharded_vectors():
    class Piece(ShardedInnerProduct):
        def reduce(self, partial):
            return partial

    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    op.inner = Piece([(0, 4)])
    with pytest.raises(ValueError, match="per-block traces need whole vectors"):
        hutchinson(op, 4, blocks={"a": slice(0, 2)})


# ------------------------------------------------------------------ FSDP2-sharded objectives
def _convnet(mode: str):
    _, _, batches = classification_batches(45, (1, 4, 4), 3, [10, 10, 10, 10, 5], seed=1)
    return tiny_convnet_bn(), batches, dict(mode=mode, dtype=torch.float64)


def _gpt2():
    model, batches = two_layer_gpt2()
    return model, batches, dict(loss=token_cross_entropy, dtype=torch.float64)


PROBLEMS = {
    "convnet-eval": functools.partial(_convnet, "eval"),
    "convnet-train": functools.partial(_convnet, "train"),
    "gpt2": _gpt2,
}
TOL = {"convnet-eval": 1e-8, "convnet-train": 1e-8, "gpt2": 1e-5}


def _sharded_measurement(name: str) -> dict:
    from landscape.engine.sharded import ShardedObjective

    model, batches, options = PROBLEMS[name]()
    objective = ShardedObjective(model, batches, device="cpu", **options)
    op = HessianOperator(objective)
    eig = lanczos(op, K, tol=TOL[name], seed=0)
    trace = hutchinson(op, 8, seed=1)
    evaluation = objective.evaluate()
    return {
        "loss": evaluation.loss,
        "accuracy": evaluation.accuracy,
        "grad": objective.grad(),
        "pieces": objective.inner.pieces,
        "length": objective.inner.length,
        "eig": eig.values,
        "eig_bounds": eig.error_bounds,
        "trace": trace.estimate,
        "hvp_error": objective.hvp_error.max_error,
        "check": objective.hvp_check_result.to_dict(),
        "describe": objective.describe(),
    }


def _one_process(name: str) -> dict:
    model, batches, options = PROBLEMS[name]()
    objective = Objective(model, batches, device="cpu", hvp_method="double-backward", hvp_check=False, **options)
    op = HessianOperator(objective)
    evaluation = objective.evaluate()
    return {
        "loss": evaluation.loss,
        "accuracy": evaluation.accuracy,
        "grad": objective.grad(),
        "eig": lanczos(op, K, tol=TOL[name], seed=0),
        "trace": hutchinson(op, 8, seed=1).estimate,
        "n_params": objective.n_params,
    }


def _sharded_on_a_rank(names: tuple[str, ...]) -> dict:
    torch.manual_seed(0)
    results = {name: _sharded_measurement(name) for name in names}
    if "convnet-eval" in names:  # finite differences in the data-parallel Objective too: batches split, sums reduced
        model, batches, options = _convnet("eval")
        objective = Objective(
            model, ranks.shard(batches), device="cpu", hvp_method=FINITE_DIFFERENCE_HVP, distributed=True, **options
        )
        results["data-parallel"] = {
            "products": objective.hvp_batched(_probes(objective.n_params)),
            "errors": objective.last_hvp_errors,
        }
    return results


def _probes(n: int) -> torch.Tensor:
    return torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(9))


def _compare(name: str, ranks_results: list[dict]) -> None:
    single = _one_process(name)
    rank0, rank1 = (r[name] for r in ranks_results)
    assert rank0["loss"] == pytest.approx(single["loss"], rel=1e-12)
    assert rank0["accuracy"] == single["accuracy"]
    assert rank0["length"] + rank1["length"] == single["n_params"]  # every entry on exactly one rank
    for result in (rank0, rank1):  # each rank's gradient is its piece of the whole one
        piece = ShardedInnerProduct(result["pieces"]).piece(single["grad"])
        torch.testing.assert_close(result["grad"], piece, rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(rank0["eig"], rank1["eig"])
    exact = single["eig"]
    stated = rank0["hvp_error"]  # per unit probe: an eigenvalue moves by about that much
    slack = stated + rank0["eig_bounds"] + exact.error_bounds
    assert np.all(np.abs(rank0["eig"] - exact.values) <= slack), (rank0["eig"], exact.values, stated)
    assert np.all(np.abs(rank0["eig"] - exact.values) <= 1e-6 * np.abs(exact.values))  # float64: far inside it
    # each probe's sample zᵀ(Hz + e) moves by at most ‖z‖·‖e‖ ≤ n·(error per unit probe)
    assert abs(rank0["trace"] - single["trace"]) <= single["n_params"] * stated
    assert rank0["trace"] == pytest.approx(single["trace"], rel=1e-6)
    assert rank0["check"]["skipped"].startswith("no double backward through FSDP2")
    assert rank0["describe"]["parameters_sharded"] == "fsdp2" and rank0["describe"]["hvp_method"] == FINITE_DIFFERENCE_HVP


@pytest.fixture(scope="module")
def convnet_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("convnet")
    return run_on_ranks(functools.partial(_sharded_on_a_rank, ("convnet-eval", "convnet-train")), out)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fsdp2_convnet_matches_one_process_within_the_stated_error(convnet_ranks, mode):
    _compare(f"convnet-{mode}", convnet_ranks)


def test_data_parallel_finite_differences_match_one_process_within_their_estimate(convnet_ranks):
    model, batches, options = _convnet("eval")
    exact = Objective(model, batches, device="cpu", hvp_method="double-backward", hvp_check=False, **options)
    V = _probes(exact.n_params)
    rank0, rank1 = (r["data-parallel"] for r in convnet_ranks)
    torch.testing.assert_close(rank0["products"], rank1["products"], rtol=0, atol=0)  # the same bits everywhere
    true = (rank0["products"] - exact.hvp_batched(V)).norm(dim=1)
    assert bool((true <= rank0["errors"]).all()), (true, rank0["errors"])


def test_fsdp2_gpt2_matches_one_process_within_the_stated_error(tmp_path):
    pytest.importorskip("transformers")
    _compare("gpt2", run_on_ranks(functools.partial(_sharded_on_a_rank, ("gpt2",)), tmp_path))


def _hsdp_on_a_rank() -> dict:
    """2 × 2 on four ranks: replicated over two groups, sharded within each (FSDP2 on a 2-D mesh), probes drawn
    piece by piece (the replicas, holding the same pieces, must draw the same ones)."""
    from landscape.engine.sharded import ShardedObjective

    model, batches, options = _convnet("train")
    objective = ShardedObjective(model, batches, device="cpu", replicas=2, probes="pieces", **options)
    op = HessianOperator(objective)
    trace = hutchinson(op, 8, seed=1)
    return {
        "loss": objective.loss(),
        "grad": objective.grad(),
        "pieces": objective.inner.pieces,
        "eig": lanczos(op, K, tol=1e-8, seed=0).values,
        "trace": trace.estimate,
        "trace_stderr": trace.stderr,
        "hvp_error": objective.hvp_error.max_error,
    }


def test_fsdp2_two_replicas_of_two_shards_match_one_process(tmp_path):
    results = run_on_ranks(_hsdp_on_a_rank, tmp_path, world=4)
    single = _one_process("convnet-train")
    assert results[0]["pieces"] == results[2]["pieces"] != results[1]["pieces"] == results[3]["pieces"]  # replicas
    for result in results:
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-12)
        piece = ShardedInnerProduct(result["pieces"]).piece(single["grad"])
        torch.testing.assert_close(result["grad"], piece, rtol=1e-10, atol=1e-13)
        np.testing.assert_array_equal(result["eig"], results[0]["eig"])
        assert result["trace"] == results[0]["trace"]
    exact = single["eig"]
    slack = results[0]["hvp_error"] + exact.error_bounds + 1e-8 * np.abs(exact.values)
    assert np.all(np.abs(results[0]["eig"] - exact.values) <= slack)
    model, batches, _ = _convnet("train")
    exact_trace = float(torch.trace(dense_hessian(model, batches, "train")))
    assert abs(results[0]["trace"] - exact_trace) <= 4 * results[0]["trace_stderr"]  # other probes: a sample of it


def test_a_sharded_objective_needs_a_process_group():
    from landscape.engine.sharded import ShardedObjective

    model, batches, options = _convnet("eval")
    with pytest.raises(ObjectiveError, match="needs an initialised process group: launch with torchrun"):
        ShardedObjective(model, batches, **options)


# ------------------------------------------------------------------ the command line: torchrun landscape measure --shard
SHARD_ARGS = ["--shard", "--metrics", "eig,trace", "--k", "2", "--trace-method", "hutchinson", "--probes", "6"]
SHARD_ARGS += ["--n-samples", "64", "--batch-size", "16", "--dtype", "float64", "--tol", "1e-6"]


def _exact_single(checkpoint) -> dict:
    args = build_parser().parse_args(
        ["measure", str(checkpoint), *[a for a in SHARD_ARGS if a != "--shard"], "--hvp", "double-backward"]
    )
    return measure_checkpoint(str(checkpoint), MeasureSpec.from_args(args)).to_dict()


def test_shard_is_refused_in_one_line_outside_torchrun_and_with_what_it_cannot_measure(tmp_path, capsys, monkeypatch):
    checkpoint = digits_mlp_checkpoint(tmp_path, hidden=(8,))
    assert main(["measure", str(checkpoint), *SHARD_ARGS]) == 2
    assert "--shard splits the parameters over the ranks of a torchrun job" in capsys.readouterr().err
    assert main(["measure", str(checkpoint), "--shard-replicas", "2"]) == 2
    assert "--shard-replicas and --shard-probes set how a model is sharded: add --shard" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: the options are checked before any group is joined
    for extra, message in (
        (["--metrics", "eig,expected-loss"], "--shard measures eig, trace, density; drop expected-loss from --metrics"),
        (["--params", "weights"], "--shard measures every parameter: drop --params weights"),
        (["--hvp", "double-backward"], "FSDP2 allows no double backward"),
        (["--shard-replicas", "3"], "--shard-replicas 3 must divide the 2 ranks"),
    ):
        assert main(["measure", str(checkpoint), *SHARD_ARGS, *extra]) == 2
        assert message in capsys.readouterr().err


def _torchrun_measure(checkpoint, out, *extra, wait=True):
    command = [*torchrun(2), *cli_command(), "measure", str(checkpoint), *SHARD_ARGS, "--out", str(out), *extra]
    process = subprocess.Popen(command, env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        return stdout, stderr
    return process


def _saved_metrics(path) -> dict:
    """The metrics saved so far for the one checkpoint (the file is written atomically, so always whole)."""
    checkpoints = json.loads(path.read_text())["checkpoints"] if path.exists() else []
    return checkpoints[0]["metrics"] if checkpoints else {}


def test_torchrun_measure_shard_is_killed_and_resumes(tmp_path):
    """kill -9 of the whole torchrun job once λ is saved; --resume reads it back and computes only the trace."""
    checkpoint = digits_mlp_checkpoint(tmp_path, hidden=(8,))
    out = tmp_path / "results.json"
    process = _torchrun_measure(checkpoint, out, "--quiet", wait=False)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and "eig" not in _saved_metrics(out):
        time.sleep(0.05)
    # kill -9 the job: the launcher and its two ranks (torchrun starts each rank in a session of its own)
    ranks_pids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(process.pid)], capture_output=True, text=True).stdout.split()
    for pid in [process.pid, *map(int, ranks_pids)]:
        os.kill(pid, signal.SIGKILL)
    process.communicate()
    saved = json.loads(out.read_text())["checkpoints"][0]
    assert "eig" in saved["metrics"], "the run ended before the kill"
    stdout, stderr = _torchrun_measure(checkpoint, out, "--resume", "--json")
    (report,) = json.loads(stdout)
    assert "eig read back from the results file; computed now: trace" in stderr
    assert report["metrics"]["eig"] == saved["metrics"]["eig"]  # kept as saved, not recomputed
    single = _exact_single(checkpoint)
    # the errors stated cover both runs' products: the killed one's for λ, the resumed one's for the trace
    before, after = saved["hvp_error"], report["hvp_error"]
    assert after["n_products"] > before["n_products"] and after["max_error"] >= before["max_error"]
    before = after = after["max_error"]
    assert report["setup"]["parameters_sharded"] == "fsdp2" and report["setup"]["world_size"] == 2
    assert report["loss"] == pytest.approx(single["loss"], rel=1e-12)
    assert report["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-10)
    got, exact = report["metrics"]["eig"], single["metrics"]["eig"]
    slack = before + np.array(got["error_bounds"]) + np.array(exact["error_bounds"])
    assert np.all(np.abs(np.array(got["values"]) - np.array(exact["values"])) <= slack)
    assert abs(report["metrics"]["trace"]["estimate"] - single["metrics"]["trace"]["estimate"]) <= report["n_params"] * after
