"""Per-layer curvature (landscape.curvature.blocks, `landscape measure --per-layer`, analysis.report.charts.plot_per_layer) against the
dense Hessian's diagonal blocks of a small MLP."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from analysis.report.charts import plot_per_layer, save
from landscape.curvature.blocks import BlockOperator, module_blocks, per_layer
from landscape.curvature.trace import hutchinson, hutchpp, xtrace
from landscape.engine.objective import Objective
from landscape.engine.operators import DenseOperator, HessianOperator
from landscape.engine.params import FlatLayout, select_parameters
from tests.ground_truth import dense_hessian
from tests.helpers import classification_batches, dense, digits_mlp_checkpoint, run_cli, tiny_mlp

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mlp():
    """The Objective of a 12-8-4 MLP (140 parameters in blocks 1 and 3) and its dense Hessian."""
    _, _, batches = classification_batches(50, (12,), 4, [20, 20, 10])
    model = tiny_mlp()
    objective = Objective(model, batches, dtype=torch.float64, device="cpu")
    return objective, dense_hessian(model, batches, "eval").numpy()


def test_one_block_per_module_that_owns_parameters(mlp):
    objective, _ = mlp
    assert module_blocks(objective.layout) == {"1": slice(0, 104), "3": slice(104, 140)}
    net = nn.Sequential(nn.Linear(3, 2), nn.Sequential(nn.LayerNorm(2), nn.Linear(2, 1, bias=False)))
    net.register_parameter("temperature", nn.Parameter(torch.ones(1)))
    params = dict(net.named_parameters())

    def layout(selection):
        return FlatLayout.of({n: params[n] for n in select_parameters(net, selection)})

    assert module_blocks(layout("weights")) == {"0": slice(0, 6), "1.1": slice(6, 8)}
    assert module_blocks(layout("all")) == {"(model)": slice(0, 1), "0": slice(1, 9), "1.0": slice(9, 13), "1.1": slice(13, 15)}


def test_block_operator_is_the_diagonal_block():
    a, op = dense(np.linspace(-1, 3, 9), seed=1)
    V = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # 3 probes, as rows
    restricted = BlockOperator(op, slice(2, 6))
    assert restricted.shape == (4, 4)
    np.testing.assert_allclose(restricted.products(V).numpy(), V.numpy() @ a[2:6, 2:6].T, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("trace", [xtrace, hutchinson, hutchpp], ids=lambda f: f.__name__)
def test_block_eigenvalues_and_traces_equal_the_dense_diagonal_blocks(mlp, trace):
    objective, H = mlp
    blocks = module_blocks(objective.layout)
    result = per_layer(HessianOperator(objective), blocks, tol=1e-10, trace=trace, n_probes=60, seed=3)
    assert [b.name for b in result.blocks] == ["1", "3"] and [b.n_params for b in result.blocks] == [104, 36]
    full_top = np.linalg.eigvalsh(H)[-1]
    for row, block in zip(result.blocks, blocks.values()):
        H_bb = H[block, block]
        top = np.linalg.eigvalsh(H_bb)[-1]
        assert row.lambda1 == pytest.approx(top, rel=1e-6) and row.converged and abs(row.lambda1 - top) <= row.residual
        assert row.lambda1 < full_top * (1 - 1e-3)  # the block's, not the whole Hessian's (interlacing: ≤ it)
        assert abs(row.trace - np.trace(H_bb)) < 4 * row.trace_stderr, (row.name, row.trace, np.trace(H_bb))
    total = result.trace_estimate
    assert sum(b.trace for b in result.blocks) == pytest.approx(total.estimate, rel=1e-10)
    assert abs(total.estimate - np.trace(H)) < 4 * total.stderr
    assert result.n_matvecs == total.n_matvecs + sum(b.eig_matvecs for b in result.blocks)
    assert json.loads(json.dumps(result.to_dict()))["blocks"][0]["name"] == "1"


def test_one_metric_alone_and_bad_metrics():
    _, op = dense(np.arange(1.0, 7.0))
    blocks = {"a": slice(0, 2), "b": slice(2, 6)}
    only_trace = per_layer(op, blocks, ["trace"], n_probes=10)
    assert all(b.lambda1 is None and b.trace is not None and b.eig_matvecs == 0 for b in only_trace.blocks)
    only_eig = per_layer(op, blocks, ["eig"])
    assert all(b.trace is None and b.lambda1 is not None for b in only_eig.blocks) and only_eig.trace_estimate is None
    for bad in (["eigs"], []):
        with pytest.raises(ValueError, match="choose from eig, trace"):
            per_layer(op, blocks, bad)


# ------------------------------------------------------------------------------------------- CLI
MEASURE = [
    "--dtype",
    "float64",
    "--n-samples",
    "100",
    "--batch-size",
    "50",
    "--metrics",
    "eig",
    "--k",
    "1",
    "--tol",
    "1e-8",
    "--trace-method",
    "hutchinson",
    "--probes",
    "20",
    "--quiet",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return digits_mlp_checkpoint(tmp_path_factory.mktemp("ckpt"), hidden=(8,))


@pytest.mark.cli
def test_measure_per_layer_rows_name_the_models_layers(checkpoint):
    result = run_cli("measure", checkpoint, "--per-layer", "eig,trace", "--json", *MEASURE)
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)
    rows = report["per_layer"]["blocks"]
    assert [(r["name"], r["n_params"]) for r in rows] == [("1", 64 * 8 + 8), ("3", 8 * 10 + 10)]  # Flatten, Linear, ReLU, Linear
    assert all(r["converged"] and r["lambda1"] < report["metrics"]["eig"]["values"][0] + 1e-8 for r in rows)
    assert sum(r["trace"] for r in rows) == pytest.approx(report["per_layer"]["trace_estimate"]["estimate"], rel=1e-10)
    table = run_cli("measure", checkpoint, "--per-layer", "trace", *MEASURE)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.split("per-layer Hessian")[1].splitlines()
    assert lines[1].split() == ["block", "n", "params", "λ1", "±", "residual", "trace", "±", "stderr"]
    assert lines[3].split()[:3] == ["1", "520", "—"] and lines[4].split()[:3] == ["3", "90", "—"]


@pytest.mark.cli
def test_measure_without_per_layer_is_unchanged_and_a_bad_list_is_one_line(checkpoint):
    plain = run_cli("measure", checkpoint, "--json", *MEASURE)
    assert plain.returncode == 0 and "per_layer" not in json.loads(plain.stdout)[0]
    bad = run_cli("measure", checkpoint, "--per-layer", "eig,spectrum", *MEASURE)
    assert (
        bad.returncode == 2
        and bad.stderr.strip()
        == "landscape measure: error: --per-layer: unknown metric spectrum; choose from eig, trace, density"
    )


def test_plot_per_layer_draws_two_checkpoints(mlp, tmp_path):
    objective, _ = mlp
    op, blocks = HessianOperator(objective), module_blocks(objective.layout)
    results = {
        "SGD": per_layer(op, blocks, n_probes=20, seed=0),
        "SmoothOut": per_layer(DiagonalHalf(op), blocks, n_probes=20, seed=1),
    }
    fig = plot_per_layer(results)
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "3"]
    assert len(fig.axes[1].patches) == 4  # two blocks × two checkpoints
    assert save(fig, tmp_path / "per-layer.png").read_bytes().startswith(PNG)


class DiagonalHalf(DenseOperator):
    """H/2 as a second 'checkpoint' with smaller curvature."""

    def __init__(self, op: HessianOperator) -> None:
        super().__init__(op.products(torch.eye(op.shape[0], dtype=op.dtype)) / 2)
