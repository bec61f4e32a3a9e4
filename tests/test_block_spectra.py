"""Block spectra by role (landscape.curvature.blocks's role_blocks, BlockOperator of several slices, per_layer's
density; `landscape measure --per-layer-by role`; analysis.report.charts.plot_block_spectra) against the dense Hessian's
principal submatrices of a two-layer GPT-2."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from analysis.report.charts import plot_block_spectra, save
from landscape.curvature.blocks import BlockOperator, block_slices, parameter_blocks, parameter_roles, per_layer, role_blocks
from landscape.curvature.trace import hutchinson
from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator
from landscape.engine.params import FlatLayout
from landscape.inputs.batches import token_cross_entropy
from landscape.inputs.models import build_model
from tests.helpers import dense, reference_lm_loss, run_cli, token_batches

transformers = pytest.importorskip("transformers")

PNG = b"\x89PNG\r\n\x1a\n"
VOCAB = 100


def gpt2(n_embd: int = 8, tied: bool = True):
    """A two-layer GPT-2 (two heads, vocabulary 100, MLP width n_embd), float64, eval mode, seed 0."""
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=n_embd,
        n_head=2,
        n_inner=n_embd,
        vocab_size=VOCAB,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


class TinyTransformer(nn.Module):
    """A ViT-like model in plain torch: class token and position embedding owned by the model itself, a linear patch
    embedding, two nn.TransformerEncoderLayer (nn.MultiheadAttention, linear1/linear2, norm1/norm2), a norm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.patch_embed = nn.Linear(16, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)


def layout_of(model: nn.Module) -> FlatLayout:
    return FlatLayout.of(dict(model.named_parameters()))


def covered(blocks: dict, n: int) -> np.ndarray:
    """How many blocks hold each coordinate of [0, n)."""
    count = np.zeros(n, int)
    for parts in blocks.values():
        for s in block_slices(parts, n):
            count[s] += 1
    return count


# ------------------------------------------------------------------------------------------- roles
def test_gpt2_roles_partition_the_parameters_and_tied_weights_count_once():
    model = gpt2(32)
    layout = layout_of(model)
    blocks = role_blocks(model, layout)
    assert list(blocks) == ["embedding", "attention", "mlp", "norm"]  # lm_head is wte: no head block
    assert (covered(blocks, layout.size) == 1).all()  # every coordinate in exactly one block
    roles = parameter_roles(model, layout.names)
    assert roles["transformer.wte.weight"] == roles["transformer.wpe.weight"] == "embedding"
    assert roles["transformer.h.1.attn.c_attn.weight"] == roles["transformer.h.0.attn.c_proj.bias"] == "attention"
    assert roles["transformer.h.1.mlp.c_fc.weight"] == roles["transformer.h.0.mlp.c_proj.weight"] == "mlp"
    assert roles["transformer.h.0.ln_2.bias"] == roles["transformer.ln_f.weight"] == "norm"
    sizes = {name: sum(s.stop - s.start for s in parts) for name, parts in blocks.items()}
    d = 32
    assert sizes == {
        "embedding": (VOCAB + 8) * d,
        "attention": 2 * (d * 3 * d + 3 * d + d * d + d),
        "mlp": 2 * 2 * (d * d + d),
        "norm": 5 * 2 * d,
    }
    assert [len(parts) for parts in blocks.values()] == [1, 2, 2, 5]  # one slice per layer where layers interleave
    untied = gpt2(8, tied=False)
    untied_blocks = role_blocks(untied, layout_of(untied))
    assert list(untied_blocks) == ["embedding", "attention", "mlp", "norm", "head"]
    assert untied_blocks["head"] == (slice(layout_of(untied).size - VOCAB * 8, layout_of(untied).size),)


