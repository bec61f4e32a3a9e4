"""Batched surface points: k points per vmapped call give what k calls of Objective.evaluate give."""

import warnings

import numpy as np
import pytest
import torch

from landscape.engine.batched_points import BatchedPointsNote, PointEvaluator, points_per_call
from landscape.engine.objective import Objective
from landscape.inputs.data import MeasurementSet, load_data
from landscape.inputs.models import model_for_data
from landscape.surfaces.directions import random_directions
from landscape.surfaces.surface import compute_surface, grid_axis, read_surface
from tests.helpers import tiny_convnet_bn

TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


def _points(objective: Objective, k: int = 5) -> torch.Tensor:
    """k points around the checkpoint, far enough apart that their losses and accuracies differ."""
    g = torch.Generator().manual_seed(0)
    steps = torch.randn(k, objective.n_params, generator=g, dtype=torch.float64).to(objective.dtype)
    return objective.w + 0.3 * objective.w.abs().mean() * steps


def _assert_same_as_one_per_call(objective: Objective, W: torch.Tensor, buffers: dict | None = None) -> None:
    evaluator = PointEvaluator(objective)
    batched = evaluator.evaluate(W, buffers)
    assert evaluator.fallback is None
    single = [objective.evaluate(w, None if buffers is None else {n: b[i] for n, b in buffers.items()}) for i, w in enumerate(W)]
    np.testing.assert_allclose([e.loss for e in batched], [e.loss for e in single], rtol=TOLERANCE[objective.dtype])
    assert [e.accuracy for e in batched] == [e.accuracy for e in single]
    assert len({e.loss for e in batched}) == len(W)  # the points really differ


def _digits(arch: str, n: int = 300):
    data = load_data("digits")
    torch.manual_seed(0)
    model, _ = model_for_data(arch, data)
    return model, MeasurementSet("train", n, 128).batches(data)  # 128, 128, 44: uneven batches weigh by samples


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ["mlp", "convnet"])
def test_digits_models_match_one_point_per_call(arch, dtype):
    model, batches = _digits(arch)
    objective = Objective(model, batches, dtype=dtype, device="cpu")
    _assert_same_as_one_per_call(objective, _points(objective))


def test_resnet20_with_bn_in_eval_mode_and_per_point_bn_buffers():
    torch.manual_seed(0)
    model, _ = model_for_data("resnet20", (3, 8, 8), num_classes=10)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)
    objective = Objective(model, [(x[:16], y[:16]), (x[16:], y[16:])], dtype=torch.float64, device="cpu")
    W = _points(objective, 3)
    _assert_same_as_one_per_call(objective, W)
    means = {n: b for n, b in objective.model.named_buffers() if n.endswith("running_mean")}
    buffers = {n: torch.stack([b + 0.1 * i for i in range(3)]) for n, b in means.items()}  # statistics differ per point
    _assert_same_as_one_per_call(objective, W, buffers)


def test_tiny_gpt2_with_dict_batches():
    pytest.importorskip("transformers")
    from landscape.inputs.batches import token_cross_entropy
    from tests.helpers import gpt2, token_batches

    objective = Objective(gpt2(), token_batches(), loss=token_cross_entropy, dtype=torch.float64, device="cpu")
    _assert_same_as_one_per_call(objective, _points(objective, 3))


def test_a_model_vmap_cannot_batch_falls_back_with_a_reason(mlp_problem):
    model, _, _, batches = mlp_problem

    class Unbatchable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            out = self.net(x)
            return out + float(out.detach().sum()) * 0  # .item() of a batched tensor: no vmap rule

    objective = Objective(Unbatchable(), batches, device="cpu")
    evaluator = PointEvaluator(objective)
    W = _points(objective, 3)
    with pytest.warns(BatchedPointsNote, match="vmap cannot batch"):
        evaluations = evaluator.evaluate(W)
    assert "vmap cannot batch" in evaluator.fallback, evaluator.fallback
    assert [e.loss for e in evaluations] == [objective.evaluate(w).loss for w in W]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; later blocks go one per call quietly
        evaluator.evaluate(W)


def test_points_per_call_auto_is_one_on_the_cpu_and_bad_values_are_refused(mlp_problem):
    model, _, _, batches = mlp_problem
    objective = Objective(model, batches, device="cpu")
    assert points_per_call([objective]) == 1 and points_per_call([objective], 8) == 8
    for bad in (0, -2, 1.5, "many", True):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            points_per_call([objective], bad)


