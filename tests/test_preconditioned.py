"""Preconditioned sharpness λ1(P⁻¹H) against ground truth: P read from each optimizer's state equals the denominator
its own step divides by; λ1..λk equal the dense non-symmetric P⁻¹H's eigenvalues (a digits MLP, 100 random problems
with clustered spectra); each threshold is where the frozen-P recursion on a quadratic turns unstable."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.curvature.preconditioned import (
    OptimizerSettings,
    Preconditioner,
    preconditioned_sharpness,
    preconditioner_from_state,
    preconditioner_of,
)
from landscape.engine.objective import Objective
from landscape.inputs.checkpoints import CheckpointError, load_checkpoint, load_optimizer_state, save_checkpoint
from landscape.inputs.models import model_for_data
from tests.helpers import one_line, run_cli


def _digits(n: int = 256):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:n] / 16.0, dtype=torch.float64)
    return x, torch.tensor(data.target[:n])


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _dense_hessian(objective: Objective) -> torch.Tensor:
    w = objective.w.clone()
    names, shapes = objective.layout.names, objective.layout.shapes
    model = objective.model

    def loss(flat: torch.Tensor) -> torch.Tensor:
        tensors, start = {}, 0
        for name, shape in zip(names, shapes):
            tensors[name] = flat[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        total = 0.0
        for (x, y), weight in zip(objective.batches, objective.batch_weights):
            total = total + weight * F.cross_entropy(torch.func.functional_call(model, tensors, (x,)), y)
        return total

    return torch.autograd.functional.hessian(loss, w)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=1e-3),
        lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True, eps=1e-6),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
        lambda p: torch.optim.RMSprop(p, lr=1e-3),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
        lambda p: torch.optim.Adagrad(p, lr=1e-2),
    ],
    ids=["adam", "amsgrad", "adamw", "rmsprop", "rmsprop-momentum-centred", "adagrad"],
)
def test_P_is_the_denominator_the_optimizers_own_step_divides_by(make):
    """w_{t+1} − w_t = −η·u_t/P_t with P_t read from the state after step t: the step torch took, reproduced."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    x, y = _digits(128)
    optimizer = make(model.parameters())
    _steps(model, optimizer, x, y, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _steps(model, optimizer, x, y, 1)
    P = preconditioner_of(optimizer, model)
    group = optimizer.param_groups[0]
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        if P.settings.optimizer in ("adam", "adamw"):
            direction = state["exp_avg"] / (1 - group["betas"][0] ** int(state["step"]))
            decay = before[name] * group["lr"] * group["weight_decay"] if P.settings.optimizer == "adamw" else 0
        elif P.settings.optimizer == "rmsprop" and group["momentum"]:
            direction, decay = state["momentum_buffer"] * P.diagonal[name], 0  # buf = μ·buf + g/P: the step is η·buf
        else:
            direction, decay = p.grad, 0
        clr = group["lr"] / (1 + (int(state["step"]) - 1) * group.get("lr_decay", 0.0))
        expected = before[name] - decay - clr * direction / P.diagonal[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12)
    assert P.settings.step == 5 and P.settings.lr == group["lr"]


def test_the_digits_mlp_top_five_equal_the_dense_eigenvalues_of_P_inverse_H():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()  # 1210 parameters
    x, y = _digits(256)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    _steps(model, optimizer, x, y, 40)
    P = preconditioner_of(optimizer, model)
    objective = Objective(model, [(x[:128], y[:128]), (x[128:], y[128:])], dtype=torch.float64, device="cpu")
    found = preconditioned_sharpness(objective, P, k=5, tol=1e-6)
    H = _dense_hessian(objective).numpy()
    p = P.flat(objective).numpy()
    truth = np.sort(np.linalg.eigvals(H / p[:, None]).real)[::-1][:5]  # P⁻¹H itself, not the symmetric form
    assert found.spectrum.certified
    assert np.all(np.abs(found.spectrum.values - truth) <= found.spectrum.error_bounds + 1e-9 * truth[0])
    np.testing.assert_allclose(found.spectrum.values, truth, rtol=1e-5)
    assert found.threshold == pytest.approx(38 / 3e-3) and found.ratio == pytest.approx(truth[0] / (38 / 3e-3), rel=1e-5)
    assert 1 < truth[0] / np.linalg.eigvalsh(H)[-1]  # the preconditioner matters here: P⁻¹H is not a rescaled H


def test_certified_values_hold_their_bounds_over_100_problems_with_clustered_spectra():
    """Least squares f(x) = xᵀw with H = XᵀX/N built to have a close top pair (gap 0.1%–5%) and P spanning 3 decades."""
    misses, certified = 0, 0
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        d = 24
        P = torch.exp(torch.empty(d, dtype=torch.float64).uniform_(-3, 3, generator=g))
        gap = float(torch.empty(1).uniform_(1e-3, 5e-2, generator=g))
        target = torch.cat([torch.tensor([1.0, 1.0 - gap, 0.6]), torch.rand(d - 3, generator=g, dtype=torch.float64) * 0.5])
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        D = P.sqrt()
        H = torch.diag(D) @ Q @ torch.diag(target) @ Q.T @ torch.diag(D)  # D⁻¹HD⁻¹ = Q·diag(target)·Qᵀ
        L = torch.linalg.cholesky(H + 1e-12 * torch.eye(d, dtype=torch.float64))
        X = L.T * math.sqrt(d)  # (1/d)·XᵀX = H; the loss ½·mean((Xw)²) has Hessian H
        model = nn.Linear(d, 1, bias=False).double()
        objective = Objective(
            model, [(X, torch.zeros(d, 1, dtype=torch.float64))], loss_fn=_half_mse, dtype=torch.float64, device="cpu"
        )
        precond = Preconditioner({"weight": P.reshape(1, -1)}, OptimizerSettings("adam", 1e-3, 0.9, "averaged", 0.0, 0.0, 1))
        found = preconditioned_sharpness(objective, precond, k=2, seed=seed)
        if found.spectrum.certified:
            certified += 1
            misses += int(np.any(np.abs(found.spectrum.values - target[:2].numpy()) > found.spectrum.error_bounds))
    assert certified >= 95 and misses == 0


def _half_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs - targets).pow(2).mean()


