"""Training presets: `smoothout-reference` trains by SmoothOut's reference rule, recomputed here by hand."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.cli import build_parser, main
from analysis.cli.train import config_from_args
from landscape.inputs.checkpoints import load_checkpoint
from landscape.training.loop import TrainConfig, build_optimizer, train
from landscape.training.presets import PRESETS, apply_preset, get_preset
from tests.helpers import run_cli

PRESET = "smoothout-reference"
A, LR, SEED = 0.05, 0.1, 3


def preset_optimizer(model: nn.Module, **given):
    """The optimizer `train` builds for the preset's TrainConfig (same call as landscape.training.loop.train)."""
    return build_optimizer(TrainConfig(**apply_preset(PRESET, given)), model)


def forward(w: dict, x: torch.Tensor) -> torch.Tensor:
    """The digits-style MLP (Flatten, Linear, ReLU, Linear) written out."""
    return torch.relu(x @ w["1.weight"].T + w["1.bias"]) @ w["3.weight"].T + w["3.bias"]


def by_hand(w0: dict, batches: list, *, chunk=128, clip=5.0, lr=LR * math.sqrt(256 / 128), denoise=True):
    """SmoothOut's reference rule, one step per (x, y) batch: per chunk fresh U(−a, a) noise for every parameter
    (named_parameters order, the optimizer's seeded generator), the chunk's gradient at w+u, the noise taken
    out again, chunk gradients weighted n_chunk/n_batch, global norm clipped, SGD momentum 0.9 at w.
    Returns the weights after each step and the unclipped gradient norm of each step."""
    gen = torch.Generator().manual_seed(SEED)
    w, buf, after, norms = dict(w0), None, [], []
    for x, y in batches:
        grad = {n: torch.zeros_like(t) for n, t in w.items()}
        for xc, yc in zip(x.split(chunk), y.split(chunk)):
            u = {n: (torch.rand(t.shape, generator=gen) * 2 - 1) * A for n, t in w.items()}
            point = {n: (w[n] + u[n]).requires_grad_() for n in w}
            g = torch.autograd.grad(F.cross_entropy(forward(point, xc), yc), list(point.values()))
            grad = {n: grad[n] + len(yc) / len(y) * gi for n, gi in zip(point, g)}
            if not denoise:
                w = {n: w[n] + u[n] for n in w}
        norm = float(torch.sqrt(sum((g**2).sum() for g in grad.values())))
        norms.append(norm)
        if clip is not None and norm > clip:
            grad = {n: g * (clip / norm) for n, g in grad.items()}
        buf = grad if buf is None else {n: 0.9 * buf[n] + grad[n] for n in grad}
        w = {n: (w[n] - lr * buf[n]).detach() for n in w}
        after.append(w)
    return after, norms


def test_two_steps_under_the_preset_equal_the_reference_rule_by_hand(tmp_path):
    # 256 training samples of large inputs: one batch of B=256 per epoch (two ghost chunks), gradient norm ≫ 5
    g = torch.Generator().manual_seed(0)
    x, x_test = torch.randn(256, 5, generator=g) * 50, torch.randn(8, 5, generator=g)
    y, y_test = torch.randint(0, 3, (256,), generator=g), torch.arange(8) % 3
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy(), x_test=x_test.numpy(), y_test=y_test.numpy())
    config = TrainConfig(
        **apply_preset(
            PRESET,
            {
                "data": f"npz:{tmp_path / 'data.npz'}",
                "model": "mlp",
                "model_kwargs": {"hidden": [6]},
                "batch_size": 256,
                "lr": LR,
                "epochs": 2,
                "seed": SEED,
                "optimizer_kwargs": {"a": A},
            },
        )
    )
    train(config, tmp_path / "run", progress=False)
    trajectory = [load_checkpoint(tmp_path / "run" / "trajectory" / f"epoch_{e:04d}.pt") for e in range(3)]
    assert trajectory[2].meta["optimizer"]["base_hyperparameters"]["lr"] == pytest.approx(LR * math.sqrt(2))
    w0 = dict(trajectory[0].state_dict)
    assert list(w0) == ["1.weight", "1.bias", "3.weight", "3.bias"]

    shuffle = torch.Generator().manual_seed(SEED)  # the trainer's per-epoch order
    batches = [(x[order], y[order]) for order in (torch.randperm(256, generator=shuffle) for _ in range(2))]
    expected, norms = by_hand(w0, batches)
    assert min(norms) > 10  # clipping at 5.0 changes both steps
    for step in (1, 2):
        for n, w in expected[step - 1].items():
            torch.testing.assert_close(trajectory[step].state_dict[n], w, rtol=1e-5, atol=1e-6, msg=n)

    # the comparison is sharp: getting any one ingredient wrong moves the weights well past the tolerance
    wrong = {
        "no clip": {"clip": None},
        "unscaled lr": {"lr": LR},
        "no ghost batches": {"chunk": 256},
        "no de-noising": {"denoise": False},
    }
    for what, change in wrong.items():
        off = by_hand(w0, batches, **change)[0][1]
        assert max(float((off[n] - trajectory[2].state_dict[n]).abs().max()) for n in off) > 1e-3, what


