"""Real HuggingFace transformer classes (tiny, built from configs, nothing downloaded) through the Objective.

A causal GPT-2 with token-level cross-entropy on padded sequences of uneven length, a BERT sequence
classifier on dict batches and a ViT image classifier on (pixel_values, labels) pairs. Ground truth:
the dense Hessian by reverse-over-reverse autograd (torch.autograd.functional.hessian), itself checked
against central finite differences of the gradient. (torch.func.hessian, forward-over-reverse under
vmap, is not ground truth here: on this GPT-2 it differs from both by 0.3%.)
"""

import math
import warnings

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.curvature.spectrum import lanczos
from landscape.curvature.trace import hutchinson
from landscape.engine.hvp_paths import HVP_METHODS
from landscape.engine.objective import Objective, ObjectiveError
from landscape.engine.operators import GGNOperator, HessianOperator
from landscape.inputs.batches import BatchError, class_cross_entropy, mean_squared_error, token_cross_entropy
from landscape.sharpness.box import epsilon_sharpness
from landscape.sharpness.perturb import expected_loss
from landscape.surfaces.directions import random_directions
from landscape.surfaces.surface import compute_surface, grid_axis
from tests.helpers import cli_command, digits_mlp_checkpoint, flat_parameters, gpt2, reference_lm_loss, token_batches

transformers = pytest.importorskip("transformers")


def bert():
    config = transformers.BertConfig(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        vocab_size=30,
        max_position_embeddings=16,
        num_labels=3,
        type_vocab_size=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()
    g = torch.Generator().manual_seed(2)
    batches = []
    for n, length in ((4, 7), (3, 5)):
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, -2:] = 0
        batches.append(
            {
                "input_ids": torch.randint(0, 30, (n, length), generator=g),
                "attention_mask": mask,
                "labels": torch.randint(0, 3, (n,), generator=g),
            }
        )
    return model, batches


def vit():
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).double().eval()
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)) for n in (5, 3)
    ]
    return model, batches


def dense_hessian(loss, w0):
    with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no second derivative
        return torch.autograd.functional.hessian(loss, w0)


@pytest.fixture(scope="module")
def gpt2_truth():
    model, batches = gpt2(), token_batches()
    loss, w0, n_tokens = reference_lm_loss(model, batches)
    return model, batches, loss, w0, n_tokens, dense_hessian(loss, w0)


@pytest.mark.slow
def test_token_loss_is_the_mean_over_real_tokens_across_batches(gpt2_truth):
    model, batches, loss, w0, n_tokens, _ = gpt2_truth
    objective = Objective(model, batches, loss=token_cross_entropy, dtype=torch.float64, device="cpu")
    assert objective.n_items == n_tokens == 24 and objective.n_samples == 5
    assert objective.loss() == pytest.approx(float(loss(w0)), rel=1e-13)
    # HuggingFace's own loss (per batch, upcast to float32 inside) weighted by each batch's real tokens
    hf = sum(float(model(**b).loss) * int((b["labels"][:, 1:] != -100).sum()) for b in batches) / n_tokens
    assert objective.loss() == pytest.approx(hf, rel=1e-6)
    assert not math.isclose(objective.loss(), np.mean([float(model(**b).loss) for b in batches]), rel_tol=1e-4)
    evaluation = objective.evaluate()  # next-token accuracy over the real tokens
    correct = sum(
        int((model(**b).logits[:, :-1].argmax(-1) == b["input_ids"][:, 1:])[b["attention_mask"][:, 1:] == 1].sum())
        for b in batches
    )
    assert evaluation.accuracy == pytest.approx(correct / n_tokens)
    assert objective.describe()["n_items"] == 24


