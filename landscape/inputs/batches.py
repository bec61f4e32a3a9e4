"""What a batch is, how a model is called on it, and the losses that read it.

A batch is an `(x, y)` pair, a longer tuple (the model takes the first element), or a dict in the
HuggingFace style (the model takes every key but the labels as keyword arguments). A loss is a
callable `(model output, batch) → (sum of per-item losses, number of items)`; items are samples or,
for a language model, real (not padded, not ignored) tokens, so an uneven last batch and padded
sequences weigh exactly: the objective is Σ sums / Σ counts over the whole measurement set. A model
output with `.logits` (HuggingFace's ModelOutput) is read through it.

Built in: `class_cross_entropy` (class-index targets), `token_cross_entropy` (causal language
models: shifted labels, ignore_index −100), `mean_squared_error`. `accuracy(output, batch)` gives
(correct, counted) where the loss defines one: top-1 for classes, next-token for language models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F

LABEL_KEYS = ("labels", "label")
IGNORE_INDEX = -100

Batch = Any  # a tuple/list whose first element is the model input, or a mapping of keyword arguments


class BatchError(ValueError):
    """A batch or model output a loss cannot read: the message names what was expected."""


class Loss(Protocol):
    """(model output, batch) → (sum of the per-item losses, number of items). An optional `count(batch)` gives the
    number without a forward pass (the built-in losses have one)."""

    def __call__(self, output: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | int]: ...


def to_device(batch: Batch, device: torch.device, dtype: torch.dtype) -> Batch:
    """Every tensor of the batch on `device`; floating-point tensors in `dtype`, integer ones (labels, token ids) as
    they are. Tuples, lists and mappings keep their form (a HuggingFace BatchEncoding becomes a dict)."""
    if isinstance(batch, torch.Tensor) or not isinstance(batch, (tuple, list, Mapping)):
        tensor = torch.as_tensor(batch).to(device)
        return tensor.to(dtype) if tensor.is_floating_point() else tensor
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    return tuple(to_device(v, device, dtype) for v in batch)


def model_arguments(batch: Batch) -> tuple[tuple, dict]:
    """(args, kwargs) the model is called with: (x,) for a tuple, every key but the labels for a mapping."""
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise BatchError("an empty tuple is not a batch: expected (inputs, targets) or a dict of model arguments")
        return (batch[0],), {}
    return (batch,), {}


def targets(batch: Batch) -> torch.Tensor:
    """y of an (x, y) batch, or the "labels" of a dict batch."""
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            if key in batch:
                return batch[key]
        raise BatchError(f"the batch has no labels: expected a 'labels' key among {', '.join(map(str, batch))}")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise BatchError("the batch has no targets: expected (inputs, targets) or a dict with 'labels'")


def batch_size(batch: Batch) -> int:
    """Samples in the batch: the leading size of its first tensor."""
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if first.ndim else 1


SEQUENCE_KEY = "input_ids"  # a dict batch whose input_ids are (batch, length) holds token sequences


def sequence_length(batch: Batch) -> int | None:
    """Tokens per sequence of a dict batch of token sequences (the second size of its input_ids); None for others."""
    ids = batch.get(SEQUENCE_KEY) if isinstance(batch, Mapping) else None
    return int(ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.ndim == 2 else None


def truncated(batch: Batch, max_length: int) -> Batch:
    """A dict batch of token sequences cut to its first `max_length` tokens: every tensor whose second size is the
    sequence length (input_ids, attention_mask, labels, token_type_ids, position_ids) is sliced alike. Batches of
    other forms, and sequences already short enough, are returned as they are."""
    length = sequence_length(batch)
    if length is None or length <= max_length:
        return batch
    return {
        k: v[:, :max_length] if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[1] == length else v
        for k, v in batch.items()
    }


def logits(output: Any) -> torch.Tensor:
    """The model's output tensor: itself, its `.logits` (HuggingFace), or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    value = getattr(output, "logits", None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise BatchError(f"the model returned {type(output).__name__}: expected a tensor or an output with .logits")


def mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of class-index targets: F.cross_entropy, taken along the sample axis for few classes on a CPU.

    PyTorch's CPU log_softmax vectorizes along the class axis, which leaves the vector units idle
    for fewer than 16 classes: 1437x10 logits take 0.22 ms forward and 0.65 ms through an HVP's
    double backward, against 0.04 and 0.26 ms with the samples on the vectorized axis. Same value
    to rounding; for a few samples the transpose costs more than it saves, so they keep F.cross_entropy.
    """
    few_classes = logits.ndim == 2 and logits.shape[1] < 16 and logits.shape[0] >= 256
    if few_classes and logits.device.type == "cpu" and targets.dtype == torch.int64 and targets.ndim == 1:
        return -torch.log_softmax(logits.t().contiguous(), dim=0).gather(0, targets[None]).mean()
    return F.cross_entropy(logits, targets)


def from_mean(mean_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Loss:
    """A loss from a per-batch mean `mean_loss(output tensor, targets)` over the batch's samples (items = samples)."""

    def loss(output: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        y = targets(batch)
        return mean_loss(logits(output), y) * len(y), len(y)

    loss.mean_loss = mean_loss  # the curvature module's closed forms recognise cross-entropy through it
    loss.count = lambda batch: len(targets(batch))
    for attribute in ("__name__", "__qualname__", "__module__"):  # recorded under the mean loss's own name
        if hasattr(mean_loss, attribute):
            setattr(loss, attribute, getattr(mean_loss, attribute))
    return loss


class_cross_entropy = from_mean(mean_cross_entropy)
class_cross_entropy.__name__ = "class_cross_entropy"


def normalize_logits(scores: torch.Tensor) -> torch.Tensor:
    """Logits centred over the class axis (the last) and divided by their ℓ2 norm (at least 1e-10), gradients kept.

    Andriushchenko et al. (2023)'s logit normalization: cross-entropy of the result depends only on the
    logits' direction, so scaling the last layer up cannot make the loss flatter or sharper.
    """
    centred = scores - scores.mean(dim=-1, keepdim=True)
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-10)


