"""Model idioms users' checkpoints contain, small enough for a dense Hessian (a few hundred parameters).

Each entry of ZOO is one line: name → Idiom(factory, input shape, classes). A new idiom is one
more line (and, if it needs one, a small module below). Every HVP path is tested on each of them
against the dense Hessian, in both BatchNorm modes (tests/test_zoo.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _randomize_norms(net: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so BN eval and train modes differ."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.num_features, generator=g))
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.4 * torch.rand(m.bias.shape, generator=g) - 0.2)
    return net


class InplaceResidualMLP(nn.Module):
    """The issue-20 reproduction: `out += h` on a residual MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x)
        h = torch.tanh(self.b(torch.tanh(out)))
        out += h
        return self.c(torch.tanh(out))


class BasicBlock(nn.Module):
    """A torchvision-style ResNet basic block: in-place ReLU, `out += identity`, a strided 1x1 downsample."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TiedWeights(nn.Module):
    """One matrix used twice: an encoder and its transpose as decoder, plus a layer applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mid, self.head = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mid(torch.tanh(self.mid(torch.tanh(self.enc(x))))))
        return self.head(torch.tanh(h @ self.enc.weight))


class SharedHead(nn.Module):
    """A parameter registered under two names (tied embedding/head style): counted once."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.out = nn.Linear(6, 3), nn.Linear(3, 3)
        self.alias = self.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alias(torch.tanh(self.out(torch.tanh(self.body(x)))))


class MutatesBuffers(nn.Module):
    """A forward that writes its buffers in place (a call counter, a running input mean) without reading them back."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("input_mean", torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.input_mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return self.b(torch.tanh(self.a(x)))


class _SmoothStep(torch.autograd.Function):
    """x·sigmoid(x) with a hand-written, twice-differentiable backward and a jvp rule (torch.func-ready)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * _swish_derivative(x)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return tangent * _swish_derivative(x)


def _swish_derivative(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s + x * s * (1 - s)


class CustomFunctionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_SmoothStep.apply(self.a(x)))


class NonContiguousViews(nn.Module):
    """Transposes, strided slices and permutes between layers; a weight used through its transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(4, 4) * 0.4)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))  # (n, 8)
        grid = h.view(-1, 2, 4).transpose(1, 2)  # non-contiguous (n, 4, 2)
        mixed = torch.tanh(self.w.t() @ grid)  # (n, 4, 2)
        flat = mixed.permute(0, 2, 1).reshape(len(x), 8)
        return self.head(flat[:, ::1] + h[:, torch.arange(7, -1, -1)])


class ChannelsLast(nn.Module):
    """A conv net whose weights and activations are in channels_last memory format."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.head(torch.nn.functional.softplus(self.bn(self.conv(x))).flatten(1))


@dataclass(frozen=True)
class Idiom:
    factory: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    classes: int = 3

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        net = _randomize_norms(self.factory())
        if any(isinstance(m, ChannelsLast) for m in net.modules()):
            net = net.to(memory_format=torch.channels_last)
        return net

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.build().modules())


ZOO: dict[str, Idiom] = {
    "inplace-residual-add": Idiom(InplaceResidualMLP, (6,)),
    "inplace-relu": Idiom(
        lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)), (6,)
    ),
    "torchvision-basic-block": Idiom(lambda: nn.Sequential(BasicBlock(2, 3, 2), nn.Flatten(), nn.Linear(12, 3)), (2, 4, 4)),
    "tied-weights": Idiom(TiedWeights, (6,)),
    "shared-module": Idiom(SharedHead, (6,)),
    "mutated-buffers": Idiom(MutatesBuffers, (6,)),
    "batchnorm1d": Idiom(lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)), (6,)),
    "batchnorm2d": Idiom(
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Softplus(), nn.Flatten(), nn.Linear(12, 3)), (2, 4, 4)
    ),
    "layernorm": Idiom(lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)), (6,)),
    "groupnorm": Idiom(
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Softplus(), nn.Flatten(), nn.Linear(16, 3)), (2, 4, 4)
    ),
    "dropout-eval": Idiom(lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)), (6,)),
    "custom-function": Idiom(CustomFunctionNet, (6,)),
    "custom-function-inplace": Idiom(lambda: CustomFunctionResidual((6,), 3), (6,)),
    "non-contiguous-views": Idiom(NonContiguousViews, (6,)),
    "channels-last": Idiom(ChannelsLast, (2, 4, 4)),
}


class _PaddedShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels (no parameters)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBlock(nn.Module):
    """The CIFAR basic block as widely published checkpoints write it: `out += self.shortcut(x)` in place."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _PaddedShortcut((cout - cin) // 2) if stride != 1 or cin != cout else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return nn.functional.relu(out)


class CifarResNet(nn.Module):
    """A full-size CIFAR ResNet (6n+2 layers, option-A shortcuts, in-place residual adds): 269,722 parameters at n = 3."""

    def __init__(self, n: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, c in enumerate((16, 32, 64)):
            blocks = [CifarBlock(cin if j == 0 else c, c, 2 if i > 0 and j == 0 else 1) for j in range(n)]
            layers.append(nn.Sequential(*blocks))
            cin = c
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


class CustomFunctionResidual(nn.Module):
    """A custom autograd Function (which functionalization cannot trace) and an in-place residual add in one net.

    The linearized paths then replay an eager jvp instead of a trace (a plain trace would be wrong after its
    first product). Digits-shaped by default (64 inputs, 10 classes).
    """

    def __init__(self, input_shape: tuple[int, ...] = (64,), num_classes: int = 10) -> None:
        super().__init__()
        width = 1
        for d in input_shape:
            width *= d
        self.a, self.b, self.c = nn.Linear(width, 16), nn.Linear(16, 16), nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x.flatten(1))
        h = torch.tanh(self.b(_SmoothStep.apply(torch.tanh(out))))
        out += h
        return self.c(torch.tanh(out))


def zoo_batches(name: str, sizes=(10, 6)):
    """float64 batches of `sizes` samples for the idiom NAME (seed 3)."""
    idiom = ZOO[name]
    g = torch.Generator().manual_seed(3)
    return [
        (torch.randn(n, *idiom.in_shape, generator=g, dtype=torch.float64), torch.randint(0, idiom.classes, (n,), generator=g))
        for n in sizes
    ]