def test_every_hvp_path_equals_the_dense_hessian_on_tiny_gpt2(gpt2_truth):
    model, batches, loss, w0, _, H = gpt2_truth
    assert w0.numel() == 1200
    V = torch.randn(3, w0.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    h = 1e-6  # the reference itself against central differences of the gradient (error ~h²)
    fd = (torch.func.grad(loss)(w0 + h * V[0]) - torch.func.grad(loss)(w0 - h * V[0])) / (2 * h)
    assert float((fd - H @ V[0]).norm() / fd.norm()) < 1e-6
    exact = V @ H
    for method in HVP_METHODS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            objective = Objective(model, batches, loss=token_cross_entropy, dtype=torch.float64, device="cpu", hvp_method=method)
            try:
                products = objective.hvp_batched(V)
            except ObjectiveError as error:  # asked for by name, a path torch.func cannot trace says so in one line
                assert method == "linearize" and "could not trace" in str(error) and "\n" not in str(error)
                continue
        assert float((products - exact).norm() / exact.norm()) <= 1e-10, method
        assert not [w for w in caught if "could not trace" in str(w.message)], method  # auto is autograd: nothing to say


def test_sdpa_attention_is_differentiated_through_its_math_kernel():
    """PyTorch's fused CPU attention has no second derivative; the Objective runs attention on the math kernel, so the
    default (sdpa) GPT-2 gets exact HVPs too, equal to the eager-attention model's dense Hessian."""
    model, batches = gpt2("sdpa"), token_batches()
    loss, w0, _ = reference_lm_loss(gpt2("eager"), batches)  # the same weights (seed 0) with eager attention
    v = torch.randn(w0.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exact = torch.autograd.functional.hvp(loss, w0, v)[1]
    for method in ("auto", "reuse", "fwd-rev", "double-backward"):
        objective = Objective(model, batches, loss=token_cross_entropy, dtype=torch.float64, device="cpu", hvp_method=method)
        product = objective.hvp(v)
        assert float((product - exact).norm() / exact.norm()) <= 1e-10, method
    assert objective.loss() == pytest.approx(float(loss(w0)), rel=1e-12)


@pytest.mark.slow
def test_estimators_on_gpt2_agree_with_the_dense_hessian(gpt2_truth, tmp_path):
    model, batches, _, w0, _, H = gpt2_truth
    true = np.linalg.eigvalsh(H.numpy())
    objective = Objective(model, batches, loss=token_cross_entropy, dtype=torch.float64, device="cpu")
    op = HessianOperator(objective)
    top = lanczos(op, 2, tol=1e-8)
    np.testing.assert_allclose(top.values, true[::-1][:2], rtol=1e-6)
    trace = hutchinson(op, 200, seed=0)
    assert abs(trace.estimate - true.sum()) < 4 * trace.stderr
    ggn = GGNOperator(objective)  # the GGN of token cross-entropy: positive semi-definite
    assert lanczos(ggn, 1, which="SA", tol=1e-6).values[0] > -1e-8
    _check_perturbation_and_surfaces(objective, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("build", [bert, vit], ids=["bert-dict-batches", "vit-pairs"])
def test_classifiers_measure_like_any_model(build, tmp_path):
    model, batches = build()
    objective = Objective(model, batches, dtype=torch.float64, device="cpu")  # class cross-entropy read from .logits
    assert objective.n_items == objective.n_samples == sum(len(b["labels"] if isinstance(b, dict) else b[1]) for b in batches)
    w0, unflatten = flat_parameters(model)

    def loss(w):  # HuggingFace's own classification loss (mean over each batch), weighted by batch size
        total = 0.0
        for b in batches:
            kwargs = b if isinstance(b, dict) else {"pixel_values": b[0], "labels": b[1]}
            n = len(kwargs["labels"])
            total = total + n * functional_call(model, unflatten(w), (), kwargs).loss
        return total / objective.n_samples

    assert objective.loss() == pytest.approx(float(loss(w0)), rel=1e-6)  # HF upcasts its loss to float32
    H = dense_hessian(lambda w: _float64_loss(model, unflatten, batches, w), w0)
    v = torch.randn(w0.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert float((objective.hvp(v) - H @ v).norm() / (H @ v).norm()) <= 1e-10
    top = lanczos(HessianOperator(objective), 1, tol=1e-8)
    assert top.values[0] == pytest.approx(np.linalg.eigvalsh(H.numpy())[-1], rel=1e-6)
    with torch.no_grad():  # top-1 hits counted here from HuggingFace's own logits
        pairs = [(b, b["labels"]) if isinstance(b, dict) else ({"pixel_values": b[0]}, b[1]) for b in batches]
        correct = sum(int((model(**inputs).logits.argmax(-1) == labels).sum()) for inputs, labels in pairs)
    assert objective.evaluate().accuracy == pytest.approx(correct / objective.n_samples, abs=1e-12)
    _check_perturbation_and_surfaces(objective, tmp_path)


def _float64_loss(model, unflatten, batches, w):
    total, n = 0.0, 0
    for b in batches:
        inputs = {k: v for k, v in b.items() if k != "labels"} if isinstance(b, dict) else {"pixel_values": b[0]}
        labels = b["labels"] if isinstance(b, dict) else b[1]
        logits = functional_call(model, unflatten(w), (), inputs).logits
        total = total - torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).sum()
        n += len(labels)
    return total / n


def _check_perturbation_and_surfaces(objective, tmp_path):
    """Expected loss, ε-sharpness and 1-D/2-D surfaces run, and agree with the loss where they must."""
    clean = objective.loss()
    curve = expected_loss(objective, 1e-3, n_samples=8, seed=0)
    assert abs(curve.increase) < 1e-2 and curve.clean_loss == pytest.approx(clean)
    assert curve.stderr == pytest.approx(np.std(curve.samples, ddof=1) / math.sqrt(len(curve.samples)), rel=1e-12)
    eps = epsilon_sharpness(objective, 1e-3, restarts=1, seed=0)
    w = objective.w  # the box's corner along the gradient, evaluated here: a lower bound the maximum must reach
    corner = 100 * (objective.loss(w + 1e-3 * (w.abs() + 1) * torch.sign(objective.grad())) - clean) / (1 + clean)
    assert corner > 0 and eps.value >= corner * (1 - 1e-9)
    for dim, n in ((1, 5), (2, 3)):
        surface = compute_surface(
            {"train": objective},
            random_directions(objective, dim, seed=0),
            [grid_axis(-0.1, 0.1, n)] * dim,
            path=tmp_path / f"s{dim}.h5",
        )
        centre = surface.loss["train"][(n // 2,) * dim]
        assert centre == pytest.approx(clean, rel=1e-10)


def test_losses_say_what_they_expected():
    with pytest.raises(BatchError, match="dict batch with 'input_ids'"):
        token_cross_entropy(torch.zeros(2, 3, 4), (torch.zeros(2, 3), torch.zeros(2)))
    with pytest.raises(BatchError, match="no labels"):
        class_cross_entropy(torch.zeros(2, 3), {"input_ids": torch.zeros(2, 4)})
    with pytest.raises(BatchError, match="expected a tensor or an output with .logits"):
        class_cross_entropy(object(), (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)))
    total, count = mean_squared_error(torch.ones(4, 2), (None, torch.zeros(4, 2)))
    assert float(total) / count == pytest.approx(torch.nn.functional.mse_loss(torch.ones(4, 2), torch.zeros(4, 2)).item())


# ---------------------------------------------------------------- the command line on save_pretrained folders
DATA_MODULE = """
import torch

VOCAB = 23


def _tokens(seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, length in ((3, 8), (2, 6)):
        ids = torch.randint(0, VOCAB, (n, length), generator=g)
        mask = torch.ones(n, length, dtype=torch.long)
        mask[0, length // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def tokens():
    return {"train": _tokens(1), "test": _tokens(2)}


def sentences():
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 30, (4, 7), generator=g), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,), generator=g)}]


def images():
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 3, (5,), generator=g))]


def not_batches():
    return ["a", "b"]
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The three tiny models as save_pretrained folders (safetensors), and a data module on PYTHONPATH."""
    root = tmp_path_factory.mktemp("hf")
    (root / "hfdata.py").write_text(DATA_MODULE)
    folders = {}
    for name, model in (("gpt2", gpt2("sdpa").float()), ("bert", bert()[0].float()), ("vit", vit()[0].float())):
        model.save_pretrained(root / name)
        folders[name] = root / name
    return root, folders


def _cli(root, *args):
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cli_command(), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_measure_a_save_pretrained_gpt2_from_the_command_line(saved):
    import json
    import sys

    root, folders = saved
    result = _cli(
        root,
        "measure",
        folders["gpt2"],
        "--data",
        "hfdata:tokens",
        "--loss",
        "token-cross-entropy",
        "--metrics",
        "eig",
        "--k",
        "1",
        "--tol",
        "1e-8",
        "--dtype",
        "float64",
        "--json",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)
    assert report["setup"]["loss"] == "token-cross-entropy" and report["setup"]["n_items"] == 24
    sys.path.insert(0, str(root))
    try:
        import hfdata
    finally:
        sys.path.remove(str(root))
    model = transformers.GPT2LMHeadModel.from_pretrained(folders["gpt2"]).double()
    objective = Objective(model, hfdata.tokens()["train"], loss=token_cross_entropy, dtype=torch.float64, device="cpu")
    assert report["loss"] == pytest.approx(objective.loss(), rel=1e-12)
    top = lanczos(HessianOperator(objective), 1, tol=1e-8)
    assert report["metrics"]["eig"]["values"][0] == pytest.approx(top.values[0], rel=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, data, loss",
    [
        ("gpt2", "hfdata:tokens", "token-cross-entropy"),
        ("bert", "hfdata:sentences", "cross-entropy"),
        ("vit", "hfdata:images", "cross-entropy"),
    ],
)
def test_every_measure_and_a_plane_run_on_each_model_from_the_command_line(saved, name, data, loss):
    """Lanczos, trace, expected loss, ε-sharpness, per-layer curvature with its figure, and a 2-D surface (GPT-2: on
    the test batches its data callable also returns)."""
    import json

    from landscape.surfaces.surface import read_surface

    root, folders = saved
    figure = root / f"{name}-layers.png"
    result = _cli(
        root,
        "measure",
        folders[name],
        "--data",
        data,
        "--loss",
        loss,
        "--metrics",
        "eig,trace,expected-loss,eps-sharpness",
        "--k",
        "1",
        "--probes",
        "8",
        "--radius",
        "0.001",
        "--noise-samples",
        "4",
        "--restarts",
        "1",
        "--eps-iters",
        "3",
        "--per-layer",
        "eig,trace",
        "--per-layer-figure",
        figure,
        "--json",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    (report,) = json.loads(result.stdout)
    metrics = report["metrics"]
    assert metrics["eig"]["values"][0] > 0 and math.isfinite(metrics["trace"]["estimate"])
    eps = metrics["eps-sharpness"]
    assert math.isfinite(metrics["expected-loss"]["mean"])
    assert eps["clean_loss"] == pytest.approx(report["loss"], rel=1e-6)
    assert eps["value"] > 0  # the box's corner along the gradient raises the loss of any model with a gradient
    blocks = report["per_layer"]["blocks"]
    assert sum(b["n_params"] for b in blocks) == report["n_params"]
    assert figure.read_bytes()[:4] == b"\x89PNG"
    test = ["--test"] if name == "gpt2" else []
    plane = _cli(
        root,
        "surface",
        folders[name],
        "--data",
        data,
        "--loss",
        loss,
        "--dim",
        "2",
        "--range=-0.5:0.5:3",
        *test,
        "--out",
        root / f"{name}-plane.h5",
        "--quiet",
    )
    assert plane.returncode == 0, plane.stderr
    surface = read_surface(root / f"{name}-plane.h5")
    grid = surface.loss["train"]
    assert grid.shape == (3, 3) and np.isfinite(grid).all()
    assert not test or np.isfinite(surface.loss["test"]).all()
    assert grid[1, 1] == pytest.approx(report["loss"], rel=1e-5)


def test_safetensors_state_dicts_and_sharded_folders_load(saved, tmp_path, monkeypatch):
    """A bare .safetensors state dict measures like the same weights in a .pt; a folder saved in shards like one file.
    Through the command line's entry point in this process (the tests above run it as a program)."""
    import contextlib
    import io
    import json

    from safetensors.torch import save_file

    from analysis.cli import main

    def measure(*args) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["measure", *map(str, args)])
        return code, out.getvalue(), err.getvalue()

    checkpoint = digits_mlp_checkpoint(tmp_path, (16,))
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "net.safetensors")
    options = ["--data", "digits", "--metrics", "eig", "--k", "1", "--n-samples", "200", "--json", "--quiet"]
    bare = measure(tmp_path / "net.safetensors", "--model", "mlp", "--model-opt", "hidden=(16,)", *options)
    native = measure(checkpoint, *options)
    assert bare[0] == 0 and native[0] == 0, bare[2] + native[2]
    assert json.loads(bare[1])[0]["loss"] == json.loads(native[1])[0]["loss"]
    root, folders = saved
    monkeypatch.syspath_prepend(str(root))
    model = transformers.BertForSequenceClassification.from_pretrained(folders["bert"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="1KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    results = [
        json.loads(measure(folder, "--data", "hfdata:sentences", "--metrics", "eig", "--k", "1", "--json", "--quiet")[1])[0]
        for folder in (folders["bert"], tmp_path / "sharded")
    ]
    assert results[0]["loss"] == results[1]["loss"] and results[0]["n_params"] == results[1]["n_params"]
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    code, _, stderr = measure(tmp_path / "broken.safetensors", "--model", "mlp", "--data", "digits", "--quiet")
    assert code == 2 and "not a readable safetensors file" in stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--data", "hfdata:sentences", "--loss", "token-cross-entropy"],
            "token cross-entropy: expected token labels of shape (batch, sequence), got (4,)",
        ),
        (["--data", "hfdata:not_batches"], "train batch 0 is a str; a batch is an (x, y) tuple of tensors or a dict"),
        (["--data", "hfdata:sentences", "--n-samples", "3"], "gives its own batches"),
        (["--data", "hfdata:sentences", "--loss", "hinge"], "unknown loss 'hinge'"),
    ],
)
def test_bad_batches_and_losses_fail_in_one_line(saved, args, message, monkeypatch, capsys):
    """Through the command line's own entry point in this process (the subprocess tests above show it as a program)."""
    from analysis.cli import main

    root, folders = saved
    monkeypatch.syspath_prepend(str(root))
    code = main(["measure", str(folders["bert"]), *args, "--metrics", "eig", "--k", "1", "--quiet"])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_a_folder_without_safetensors_weights_is_refused(saved, tmp_path):
    root, folders = saved
    (tmp_path / "config.json").write_text((folders["bert"] / "config.json").read_text())
    result = _cli(root, "measure", tmp_path, "--data", "hfdata:sentences", "--quiet")
    assert result.returncode == 2 and "holds no *.safetensors weights" in result.stderr
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")  # a damaged header
    from landscape.inputs.checkpoints import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_checkpoint(tmp_path)


def test_hvps_at_readme_size_equal_finite_differences_of_an_independent_loss():
    """The GPT-2 of docs/how-to/own-model.md (30,720 parameters, 16 sequences, right padding) in float64: every path's H v equals central
    differences of the gradient of a separately written token loss (masked log-softmax), to their h² error."""
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 100, (16, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, 16:] = 0
    batches = [
        {
            "input_ids": ids[i : i + 8],
            "attention_mask": mask[i : i + 8],
            "labels": ids[i : i + 8].masked_fill(mask[i : i + 8] == 0, -100),
        }
        for i in (0, 8)
    ]
    w0, unflatten = flat_parameters(model)
    assert w0.numel() > 30_000

    def loss(w):
        total, count = 0.0, 0
        for b in batches:
            with sdpa_kernel(SDPBackend.MATH):
                out = functional_call(
                    model, unflatten(w), (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
                )
            logp = torch.log_softmax(out.logits[:, :-1], dim=-1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
            real = b["attention_mask"][:, 1:].double()
            total, count = total - (logp * real).sum(), count + real.sum()
        return total / count

    v = torch.randn(w0.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = 1e-6  # truncation error ~h²: 1e-6 relative at h = 1e-5, 1e-8 here
    fd = (torch.func.grad(loss)(w0 + h * v) - torch.func.grad(loss)(w0 - h * v)) / (2 * h)
    for method in ("auto", "reuse", "fwd-rev", "double-backward"):
        objective = Objective(model, batches, loss=token_cross_entropy, dtype=torch.float64, device="cpu", hvp_method=method)
        assert objective.n_items == 304 and objective.loss() == pytest.approx(float(loss(w0)), rel=1e-12)
        assert float((objective.hvp(v) - fd).norm() / fd.norm()) < 1e-7, method


def test_every_direction_spread_and_curve_runs_on_gpt2_with_the_token_loss(tmp_path):
    """The eigenvector plane, the three-checkpoint plane, a spread over directions and a trained Bézier curve on
    the tiny GPT-2: each passes through the points whose loss is known (the checkpoints themselves)."""
    import copy

    from landscape.surfaces.connectivity import CurveTraining, connect
    from landscape.surfaces.directions import checkpoint_plane, eigenvector_directions
    from landscape.surfaces.spread import compute_spread

    pytest.importorskip("transformers")
    model, batches = gpt2(), token_batches()
    objective = Objective(model, batches, loss=token_cross_entropy, device="cpu")
    clean = objective.loss()
    directions = eigenvector_directions(objective, 2, seed=0)
    assert directions.spec["eigenvalues"][0] >= directions.spec["eigenvalues"][1]
    plane = compute_surface(objective, directions, [grid_axis(-0.1, 0.1, 3)] * 2)
    assert plane.loss["train"][1, 1] == pytest.approx(clean, rel=1e-10)

    others = []
    for seed in (1, 2):
        other = copy.deepcopy(model)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=p.dtype))
        others.append(other)
    own = [Objective(m, batches, loss=token_cross_entropy, device="cpu").loss() for m in others]
    through = checkpoint_plane(objective, *others, labels=("A", "B", "C"))
    for (x, y), expected in zip(through.trajectory[1:], own):
        at = compute_surface(objective, through, [np.array([x]), np.array([y])])
        assert at.loss["train"][0, 0] == pytest.approx(expected, rel=1e-9)

    spread = compute_spread(objective, [grid_axis(-0.1, 0.1, 3)], n=2, seed=0)
    assert np.allclose(spread.loss["train"][:, 1], clean, rtol=1e-10)

    curve = connect(objective, others[0], training=CurveTraining(epochs=1, seed=0), points=3)
    for path in (curve.line, curve.curve):
        assert path.loss["train"][0] == pytest.approx(clean, rel=1e-9)
        assert path.loss["train"][-1] == pytest.approx(own[0], rel=1e-9)
