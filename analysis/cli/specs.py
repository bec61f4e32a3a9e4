"""Typed configuration: what a checkpoint is measured on, which metrics with which options, what to compare.

The command line is read once, at the edge, into these frozen specs (`from_args`); the library functions of
analysis/ (`measure_checkpoint`, `compare`, `correlate_runs`) take the specs, never an argparse Namespace.
`demo` and `figures` build them directly. Every option's default lives here, in the dataclass field, and the
parsers read it from there (`OBJECTIVE`, `METRIC_DEFAULTS`, each command's own `MetricSpec`), so `--help` says
the value the command uses (tests/test_help_defaults.py).

A spec's `settings()` is what a results file records and `--resume` checks: every field that changes a
number, in its command-line spelling; run-time handles (progress style, warm start) are not settings.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from analysis.report.rank_correlation import RESAMPLES  # numpy only: no torch at import

RUNTIME = {"setting": False}  # field metadata: a run-time handle or output choice, not a setting of the numbers


def _from_args(cls: type, args: argparse.Namespace, **converted: Any) -> Any:
    """`cls` from the Namespace's attributes of the same names (missing ones keep their defaults), then `converted`."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in converted and hasattr(args, f.name)}
    return cls(**values, **converted)


def _setting_text(value: object) -> object:
    """A setting in its command-line spelling: (0.005, 0.01) → "0.005,0.01"; ("eig", "trace") → "eig,trace"."""
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return value


def _settings(spec: object) -> dict[str, object]:
    return {f.name: _setting_text(getattr(spec, f.name)) for f in fields(spec) if f.metadata.get("setting", True)}


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
        return _settings(self)


@dataclass(frozen=True)
class MetricSpec:
    """Which metrics, with which options. `seed` seeds every probe, noise draw and random start."""

    metrics: tuple[str, ...] = ("eig", "trace")
    curvature: str = "hessian"
    k: int = 5
    which: str = "LA"
    tol: float = 1e-3
    max_matvecs: int | None = None
    max_vectors: int | None = None
    trace_method: str = "xtrace"
    probes: int = 100
    density_runs: int = 4
    density_steps: int = 60
    radius: tuple[float, ...] = (0.001, 0.005, 0.01)
    distribution: str = "uniform"
    scale: str = "absolute"
    noise_samples: int = 100
    bn_recalibration: int | None = None
    eps: float = 5e-4
    subspace_dim: int | None = None
    restarts: int = 2
    eps_method: str = "sign-ascent"
    eps_iters: int = 20
    rho: float | None = None
    p: str = "2"
    m: int = 128
    ascent_steps: int = 20
    ascent_restarts: int = 1
    eta: float = 0.0
    per_layer: tuple[str, ...] = ()
    per_layer_by: str = "module"  # the blocks --per-layer measures: one per module, or one per role (attention, mlp, ...)
    seed: int = 0
    progress: bool | str = field(default=False, metadata=RUNTIME, compare=False)
    warm_start: Any = field(default=None, metadata=RUNTIME, compare=False)  # a spectrum.WarmStart (`landscape track`)

    @classmethod
    def from_args(cls, args: argparse.Namespace, choices: Iterable[str] | None = None) -> MetricSpec:
        """The metric options of `args`; --metrics must name metrics of `choices` (default: the command's, which
        its parser records as `metric_choices`)."""
        choices = getattr(args, "metric_choices", ()) if choices is None else choices
        from analysis.cli.option_checks import parse_metrics, parse_radii, per_layer_names

        converted: dict[str, Any] = {"progress": getattr(args, "progress", False)}
        if getattr(args, "metrics", None) is not None:
            converted["metrics"] = tuple(parse_metrics(args.metrics, tuple(choices)))
        if getattr(args, "radius", None) is not None:
            converted["radius"] = tuple(parse_radii(args.radius))
        per_layer = getattr(args, "per_layer", None)
        converted["per_layer"] = tuple(per_layer_names(per_layer)) if per_layer else ()
        return _from_args(cls, args, **converted)

    def settings(self) -> dict[str, object]:
        return _settings(self)

    def check_fits(self, params: str, n_params: int, n_samples: int | None = None) -> None:
        """Options that must fit the model: --k and --subspace-dim at most the number of parameters measured
        (selected by --params `params`), a Lanczos budget (--max-matvecs) of at least --k, and --m at most the
        `n_samples` measured."""
        metrics = self.metrics
        where = f"the {n_params} parameters measured (--params {params})"
        if "eig" in metrics:
            if self.k > n_params:
                raise ValueError(f"--k {self.k} asks for more eigenvalues than {where}; give at most {n_params}")
            if self.max_matvecs is not None and self.max_matvecs < self.k:  # None: the default budget, ≥ k
                raise ValueError(f"--max-matvecs {self.max_matvecs} cannot find --k {self.k} eigenvalues; give at least {self.k}")
            from landscape.curvature.spectrum import minimum_vectors  # torch is loaded by now: the model exists

            fewest = minimum_vectors(min(self.k, n_params))
            if self.max_vectors is not None and self.max_vectors < fewest:
                raise ValueError(
                    f"--max-vectors {self.max_vectors} leaves Lanczos no room to restart for --k {self.k}; give at least {fewest}"
                )
        if "eps-sharpness" in metrics and self.subspace_dim is not None and self.subspace_dim > n_params:
            raise ValueError(f"--subspace-dim {self.subspace_dim} exceeds {where}; give at most {n_params}")
        m_metrics = {"m-sharpness", "adaptive-m-sharpness"} & set(metrics)
        if m_metrics and n_samples is not None and self.m > n_samples:
            raise ValueError(
                f"--m {self.m} exceeds the {n_samples} samples of the measurement set (--n-samples, --split); "
                f"give at most {n_samples}"
            )

    def help_default(self, name: str) -> str:
        """Field `name` as --help and the parser's default spell it."""
        return str(_setting_text(getattr(self, name)))


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
        own = {f.name: _setting_text(getattr(self, f.name)) for f in fields(self) if f.name not in ("measure", "out")}
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