def test_bert_vit_and_cnn_roles():
    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, vocab_size=30, num_labels=3
        )
    )
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=1,
            hidden_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=16,
        )
    )
    convnet = build_model("convnet", input_shape=(1, 8, 8), num_classes=10, batchnorm=True)
    expected = {
        "torch transformer": (TinyTransformer(), ["embedding", "attention", "mlp", "norm", "head"]),
        "bert": (bert, ["embedding", "attention", "mlp", "norm", "head"]),
        "vit": (vit, ["embedding", "attention", "mlp", "norm", "head"]),
        "convnet": (convnet, ["conv", "norm", "linear"]),
        "mlp": (build_model("mlp", input_shape=(12,), num_classes=4, hidden=(8,)), ["linear"]),
    }
    for name, (model, roles) in expected.items():
        layout = layout_of(model)
        blocks = role_blocks(model, layout)
        assert list(blocks) == roles, name
        assert (covered(blocks, layout.size) == 1).all(), name
    bert_roles = parameter_roles(bert, layout_of(bert).names)
    assert bert_roles["bert.encoder.layer.1.attention.self.key.weight"] == "attention"
    assert bert_roles["bert.encoder.layer.1.attention.output.dense.weight"] == "attention"
    assert (
        bert_roles["bert.encoder.layer.1.output.dense.weight"]
        == bert_roles["bert.encoder.layer.0.intermediate.dense.bias"]
        == "mlp"
    )
    assert bert_roles["bert.embeddings.LayerNorm.weight"] == "norm"
    assert bert_roles["bert.pooler.dense.weight"] == bert_roles["classifier.bias"] == "head"
    torch_roles = parameter_roles(TinyTransformer(), layout_of(TinyTransformer()).names)
    assert [torch_roles[n] for n in ("cls_token", "pos_embed", "patch_embed.weight", "head.bias")] == ["embedding"] * 3 + ["head"]
    assert torch_roles["encoder.layers.1.self_attn.in_proj_weight"] == torch_roles["encoder.layers.0.self_attn.out_proj.bias"]
    assert torch_roles["encoder.layers.1.self_attn.in_proj_weight"] == "attention"
    assert torch_roles["encoder.layers.0.linear2.weight"] == "mlp" and torch_roles["encoder.layers.1.norm2.bias"] == "norm"
    vit_roles = parameter_roles(vit, layout_of(vit).names)
    assert {vit_roles[n] for n in vit_roles if ".embeddings." in n} == {"embedding"}  # class token, patch projection
    modules = parameter_blocks(convnet, layout_of(convnet), "module")
    assert list(modules) == ["features.0", "features.1", "features.3", "features.4", "head"]
    assert role_blocks(convnet, layout_of(convnet)) == {  # each role: its modules' slices, in order
        "conv": (modules["features.0"], modules["features.3"]),
        "norm": (modules["features.1"], modules["features.4"]),
        "linear": (modules["head"],),
    }
    with pytest.raises(ValueError, match="choose from module, role"):
        parameter_blocks(convnet, layout_of(convnet), "type")


# ------------------------------------------------------------------------------------------- operator
def test_block_operator_of_several_slices_is_the_principal_submatrix():
    a, op = dense(np.linspace(-2, 5, 10), seed=2)
    parts = (slice(7, 9), slice(1, 3), slice(3, 4))  # kept in this order; 1:3 and 3:4 are merged
    restricted = BlockOperator(op, parts)
    assert restricted.slices == (slice(7, 9, 1), slice(1, 4, 1)) and restricted.shape == (5, 5)
    idx = [7, 8, 1, 2, 3]
    V = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(restricted.products(V).numpy(), V.numpy() @ a[np.ix_(idx, idx)].T, rtol=1e-13, atol=1e-13)
    for bad, message in (
        ((slice(0, 3), slice(2, 5)), "overlap"),
        ((slice(4, 4),), "not a non-empty forward slice"),
        ((slice(8, 12),), "not a non-empty forward slice"),
        ((slice(0, 4, 2), slice(5, 6)), "step 1 only"),
        ((), "non-empty sequence of slices"),
    ):
        with pytest.raises(ValueError, match=message):
            BlockOperator(op, bad)


