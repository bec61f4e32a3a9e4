"""λ1, the trace, and critical, batch or preconditioned sharpness every N steps of a HuggingFace Trainer run.

Progressive sharpening and the edge of stability (Cohen et al. 2021; with Adam, Cohen et al. 2022) show in λ1 over
training. `CurvatureCallback` measures the model with a `landscape.CurvatureTracker` (warm-started, certified
Lanczos) on fixed batches and logs the values through `Trainer.log`, so every reporting callback (TensorBoard,
W&B, ...) and `trainer.state.log_history` get them, at the trainer's global step. Training is unchanged: the
tracker measures a copy in eval mode and leaves the weights, gradients and random states as they were.
Needs transformers (`pip install 'landscape[hf]'`); docs/how-to/trainer-callbacks.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from landscape.inputs.batches import Batch, Loss, class_cross_entropy, to_device, token_cross_entropy
from landscape.training.callbacks import ScheduledTracking, sampled_batches, seeded_random_state


class CurvatureCallback(ScheduledTracking, TrainerCallback):
    """Measures the Trainer's model every `every` optimizer steps and logs "landscape/lambda1" (and the rest).

    `trainer.add_callback(CurvatureCallback(trainer, every=50))`: the trainer is named so the values go through its
    `log`; the other options are ScheduledTracking's (landscape.training.callbacks). The batches are `batches`
    (dicts, as the model takes them), or else `n_samples` training items drawn once with `seed` and collated like
    the training batches. `measures` (the names of landscape's TRACKED), `tol`, `trace_matvecs` and `loss` are
    CurvatureTracker's; by default the loss is token cross-entropy for a causal language model and class
    cross-entropy otherwise, checked against the model's own `.loss` on the first batch. Preconditioned sharpness
    reads the trainer's optimizer. Each `train()` (a resume too) starts Lanczos cold.
    """

    def __init__(self, trainer: Trainer, every: int, batches: Sequence[Batch] | None = None, **options: Any) -> None:
        ScheduledTracking.__init__(self, every, batches, **options)  # options: measures, n_samples, loss, tol, ...
        self.trainer = trainer

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, train_dataloader=None, **kwargs
    ) -> None:
        batches = self.batches
        if batches is None:
            data = train_dataloader
            batches = sampled_batches(
                data.dataset, data.collate_fn, self.n_samples, args.per_device_train_batch_size, self.options["seed"]
            )
        self.start(model, batches, self.loss if self.loss is not None else checked_model_loss(model, batches[0]))

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, optimizer=None, **kwargs
    ) -> None:
        if not self.due(state.global_step):
            return
        values = self.measure(state.global_step, model, optimizer)
        pending = control.should_log  # Trainer.log clears it: the trainer's own log of this step must still happen
        self.trainer.log(dict(values))
        control.should_log = pending


def model_loss(model: nn.Module) -> Loss:
    """Token cross-entropy for a causal language model (a class transformers lists as one), class cross-entropy else."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model: the model it adapts
    causal = type(base).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return token_cross_entropy if causal else class_cross_entropy


def checked_model_loss(model: nn.Module, batch: Batch) -> Loss:
    """`model_loss(model)`, once it gives the model's own `.loss` on `batch` (in eval mode): λ1 of another loss would
    be no use. A model that returns no loss is taken at its word."""
    loss = model_loss(model)
    if not isinstance(batch, Mapping):
        return loss
    parameter = next(model.parameters())
    batch = to_device(batch, parameter.device, parameter.dtype)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), seeded_random_state(0):
            output = model(**batch)
    finally:
        model.train(training)
    own: Any = getattr(output, "loss", None)
    if own is None:
        return loss
    try:
        total, count = loss(output, batch)
        ours = f"{loss.__name__} gives {float(total) / float(count):.6g}"
        same = abs(float(total) / float(count) - float(own)) <= 1e-4 * max(1.0, abs(float(own)))
    except (RuntimeError, ValueError) as error:  # labels the loss cannot read (floats for class cross-entropy)
        ours, same = f"{loss.__name__} cannot read the batch ({(str(error).splitlines() or [''])[0]})", False
    if not same:
        raise ValueError(
            f"the model's own loss on the first batch is {float(own):.6g}, {ours}: pass loss=(model output, batch) → "
            "(sum of per-item losses, number of items) for the loss the model trains on"
        )
    return loss
