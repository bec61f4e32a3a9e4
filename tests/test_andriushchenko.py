"""Andriushchenko et al. (2023)'s two options of the worst-case family: logit normalization and BatchNorm folding.

Folding keeps the eval-mode function (a BN ConvNet, a ResNet block with a projection shortcut, an MLP with
BatchNorm1d, a model torch.fx cannot trace) and removes every running statistic; the normalized loss of a linear
model equals its closed form computed apart in numpy and does not move when the logits are scaled; and the
symmetries BN adds are checked on the adaptive worst case: folded, it is unchanged by shifting a conv bias and
the BN's running mean together, which moves the unfolded one, and by scaling a conv's output channels with the
running statistics, which leaves the adaptive unfolded one unchanged too but moves the plain (T = 1) unfolded one.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

from landscape.engine.objective import Objective
from landscape.inputs.batches import normalize_logits
from landscape.inputs.checkpoints import save_checkpoint
from landscape.inputs.fold_bn import ChannelAffine, fold_batch_norm
from landscape.inputs.models import model_for_data
from landscape.sharpness.balls import average_case, m_sharpness, preprocessed, worst_case
from tests.helpers import classification_batches, run_cli, tiny_convnet_bn
from tests.model_zoo import ZOO

F64 = {"dtype": torch.float64, "device": "cpu"}


def randomized_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters away from their initial values, so folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.4 * torch.rand(m.num_features, generator=g) - 0.2)
    return net.double().eval()


class Untraceable(nn.Module):
    """A conv-BN network whose forward branches on a tensor value, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.conv(x)))
        if out.sum() > -1e30:  # always true, but data-dependent
            out = out.flatten(1)
        return self.head(out)


