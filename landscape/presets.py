"""Named training presets: a paper's training defaults as TrainConfig settings, applied where the user gave none.

`smoothout-reference` follows SmoothOut (Wen, Wang et al. 2018, "SmoothOut: Smoothing Out Sharp Minima
to Improve Generalization in Deep Learning", arXiv 1805.07898). From the paper: the smoothed loss
E_u C(w+u) with uniform noise u ~ U(−a, a) on the weights, the gradient taken at w+u and the step
taken at the de-noised weights w. From the authors' reference trainer: each batch split into ghost
batches of 128 samples with fresh noise per chunk, chunk gradients averaged, the global gradient
norm clipped at 5.0, SGD with momentum 0.9, and the large-batch learning rate scaled by sqrt(B/128).
From the later reference code: BatchNorm affine parameters get no noise (the earlier code perturbed
them and the paper does not say which); biases are perturbed. The noise size a, the learning rate,
batch size, epochs, weight decay and schedule vary between the paper's experiments and are left to
the user (a defaults to SmoothOut's 0.02).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Preset:
    """A named set of TrainConfig settings; `optimizer_kwargs` are the method's options, merged option by option."""

    name: str
    summary: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset(
        "smoothout-reference",
        "SmoothOut's reference trainer (Wen et al. 2018): uniform noise, de-noising, BN excluded, ghost batches "
        "of 128, clip 5.0, SGD momentum 0.9, lr scaled by sqrt(B/128)",
        settings={"optimizer": "smoothout", "base": "sgd", "momentum": 0.9, "lr_scaling": "sqrt",
                  "lr_reference_batch": 128},
        optimizer_kwargs={"scale": "absolute", "distribution": "uniform", "denoise": True, "exclude_bn": True,
                          "exclude_bias": False, "ghost_batch_size": 128, "clip_grad_norm": 5.0},
    ),
]}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is a one-line ValueError listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def apply_preset(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """TrainConfig settings: the preset's, overridden by `given` (only the settings the user gave explicitly).

    Method options merge option by option (an explicit `clip_grad_norm` replaces only the preset's clip),
    and `recipe` is set to the preset's name. An explicit optimizer other than the preset's is an error:
    the preset's method options would belong to another method.
    """
    preset = get_preset(name)
    optimizer = preset.settings.get("optimizer")
    if optimizer is not None and given.get("optimizer", optimizer) != optimizer:
        raise ValueError(f"preset {name!r} trains with optimizer {optimizer!r}, not {given['optimizer']!r}; "
                         "drop the preset or the optimizer")
    settings = {**preset.settings, **given}
    settings["optimizer_kwargs"] = {**preset.optimizer_kwargs, **given.get("optimizer_kwargs", {})}
    settings["recipe"] = preset.name
    return settings
