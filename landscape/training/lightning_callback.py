"""λ1, the trace, and critical, batch or preconditioned sharpness every N steps of a PyTorch Lightning run.

The Lightning twin of `landscape.training.hf_callback` (progressive sharpening and the edge of stability, Cohen et
al. 2021): `LightningCurvatureCallback` measures the LightningModule with a `landscape.CurvatureTracker` on fixed
batches every `every` optimizer steps and hands the values to every logger of the trainer (`log_metrics` at the
global step, whatever `log_every_n_steps` says). Training is unchanged: the tracker measures a copy in eval mode.
Needs lightning (`pip install 'landscape[lightning]'`); docs/how-to/trainer-callbacks.md.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from landscape.training.callbacks import ScheduledTracking, sampled_batches


class LightningCurvatureCallback(ScheduledTracking, pl.Callback):
    """Measures the LightningModule every `every` optimizer steps and logs "landscape/lambda1" (and the rest).

    `pl.Trainer(callbacks=[LightningCurvatureCallback(every=50)])`, with ScheduledTracking's options
    (landscape.training.callbacks). The model is called as the module's `forward` on `batches`, or else on
    `n_samples` items of the training DataLoader's data set, drawn once with `seed` and collated like the training
    batches; `loss` as for Objective (class cross-entropy by default). `measures`, `tol` and `trace_matvecs` are
    CurvatureTracker's; preconditioned sharpness reads the trainer's optimizer (when it has one). Each `fit` (a
    resume from a checkpoint too) starts Lanczos cold.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = self.batches
        if batches is None:
            data = trainer.train_dataloader
            if not hasattr(data, "collate_fn"):
                raise ValueError(f"the training data is a {type(data).__name__}, not one DataLoader: give the batches")
            size = data.batch_size or getattr(data.batch_sampler, "batch_size", None)  # a DataLoader given a batch_sampler
            batches = sampled_batches(data.dataset, data.collate_fn, self.n_samples, size, self.options["seed"])
        self.start(pl_module, batches, self.loss)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.due(step):
            return
        optimizers = trainer.optimizers
        values = self.measure(step, pl_module, optimizers[0] if len(optimizers) == 1 else None)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