def logit_normalized(loss: Loss) -> Loss:
    """`loss` taken of the normalized logits (normalize_logits) instead of the model's own; same items, same count."""

    def normalized(output: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | int]:
        return loss(normalize_logits(logits(output)), batch)

    if hasattr(loss, "count"):
        normalized.count = loss.count
    normalized.__name__ = normalized.__qualname__ = f"logit_normalized({loss_name(loss)})"
    normalized.__module__ = __name__
    return normalized


def mean_squared_error(output: Any, batch: Batch) -> tuple[torch.Tensor, int]:
    """Σ over samples of the mean squared error over each sample's outputs; the objective is F.mse_loss's mean."""
    prediction, y = logits(output), targets(batch)
    if prediction.shape != y.shape:
        y = y.reshape(prediction.shape) if y.numel() == prediction.numel() else y
    if prediction.shape != y.shape:
        raise BatchError(
            f"mean squared error: the model output has shape {tuple(prediction.shape)} and the targets "
            f"{tuple(y.shape)}; expected equal shapes"
        )
    per_sample = (prediction - y.to(prediction.dtype)).pow(2).reshape(len(y), -1).mean(dim=1)
    return per_sample.sum(), len(y)


mean_squared_error.count = lambda batch: len(targets(batch))


def language_model_labels(batch: Batch) -> torch.Tensor:
    """Token labels of a causal-LM batch: its "labels", else its input_ids with padding (attention_mask 0) ignored."""
    if not isinstance(batch, Mapping):
        raise BatchError("token cross-entropy needs a dict batch with 'input_ids' (and optionally 'labels', 'attention_mask')")
    if "labels" in batch:
        labels = batch["labels"]
    elif "input_ids" in batch:
        mask = batch.get("attention_mask")
        labels = batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
    else:
        raise BatchError(f"token cross-entropy: the batch has neither 'labels' nor 'input_ids' (keys: {', '.join(batch)})")
    if labels.ndim != 2:
        raise BatchError(
            f"token cross-entropy: expected token labels of shape (batch, sequence), got {tuple(labels.shape)} "
            "(class labels? use loss=class_cross_entropy)"
        )
    return labels


def token_cross_entropy(output: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of a causal language model: position t predicts label t+1; −100 labels are ignored.

    The sum over real tokens and their number, so the objective is the mean over every real token of
    the measurement set (HuggingFace's loss for one batch; the token-weighted mean over several).
    """
    scores, labels = logits(output), language_model_labels(batch)
    if scores.ndim != 3 or labels.shape != scores.shape[:2]:
        raise BatchError(
            f"token cross-entropy: expected logits (batch, sequence, vocabulary) and labels (batch, "
            f"sequence), got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    shifted = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(scores[:, :-1].reshape(-1, scores.shape[-1]), shifted, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shifted != IGNORE_INDEX).sum()


token_cross_entropy.count = lambda batch: int((language_model_labels(batch)[:, 1:] != IGNORE_INDEX).sum())


def accuracy(loss: Loss, output: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | int] | None:
    """(correct, counted) under `loss`'s notion of a prediction: top-1 class, next token; None where there is none.

    Counts stay tensors on the output's device (0-dim), so a forward pass per batch adds no device synchronization.
    """
    if loss is token_cross_entropy:
        scores, labels = logits(output), language_model_labels(batch)
        shifted = labels[:, 1:]
        real = shifted != IGNORE_INDEX
        return ((scores[:, :-1].argmax(-1) == shifted) & real).sum(), real.sum()
    if loss is mean_squared_error:
        return None
    try:
        scores, y = logits(output), targets(batch)
    except BatchError:
        return None
    if scores.ndim == 2 and y.ndim == 1 and not y.is_floating_point():
        return (scores.argmax(dim=1) == y).sum(), len(y)
    return None


LOSSES: dict[str, Loss] = {
    "cross-entropy": class_cross_entropy,
    "token-cross-entropy": token_cross_entropy,
    "mse": mean_squared_error,
}


def resolve_loss(name: str | None) -> Loss:
    """A built-in loss by name (cross-entropy when None), or a `module:callable` (output, batch) → (sum, count)."""
    if name is None:
        return class_cross_entropy
    if name in LOSSES:
        return LOSSES[name]
    if ":" in name:
        from landscape.inputs.user_code import import_callable

        return import_callable(name)
    raise ValueError(
        f"unknown loss {name!r}; use {', '.join(LOSSES)} or module:callable "
        "(a function (model output, batch) → (sum of per-item losses, number of items))"
    )


def loss_name(loss: Loss) -> str:
    """The name a loss is recorded under: its LOSSES key, else module:qualname."""
    for name, known in LOSSES.items():
        if known is loss:
            return name
    return f"{getattr(loss, '__module__', '?')}:{getattr(loss, '__qualname__', type(loss).__name__)}"
