"""Typed configuration: what a checkpoint is measured on, which metrics with which options, what to compare.

The command line is read once, at the edge, into these frozen specs (`from_args`); the library functions of
analysis/ (`measure_checkpoint`, `compare`, `correlate_runs`) take the specs, never an argparse Namespace.
`demo` and `figures` build them directly. Every option's default lives in its dataclass field (the metric
options' in analysis/measures/options.py's `MetricSpec`, with their help), and the parsers read it from there,
so `--help` says the value the command uses (tests/test_help_defaults.py).

A spec's `settings()` is what a results file records and `--resume` checks: every field that changes a
number, in its command-line spelling; run-time handles (progress style, warm start) are not settings.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from analysis.measures.options import MetricSpec, setting_text, settings_of
from analysis.report.rank_correlation import RESAMPLES

RUNTIME = {"setting": False}  # field metadata: a run-time handle or output choice, not a setting of the numbers


def _from_args(cls: type, args: argparse.Namespace, **converted: Any) -> Any:
    """`cls` from the Namespace's attributes of the same names (missing ones keep their defaults), then `converted`."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in converted and hasattr(args, f.name)}
    return cls(**values, **converted)


@dataclass(frozen=True)
class ObjectiveSpec:
    """What a checkpoint is measured on: model, data, measurement subset, parameters, precision, device and HVP path."""

    model: str | None = None
    model_opt: tuple[str, ...] = ()
    data: str | None = None
    trust_checkpoint: bool = field(default=False, metadata=RUNTIME)
    split: str = "train"
    n_samples: int | None = None
    batch_size: int = 256
    max_length: int | None = None
    seed: int = 0
    mode: str = "eval"
    loss: str | None = None
    params: str = "all"
    dtype: str = "float32"
    device: str | None = None
    hvp: str = "auto"
    hvp_memory: str | None = None
    no_hvp_check: bool = False
    shard: bool = False  # measure under torchrun with the parameters sharded over the ranks (FSDP2)
    shard_replicas: int = 1  # with shard: data-parallel replicas of the sharded model (HSDP)
    shard_probes: str = "whole"  # with shard: probes drawn whole and cut to pieces, or each rank's pieces alone

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ObjectiveSpec:
        return _from_args(cls, args, model_opt=tuple(getattr(args, "model_opt", None) or ()))

    def whole(self, split: str) -> ObjectiveSpec:
        """The same objective on the whole of `split` (test accuracy, generalization gaps)."""
        return replace(self, split=split, n_samples=None)

    def settings(self) -> dict[str, object]:
        return settings_of(self)


@dataclass(frozen=True)
class MeasureSpec:
    """One measurement: the objective it is taken on and the metrics taken (`landscape measure`, track, correlate)."""

    objective: ObjectiveSpec = ObjectiveSpec()
    metrics: MetricSpec = MetricSpec()

    @classmethod
    def from_args(cls, args: argparse.Namespace, choices: Iterable[str] | None = None) -> MeasureSpec:
        """`choices`: the metrics the command takes (default: its parser's record of them)."""
        return cls(ObjectiveSpec.from_args(args), MetricSpec.from_args(args, choices))

    def settings(self) -> dict[str, object]:
        """Every setting of both, flat, as a results file records them (the seed is the one shared option)."""
        return dict(sorted({**self.objective.settings(), **self.metrics.settings()}.items()))


@dataclass(frozen=True)
class CompareSpec:
    """`landscape compare`: the checkpoints' shared measurement, how they are labelled and grouped, and where
    the report goes. `labels` None: each checkpoint's method and batch size."""

    measure: MeasureSpec
    out: Path = Path("comparison")
    labels: tuple[str, ...] | None = None
    allow_mixed: bool = False
    baseline: str | None = None
    at_train_loss: str | None = None
    surface_range: str = "-1:1:21"
    surface2d_range: str = "-1:1:11"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CompareSpec:
        labels = tuple(args.labels.split(",")) if getattr(args, "labels", None) else None
        return _from_args(cls, args, measure=MeasureSpec.from_args(args), out=Path(args.out), labels=labels)

    def settings(self) -> dict[str, object]:
        """The measurement's settings and the comparison's own (not where the report goes)."""
        own = {f.name: setting_text(getattr(self, f.name)) for f in fields(self) if f.name not in ("measure", "out")}
        return {**self.measure.settings(), **own}


@dataclass(frozen=True)
class CorrelateSpec:
    """`landscape correlate`: the runs' shared measurement, the gaps and hyperparameter axes they are ranked by,
    the bootstrap, and where the measurements are saved (resumable)."""

    measure: MeasureSpec
    out: Path = Path("correlation")
    gaps: tuple[str, ...] = ("error", "loss")
    axes: tuple[str, ...] = ("method", "batch_size", "lr", "momentum", "weight_decay")
    at_train_loss: str | None = None
    resamples: int = RESAMPLES

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CorrelateSpec:
        names = {
            name: tuple(a for a in getattr(args, option).split(",") if a) for name, option in (("gaps", "gap"), ("axes", "axes"))
        }
        return _from_args(cls, args, measure=MeasureSpec.from_args(args), out=Path(args.out), **names)