@pytest.mark.parametrize("style", ["averaged", "heavy-ball", "none"])
def test_each_threshold_is_where_the_frozen_P_recursion_turns_unstable(style):
    """A 1-D quadratic of curvature h under P fixed: bounded just below the threshold, growing just above it."""
    lr, beta, p = 0.01, 0.9, 0.25
    threshold = OptimizerSettings("x", lr, beta, style, 0.0, 0.0, 1).threshold

    def largest(factor: float) -> float:
        h, w, u = factor * threshold * p, 1.0, 0.0
        for _ in range(4000):
            g = h * w
            u = {"averaged": beta * u + (1 - beta) * g, "heavy-ball": beta * u + g / p, "none": g}[style]
            w -= lr * (u / p if style != "heavy-ball" else u)
            if abs(w) > 1e6:
                break
        return abs(w)

    assert largest(0.98) < 1.0 and largest(1.02) > 1e3


def test_bad_optimizer_states_get_one_clear_error():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    names = [n for n, _ in model.named_parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    _steps(model, sgd, x, y, 1)
    with pytest.raises(ValueError, match="unsupported optimizer state"):
        preconditioner_from_state(sgd.state_dict(), names)
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="has not taken a step"):
        preconditioner_from_state(fresh.state_dict(), names)
    adam = torch.optim.Adam(model.parameters())
    _steps(model, adam, x, y, 1)
    with pytest.raises(ValueError, match="holds 4 parameters and the model 3"):
        preconditioner_from_state(adam.state_dict(), names[:3])
    with pytest.raises(ValueError, match="shape"):
        preconditioner_from_state(adam.state_dict(), names, {names[0]: torch.Size([9, 9])})
    with pytest.raises(ValueError, match="not a torch optimizer state_dict"):
        preconditioner_from_state({"weight": torch.zeros(2)}, names)
    two = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}])
    _steps(model, two, x, y, 1)
    with pytest.raises(ValueError, match="2 parameter groups and no parameter names"):
        preconditioner_from_state(two.state_dict(), names)
    named = torch.optim.Adam([{"params": model[0].named_parameters()}, {"params": model[2].named_parameters(), "lr": 0.5}])
    _steps(model, named, x, y, 1)
    with pytest.raises(ValueError, match="differ in lr or momentum"):
        preconditioner_from_state(named.state_dict())
    # decay and no-decay groups (a HuggingFace Trainer's split) in the groups' order, not the model's: read by name
    split = torch.optim.AdamW(
        [
            {"params": [model[0].weight, model[2].weight], "param_names": ["0.weight", "2.weight"], "weight_decay": 0.1},
            {"params": [model[0].bias, model[2].bias], "param_names": ["0.bias", "2.bias"], "weight_decay": 0.0},
        ]
    )
    _steps(model, split, x, y, 2)
    P = preconditioner_from_state(split.state_dict())
    for name, p in model.named_parameters():
        v = split.state[p]["exp_avg_sq"] / (1 - 0.999**2)
        torch.testing.assert_close(P.diagonal[name], v.double().sqrt() + 1e-8)


