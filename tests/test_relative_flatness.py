"""Relative flatness (landscape.curvature.relative) against ground truth: the closed form of least squares, the closed
form of a cross-entropy head, dense float64 Hessians of a digits MLP's hidden layer, the coverage of the estimate's
95% interval over 200 seeds, its errors, and the command line."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.curvature.relative import default_layer, relative_flatness
from landscape.curvature.trace import hutchinson, xtrace
from landscape.engine.objective import Objective
from landscape.engine.operators import DenseOperator
from landscape.inputs.batches import mean_squared_error
from landscape.inputs.data import load_data
from landscape.statistics import binomial_interval
from tests.helpers import digits_mlp_checkpoint, one_line, run_cli


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data("digits")
    return data.x_train[:n].reshape(n, -1).double(), data.y_train[:n]


def _tanh_mlp(widths: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def _kappa(A: torch.Tensor, H: torch.Tensor) -> float:
    """Σ_{s,s'} A_ss' Tr H_{s,s'} from the dense (d·m)² Hessian block, H[s, t, s', t'] read straight off the definition."""
    d = A.shape[0]
    H = H.reshape(d, -1, d, H.shape[-1] // d)
    return sum(float(A[s, r]) * float(torch.diagonal(H[s, :, r, :]).sum()) for s in range(d) for r in range(d))


@pytest.mark.parametrize("seed", range(12))
def test_least_squares_closed_form(seed):
    """L = mean_i ‖Wx_i − y_i‖²/d has H_WW = (2/d)·I_d ⊗ C, C = mean xxᵀ, so κ = (2/d)·‖W‖²_F·tr C; with d > m the Gram
    matrix WWᵀ has rank m and the exact value takes m² products, not d·m."""
    g = torch.Generator().manual_seed(seed)
    d, m = [(3, 7), (7, 3), (5, 5)][seed % 3]
    sizes = [13, 13, 6]
    x = torch.randn(sum(sizes), m, generator=g, dtype=torch.float64) * torch.logspace(0, 1, m, dtype=torch.float64)
    y = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64)
    model = nn.Linear(m, d, bias=seed % 2 == 0).double()  # a bias is no part of W and leaves H_WW as it is
    with torch.no_grad():
        model.weight.copy_(torch.randn(d, m, generator=g, dtype=torch.float64))
    objective = Objective(model, list(zip(x.split(sizes), y.split(sizes))), loss=mean_squared_error, dtype=torch.float64)
    found = relative_flatness(objective)
    C = x.T @ x / len(x)
    expected = 2 / d * float(model.weight.detach().square().sum()) * float(torch.trace(C))
    assert found.value == pytest.approx(expected, rel=1e-10)
    assert found.method == "exact" and found.stderr == 0 and found.ci == (found.value, found.value)
    assert found.layer == "weight" and found.shape == (d, m) and found.rank == min(d, m)
    assert found.n_matvecs == min(d, m) * m == found.exact_matvecs


@pytest.mark.parametrize("seed", range(2))
def test_cross_entropy_head_closed_form(seed):
    """For the last layer of a classifier the Hessian block is mean_i φ_iφ_iᵀ ⊗ (diag p_i − p_i p_iᵀ), so
    κ = mean_i ‖φ_i‖²·(Σ_s A_ss p_is − p_iᵀ A p_i) with A = WWᵀ: no Hessian needed."""
    model = _tanh_mlp((64, 12, 10), seed)
    x, y = _digits(80)
    found = relative_flatness(Objective(model, [(x[:50], y[:50]), (x[50:], y[50:])], dtype=torch.float64))
    assert found.layer == "2.weight" and found.shape == (10, 12)
    with torch.no_grad():
        phi = model[:2](x)
        p = F.softmax(model[2](phi), dim=1)
        W = model[2].weight
        A = W @ W.T
        per_sample = phi.square().sum(1) * (p @ torch.diagonal(A) - ((p @ A) * p).sum(1))
    assert found.value == pytest.approx(float(per_sample.mean()), rel=1e-10)


def _layer_hessian(model: nn.Module, batches, name: str) -> torch.Tensor:
    """The dense float64 Hessian of the sample-weighted cross-entropy with respect to the one parameter `name`."""
    params, total = dict(model.named_parameters()), sum(len(y) for _, y in batches)
    weight = params[name].detach()

    def loss(value: torch.Tensor) -> torch.Tensor:
        state = {**{n: p.detach() for n, p in params.items()}, name: value}
        return sum(len(y) / total * F.cross_entropy(torch.func.functional_call(model, state, (x,)), y) for x, y in batches)

    return torch.autograd.functional.hessian(loss, weight, vectorize=True).reshape(weight.numel(), weight.numel())


def test_a_hidden_layer_against_the_dense_hessian():
    """κ of a hidden layer, where no closed form holds, against the dense float64 Hessian read as the definition."""
    model = _tanh_mlp((64, 16, 12, 10), 1)
    x, y = _digits(60)
    batches = [(x[:40], y[:40]), (x[40:], y[40:])]
    found = relative_flatness(Objective(model, batches, dtype=torch.float64), "2.weight")
    W = model[2].weight.detach()
    assert found.value == pytest.approx(_kappa(W @ W.T, _layer_hessian(model, batches, "2.weight")), rel=1e-10)
    assert found.method == "exact" and found.n_matvecs == 12 * 16


@pytest.mark.slow
def test_a_layer_of_thousands_of_weights_against_the_dense_hessian():
    """1920 weights (40×48) of a digits MLP's hidden layer: the exact value (1920 products) against the dense Hessian."""
    model = _tanh_mlp((64, 48, 40, 10), 2)
    x, y = _digits(200)
    batches = [(x[:128], y[:128]), (x[128:], y[128:])]
    found = relative_flatness(Objective(model, batches, dtype=torch.float64), "2.weight", method="exact", block_size=64)
    W = model[2].weight.detach()
    assert found.value == pytest.approx(_kappa(W @ W.T, _layer_hessian(model, batches, "2.weight")), rel=1e-10)
    assert found.n_matvecs == W.numel() and found.rank == 40


@pytest.fixture(scope="module")
def dense_problem():
    """A briefly trained digits MLP, the dense Hessian of its head (zero elsewhere: κ reads only that block) as the
    operator, and the exact κ of the head."""
    model = _tanh_mlp((64, 12, 10), 3)
    x, y = _digits(150)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    batches = [(x, y)]
    objective = Objective(model, batches, dtype=torch.float64)
    part = objective.layout.slices()["2.weight"]
    dense = torch.zeros(objective.n_params, objective.n_params, dtype=torch.float64)
    dense[part, part] = _layer_hessian(model, batches, "2.weight")
    hessian = DenseOperator(dense)
    return objective, hessian, relative_flatness(objective, hessian=hessian, method="exact").value


@pytest.mark.parametrize("estimator", [xtrace, hutchinson], ids=["xtrace", "hutchinson"])
def test_the_estimates_interval_covers_the_exact_value(dense_problem, estimator):
    """200 seeds of the 20-product estimate of a 120-dimensional operator: its 95% interval holds the exact value in
    a share of seeds whose own 95% binomial interval holds 0.95."""
    objective, hessian, exact = dense_problem
    hits, z = 0, []
    for seed in range(200):
        r = relative_flatness(objective, hessian=hessian, method="estimate", trace=estimator, n_matvecs=20, seed=seed)
        assert r.method == estimator.__name__ and r.n_matvecs == 20 and r.stderr > 0
        hits += r.ci[0] <= exact <= r.ci[1]
        z.append((r.value - exact) / r.stderr)
    low, high = binomial_interval(hits, 200)
    assert low <= 0.95 <= high, (hits, float(np.sqrt(np.mean(np.square(z)))))


def test_auto_estimates_past_its_exact_budget(dense_problem):
    objective, hessian, exact = dense_problem
    auto = relative_flatness(objective, hessian=hessian, n_matvecs=20, max_exact=100)  # the exact value takes 120
    assert auto.method == "xtrace" and auto.n_matvecs == 20 and auto.exact_matvecs == 120
    assert relative_flatness(objective, hessian=hessian, n_matvecs=20, max_exact=120).method == "exact"


def test_errors_name_the_parameter():
    model = _tanh_mlp((64, 12, 10))
    x, y = _digits(20)
    objective = Objective(model, [(x, y)], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer='9.weight' is not a parameter of the model .*0.weight, 2.weight"):
        relative_flatness(objective, "9.weight")
    with pytest.raises(ValueError, match=r"layer='2.bias' has shape \(10,\); relative flatness takes a 2-d weight"):
        relative_flatness(objective, "2.bias")
    with pytest.raises(ValueError, match=r"method='fast'"):
        relative_flatness(objective, method="fast")
    heads_fixed = Objective(model, [(x, y)], dtype=torch.float64, params="re:^0\\.")
    with pytest.raises(ValueError, match=r"layer='2.weight' is not among the measured parameters \(params='re:\^0\\\\.'\)"):
        relative_flatness(heads_fixed, "2.weight")
    assert default_layer(heads_fixed) == "0.weight"  # the last nn.Linear weight measured


@pytest.mark.cli
def test_measure_prints_it_and_names_the_flag(tmp_path):
    checkpoint = digits_mlp_checkpoint(tmp_path, (16,))
    common = ["--n-samples", "100", "--device", "cpu"]
    done = run_cli("measure", checkpoint, "--metrics", "relative-flatness", *common, "--json")
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)
    found = report["metrics"]["relative-flatness"]
    assert found["layer"] == "3.weight" and found["method"] == "exact" and found["n_matvecs"] == 160 and found["value"] > 0
    bad = run_cli("measure", checkpoint, "--metrics", "relative-flatness", "--relative-flatness-layer", "3.bias", *common)
    assert "--relative-flatness-layer 3.bias has shape (10,)" in one_line(bad)
