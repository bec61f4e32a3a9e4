"""Pytest hooks and fixtures only; the shared helpers live in tests/helpers.py (`from tests.helpers import ...`)."""

import os

import pytest
import torch

from tests.helpers import classification_batches, tiny_convnet_bn, tiny_mlp  # what the fixtures below build on

EDIT_LOOP_SKIPS = ("slow", "cli", "distributed")  # what the default run leaves out; `pytest --all` (CI) runs everything

if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n N`: N workers share the cores, one thread each (more thrash)
    torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--all",
        action="store_true",
        help="run every test, the slow, cli and distributed ones too (CI); by default they are left out",
    )


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


@pytest.fixture
def mlp_problem():
    x, y, batches = classification_batches(50, (12,), 4, [20, 20, 10])
    return tiny_mlp(), x, y, batches


@pytest.fixture
def conv_problem():
    x, y, batches = classification_batches(40, (1, 4, 4), 3, [16, 16, 8])
    return tiny_convnet_bn(), x, y, batches


@pytest.fixture
def one_thread():
    """One torch thread for the test: small dense products and hundreds of tiny steps run faster on one than on
    two fighting over a loaded machine, and the suite's time depends less on the load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