def test_per_layer_of_blocks_of_several_slices_against_their_submatrices():
    a, op = dense(np.concatenate([np.linspace(-1, 1, 12), [6.0, 3.0, 2.5]]), seed=5)
    blocks = {"odd": tuple(slice(i, i + 1) for i in range(1, 15, 2)), "even": tuple(slice(i, i + 1) for i in range(0, 15, 2))}
    result = per_layer(op, blocks, ["eig", "trace", "density"], tol=1e-10, trace=hutchinson, n_probes=400, density_steps=8)
    total = 0.0
    for row in result.blocks:
        idx = np.arange(1 if row.name == "odd" else 0, 15, 2)
        sub = a[np.ix_(idx, idx)]
        values = np.linalg.eigvalsh(sub)
        assert row.n_params == len(idx) and row.n_slices == len(idx)
        assert row.lambda1 == pytest.approx(values[-1], rel=1e-9) and row.certified
        assert abs(row.trace - np.trace(sub)) < 4 * row.trace_stderr
        nodes = row.density.nodes
        assert (
            nodes.shape == (4, min(8, len(idx))) and values[0] - 1e-9 <= nodes.min() and nodes.max() <= values[-1] + 1e-9
        )  # interlacing
        total += row.trace
    assert total == pytest.approx(result.trace_estimate.estimate, rel=1e-12)  # shared probes: the blocks add up
    assert result.n_matvecs == result.trace_estimate.n_matvecs + sum(b.eig_matvecs + b.density.n_matvecs for b in result.blocks)
    back = type(result).from_dict(json.loads(json.dumps(result.to_dict())))
    assert back.blocks[0].density.nodes.shape == (4, 7) and back.grouping == "custom"
    with pytest.raises(ValueError, match="per-block traces need disjoint blocks"):
        per_layer(op, {"a": (slice(0, 2), slice(4, 6)), "b": slice(1, 3)}, ["trace"])


# ------------------------------------------------------------------------------------------- ground truth
def principal_submatrix(model: nn.Module, batches: list[dict], parts: tuple[slice, ...]) -> np.ndarray:
    """H_bb of the mean next-token cross-entropy (written out token by token) by reverse-over-reverse autograd on the
    block's coordinates alone: independent of the Objective, its operators and BlockOperator."""
    loss, w0, _ = reference_lm_loss(model, batches)
    idx = torch.cat([torch.arange(s.start, s.stop) for s in parts])
    return torch.autograd.functional.hessian(lambda wb: loss(w0.index_put((idx,), wb)), w0[idx].clone(), vectorize=True).numpy()


@pytest.mark.slow
def test_role_blocks_of_gpt2_equal_the_dense_principal_submatrices():
    """λ1 (certified), trace (within 4 stderr) and the SLQ nodes' range of each role block equal those of the dense
    Hessian's principal submatrix on the block's indices (a 1,808-parameter GPT-2: n_embd 8, where n_embd 32 would take
    16,448 dense products)."""
    model, batches = gpt2(8), token_batches()
    objective = Objective(model, batches, loss=token_cross_entropy, dtype=torch.float64, device="cpu")
    blocks = parameter_blocks(objective.model, objective.layout, "role")
    result = per_layer(
        HessianOperator(objective), blocks, ["eig", "trace", "density"], tol=1e-10, n_probes=200, seed=1, grouping="role"
    )
    assert [b.name for b in result.blocks] == ["embedding", "attention", "mlp", "norm"]
    assert sum(b.n_params for b in result.blocks) == objective.n_params == 1808
    for row in result.blocks:
        values = np.linalg.eigvalsh(principal_submatrix(model, batches, blocks[row.name]))
        scale = np.abs(values).max()
        assert row.certified and row.lambda1 == pytest.approx(values[-1], rel=1e-8), row.name
        assert abs(row.lambda1 - values[-1]) <= row.residual + 1e-12 * scale
        assert abs(row.trace - values.sum()) < 4 * row.trace_stderr, (row.name, row.trace, values.sum())
        nodes = row.density.nodes
        assert values[0] - 1e-9 * scale <= nodes.min() and nodes.max() <= values[-1] + 1e-9 * scale  # Ritz values interlace
        assert nodes.max() == pytest.approx(values[-1], rel=1e-6)  # 60 steps reach both ends of the spectrum
        assert nodes.min() == pytest.approx(values[0], rel=1e-6)
    assert sum(b.trace for b in result.blocks) == pytest.approx(result.trace_estimate.estimate, rel=1e-10)


