"""The networks the toolkit trains and measures: MLP, small ConvNet, SmoothOut's C3, CIFAR ResNet-20/44.

Every model takes `input_shape` (without the batch axis) and `num_classes`, so a model spec
`{"name": ..., "kwargs": {...}}` of plain JSON values rebuilds it exactly. No in-place
activations, so torch.func transforms (functional_call, jvp, vmap) apply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from landscape.inputs.data import Dataset
from landscape.inputs.user_code import accepts, call_user, import_callable, import_folder


class MLP(nn.Sequential):
    """Fully connected classifier on flattened inputs, e.g. the 40-100-100-10 ReLU net on mnist1d."""

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 40),
        num_classes: int = 10,
        hidden: Sequence[int] = (100, 100),
        activation: str = "relu",
        batchnorm: bool = False,
    ):
        activations = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in activations:
            raise ValueError(f"unknown activation {activation!r}; use one of {sorted(activations)}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h)] + ([nn.BatchNorm1d(h)] if batchnorm else []) + [activations[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class ConvNet(nn.Module):
    """Small ConvNet for 8x8 images (1, 8, 8) or 1-D signals (1, 40): 3x3 conv[-BN]-ReLU blocks, adaptive pool, linear head.

    Conv1d or Conv2d is chosen from the input rank; `channels=(2, 3)` gives a few hundred
    parameters on digits, small enough for a dense Hessian.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
        batchnorm: bool = True,
        pooled: int = 4,
    ):
        super().__init__()
        dims = len(input_shape) - 1
        if dims not in (1, 2):
            raise ValueError(f"convnet needs input shape (C, L) or (C, H, W); got {tuple(input_shape)}")
        conv, bn, pool = (
            (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d)
        )
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for c in channels:
            layers += [conv(c_in, c, 3, padding=1, bias=not batchnorm)] + ([bn(c)] if batchnorm else []) + [nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = pool(pooled)
        self.head = nn.Linear(c_in * pooled**dims, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class C3(nn.Module):
    """SmoothOut's shallow CIFAR net "C3" (Wen et al. 2018; `cifar_shallow.py` of their code).

    layout "reference" (default): (5x5 conv → 3x3/2 max-pool without padding → BN → ReLU) x2, a 7x7
    map on 32x32 inputs, then FC 384 and 192 (each BN, ReLU, Dropout(0.5)) and the classifier:
    1,405,860 parameters on CIFAR-100. layout "first-release": conv → BN → ReLU → padded pool, an 8x8
    map, no dropout (1.76M on CIFAR-100), kept to load checkpoints trained with landscape 0.1.
    """

    LAYOUTS = ("reference", "first-release")

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        channels: Sequence[int] = (64, 64),
        hidden: Sequence[int] = (384, 192),
        layout: str = "reference",
        dropout: float = 0.5,
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"c3 needs input shape (C, H, W); got {tuple(input_shape)}")
        if layout not in self.LAYOUTS:
            raise ValueError(f"c3 layout must be one of {', '.join(self.LAYOUTS)}; got {layout!r}")
        reference = layout == "reference"
        layers: list[nn.Module] = []
        c_in, (h, w) = input_shape[0], input_shape[1:]
        for c in channels:
            conv = nn.Conv2d(c_in, c, 5, padding=2, bias=False)
            if reference:
                layers += [conv, nn.MaxPool2d(3, 2), nn.BatchNorm2d(c), nn.ReLU()]
                h, w = (h - 3) // 2 + 1, (w - 3) // 2 + 1
            else:
                layers += [conv, nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1)]
                h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            c_in = c
        if h < 1 or w < 1:
            raise ValueError(f"c3: inputs of shape {tuple(input_shape)} are too small for {len(channels)} pooling stages")
        self.features = nn.Sequential(*layers)
        fc: list[nn.Module] = []
        width = c_in * h * w
        for units in hidden:
            fc += [nn.Linear(width, units, bias=False), nn.BatchNorm1d(units), nn.ReLU()]
            fc += [nn.Dropout(dropout)] if reference and dropout > 0 else []
            width = units
        self.classifier = nn.Sequential(*fc, nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut, or a 1x1 conv-BN projection when the shape changes (option B)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 (He et al. 2016): 3 stages of n BasicBlocks at 16/32/64 x `width` channels, global pool, linear.

    Shortcuts that change shape are 1x1 conv-BN projections (option B): ResNet-20 has
    272,474 parameters (269,722 with option A's zero padding). Convs use Kaiming-normal init.
    """

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, depth: int = 20, width: int = 1):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"resnet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...); got {depth}")
        if len(input_shape) != 3:
            raise ValueError(f"resnet needs input shape (C, H, W); got {tuple(input_shape)}")
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, c_in = [], widths[0]
        for i, c in enumerate(widths):
            blocks = [BasicBlock(c_in if j == 0 else c, c, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet20(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width: int = 1) -> ResNet:
    """ResNet-20 for CIFAR (He et al. 2016)."""
    return ResNet(input_shape, num_classes, depth=20, width=width)


def resnet44(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width: int = 1) -> ResNet:
    """ResNet-44 for CIFAR (He et al. 2016), SmoothOut's reference network."""
    return ResNet(input_shape, num_classes, depth=44, width=width)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "convnet": ConvNet,
    "c3": C3,
    "resnet20": resnet20,
    "resnet44": resnet44,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """A registered model by name, or `module:factory` imported and called with `kwargs`."""
    return _build(name, kwargs)


def _build(name: str, kwargs: dict, folders: Sequence[str] = ()) -> nn.Module:
    """build_model, a `module:factory`'s module also looked for in `folders`; the factory failing is one line naming it."""
    if name in MODELS or name in FOLDER_MODELS:
        model = (MODELS.get(name) or FOLDER_MODELS[name])(**kwargs)
    elif ":" in name:
        model = call_user(name, import_callable(name, folders=folders), **kwargs)
    else:
        raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODELS)} or module:factory")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _plain(value):
    """Tuples to lists, recursively, so a spec equals its JSON round trip."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def model_for_data(
    name: str, dataset_or_shape: Dataset | Sequence[int], num_classes: int | None = None, **kwargs
) -> tuple[nn.Module, dict]:
    """(model, spec) with input shape and classes taken from a Dataset (or a shape plus `num_classes`).

    A `module:factory` gets `input_shape`/`num_classes` only if it accepts them. The spec
    is JSON-ready and `model_from_spec(spec)` rebuilds the same architecture.
    """
    if isinstance(dataset_or_shape, Dataset):
        input_shape = dataset_or_shape.input_shape
        num_classes = dataset_or_shape.num_classes if num_classes is None else num_classes
    else:
        input_shape = tuple(int(d) for d in dataset_or_shape)
        if num_classes is None:
            raise ValueError("model_for_data with an input shape needs num_classes")
    if "input_shape" in kwargs:
        raise ValueError("input_shape comes from the data; do not pass it to model_for_data")
    factory = MODELS.get(name) or (import_callable(name) if ":" in name else None)
    filled = {
        k: v
        for k, v in (("input_shape", list(input_shape)), ("num_classes", int(num_classes)))
        if factory is None or accepts(factory, k)
    }
    spec = {"name": name, "kwargs": _plain({**filled, **kwargs})}
    folder = import_folder(name) if ":" in name else None
    if folder is not None:  # where the factory's module was found, so the checkpoint finds it again from any folder
        spec["import_path"] = folder
    try:
        json.dumps(spec)
    except TypeError as e:
        raise ValueError(f"model kwargs for {name!r} must be JSON values (numbers, strings, lists, dicts): {e}") from e
    return model_from_spec(spec), spec


def huggingface(folder: str, architecture: str) -> nn.Module:
    """A transformers model from a save_pretrained folder (its safetensors weights; nothing is downloaded)."""
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{folder} is a HuggingFace model: pip install -e '.[hf]' to measure it") from None
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise ValueError(f"transformers {transformers.__version__} has no model class {architecture!r}")
    logging = transformers.utils.logging
    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()  # no "Loading weights" bars or notes on stderr: the CLI keeps stderr to one line
    logging.set_verbosity_error()
    try:
        return model_class.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


FOLDER_MODELS: dict[str, Callable[..., nn.Module]] = {"huggingface": huggingface}  # rebuilt from files, not data shapes


def model_from_spec(spec: dict) -> nn.Module:
    """Rebuild a model from its {"name", "kwargs"} spec; a `module:factory` is also looked for in the folder its
    module was imported from when the spec was made ("import_path"), then in the current folder."""
    folder = spec.get("import_path")
    return _build(spec["name"], spec.get("kwargs", {}), [folder] if folder else [])