def test_bn_affine_parameters_get_no_noise_and_biases_do():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    seen = {}
    model[1].register_forward_pre_hook(
        lambda m, inp: seen.update(bn_weight=m.weight.detach().clone(), bn_bias=m.bias.detach().clone())
    )
    model[3].register_forward_pre_hook(lambda m, inp: seen.update(bias=m.bias.detach().clone()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = preset_optimizer(model, optimizer_kwargs={"a": A})
    g = torch.Generator().manual_seed(1)
    opt.step(model, torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g), F.cross_entropy)
    assert torch.equal(seen["bn_weight"], before["1.weight"]) and torch.equal(seen["bn_bias"], before["1.bias"])
    assert not torch.equal(seen["bias"], before["3.bias"])
    assert opt.config()["perturbed"] == ["0.weight", "0.bias", "3.weight", "3.bias"]


@pytest.mark.cli
def test_cli_preset_is_recorded_and_explicit_options_win(tmp_path):
    common = ["--preset", PRESET, "--model-opt", "hidden=(16,)", "--batch-size", "256", "--epochs", "1", "--quiet"]
    done = run_cli("train", *common, "--out", tmp_path / "preset")
    assert done.returncode == 0, done.stderr
    meta = load_checkpoint(tmp_path / "preset" / "final.pt").meta
    train_meta, opt_meta = meta["train"], meta["optimizer"]
    assert train_meta["recipe"] == PRESET and train_meta["optimizer"] == "smoothout"
    assert train_meta["optimizer_kwargs"]["clip_grad_norm"] == 5.0 and train_meta["optimizer_kwargs"]["ghost_batch_size"] == 128
    assert train_meta["lr_scaling"] == "sqrt" and train_meta["lr_reference_batch"] == 128 and train_meta["momentum"] == 0.9
    assert opt_meta["clip_grad_norm"] == 5.0 and opt_meta["ghost_batch_size"] == 128 and opt_meta["exclude_bn"]
    assert opt_meta["base_hyperparameters"]["lr"] == pytest.approx(TrainConfig.lr * math.sqrt(2))

    done = run_cli("train", *common, "--clip-grad-norm", "1", "--lr-scaling", "none", "--out", tmp_path / "override")
    assert done.returncode == 0, done.stderr
    meta = load_checkpoint(tmp_path / "override" / "final.pt").meta
    assert meta["optimizer"]["clip_grad_norm"] == 1.0 and meta["train"]["optimizer_kwargs"]["clip_grad_norm"] == 1.0
    assert meta["train"]["lr_scaling"] == "none" and meta["optimizer"]["base_hyperparameters"]["lr"] == TrainConfig.lr
    assert meta["train"]["recipe"] == PRESET and meta["optimizer"]["ghost_batch_size"] == 128


@pytest.mark.cli
def test_unknown_preset_is_a_one_line_error(tmp_path):
    done = run_cli("train", "--preset", "smoothout-paper", "--out", tmp_path / "run")
    assert done.returncode != 0 and not (tmp_path / "run").exists()
    assert len(done.stderr.strip().splitlines()) == 1
    assert "smoothout-paper" in done.stderr and PRESET in done.stderr
    with pytest.raises(ValueError, match="known presets: smoothout-reference"):
        get_preset("nope")


def test_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(f"{name}:" in help_text for name in PRESETS)


def test_without_a_preset_the_command_line_defaults_are_unchanged():
    def config(*argv):
        return config_from_args(build_parser().parse_args(["train", *argv, "--out", "unused"]))

    assert config() == TrainConfig()
    assert config("--optimizer", "smoothout", "--noise", "0.03", "--lr", "0.2") == TrainConfig(
        optimizer="smoothout", optimizer_kwargs={"a": 0.03}, lr=0.2
    )
    preset = config("--preset", PRESET, "--noise", "0.03", "--momentum", "0.5")
    assert preset.momentum == 0.5 and preset.optimizer_kwargs["a"] == 0.03 and preset.optimizer_kwargs["denoise"]


def test_a_preset_refuses_another_optimizer():
    with pytest.raises(ValueError, match="trains with optimizer 'smoothout', not 'sam'"):
        apply_preset(PRESET, {"optimizer": "sam"})
    assert apply_preset(PRESET, {"optimizer": "smoothout"})["recipe"] == PRESET
