"""Gradient accumulation and mixed precision in every method's step (landscape/training/optim.py).

Accumulation: K micro-batches give the whole batch's step for SGD/Adam (float64, to rounding), a noisy
method's micro-batches are its noise pieces (the same bits as ghost batches of n/K), and SAM's global
ascent over micro-batches equals SAM on the whole batch. Mixed precision: the forward passes run in the
low precision while weights, gradients and optimizer state stay float32; with fp16 the loss scaler
unscales and checks each step once, however many passes it combines, and an overflow skips the step
leaving the weights bitwise unchanged.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from landscape.inputs.checkpoints import load_checkpoint
from landscape.inputs.models import MLP
from landscape.training.loop import TrainConfig, train
from landscape.training.optim import make_optimizer
from tests.helpers import tiny_convnet_bn

N = 60


def _problem(dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = MLP((1, 4, 4), 3, (16,)).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 1, 4, 4, generator=g, dtype=dtype)
    return model, x, torch.randint(0, 3, (N,), generator=g)


def _train(name: str, steps: int = 3, dtype=torch.float64, model=None, **options):
    base, x, y = _problem(dtype)
    model = model or base
    opt = make_optimizer(name, model, lr=0.1, momentum=0.9, seed=3, **options)
    losses = [float(opt.step(model, x, y, F.cross_entropy)[0]) for _ in range(steps)]
    return model, opt, losses


@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("k", [2, 4, 7])
def test_accumulated_micro_batches_equal_the_whole_batch(name, k):
    whole, _, whole_losses = _train(name)
    accumulated, _, losses = _train(name, accumulate=k)
    for p, q in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    assert losses == pytest.approx(whole_losses, rel=1e-12)


@pytest.mark.parametrize("name", ["smoothout", "nso", "ssgd", "nrs", "sam"])
def test_a_noisy_methods_micro_batches_are_its_noise_pieces(name):
    """accumulate=K draws fresh noise (SAM: ascends) per micro-batch, exactly as ghost batches of n/K do."""
    accumulated, _, a = _train(name, accumulate=3)
    ghost, _, b = _train(name, ghost_batch_size=N // 3)
    assert a == b
    assert all(torch.equal(p, q) for p, q in zip(accumulated.parameters(), ghost.parameters()))


def test_micro_batches_and_ghost_batches_nest():
    opt = make_optimizer("smoothout", _problem()[0], lr=0.1, accumulate=2, ghost_batch_size=8)
    x, y = torch.zeros(30, 1, 4, 4), torch.zeros(30, dtype=torch.long)
    assert [len(yc) for _, yc in opt.chunks(x, y)] == [8, 7, 8, 7]


def test_sam_global_ascent_over_micro_batches_equals_sam_on_the_whole_batch():
    whole, _, whole_losses = _train("sam")
    accumulated, _, losses = _train("sam", accumulate=4, ascent_gradient="global")
    for p, q in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)
    assert losses == pytest.approx(whole_losses, rel=1e-12)
    local, _, _ = _train("sam", accumulate=4)  # m-sharpness per micro-batch is another method
    assert not torch.allclose(next(local.parameters()), next(whole.parameters()), rtol=1e-6)


def test_sam_global_ascent_moves_batchnorm_statistics_once_per_step():
    torch.manual_seed(0)
    model = tiny_convnet_bn().double()
    x = torch.randn(24, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    opt = make_optimizer("sam", model, lr=0.1, accumulate=3, ascent_gradient="global")
    opt.step(model, x, y, F.cross_entropy)
    counters = [int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    assert counters and all(c == 3 for c in counters)  # once per micro-batch of the first sweep, none in the second


# ---------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_the_forward_in_low_precision_and_keeps_float32_state(amp, dtype):
    model, x, y = _problem(torch.float32)
    seen = []
    model[1].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    opt = make_optimizer("sam", model, lr=0.1, momentum=0.9, amp=amp)
    opt.step(model, x, y, F.cross_entropy)
    assert seen == [dtype, dtype]  # both SAM passes
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for s in opt.base.state.values() for v in s.values() if v.is_floating_point())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["sgd", "sam", "nso", "smoothout"])
def test_amp_training_tracks_float32_training(amp, name):
    """40 steps: the low-precision run's losses stay within a few percent of float32's, and both fall."""
    _, _, reference = _train(name, steps=40, dtype=torch.float32)
    _, _, low = _train(name, steps=40, dtype=torch.float32, amp=amp)
    assert low[-1] < 0.8 * low[0]
    assert low[-1] == pytest.approx(reference[-1], rel=0.05)


@pytest.mark.parametrize(
    "name, options", [("sam", {}), ("nso", {"k": 2}), ("smoothout", {"ghost_batch_size": 20}), ("sgd", {"accumulate": 3})]
)
def test_the_fp16_scaler_unscales_and_steps_once_per_step(name, options, monkeypatch):
    model, x, y = _problem(torch.float32)
    opt = make_optimizer(name, model, lr=0.1, amp="fp16", **options)
    calls = {"unscale_": 0, "step": 0, "update": 0}
    for method in calls:
        original = getattr(opt.scaler, method)

        def counted(*args, _original=original, _name=method, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(opt.scaler, method, counted)
    for _ in range(3):
        opt.step(model, x, y, F.cross_entropy)
    assert calls == {"unscale_": 3, "step": 3, "update": 3}


@pytest.mark.parametrize("name", ["sgd", "sam", "nso", "smoothout"])
def test_an_fp16_overflow_skips_the_step_and_leaves_the_weights_bitwise(name):
    torch.manual_seed(0)
    model = tiny_convnet_bn()
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
    opt = make_optimizer(name, model, lr=0.1, momentum=0.9, amp="fp16")
    state = opt.scaler.state_dict()
    opt.scaler.load_state_dict({**state, "scale": 2.0**24})  # loss × 2²⁴ overflows fp16's 65504 in backward
    before = copy.deepcopy(model.state_dict())
    opt.step(model, x, y, F.cross_entropy)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in before.items() if k in params)
    assert opt.scaler.get_scale() == 2.0**23  # backed off once
    for _ in range(20):  # the scale halves until the products fit
        opt.step(model, x, y, F.cross_entropy)
    assert not all(torch.equal(params[k], v) for k, v in before.items() if k in params)  # later steps do move


def test_fp16_runs_resume_with_the_loss_scale(tmp_path):
    config = TrainConfig(model_kwargs={"hidden": [16]}, optimizer="sam", amp="fp16", epochs=2, batch_size=128)
    whole = load_checkpoint(train(config, tmp_path / "whole", progress=False))
    train(TrainConfig(**{**config.to_dict(), "epochs": 1, "lr_milestones": ()}), tmp_path / "half", progress=False)
    state = torch.load(tmp_path / "half" / "state.pt", weights_only=True)["optimizer"]
    resumed = make_optimizer(
        "sam", MLP((1, 8, 8), 10, (16,)), lr=config.lr, momentum=config.momentum, amp="fp16", seed=config.seed
    )
    resumed.load_state_dict({**state, "scaler": {**state["scaler"], "scale": 1234.0}})
    assert resumed.scaler.get_scale() == 1234.0  # the scale (and growth tracker) come back with the state
    assert whole.meta["optimizer"]["amp"] == "fp16" and whole.meta["train"]["amp"] == "fp16"
