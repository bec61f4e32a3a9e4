"""Shared tiny problems: small enough for a dense Hessian, rich enough to catch mistakes."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from landscape.operators import DenseOperator

EDIT_LOOP_SKIPS = ("slow", "cli", "distributed")  # what the default run leaves out; `pytest --all` (CI) runs everything


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all", action="store_true",
                     help="run every test, the slow, cli and distributed ones too (CI); by default they are left out")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The default run is the edit-test loop (about 2 minutes on 2 cores): tests marked slow, cli or distributed are
    deselected unless --all or a -m expression is given."""
    if config.getoption("--all") or config.getoption("markexpr"):
        return
    kept, left_out = [], []
    for item in items:
        (left_out if any(item.get_closest_marker(m) for m in EDIT_LOOP_SKIPS) else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


def dense(eigenvalues, seed=0, dtype=torch.float64):
    """Q diag(λ) Qᵀ with a random orthogonal Q: (numpy matrix, DenseOperator)."""
    eigenvalues = np.asarray(eigenvalues, dtype=float)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigenvalues), len(eigenvalues))))
    a = (q * eigenvalues) @ q.T
    a = (a + a.T) / 2
    return a, DenseOperator(torch.tensor(a, dtype=dtype))


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4))


def tiny_convnet_bn(seed: int = 0) -> nn.Module:
    """Conv + BatchNorm + ReLU + linear head on 1x4x4 inputs (~150 parameters)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Softplus(),
        nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Softplus(),
        nn.Flatten(), nn.Linear(8, 3),
    )
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def classification_batches(n: int, in_shape: tuple, n_classes: int, sizes: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *in_shape, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    out, start = [], 0
    for s in sizes:
        out.append((x[start:start + s], y[start:start + s]))
        start += s
    assert start == n
    return x, y, out


@pytest.fixture
def mlp_problem():
    x, y, batches = classification_batches(50, (12,), 4, [20, 20, 10])
    return tiny_mlp(), x, y, batches


@pytest.fixture
def conv_problem():
    x, y, batches = classification_batches(40, (1, 4, 4), 3, [16, 16, 8])
    return tiny_convnet_bn(), x, y, batches


def cli_command() -> list[str]:
    """The installed `landscape` console script, or the module when it is not installed."""
    script = Path(sys.executable).with_name("landscape")
    return [str(script)] if script.exists() else [sys.executable, "-m", "analysis.cli"]


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run `landscape ARGS` as a real process."""
    return subprocess.run(cli_command() + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=600)


def digits_mlp_checkpoint(folder: Path, hidden: tuple[int, ...], seed: int = 0) -> Path:
    """An untrained digits MLP saved as FOLDER/net.pt, a toolkit checkpoint, for CLI tests that need any checkpoint."""
    from landscape.checkpoints import save_checkpoint
    from landscape.models import model_for_data

    torch.manual_seed(seed)
    model, spec = model_for_data("mlp", (1, 8, 8), 10, hidden=hidden)
    return save_checkpoint(Path(folder) / "net.pt", model, model_spec=spec,
                           data_spec={"spec": "digits", "seed": 0, "normalize": None})