def test_points_per_call_auto_on_cuda_fits_k_copies_of_the_activations(mlp_problem, monkeypatch):
    """On CUDA, auto takes the k whose activations fill a quarter of the free memory, between 1 and 32."""
    from landscape.engine import batched_points

    model, _, _, batches = mlp_problem
    objective = Objective(model, batches, device="cpu")
    per_point = batched_points._activation_bytes(objective)
    assert per_point == 50 * objective._graph_bytes_per_sample() + 4 * objective.n_params  # one merged chunk of 50
    objective.device = torch.device("cuda")  # the rule only: no kernel runs
    for free, k in ((4 * 10.5 * per_point, 10), (1e15, 32), (per_point, 1)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (int(free), int(free)))
        assert points_per_call([objective]) == k


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["mlp", "convnet"])
def test_digits_models_on_cuda_match_one_point_per_call(arch):
    model, batches = _digits(arch)
    objective = Objective(model, batches, dtype=torch.float64, device="cuda")
    assert points_per_call([objective]) > 1
    _assert_same_as_one_per_call(objective, _points(objective))


def test_surface_file_with_four_points_per_call_equals_one_per_call(tmp_path, conv_problem):
    model, _, _, batches = conv_problem
    objective = Objective(model, batches, dtype=torch.float64)
    directions = random_directions(objective, 2, seed=0, states=True)  # BN statistics move with the point
    axes = [grid_axis(-1, 1, 5), grid_axis(-1, 1, 3)]
    one = compute_surface(objective, directions, axes, path=tmp_path / "one.h5", points_per_call=1)
    four = compute_surface(objective, directions, axes, path=tmp_path / "four.h5", points_per_call=4)
    a, b = read_surface(tmp_path / "one.h5"), read_surface(tmp_path / "four.h5")
    assert a.complete and b.complete and b.metadata["points_per_call"] == 4
    np.testing.assert_allclose(b.loss["train"], a.loss["train"], rtol=1e-12)
    np.testing.assert_array_equal(b.accuracy["train"], a.accuracy["train"])
    np.testing.assert_array_equal(four.loss["train"], b.loss["train"])
    np.testing.assert_array_equal(one.loss["train"], a.loss["train"])


def test_bn_recalibration_batches_the_evaluation_too(conv_problem):
    model, _, _, batches = conv_problem
    objective = Objective(model, batches, dtype=torch.float64)
    directions, axes = random_directions(objective, 1, seed=0), [grid_axis(-1, 1, 5)]
    one = compute_surface(objective, directions, axes, bn_recalibration=2, points_per_call=1)
    four = compute_surface(objective, directions, axes, bn_recalibration=2, points_per_call=4)
    np.testing.assert_allclose(four.loss["train"], one.loss["train"], rtol=1e-12)
    np.testing.assert_array_equal(four.accuracy["train"], one.accuracy["train"])


def test_a_run_killed_midway_resumes_to_the_same_file(tmp_path, conv_problem, monkeypatch):
    """Raise after three calls of four points (a kill); resume finishes the file with the values of a straight run."""
    model, _, _, batches = conv_problem
    train, test = Objective(model, batches, dtype=torch.float64), Objective(model, batches[:1], dtype=torch.float64)
    objectives = {"train": train, "test": test}
    directions, axes = random_directions(train, 2, seed=0), [grid_axis(-1, 1, 7)] * 2
    straight = compute_surface(objectives, directions, axes, path=tmp_path / "straight.h5", points_per_call=4)

    original, calls = PointEvaluator.evaluate, []

    def dies_on_the_seventh_call(self, W, buffers=None):
        calls.append(len(W))
        if len(calls) == 7:  # 3 blocks of train + test: some points written, most of the grid still to do
            raise KeyboardInterrupt
        return original(self, W, buffers)

    monkeypatch.setattr(PointEvaluator, "evaluate", dies_on_the_seventh_call)
    path = tmp_path / "killed.h5"
    with pytest.raises(KeyboardInterrupt):
        compute_surface(objectives, directions, axes, path=path, points_per_call=4)
    monkeypatch.setattr(PointEvaluator, "evaluate", original)
    partial = read_surface(path)
    assert 0 < partial.done.sum() < 49
    resumed = compute_surface(objectives, directions, axes, path=path, resume=True, points_per_call=4)
    assert resumed.complete
    for split in objectives:
        np.testing.assert_allclose(read_surface(path).loss[split], straight.loss[split], rtol=1e-12)
        np.testing.assert_array_equal(read_surface(path).accuracy[split], straight.accuracy[split])


def test_conv_bn_in_train_mode_matches_in_float32(conv_problem):
    """BN on the batch's own statistics (mode="train"): normalized per point inside the vmapped forward."""
    _, _, _, batches = conv_problem
    objective = Objective(tiny_convnet_bn(seed=1), batches, mode="train")
    _assert_same_as_one_per_call(objective, _points(objective))
