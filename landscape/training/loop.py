"""Trainer that writes toolkit checkpoints, a trajectory and a JSON-lines log, and resumes."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from landscape.engine import distributed
from landscape.engine.objective import Objective
from landscape.engine.progress import Progress
from landscape.inputs.checkpoints import CheckpointError, atomic_save, save_checkpoint
from landscape.inputs.data import Dataset, DataSpec, MeasurementSet
from landscape.inputs.models import model_for_data
from landscape.training.data_parallel import GradientSync
from landscape.training.optim import Method, make_optimizer
from landscape.training.train_tracking import TRACKED, CurvatureTracker

LR_SCHEDULES = ("constant", "step", "cosine")
LR_SCALINGS = ("none", "sqrt", "linear")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; stored in every checkpoint it writes."""

    data: str = "digits"
    data_seed: int = 0
    model: str = "mlp"
    model_kwargs: dict = field(default_factory=dict)
    optimizer: str = "sgd"
    optimizer_kwargs: dict = field(default_factory=dict)
    base: str | None = None
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 10
    seed: int = 0
    lr_schedule: str = "constant"
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    lr_warmup_epochs: int = 0  # a first phase at lr × lr_warmup_factor (SmoothOut's C3 regime: 60 epochs at 0.1×)
    lr_warmup_factor: float = 1.0
    lr_scaling: str = "none"
    lr_reference_batch: int = 128
    save_every: int = 1
    validation: int = 0  # training samples held out (seeded by data_seed) and logged as validation_loss/accuracy
    recipe: str = ""  # the named recipe or preset this run follows, recorded in every checkpoint
    track_every: int = 0  # every N epochs: λ1 (and the trace) of the training loss into log.jsonl (0: off)
    track: str = "eig"  # what track_every measures, comma-separated: any of train_tracking.TRACKED
    track_samples: int = 1000  # the fixed seeded subset of the training split the tracked curvature is measured on
    accumulate: int = 1  # micro-batches per step: each batch in `accumulate` sequential pieces, gradients summed
    amp: str = "none"  # mixed precision of the forward passes: none, bf16, or fp16 (with a loss scaler)

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; use {', '.join(LR_SCHEDULES)}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"unknown lr_scaling {self.lr_scaling!r}; use {', '.join(LR_SCALINGS)}")
        if self.epochs < 1 or self.batch_size < 1 or self.save_every < 1:
            raise ValueError("epochs, batch_size and save_every must be at least 1")
        if self.track_every < 0 or self.track_samples < 1:
            raise ValueError("track_every must be >= 0 and track_samples >= 1")
        tracked = [m for m in self.track.split(",") if m]
        if self.track_every and (not tracked or any(m not in TRACKED for m in tracked)):
            raise ValueError(f"track=... takes a comma list of {', '.join(TRACKED)}; got {','.join(tracked) or 'nothing'}")
        if self.lr_warmup_epochs < 0 or not self.lr_warmup_factor > 0:
            raise ValueError(
                f"lr_warmup_epochs must be >= 0 and lr_warmup_factor > 0, got {self.lr_warmup_epochs} and {self.lr_warmup_factor}"
            )
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be at least 1, got {self.accumulate}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"unknown amp {self.amp!r}; use {', '.join(AMP_MODES)}")
        if self.validation < 0:
            raise ValueError(f"validation must be a number of samples >= 0, got {self.validation}")

    @property
    def scaled_lr(self) -> float:
        """Large-batch learning-rate scaling: lr·sqrt(B/B_ref) (Hoffer et al. 2017) or lr·B/B_ref (Goyal et al. 2017)."""
        ratio = self.batch_size / self.lr_reference_batch
        return self.lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[self.lr_scaling]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d.setdefault("validation", 0)  # checkpoints written before these fields existed
        d.setdefault("recipe", "")
        for key, value in (
            ("track_every", 0),
            ("track", "eig"),
            ("track_samples", 1000),
            ("accumulate", 1),
            ("amp", "none"),
            ("lr_warmup_epochs", 0),
            ("lr_warmup_factor", 1.0),
        ):
            d.setdefault(key, value)
        d["lr_milestones"] = tuple(d.get("lr_milestones", ()))
        return cls(**d)


def build_optimizer(config: TrainConfig, model: torch.nn.Module, **overrides: Any) -> Method:
    """The optimizer `train` steps `model` with for `config` (`overrides` replace its optimizer options)."""
    options = {**config.optimizer_kwargs, **overrides}
    return make_optimizer(
        config.optimizer,
        model,
        base=config.base,
        lr=config.scaled_lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        seed=config.seed,
        accumulate=config.accumulate,
        amp=config.amp,
        **options,
    )


def _lr_factor(config: TrainConfig, epoch: int) -> float:
    """The schedule's multiple of the (scaled) learning rate in `epoch` (from 0), the warm-up phase included."""
    warmup = config.lr_warmup_factor if epoch < config.lr_warmup_epochs else 1.0
    return warmup * _schedule_factor(config, epoch)