def test_a_checkpoint_keeps_its_optimizer_state_in_each_format(tmp_path):
    """Toolkit checkpoints (with parameter names), foreign dicts, bare optimizer files; none: one line."""
    torch.manual_seed(0)
    model, spec = model_for_data("mlp", (1, 8, 8), 10, hidden=(8,))
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    _steps(model, adam, torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)), 2)
    state = adam.state_dict()
    torch.save({"model": model.state_dict(), "optimizer_state_dict": state}, tmp_path / "foreign.pt")
    torch.save(state, tmp_path / "optimizer.pt")
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pt")
    for name in ("foreign.pt", "optimizer.pt"):
        loaded = load_optimizer_state(tmp_path / name)
        torch.testing.assert_close(loaded["state"][0]["exp_avg_sq"], state["state"][0]["exp_avg_sq"])
    assert load_checkpoint(tmp_path / "foreign.pt").optimizer_state is not None
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_optimizer_state(tmp_path / "weights.pt")
    P = preconditioner_from_state(load_optimizer_state(tmp_path / "optimizer.pt"), [n for n, _ in model.named_parameters()])
    torch.testing.assert_close(P.diagonal, preconditioner_of(adam, model).diagonal)


def test_training_with_adam_keeps_the_state_with_parameter_names_and_sgd_keeps_none(tmp_path):
    from landscape.training.loop import TrainConfig, train

    for optimizer, kept in (("adam", True), ("sgd", False)):
        config = TrainConfig(
            data="digits", model="mlp", model_kwargs={"hidden": [8]}, optimizer=optimizer, lr=0.01, epochs=1, batch_size=256
        )
        final = train(config, tmp_path / optimizer, progress=False)
        state = load_checkpoint(final).optimizer_state
        assert (state is not None) == kept
        if kept:
            names = [n for g in state["param_groups"] for n in g["param_names"]]
            assert names == [n for n, _ in load_checkpoint(final).build_model().named_parameters()]


@pytest.mark.cli
def test_measure_prints_it_against_its_threshold_and_refuses_a_checkpoint_without_state(tmp_path):
    torch.manual_seed(0)
    model, spec = model_for_data("mlp", (1, 8, 8), 10, hidden=(16,))
    x, y = _digits(256)
    adam = torch.optim.Adam(model.parameters(), lr=2e-3)
    _steps(model, adam, x.float().reshape(-1, 1, 8, 8), y, 30)
    data = {"spec": "digits", "seed": 0, "normalize": None}
    adam_path = save_checkpoint(tmp_path / "adam.pt", model, model_spec=spec, data_spec=data, optimizer_state=adam.state_dict())
    plain = save_checkpoint(tmp_path / "plain.pt", model, model_spec=spec, data_spec=data)
    torch.save(adam.state_dict(), tmp_path / "optimizer.pt")
    for args in ((adam_path,), (plain, "--optimizer-state", tmp_path / "optimizer.pt")):
        result = run_cli("measure", *args, "--metrics", "preconditioned-sharpness", "--n-samples", "256", "--k", "2")
        assert result.returncode == 0, result.stderr
        assert "λ1(P⁻¹H)" in result.stdout and "threshold (2+2β1)/(η(1−β1))" in result.stdout
        assert "19000" in result.stdout  # 38/η at η = 2e-3
    line = one_line(run_cli("measure", plain, "--metrics", "preconditioned-sharpness"), code=2)
    assert "holds no optimizer state" in line


@pytest.mark.cli
def test_track_measures_it_from_each_checkpoints_own_state_and_says_which_it_leaves_out(tmp_path):
    from landscape.training.loop import TrainConfig, train

    config = TrainConfig(data="digits", model="mlp", model_kwargs={"hidden": [8]}, optimizer="adam", lr=0.003, epochs=2)
    train(config, tmp_path / "run", progress=False)
    result = run_cli("track", tmp_path / "run", "--metrics", "preconditioned-sharpness", "--n-samples", "200", "--k", "1")
    assert result.returncode == 0, result.stderr
    assert "leaving out epoch_0000.pt: no optimizer step before it" in result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1] in ("1", "2")]
    assert [row[0] for row in rows] == ["1", "2"]
    for row, epoch in zip(rows, (1, 2)):
        checkpoint = tmp_path / "run" / "trajectory" / f"epoch_{epoch:04d}.pt"
        alone = run_cli("measure", checkpoint, "--metrics", "preconditioned-sharpness", "--n-samples", "200", "--json")
        value = json.loads(alone.stdout)[0]["metrics"]["preconditioned-sharpness"]["spectrum"]["values"][0]
        assert float(row[-2]) == pytest.approx(value, rel=2e-3)
