"""Which parameters a measurement sees, and flat-vector views of them."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch
from torch import nn

_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

SELECTIONS = ("all", "weights", "no-bn", "no-bn-bias")


def norm_layer_parameter_names(model: nn.Module) -> set[str]:
    """Names of the affine parameters of BatchNorm/GroupNorm/LayerNorm layers."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NORM_LAYERS):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + p for p, _ in module.named_parameters(recurse=False))
    return names


def select_parameters(model: nn.Module, selection: str = "all") -> list[str]:
    """Names of the trainable parameters a measurement perturbs or differentiates.

    `all`; `weights` (tensors with ≥2 dims: conv/linear weights); `no-bn` (all but
    norm-layer affine parameters); `no-bn-bias` (also without biases, as NSO's Hessian
    measurements); or `re:PATTERN` (names matching a regular expression).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    norm_names = norm_layer_parameter_names(model)
    if selection == "all":
        keep = [n for n, _ in named]
    elif selection == "weights":
        keep = [n for n, p in named if p.ndim >= 2]
    elif selection == "no-bn":
        keep = [n for n, _ in named if n not in norm_names]
    elif selection == "no-bn-bias":
        keep = [n for n, _ in named if n not in norm_names and not n.endswith("bias")]
    elif selection.startswith("re:"):
        pattern = re.compile(selection[3:])
        keep = [n for n, _ in named if pattern.search(n)]
    else:
        raise ValueError(f"unknown parameter selection {selection!r}; use one of {', '.join(SELECTIONS)} or re:PATTERN")
    if not keep:
        raise ValueError(f"parameter selection {selection!r} matches no trainable parameter")
    return keep


@dataclass(frozen=True)
class FlatLayout:
    """Maps a flat vector to named parameter tensors (views, no copies)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> "FlatLayout":
        return cls(tuple(tensors), tuple(t.shape for t in tensors.values()))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(s.numel() for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.numels)

    def slices(self) -> dict[str, slice]:
        """Each parameter's slice of the flat vector (for per-layer breakdowns)."""
        out, start = {}, 0
        for name, numel in zip(self.names, self.numels):
            out[name] = slice(start, start + numel)
            start += numel
        return out

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """One flat vector (or a stack of them, when the tensors carry leading batch dims) in layout order."""
        lead = tensors[self.names[0]].shape[: -len(self.shapes[0])] if self.shapes[0] else tensors[self.names[0]].shape
        return torch.cat([tensors[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of `flat` shaped like the parameters; a leading batch dim is kept (for vmap-free stacks)."""
        chunks = torch.split(flat, self.numels, dim=-1)
        lead = flat.shape[:-1]
        return {n: c.reshape(*lead, *s) for n, c, s in zip(self.names, chunks, self.shapes)}


def rescale_filters(direction: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], factor: float = 1.0,
                    eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """Filter normalization (Li et al. 2018; AdaSmoothOut's filter noise): each filter of `direction` gets norm factor·‖w_filter‖.

    A filter is a row of the weight reshaped to (out_channels, −1); 1-D tensors are one filter per
    element (d_j → factor·|w_j|·sign d_j). `direction` tensors may carry extra leading (batch)
    dimensions. Rows shorter than `eps` are divided by `eps` instead, so they stay finite.
    """
    out = {}
    for name, d in direction.items():
        w = weights[name]
        lead = d.shape[: d.ndim - w.ndim]
        rows = d.reshape(*lead, *_filter_shape(w))
        w_norms = w.reshape(_filter_shape(w)).norm(dim=-1, keepdim=True)
        out[name] = (rows * (factor * w_norms / rows.norm(dim=-1, keepdim=True).clamp_min(eps))).reshape(d.shape)
    return out


def _filter_shape(w: torch.Tensor) -> tuple[int, int]:
    """(number of filters, filter size): rows of the (out_channels, −1) reshape; one element per filter for ≤1-D."""
    return (w.shape[0], w[0].numel()) if w.ndim >= 2 else (w.numel(), 1)


def tensor_digest(tensors: dict[str, torch.Tensor], salt: str = "") -> str:
    """SHA-256 of named tensors' names and bytes (plus a salt string): equal digests, equal tensors."""
    digest = hashlib.sha256(salt.encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
