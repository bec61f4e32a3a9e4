"""Which parameters a measurement sees, and flat-vector views of them."""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

SELECTIONS = ("all", "weights", "no-bn", "no-bn-bias")
CHOICES = ", ".join((*SELECTIONS, "re:PATTERN", "glob:PATTERN[,PATTERN]", "module:TYPE[,TYPE]"))


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
    measurements); `re:PATTERN` (names matching a regular expression); `glob:PATTERN[,PATTERN]`
    (names matching any shell-style pattern, e.g. `glob:*.attn.*`); `module:TYPE[,TYPE]`
    (parameters owned directly by modules of a type: a class name such as `Linear` matches
    that class and its subclasses, a dotted path such as `torch.nn.Conv2d` is imported).

    Only parameters with requires_grad=True are ever selected, whatever the selection: a
    model whose base weights are frozen (LoRA adapters added by peft) is measured over its
    adapters alone, and `all` means all trainable parameters. Tied parameters count once.
    """
    named = list(model.named_parameters())  # tied parameters appear once, under their first name
    rule = _rule(model, selection)
    keep = [n for n, p in named if p.requires_grad and rule(n, p)]
    if not keep:
        frozen = sum(1 for n, p in named if not p.requires_grad and rule(n, p))
        why = f" (it matches {frozen} with requires_grad=False, which are never measured)" if frozen else ""
        raise ValueError(f"parameter selection {selection!r} matches no trainable parameter{why}; choose from {CHOICES}")
    return keep


def _rule(model: nn.Module, selection: str) -> Callable[[str, torch.Tensor], bool]:
    """The test `selection` puts to each (name, parameter)."""
    kind, _, argument = selection.partition(":")
    if selection == "all":
        return lambda name, p: True
    if selection == "weights":
        return lambda name, p: p.ndim >= 2
    if selection in ("no-bn", "no-bn-bias"):
        norm_names = norm_layer_parameter_names(model)
        return lambda name, p: name not in norm_names and not (selection == "no-bn-bias" and name.endswith("bias"))
    if kind == "re":
        try:
            pattern = re.compile(argument)
        except re.error as error:
            raise ValueError(f"parameter selection {selection!r}: not a regular expression ({error})") from None
        return lambda name, p: pattern.search(name) is not None
    if kind == "glob":
        patterns = _items(selection, argument)
        return lambda name, p: any(fnmatch.fnmatchcase(name, q) for q in patterns)
    if kind == "module":
        owned = {
            id(p) for m in _modules_of_types(model, selection, _items(selection, argument)) for p in m.parameters(recurse=False)
        }
        return lambda name, p: id(p) in owned
    raise ValueError(f"unknown parameter selection {selection!r}; choose from {CHOICES}")


def _items(selection: str, argument: str) -> list[str]:
    """The comma-separated patterns or types after `glob:` / `module:` (at least one)."""
    items = [item.strip() for item in argument.split(",") if item.strip()]
    if not items:
        raise ValueError(f"parameter selection {selection!r} names nothing after the colon; choose from {CHOICES}")
    return items


def _modules_of_types(model: nn.Module, selection: str, types: list[str]) -> list[nn.Module]:
    """Submodules that are instances of any of `types` (class names, or dotted import paths); each type must match one."""
    modules = list(model.modules())
    found = []
    for name in types:
        cls = _import_class(selection, name) if "." in name else None
        matches = (
            [m for m in modules if isinstance(m, cls)]
            if cls is not None
            else [m for m in modules if any(c.__name__ == name for c in type(m).__mro__)]
        )
        if not matches:
            present = sorted({type(m).__name__ for m in modules if next(m.parameters(recurse=False), None) is not None})
            raise ValueError(
                f"parameter selection {selection!r}: no module of type {name}; "
                f"the model's modules with parameters are {', '.join(present)}"
            )
        found += matches
    return found


def _import_class(selection: str, path: str) -> type:
    """A module class from its dotted import path (torch.nn.Linear)."""
    module_name, _, attribute = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"parameter selection {selection!r}: cannot import {path} ({error})") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"parameter selection {selection!r}: {path} is not a torch.nn.Module class")
    return cls


@dataclass(frozen=True)
class FlatLayout:
    """Maps a flat vector to named parameter tensors (views, no copies)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> FlatLayout:
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


def rescale_filters(
    direction: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], factor: float = 1.0, eps: float = 1e-6
) -> dict[str, torch.Tensor]:
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