# ------------------------------------------------------------------------------------------- figure
def test_block_spectra_figure_has_one_log_panel_per_block(tmp_path):
    a, op = dense(np.concatenate([np.linspace(-0.5, 1, 20), [9.0, 4.0]]), seed=3)
    blocks = {"attention": (slice(0, 6), slice(11, 16)), "mlp": (slice(6, 11), slice(16, 20)), "norm": slice(20, 22)}
    result = per_layer(op, blocks, ["eig", "trace", "density"], n_probes=20, density_steps=5, grouping="role")
    fig = plot_block_spectra(result)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 3 and all(ax.get_yscale() == "log" for ax in shown)
    titles = [ax.get_title() for ax in shown]
    assert titles[0].startswith("attention (11 params)\nλ1 = ") and ", tr = " in titles[0] and " ± " in titles[0]
    assert save(fig, tmp_path / "blocks.png").read_bytes().startswith(PNG)
    two = plot_block_spectra({"SGD": result, "SmoothOut": per_layer(op, blocks, ["eig", "density"], density_steps=5)})
    title = two.axes[0].get_title().splitlines()  # one line per checkpoint, then one legend for the figure
    assert title[1].startswith("SGD: λ1 = ") and ", tr = " in title[1] and title[2].startswith("SmoothOut: λ1 = ")
    assert [t.get_text() for t in two.legends[0].get_texts()] == ["SGD", "SmoothOut"]
    with pytest.raises(ValueError, match="no block has a spectral density"):
        plot_block_spectra(per_layer(op, blocks, ["eig"]))


# ------------------------------------------------------------------------------------------- CLI
DATA_MODULE = """
from tests.helpers import token_batches


def tokens():
    return token_batches()
"""
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.cli
def test_measure_per_layer_by_role_prints_the_table_and_draws_the_panels(tmp_path, monkeypatch):
    (tmp_path / "blockdata.py").write_text(DATA_MODULE)
    gpt2(32).float().save_pretrained(tmp_path / "gpt2")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    figure, out = tmp_path / "blocks.png", tmp_path / "blocks.json"
    options = ["--data", "blockdata:tokens", "--loss", "token-cross-entropy", "--dtype", "float64", "--quiet"]
    result = run_cli(
        "measure",
        tmp_path / "gpt2",
        *options,
        "--metrics",
        "eig",
        "--k",
        "1",
        "--probes",
        "20",
        "--density-steps",
        "20",
        "--density-runs",
        "2",
        "--per-layer",
        "eig,trace,density",
        "--per-layer-by",
        "role",
        "--per-layer-figure",
        figure,
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("per-layer Hessian")[1].splitlines()
    assert lines[0].startswith(" (diagonal block of each role's parameters, all layers together;")
    assert lines[1].split() == ["block", "n", "params", "λ1", "±", "residual", "trace", "±", "stderr"]
    assert [line.split()[:2] for line in lines[3:7]] == [
        ["embedding", "3456"],
        ["attention", "8448"],
        ["mlp", "4224"],
        ["norm", "320"],
    ]
    assert "spectral density of each block (SLQ)" in result.stdout
    assert figure.read_bytes().startswith(PNG)
    (report,) = json.loads(out.read_text())["checkpoints"]
    per = report["per_layer"]
    assert per["grouping"] == "role" and [b["n_slices"] for b in per["blocks"]] == [1, 2, 2, 5]
    assert all(b["certified"] and b["lambda1"] <= report["metrics"]["eig"]["values"][0] + 1e-8 for b in per["blocks"])
    assert all(len(b["density"]["nodes"]) == 2 for b in per["blocks"])
    alone = run_cli("measure", tmp_path / "gpt2", *options, "--metrics", "eig", "--per-layer-by", "role")
    assert alone.returncode == 2 and alone.stderr.strip().endswith(
        "--per-layer-by role groups the --per-layer blocks: pass --per-layer eig,trace too"
    )
