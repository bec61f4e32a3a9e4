"""The Fisher–Rao norm against ground truth: per-sample gradients written out, and Liang et al.'s identity for
bias-free ReLU networks, ⟨w, Fw⟩ = L²·mean(⟨∂ℓ/∂f, f⟩²)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.curvature.fisher_rao import fisher_rao_norm
from landscape.engine.objective import Objective
from tests.helpers import bias_free_relu_mlp, classification_batches, digits_mlp_checkpoint, run_cli


def _per_sample_gradients(model: nn.Module, batches) -> torch.Tensor:
    rows = []
    for x, y in batches:
        for i in range(len(y)):
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1].double()), y[i : i + 1]).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize("seed", range(5))
def test_the_norm_is_the_mean_squared_projection_of_per_sample_gradients_on_w(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    batches = classification_batches(48, (12,), 4, [16, 32], seed=seed)[2]
    found = fisher_rao_norm(Objective(model, batches, dtype=torch.float64, device="cpu"))
    G = _per_sample_gradients(model, batches)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert found.value == pytest.approx(float((G @ w).square().mean()), rel=1e-10)
    assert found.n_params == w.numel() and found.n_matvecs == 1


def test_liang_et_al_identity_for_a_bias_free_relu_network():
    torch.manual_seed(0)
    layers = 3
    model = bias_free_relu_mlp((12, 20, 20, 4))
    batches = classification_batches(64, (12,), 4, [64])[2]
    found = fisher_rao_norm(Objective(model, batches, dtype=torch.float64, device="cpu"))
    x, y = batches[0]
    with torch.no_grad():
        f = model(x.double())
        dl_df = F.softmax(f, dim=1) - F.one_hot(y, 4).double()
    assert found.value == pytest.approx(layers**2 * float((dl_df * f).sum(1).square().mean()), rel=1e-9)


@pytest.mark.cli
def test_measure_prints_it(tmp_path):
    checkpoint = digits_mlp_checkpoint(tmp_path, (16,))
    done = run_cli("measure", checkpoint, "--metrics", "fisher-rao", "--n-samples", "100", "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)
    assert report["metrics"]["fisher-rao"]["value"] > 0
