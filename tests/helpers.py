"""Shared tiny problems and command-line runners for the tests: small enough for a dense Hessian, rich enough to
catch mistakes. Import them as `from tests.helpers import ...` (spawned ranks import them the same way)."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from landscape.engine.objective import Objective
from landscape.engine.operators import DenseOperator
from landscape.inputs.batches import mean_squared_error
from landscape.inputs.checkpoints import save_checkpoint
from landscape.inputs.models import model_for_data


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


def bias_free_relu_mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """Linear layers of `widths` without biases, ReLU between them, in float64: a network whose output is
    homogeneous in each layer's weights (so scaling a layer by α and the next by 1/α leaves its function)."""
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b, bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


def tiny_convnet_bn(seed: int = 0) -> nn.Module:
    """Conv + BatchNorm + ReLU + linear head on 1x4x4 inputs (~150 parameters)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Softplus(),
        nn.Conv2d(3, 2, 3),
        nn.BatchNorm2d(2),
        nn.Softplus(),
        nn.Flatten(),
        nn.Linear(8, 3),
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
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    assert start == n
    return x, y, out


def cli_command() -> list[str]:
    """The installed `landscape` console script, or the module when it is not installed."""
    script = Path(sys.executable).with_name("landscape")
    return [str(script)] if script.exists() else [sys.executable, "-m", "analysis.cli"]


def run_cli(*args, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `landscape ARGS` as a real process, killed after `timeout` seconds (a hang fails the test, not CI)."""
    return subprocess.run(cli_command() + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def digits_mlp_checkpoint(folder: Path, hidden: tuple[int, ...], seed: int = 0, adam_state: bool = False) -> Path:
    """An untrained digits MLP saved as FOLDER/net.pt, a toolkit checkpoint, for CLI tests that need any checkpoint;
    `adam_state`: after one Adam step, keeping the optimizer state (what preconditioned-sharpness reads)."""
    torch.manual_seed(seed)
    model, spec = model_for_data("mlp", (1, 8, 8), 10, hidden=hidden)
    state = None
    if adam_state:
        adam = torch.optim.Adam(model.named_parameters(), lr=1e-3)
        model(torch.randn(8, 1, 8, 8)).square().mean().backward()
        adam.step()
        state = adam.state_dict()
    return save_checkpoint(
        Path(folder) / "net.pt",
        model,
        model_spec=spec,
        data_spec={"spec": "digits", "seed": 0, "normalize": None},
        optimizer_state=state,
    )


def one_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single stderr line of a process that exited with `code` (no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


class Exploit:
    """Unpickling it runs `touch MARKER`: a file that holds one must be refused before it is unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_files(tmp_path, model, spec) -> dict[str, str]:
    """A good checkpoint and one file of each bad kind in TMP_PATH; {file name: the message loading it must give}."""
    good = save_checkpoint(tmp_path / "good.pt", model, model_spec=spec)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("hello, I am not a checkpoint\n")
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 10)
    with open(tmp_path / "legacy.pt", "wb") as f:
        pickle.dump({"weights": [1, 2, 3]}, f)
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "nostate.pt")
    return {
        "missing.pt": "not found",
        "truncated.pt": "truncated or corrupt",
        "text.pt": "not a PyTorch checkpoint",
        "garbage.pt": "not a PyTorch checkpoint",
        "legacy.pt": "not a PyTorch checkpoint|holds no state dict",
        "nostate.pt": "holds no state dict",
    }


# ---------------------------------------------------------------- a tiny GPT-2 and its token-by-token reference loss
VOCAB = 23


def gpt2(attention: str = "eager"):
    """A one-layer GPT-2 (HuggingFace transformers, built from a config) in float64, eval mode, seed 0."""
    import transformers  # optional: callers importorskip it

    config = transformers.GPT2Config(
        n_embd=8,
        n_layer=1,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def two_layer_gpt2() -> tuple[nn.Module, list[dict]]:
    """A GPT-2 of two layers, 32 wide, vocabulary 100, with scaled_dot_product_attention (fused kernels allowed),
    float32, eval mode, seed 0; and two batches of 4×16 and 3×12 tokens (29 696 parameters)."""
    import transformers  # optional: callers importorskip it

    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for n, length in ((4, 16), (3, 12)):
        ids = torch.randint(0, 100, (n, length), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    return model, batches


def token_batches(seed: int = 1) -> list[dict]:
    """Two batches of different shapes, with right padding (attention_mask 0, labels −100): 24 real next tokens."""
    g = torch.Generator().manual_seed(seed)

    def batch(n, length, padded_rows):
        ids = torch.randint(0, VOCAB, (n, length), generator=g)
        mask = torch.ones(n, length, dtype=torch.long)
        for r in padded_rows:
            mask[r, length // 2 :] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    return [batch(3, 8, [1]), batch(2, 6, [0])]


def flat_parameters(model):
    params = dict(model.named_parameters())  # tied weights (GPT-2's lm_head = wte) appear once
    w = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def unflatten(w):
        out, i = {}, 0
        for name, p in params.items():
            out[name] = w[i : i + p.numel()].view_as(p)
            i += p.numel()
        return out

    return w, unflatten


def reference_lm_loss(model, batches):
    """Mean next-token cross-entropy over every real token of all batches, written out token by token."""
    w0, unflatten = flat_parameters(model)
    n_tokens = sum(int(b["attention_mask"][:, 1:].sum()) for b in batches)

    def loss(w):
        total = 0.0
        for b in batches:
            out = functional_call(model, unflatten(w), (), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
            logp = torch.log_softmax(out.logits, dim=-1)
            for i, j in (b["attention_mask"][:, 1:] == 1).nonzero().tolist():
                total = total - logp[i, j, b["input_ids"][i, j + 1]]
        return total / n_tokens

    return loss, w0, n_tokens


def result_of(cls, **given):
    """A result of type `cls` with the `given` fields, and empty or zero ones elsewhere (None where the type allows),
    built through `from_dict` as a stored result would be: for tests of what reads results (tables, plots)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    data = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        empty = (
            None
            if type(None) in typing.get_args(kind)
            else ""
            if kind is str
            else []
            if typing.get_origin(kind) is tuple or kind is np.ndarray
            else {}
            if kind is dict
            else 0
        )
        data[f.name] = given.get(f.name, empty)
    return cls.from_dict(data)


def least_squares(d: int, n: int, generator: torch.Generator, decades: float = 1.5):
    """A bias-free linear model's mean squared error at random weights, away from its minimum, in float64: inputs
    whose columns span `decades` orders of magnitude. Returns the Objective and X, w, y as arrays: L(w) =
    mean((Xw − y)²), Hessian 2XᵀX/n."""
    x = torch.randn(n, d, generator=generator, dtype=torch.float64) * torch.logspace(0, decades, d, dtype=torch.float64)
    y = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=generator, dtype=torch.float64))
    objective = Objective(model, [(x, y)], loss=mean_squared_error, dtype=torch.float64, device="cpu")
    return objective, x.numpy(), model.weight.detach().numpy().ravel(), y.numpy().ravel()
