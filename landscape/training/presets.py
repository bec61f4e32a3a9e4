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

The paper recipes (`smoothout-resnet44-cifar10`, `smoothout-c3-cifar100`, each with a `-large` variant)
add a model, a data set and a schedule to those trainer rules. Their sources, in the authors' code
(github.com/wenwei202/smoothout, built on Hoffer et al.'s bigBatch code):
- ResNet-44: `models/resnet.py`, the CIFAR ResNet's `regime`: SGD lr 0.1, momentum 0.9, weight decay
  1e-4, lr 0.01 / 0.001 / 0.0001 from epochs 81 / 122 / 164. 200 epochs: the
  default `--epochs` of `main_gbn.py` (the SmoothOut trainer); the paper's count is unconfirmed.
- C3: `models/cifar_shallow.py`'s `regime`: SGD momentum 0.9, weight decay 5e-4, lr 0.001 for epochs
  0-59, 0.01 from 60, 0.001 from 120, 0.0001 from 180; 200 epochs (`run_experiments.sh`, `main_gbn.py`).
  The recipe: lr 0.01 with a 60-epoch first phase at 0.1× (`lr_warmup_epochs`, `lr_warmup_factor`) and
  ×0.1 at epochs 120 and 180, which is the reference's regime.
- Large batch: 4096 with ghost batches of 128 (`run_experiments.sh` trains C3 on CIFAR-100 at 4096 with
  `--mini-batch-size 128` and no epoch stretching; `main_gbn.py` defaults to 2048); which sizes the
  paper's tables used is unconfirmed, so the batch size stays a setting (`--batch-size`). Every regime
  learning rate is scaled by sqrt(B/128) (`--lr_bb_fix`, on by default), at every epoch.
- The reference's SGD baseline is the same trainer without noise (its `--ss` 0): ghost batches, clip 5.0
  and the sqrt scaling apply to it too. So these recipes accept `--optimizer sgd` (the baseline under
  the same schedule) and `adasmoothout`; SmoothOut's own options apply only to the SmoothOut methods.
- SmoothOut's noise size a on CIFAR is unconfirmed: SmoothOut's default 0.02 unless `--noise` is given.
- Not reproduced: the reference's data augmentation (random 32x32 crops of a 40x40 padded image, flips)
  and its fixed ImageNet normalization; the trainer uses the stored images, standardized per channel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A named set of TrainConfig settings.

    `settings` apply under every optimizer the preset allows (the schedule, the trainer's rules);
    `optimizer_kwargs` are options every method takes (ghost batches, clipping), merged option by option;
    `method_options` maps each method the preset was written for to its own options, which apply only
    under that method; `baselines` are further optimizers it allows, with none of the method options.
    `data_kind` (cifar10, cifar100): the data the preset is for, given as `--data KIND:DIR`.
    """

    name: str
    summary: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    baselines: tuple[str, ...] = ()
    data_kind: str | None = None

    @property
    def optimizers(self) -> tuple[str, ...]:
        """The optimizers this preset trains with: its default first, then its other methods and its baselines."""
        default = self.settings.get("optimizer")
        return tuple(dict.fromkeys([*([default] if default else []), *self.method_options, *self.baselines]))

    def check_data(self, data: str | None) -> None:
        """A one-line ValueError unless `data` is a spec of the preset's data kind with a folder."""
        if self.data_kind is None:
            return
        kind, _, folder = (data or "").partition(":")
        if kind != self.data_kind or not folder:
            given = f"data={data!r}" if data else "no data=..."
            raise ValueError(
                f"recipe {self.name!r} trains on {self.data_kind}: give data='{self.data_kind}:DIR' "
                f"(the extracted python-version batches or their parent folder), not {given}"
            )


# SmoothOut's reference trainer (main_gbn.py): the rules every optimizer follows under its recipes ...
TRAINER_SETTINGS = {"base": "sgd", "momentum": 0.9, "lr_scaling": "sqrt", "lr_reference_batch": 128}
TRAINER_OPTIONS = {"ghost_batch_size": 128, "clip_grad_norm": 5.0}
# ... and its noise: uniform, de-noised, BN affine parameters excluded, biases perturbed
NOISE_OPTIONS = {"distribution": "uniform", "denoise": True, "exclude_bn": True, "exclude_bias": False}
SMOOTHOUT_OPTIONS = {
    "smoothout": {"scale": "absolute", **NOISE_OPTIONS},
    "adasmoothout": NOISE_OPTIONS,
}  # AdaSmoothOut keeps its filter-wise scale

SMALL_BATCH, LARGE_BATCH = 128, 4096
RESNET44 = {
    "model": "resnet44",
    "lr": 0.1,
    "weight_decay": 1e-4,
    "epochs": 200,
    "lr_schedule": "step",
    "lr_milestones": (81, 122, 164),
    "lr_gamma": 0.1,
}
C3 = {
    "model": "c3",
    "lr": 0.01,
    "weight_decay": 5e-4,
    "epochs": 200,
    "lr_schedule": "step",
    "lr_milestones": (120, 180),
    "lr_gamma": 0.1,
    "lr_warmup_epochs": 60,
    "lr_warmup_factor": 0.1,
}
LARGE_NOTE = (
    "ghost batches of 128 one at a time, so it fits one GPU as is; --accumulate N splits each step into N "
    "micro-batches where a run needs less memory"
)


def paper_recipe(name: str, what: str, schedule: Mapping[str, Any], batch: int, data_kind: str) -> Preset:
    """One of the SmoothOut paper's CIFAR recipes: `schedule` at batch size `batch` under the reference trainer."""
    large = f" (every lr ×{math.sqrt(batch / SMALL_BATCH):.3g} by sqrt(B/128); {LARGE_NOTE})" if batch > SMALL_BATCH else ""
    return Preset(
        name,
        f"{what} at batch {batch}{large}; SmoothOut's reference trainer (or --optimizer sgd, adasmoothout); "
        f"needs --data {data_kind}:DIR",
        settings={"optimizer": "smoothout", **TRAINER_SETTINGS, **schedule, "batch_size": batch},
        optimizer_kwargs=TRAINER_OPTIONS,
        method_options=SMOOTHOUT_OPTIONS,
        baselines=("sgd",),
        data_kind=data_kind,
    )


RESNET44_WHAT = "ResNet-44 on CIFAR-10, SGD lr 0.1 ×0.1 at epochs 81/122/164, wd 1e-4, 200 epochs"
C3_WHAT = "C3 on CIFAR-100, SGD lr 0.001 for 60 epochs, then 0.01 ×0.1 at epochs 120/180, wd 5e-4, 200 epochs"
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "smoothout-reference",
            "SmoothOut's reference trainer (Wen et al. 2018): uniform noise, de-noising, BN excluded, ghost batches "
            "of 128, clip 5.0, SGD momentum 0.9, lr scaled by sqrt(B/128)",
            settings={"optimizer": "smoothout", **TRAINER_SETTINGS},
            optimizer_kwargs={**SMOOTHOUT_OPTIONS["smoothout"], **TRAINER_OPTIONS},
        ),
        paper_recipe("smoothout-resnet44-cifar10", RESNET44_WHAT, RESNET44, SMALL_BATCH, "cifar10"),
        paper_recipe("smoothout-resnet44-cifar10-large", RESNET44_WHAT, RESNET44, LARGE_BATCH, "cifar10"),
        paper_recipe("smoothout-c3-cifar100", C3_WHAT, C3, SMALL_BATCH, "cifar100"),
        paper_recipe("smoothout-c3-cifar100-large", C3_WHAT, C3, LARGE_BATCH, "cifar100"),
    ]
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is a one-line ValueError listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def apply_preset(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """TrainConfig settings: the preset's, overridden by `given` (only the settings the user gave explicitly).

    Method options merge option by option (an explicit `clip_grad_norm` replaces only the preset's clip), and
    `recipe` is set to the preset's name. An optimizer the preset does not allow is an error (its options would
    belong to another method), and so is data of another kind than the preset's.
    """
    preset = get_preset(name)
    settings = {**preset.settings, **given}
    optimizer = settings.get("optimizer")
    if preset.optimizers and optimizer not in preset.optimizers:
        default, *others = preset.optimizers
        alternatives = f" (or {', '.join(others)})" if others else ""
        raise ValueError(
            f"preset {name!r} trains with optimizer {default!r}{alternatives}, not {optimizer!r}; "
            "drop the preset or the optimizer"
        )
    preset.check_data(settings.get("data"))
    method = preset.method_options.get(optimizer, {})
    settings["optimizer_kwargs"] = {**preset.optimizer_kwargs, **method, **given.get("optimizer_kwargs", {})}
    settings["recipe"] = preset.name
    return settings