def _schedule_factor(config: TrainConfig, epoch: int) -> float:
    if config.lr_schedule == "step":
        return config.lr_gamma ** sum(epoch >= m for m in config.lr_milestones)
    if config.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / config.epochs))
    return 1.0


def _metrics(
    model: torch.nn.Module,
    dataset: Dataset,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    device: torch.device | str = "cpu",
    sharded: bool = False,
) -> dict:
    """Train, test (and validation) loss/accuracy in eval mode, through the same Objective every measurement uses.

    `sharded`: each rank evaluates its share of the batches and the sums are all-reduced (data-parallel training).
    """
    splits = {s: MeasurementSet(s, batch_size=1024).batches(dataset) for s in ("train", "test") if len(dataset.split(s)[1])}
    if validation is not None:
        splits["validation"] = list(zip(validation[0].split(1024), validation[1].split(1024)))
    out = {}
    for split, batches in splits.items():
        e = Objective(
            model,
            distributed.shard(batches) if sharded else batches,
            device=device,
            hvp_method="double-backward",
            distributed=sharded,
        ).evaluate()
        out[f"{split}_loss"], out[f"{split}_accuracy"] = e.loss, e.accuracy
    return out


def hold_out(dataset: Dataset, n: int, seed: int) -> tuple[Dataset, tuple[torch.Tensor, torch.Tensor] | None]:
    """The data set without `n` training samples (a seeded choice), and those samples: a validation split for tuning."""
    if n == 0:
        return dataset, None
    if n >= len(dataset.y_train):
        raise ValueError(f"validation={n} leaves no training samples (the training split has {len(dataset.y_train)})")
    order = torch.randperm(len(dataset.y_train), generator=torch.Generator().manual_seed(10_000 + seed))
    keep, held = order[n:].sort().values, order[:n].sort().values
    return (
        dataclasses.replace(dataset, x_train=dataset.x_train[keep], y_train=dataset.y_train[keep]),
        (dataset.x_train[held], dataset.y_train[held]),
    )


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool | str = True,
    device: torch.device | str = "cpu",
    data_parallel: bool | None = None,
) -> Path:
    """Train, writing `trajectory/epoch_NNNN.pt`, `final.pt`, `state.pt` (for resuming) and `log.jsonl`; returns final.pt.

    `data_parallel` (default: whenever torchrun's process group has more than one rank): every rank trains
    on its contiguous share of each batch, gradients summed over the ranks once per step
    (landscape/training/data_parallel.py), and rank 0 alone writes. False trains this whole run in this process.
    """
    out = Path(out_dir)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():  # before any work, and never "[Errno 20] Not a directory" once the run writes
        raise ValueError(f"{existing} is a file; a run is a folder (checkpoints, trajectory, log): choose another out_dir=...")
    state_path, log_path = out / "state.pt", out / "log.jsonl"
    parallel = distributed.world_size() > 1 if data_parallel is None else data_parallel
    sync = GradientSync() if parallel else None
    world, main = (sync.world_size, sync.rank == 0) if sync else (1, True)
    device = distributed.local_device(device)
    data_spec = DataSpec(config.data, config.data_seed)
    dataset, validation = hold_out(data_spec.load(), config.validation, config.data_seed)
    torch.manual_seed(config.seed)
    model, model_spec = model_for_data(config.model, dataset, **config.model_kwargs)
    model.to(device)
    optimizer = build_optimizer(config, model)
    if sync is not None:
        optimizer.distribute(sync)
    shuffle = torch.Generator().manual_seed(config.seed)
    start_epoch = 0
    if resume and state_path.exists():
        start_epoch = _restore(state_path, config, model, optimizer, shuffle, world, sync.rank if sync else 0)
    elif out.exists() and any(out.iterdir()) and not resume:
        raise ValueError(f"{out} already holds a run; pass resume=True to continue it or choose another out_dir=...")
    if sync is not None:
        distributed.barrier()  # every rank has checked and read the folder before rank 0 writes to it
        sync.broadcast_module(model)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "trajectory").mkdir(exist_ok=True)
    x_train, y_train = (t.to(device) for t in dataset.split("train"))
    n_steps = math.ceil(len(y_train) / config.batch_size)
    meta = {"train": config.to_dict(), "optimizer": optimizer.config(), "world_size": world}
    tracker = None
    if config.track_every:  # after a resume the first measurement starts cold
        subset = MeasurementSet("train", min(config.track_samples, len(y_train)), 1024, seed=0).batches(dataset)
        tracker = CurvatureTracker(
            distributed.shard(subset) if sync else subset,
            device=device,
            distributed=sync is not None,
            measures=tuple(m for m in config.track.split(",") if m),
            batch_size=config.batch_size,
        )
    evaluate = functools.partial(_metrics, dataset=dataset, validation=validation, device=device, sharded=sync is not None)
    if start_epoch == 0:
        first = evaluate(model)
        if tracker is not None:
            first.update(tracker.measure(model))
            if main:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"epoch": 0, **first}) + "\n")
        if main:
            _save(out / "trajectory" / "epoch_0000.pt", model, model_spec, data_spec, meta, 0, first, optimizer)
    bar = Progress(config.epochs, f"train {config.optimizer}", "epoch", progress if main else False, initial=start_epoch)
    for epoch in bar.iterate(range(start_epoch, config.epochs)):
        for group in optimizer.param_groups:
            group["lr"] = config.scaled_lr * _lr_factor(config, epoch)
        model.train()
        order = torch.randperm(len(y_train), generator=shuffle).to(device)
        started, total = time.perf_counter(), 0.0
        for i in range(n_steps):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            mine = sync.share(idx) if sync else idx
            loss, _ = optimizer.step(model, x_train[mine], y_train[mine], F.cross_entropy, global_size=len(idx))
            if sync is not None:
                sync.average_buffers(model)
            total += float(loss) * len(idx)
        if not math.isfinite(total):
            raise ValueError(f"training diverged at epoch {epoch + 1} (non-finite loss); lower the learning rate")
        stepped = time.perf_counter() - started
        metrics = {
            "epoch": epoch + 1,
            "running_train_loss": total / len(y_train),
            **evaluate(model),
            "seconds": time.perf_counter() - started,
            "train_seconds": stepped,
        }
        if tracker is not None and (epoch + 1) % config.track_every == 0:
            metrics.update(tracker.measure(model, optimizer.base))
            metrics["track_fraction"] = metrics["track_seconds"] / max(stepped, 1e-9)  # of the epoch's training steps
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", test_acc=f"{metrics.get('test_accuracy', float('nan')):.3f}")
        generators = distributed.all_gather(optimizer.generator.get_state()) if sync else None
        if main:
            if (epoch + 1) % config.save_every == 0 or epoch + 1 == config.epochs:
                _save(
                    out / "trajectory" / f"epoch_{epoch + 1:04d}.pt",
                    model,
                    model_spec,
                    data_spec,
                    meta,
                    epoch + 1,
                    metrics,
                    optimizer,
                )
            with open(log_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            state = {
                "epoch": epoch + 1,
                "config": config.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "shuffle": shuffle.get_state(),
                "world_size": world,
            }
            if generators is not None:
                state["rank_generators"] = generators
            atomic_save(state, state_path)
    final = out / "final.pt"
    if main and (start_epoch < config.epochs or not final.exists()):  # a finished run's final.pt stays untouched
        atomic_save(torch.load(out / "trajectory" / f"epoch_{config.epochs:04d}.pt", weights_only=True), final)
    if sync is not None:
        distributed.barrier()  # final.pt is written before any rank returns it
    return final


def _save(
    path: Path, model, model_spec: dict, data_spec: DataSpec, meta: dict, epoch: int, metrics: dict, optimizer: Method
) -> None:
    save_checkpoint(
        path,
        model,
        model_spec=model_spec,
        data_spec=data_spec.to_dict(),
        meta={**meta, "epoch": epoch, "metrics": metrics},
        optimizer_state=optimizer.preconditioner_state(),
    )


def config_differences(stored: dict, asked: dict) -> str:
    """Each setting that differs, by its field name, with both values: 'lr=0.05 in the run, 0.1 asked; ...'."""

    def show(value: object) -> str:
        return "(unset)" if value is None else value if isinstance(value, str) else json.dumps(value)

    return "; ".join(
        f"{key}={show(stored.get(key))} in the run, {show(asked.get(key))} asked"
        for key in [*asked, *(k for k in stored if k not in asked)]
        if stored.get(key) != asked.get(key)
    )


def _restore(
    state_path: Path, config: TrainConfig, model, optimizer, shuffle: torch.Generator, world: int = 1, rank: int = 0
) -> int:
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    # stored configs from before a field existed read as its default; the recipe name is a label, not a setting
    stored, asked = TrainConfig.from_dict(state["config"]).to_dict(), config.to_dict()
    stored["recipe"] = asked["recipe"]
    differences = config_differences(stored, asked)
    if differences:
        raise CheckpointError(
            f"{state_path} belongs to a run with different settings ({differences}); resume with the run's options"
        )
    trained_on = int(state.get("world_size", 1))
    if trained_on != world and int(state["epoch"]) < config.epochs:  # each rank's noise stream goes on where it stopped
        raise CheckpointError(
            f"{state_path} belongs to a run trained on {trained_on} process(es), not {world}; "
            f"resume it with torchrun --nproc_per_node {trained_on}"
            if trained_on > 1
            else f"{state_path} belongs to a run trained in one process; resume it without torchrun"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if "rank_generators" in state:
        optimizer.generator.set_state(state["rank_generators"][rank])
    shuffle.set_state(state["shuffle"])
    return int(state["epoch"])
