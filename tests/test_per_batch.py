"""Batch sharpness (landscape.curvature.per_batch) against ground truth: closed forms on least squares, dense
per-batch Hessians of a network, its interval from the batch values, and the command line's JSON."""

import json

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from landscape.curvature.per_batch import batch_sharpness
from landscape.engine.objective import Objective
from landscape.inputs.batches import mean_squared_error
from tests.ground_truth import dense_hessian, dense_reference
from tests.helpers import classification_batches, digits_mlp_checkpoint, run_cli


@pytest.mark.parametrize("seed", range(20))
def test_on_least_squares_each_batch_is_its_own_rayleigh_quotient(seed):
    g = torch.Generator().manual_seed(seed)
    d, sizes = 8, [16, 16, 16, 10]
    x = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64) * torch.logspace(0, 1, d, dtype=torch.float64)
    y = torch.randn(sum(sizes), 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    batches = list(zip(x.split(sizes), y.split(sizes)))
    found = batch_sharpness(Objective(model, batches, loss=mean_squared_error, dtype=torch.float64, device="cpu"))
    w = model.weight.detach().numpy().ravel()
    exact = []
    for xb, yb in batches:
        X, t = xb.numpy(), yb.numpy().ravel()
        H, grad = 2 * X.T @ X / len(t), 2 * X.T @ (X @ w - t) / len(t)  # L_B = mean((Xw − y)²)
        exact.append(grad @ H @ grad / (grad @ grad))
    np.testing.assert_allclose(found.batch_values, exact, rtol=1e-10)
    assert found.value == pytest.approx(np.mean(exact), rel=1e-10) and found.batch_sizes == tuple(sizes)
    half = scipy.stats.t.ppf(0.975, len(exact) - 1) * np.std(exact, ddof=1) / np.sqrt(len(exact))
    assert found.ci == pytest.approx((np.mean(exact) - half, np.mean(exact) + half), rel=1e-10)


def test_on_a_network_each_batch_matches_its_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    batches = classification_batches(60, (12,), 4, [20, 20, 20])[2]
    found = batch_sharpness(Objective(model, batches, dtype=torch.float64, device="cpu"))
    for value, batch in zip(found.batch_values, batches):
        H = dense_hessian(model, [batch], "eval")
        loss, w0 = dense_reference(model, [batch], "eval")
        g = torch.autograd.functional.jacobian(loss, w0)
        assert value == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-8)
    assert found.n_matvecs == 3


@pytest.mark.cli
def test_measure_saves_its_batches(tmp_path):
    checkpoint = digits_mlp_checkpoint(tmp_path, (16,))
    args = ["--metrics", "batch-sharpness", "--n-samples", "200", "--batch-size", "50", "--device", "cpu", "--json"]
    done = run_cli("measure", checkpoint, *args)
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)
    found = report["metrics"]["batch-sharpness"]
    assert len(found["batch_values"]) == 4 and found["ci"][0] <= found["value"] <= found["ci"][1]