class WithOptions(nn.Module):
    """conv → BN with a keyword option of the forward (as Andriushchenko et al.'s ResNets have): traced at its default."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(48, 3)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        out = torch.relu(self.bn(self.conv(x))).flatten(1)
        assert return_features in (False, True)
        return out if return_features else self.head(out)


MODELS = {
    "convnet": (lambda: tiny_convnet_bn(), (1, 4, 4), 2, 0),
    "mlp-bn1d": (lambda: model_for_data("mlp", (6,), 3, hidden=(8, 8), batchnorm=True)[0], (6,), 2, 0),
    "resnet-block": (ZOO["torchvision-basic-block"].factory, (2, 4, 4), 3, 0),
    "bn-after-activation": (lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 3)), (6,), 0, 1),
    "untraceable": (Untraceable, (1, 4, 4), 0, 1),
    "forward-options": (WithOptions, (1, 4, 4), 1, 0),
}


@pytest.mark.parametrize("name", MODELS)
def test_folding_keeps_the_eval_function_and_leaves_no_running_statistic(name):
    build, shape, n_fused, n_merged = MODELS[name]
    torch.manual_seed(0)
    net = randomized_bn(build())
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    folded = fold_batch_norm(net)
    x = torch.randn(7, *shape, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(folded.model(x), net(x), rtol=0, atol=1e-12)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.model.modules())
    assert not any("running" in n for n, _ in folded.model.named_buffers())
    assert len(folded.fused) + len(folded.merged) == n_bn
    assert (len(folded.fused), len(folded.merged)) == (n_fused, n_merged)
    assert all(isinstance(folded.model.get_submodule(n), ChannelAffine) for n in folded.merged)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())  # the original is untouched


def test_the_fused_weights_are_the_closed_form():
    net = randomized_bn(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))
    folded = fold_batch_norm(net).model
    lin, bn = net[0], net[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = dict(folded.named_parameters())
    assert torch.allclose(fused["0.weight"], lin.weight * scale[:, None], atol=1e-14)
    assert torch.allclose(fused["0.bias"], (lin.bias - bn.running_mean) * scale + bn.bias, atol=1e-14)
    assert set(fused) == {"0.weight", "0.bias"}


def test_train_mode_bn_is_refused_by_name():
    x, y, batches = classification_batches(8, (1, 4, 4), 3, [8])
    objective = Objective(tiny_convnet_bn(), batches, mode="train", **F64)
    with pytest.raises(ValueError, match=r"mode='train'.*mode='eval' or fold_bn=False"):
        preprocessed(objective, fold_bn=True)
    with pytest.raises(ValueError, match=r"BatchNorm '1' has no running statistics"):
        fold_batch_norm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)))


# ------------------------------------------------------------------------------------ logit normalization
def linear_problem(seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (40,), generator=g)
    model = nn.Linear(5, 4).double()
    with torch.no_grad():
        model.weight.copy_(scale * torch.randn(4, 5, generator=g, dtype=torch.float64))
        model.bias.copy_(scale * torch.randn(4, generator=g, dtype=torch.float64))
    return model, x, y


@pytest.mark.parametrize("seed", range(3))
def test_normalized_loss_of_a_linear_model_is_the_closed_form(seed):
    model, x, y = linear_problem(seed)
    objective = Objective(model, [(x[:25], y[:25]), (x[25:], y[25:])], **F64)
    W, b, X, Y = (t.detach().numpy() for t in (model.weight, model.bias, x, y))
    z = X @ W.T + b
    z = z - z.mean(axis=1, keepdims=True)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    expected = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(Y)), Y])
    normalized = preprocessed(objective, logit_normalization=True)
    assert normalized.loss() == pytest.approx(expected, rel=1e-12)
    assert objective.loss() != pytest.approx(expected, rel=1e-3)
    g = normalized.grad()  # the gradient flows through the normalization: central differences agree
    e = torch.zeros_like(normalized.w)
    for i in (0, 7, 21):
        e.zero_()
        e[i] = 1e-6
        numeric = (normalized.loss(normalized.w + e) - normalized.loss(normalized.w - e)) / 2e-6
        assert float(g[i]) == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    assert normalized.describe()["logit_normalization"] is True


def test_normalized_logits_are_centred_unit_vectors_and_zero_stays_finite():
    z = normalize_logits(torch.tensor([[3.0, -1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(z[0], torch.tensor([2.0, -2.0, 0.0], dtype=torch.float64) / 8**0.5)
    assert torch.equal(z[1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("p", ["2", "inf"])
def test_adaptive_worst_case_of_normalized_logits_ignores_the_logit_scale(p):
    runs = {}
    for scale in (1.0, 10.0):
        model, x, y = linear_problem(0, scale)
        objective = Objective(model, [(x, y)], **F64)
        common = dict(p=p, adaptive=True, steps=5, restarts=1)
        runs[scale] = (
            worst_case(objective, 0.1, logit_normalization=True, **common),
            worst_case(objective, 0.1, **common),
        )
    (normalized, raw), (normalized10, raw10) = runs[1.0], runs[10.0]
    assert normalized10.value == pytest.approx(normalized.value, rel=1e-9)
    assert raw10.value > 2 * raw.value  # without it the sharper-looking model is just the larger one
    assert normalized.logit_normalization and not raw.logit_normalization


# ------------------------------------------------------------------------------------ BN symmetries
def conv_bn_net(bias: bool) -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=bias), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))
    return randomized_bn(net)


def shifted(net: nn.Module, c: torch.Tensor) -> nn.Module:
    """Conv bias + c and BN running mean + c: the same function in eval mode."""
    net = __import__("copy").deepcopy(net)
    with torch.no_grad():
        net[0].bias.add_(c)
        net[1].running_mean.add_(c)
    return net


def scaled(net: nn.Module, a: torch.Tensor) -> nn.Module:
    """Conv output channels × a with the running mean × a and variance × a² (eps 0): the same function in eval mode."""
    net = __import__("copy").deepcopy(net)
    with torch.no_grad():
        net[0].weight.mul_(a[:, None, None, None])
        net[1].running_mean.mul_(a)
        net[1].running_var.mul_(a**2)
    return net


def sharpness_pair(net, other, **options):
    x, y, batches = classification_batches(32, (1, 4, 4), 3, [32], seed=3)
    values = [worst_case(Objective(n, batches, **F64), 0.05, steps=5, restarts=0, p="inf", **options).value for n in (net, other)]
    return values


def test_folded_adaptive_worst_case_ignores_a_bias_shift_that_moves_the_unfolded_one():
    net = conv_bn_net(bias=True)
    other = shifted(net, torch.tensor([2.0, -3.0, 5.0], dtype=torch.float64))
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    assert torch.allclose(net(x), other(x), atol=1e-12)
    folded = sharpness_pair(net, other, adaptive=True, fold_bn=True)
    unfolded = sharpness_pair(net, other, adaptive=True)
    assert folded[1] == pytest.approx(folded[0], rel=1e-9)
    assert abs(unfolded[1] - unfolded[0]) > 0.1 * unfolded[0]


def test_channel_scaling_leaves_folded_and_adaptive_unchanged_but_moves_the_plain_unfolded_one():
    net = conv_bn_net(bias=False)
    net[1].eps = 0.0  # scaling commutes with BN exactly only without eps
    other = scaled(net, torch.tensor([0.1, 4.0, 20.0], dtype=torch.float64))
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    assert torch.allclose(net(x), other(x), atol=1e-12)
    for options in ({"adaptive": True, "fold_bn": True}, {"fold_bn": True}, {"adaptive": True}):
        values = sharpness_pair(net, other, **options)
        assert values[1] == pytest.approx(values[0], rel=1e-6), options
    plain = sharpness_pair(net, other)
    assert abs(plain[1] - plain[0]) > 0.1 * plain[0]


def test_m_sharpness_and_average_case_take_both_options_and_record_them():
    x, y, batches = classification_batches(32, (1, 4, 4), 3, [16, 16], seed=2)
    objective = Objective(randomized_bn(tiny_convnet_bn()), batches, **F64)
    both = {"logit_normalization": True, "fold_bn": True}
    m = m_sharpness(objective, 16, 0.5, adaptive=True, steps=3, **both)
    by_hand = preprocessed(objective, **both)
    assert m.logit_normalization and m.fold_bn and m.setup["fold_bn"] == {"fused": 2, "merged": 0}
    assert m.batch_clean_losses == pytest.approx([by_hand.restricted([b]).loss() for b in by_hand.batches], rel=1e-12)
    average = average_case(objective, 0.1, adaptive=True, n_samples=8, **both)
    assert average.clean_loss == pytest.approx(by_hand.loss(), rel=1e-12)
    assert average.setup["logit_normalization"] is True


@pytest.mark.cli
def test_adaptive_worst_case_with_both_options_through_the_cli(tmp_path):
    torch.manual_seed(0)
    model, spec = model_for_data("mlp", (1, 8, 8), 10, hidden=(16,), batchnorm=True)
    randomized_bn(model).float()
    path = save_checkpoint(tmp_path / "net.pt", model, model_spec=spec, data_spec={"spec": "digits", "seed": 0})
    common = ["measure", path, "--metrics", "adaptive-worst-case", "--n-samples", "64", "--ascent-steps", "3"]
    run = run_cli(*common, "--logit-normalization", "--fold-bn", "--device", "cpu", "--quiet", "--json")
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)[0]
    result = record["metrics"]["adaptive-worst-case"]
    assert result["logit_normalization"] is True and result["fold_bn"] is True
    assert result["setup"]["fold_bn"] == {"fused": 1, "merged": 0} and result["value"] > 0
    text = run_cli(*common, "--logit-normalization", "--device", "cpu", "--quiet")
    assert text.returncode == 0, text.stderr
    assert "normalized logits" in text.stdout and "BN folded" not in text.stdout
