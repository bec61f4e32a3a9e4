"""Checkpoints that carry their model spec and data spec, loaded safely (weights_only).

A toolkit checkpoint is a plain dict of tensors, strings and numbers, so
`torch.load(weights_only=True)` reads it without running pickled code. Foreign
checkpoints (a bare state dict, or one nested under a common key) need a model spec.
safetensors files (a bare state dict) and HuggingFace `save_pretrained` folders (config.json
and safetensors weights, one file or shards) hold no pickle at all: safe by construction.
A whole pickled model (`torch.save(model)`, read only with trust=True) is measured as it is, no model spec needed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from landscape.inputs.models import model_from_spec

FORMAT = "landscape-checkpoint"
VERSION = 1
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights")
# where a checkpoint keeps a torch optimizer's state_dict (a toolkit checkpoint: "optimizer", adaptive optimizers only)
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim")
# what torch.save itself puts in a pickle (tensor rebuilders, storages, OrderedDict): not worth naming
WEIGHTS_ONLY_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and the fix."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: weights plus what is known about how they were made."""

    path: str
    state_dict: dict[str, torch.Tensor]
    model_spec: dict | None = None
    data_spec: dict | None = None
    meta: dict = field(default_factory=dict)
    builds_own_weights: bool = False  # a save_pretrained folder: the model loads its weights from the folder itself
    module: nn.Module | None = field(default=None, repr=False)  # a whole pickled model (loaded with trust=True)
    optimizer_state: dict | None = field(default=None, repr=False)  # a torch optimizer state_dict saved beside the weights

    @property
    def is_native(self) -> bool:
        return self.model_spec is not None

    def build_model(self, model_spec: dict | None = None) -> nn.Module:
        """The model with these weights; `model_spec` overrides (or supplies) the stored spec."""
        spec = model_spec or self.model_spec
        if spec is None and self.module is not None:  # a whole pickled model is its own model spec
            return copy.deepcopy(self.module)
        if spec is None:
            raise CheckpointError(f"{self.path}: a bare state dict carries no model spec; pass model=NAME (or module:factory)")
        try:
            model = model_from_spec(spec)
        except (ValueError, TypeError, ImportError) as error:
            raise CheckpointError(f"{self.path}: cannot build model {spec.get('name')!r}: {error}") from error
        if not (self.builds_own_weights and spec is self.model_spec):
            load_weights(model, self.state_dict, self.path)
        return model


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    model_spec: dict,
    data_spec: dict | None = None,
    meta: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write a toolkit checkpoint atomically (a killed write never leaves a half file); `optimizer_state` (a torch
    optimizer's state_dict, its groups naming their parameters in "param_names") is kept for preconditioned sharpness."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_spec": model_spec,
        "data_spec": data_spec,
        "meta": meta or {},
    }
    if optimizer_state is not None:
        payload["optimizer"] = optimizer_state
    return atomic_save(payload, path)


def atomic_save(payload: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file, then rename: a killed write never leaves a half file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise CheckpointError(f"cannot write {path}: {error.strerror or error}") from error
    return path


def load_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> Checkpoint:
    """Read a toolkit or foreign checkpoint; arbitrary pickles only with `trust=True`."""
    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} not found")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            return huggingface_folder(path)
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file (a HuggingFace save_pretrained folder holds config.json)"
        )
    if path.endswith(".safetensors"):
        return Checkpoint(path, read_safetensors(path))
    return _interpret(path, _load_pickle(path, trust))


def load_optimizer_state(path: str | os.PathLike, *, trust: bool = False) -> dict:
    """The torch optimizer state_dict in `path`: a file holding one (`torch.save(optimizer.state_dict())`, a
    HuggingFace Trainer's optimizer.pt, also found in its checkpoint folder) or a checkpoint keeping one beside the
    weights (under one of OPTIMIZER_KEYS)."""
    path = str(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "optimizer.pt")):
        path = os.path.join(path, "optimizer.pt")
    if not os.path.isfile(path) or path.endswith(".safetensors"):
        raise CheckpointError(f"{path} holds no optimizer state (it is not a torch.save file)")
    obj = _load_pickle(path, trust)
    if is_optimizer_state(obj):
        return obj
    state = _interpret(path, obj).optimizer_state
    if state is None:
        raise CheckpointError(
            f"{path} holds no optimizer state (looked under {', '.join(OPTIMIZER_KEYS)}); save optimizer.state_dict() "
            "beside the weights or pass its file"
        )
    return state


def is_optimizer_state(obj: Any) -> bool:
    """Whether `obj` looks like a torch optimizer's state_dict."""
    return isinstance(obj, dict) and isinstance(obj.get("state"), dict) and isinstance(obj.get("param_groups"), list)


def _optimizer_state_in(obj: dict) -> dict | None:
    for key in OPTIMIZER_KEYS:
        value = obj.get(key)
        if is_optimizer_state(value):
            return value
        if isinstance(value, dict) and is_optimizer_state(value.get("base")):  # a toolkit training state (Method)
            return value["base"]
    return None


def _load_pickle(path: str, trust: bool) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        objects = _refused_globals(path, str(error))
        if objects:  # a class or function the weights-only unpickler refuses to import (and unpickling would call)
            raise CheckpointError(
                f"{path}: unreadable pickle: it holds Python objects beyond tensors ({', '.join(objects)}), which loading "
                "would import and may run; pass trust=True only if you trust it"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (unreadable pickle)") from None
    except OSError as error:  # torch's zip reader fails on some cut archives with a bare "[Errno 22] Invalid argument"
        if _starts_as_zip(path):
            raise CheckpointError(f"{path} is truncated or corrupt (an incomplete zip archive); save or copy it again") from None
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "zip archive" in message or "central directory" in message or isinstance(error, EOFError):
            raise CheckpointError(f"{path} is truncated or corrupt ({message})") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({message})") from None
    except Exception as error:  # anything torch.load raises on a foreign file
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {error})") from None
    return obj


def file_sha256(path: str | Path) -> str:
    """Content hash of a file, or of a folder's files (a save_pretrained folder): names and bytes, in name order
    (recorded so a result can be traced to exact weights)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _starts_as_zip(path: str) -> bool:
    """Whether the file begins as a zip archive does (torch.save's format since PyTorch 1.6)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (no pickle: nothing in the file can run)."""
    return _safetensors(path, lambda f: {name: f.get_tensor(name) for name in f.keys()})


def check_safetensors(path: str | os.PathLike) -> None:
    """A .safetensors file whose header reads (no weights are loaded); one line naming the file otherwise."""
    _safetensors(path, lambda f: list(f.keys()))


def _safetensors(path: str | os.PathLike, read: Any) -> Any:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package: pip install -e '.[hf]'") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return read(f)
    except Exception as error:  # safetensors raises its own SafetensorError on a damaged header
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is not a readable safetensors file ({message})") from None


def huggingface_folder(path: str) -> Checkpoint:
    """A `save_pretrained` folder: its config names the architecture; transformers reads its safetensors weights (one
    file or shards) when the model is built, so here only their headers are checked (no second copy of the weights
    in memory). Pickled weights (pytorch_model.bin) are refused: re-save the model with safe_serialization=True."""
    folder = Path(path)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder}/config.json cannot be read as JSON ({error})") from None
    architectures = config.get("architectures") or []
    if not architectures:
        raise CheckpointError(
            f"{folder}/config.json names no architecture (its 'architectures' list is empty); "
            "save the model with model.save_pretrained(folder)"
        )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        binary = " (pytorch_model.bin is a pickle, not read)" if (folder / "pytorch_model.bin").exists() else ""
        raise CheckpointError(
            f"{folder} holds no *.safetensors weights{binary}: re-save it with save_pretrained(folder, safe_serialization=True)"
        )
    for file in files:
        check_safetensors(file)
    spec = {"name": "huggingface", "kwargs": {"folder": str(folder.resolve()), "architecture": architectures[0]}}
    return Checkpoint(str(folder), {}, model_spec=spec, meta={"format": "huggingface"}, builds_own_weights=True)


def _refused_globals(path: str, message: str, limit: int = 3) -> list[str]:
    """The Python objects (module.name) a pickle imports, as torch's weights-only error names them or, for a
    raw pickle torch rejects earlier, as a scan of its opcodes finds them (nothing is executed)."""
    named = re.findall(r"GLOBAL ([\w.]+)", message)
    if named or zipfile.is_zipfile(path):
        return list(dict.fromkeys(named))[:limit]
    found, strings = [], []
    try:
        with open(path, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a pickle stream (or a broken one): whatever it named so far
        pass
    return list(dict.fromkeys(f for f in found if not f.startswith(WEIGHTS_ONLY_GLOBALS)))[:limit]


def _interpret(path: str, obj: Any) -> Checkpoint:
    if isinstance(obj, nn.Module):  # only reachable with trust=True
        return Checkpoint(path, obj.state_dict(), module=obj)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("version", 0) > VERSION:
            raise CheckpointError(f"{path} was written by a newer landscape (format version {obj['version']}); upgrade landscape")
        state = _state_dict_or_none(obj.get("state_dict"))
        if state is None:
            raise CheckpointError(f"{path} is a landscape checkpoint without weights (corrupt)")
        optimizer_state = _optimizer_state_in(obj)
        return Checkpoint(
            path, state, obj.get("model_spec"), obj.get("data_spec"), dict(obj.get("meta") or {}), optimizer_state=optimizer_state
        )
    state = _state_dict_or_none(obj)
    if state is None and isinstance(obj, dict):
        for key in NESTED_KEYS:
            state = _state_dict_or_none(obj.get(key))
            if state is not None:
                break
    if state is None:
        raise CheckpointError(
            f"{path} holds no state dict (a {type(obj).__name__}); expected tensors keyed by parameter name, "
            f"at top level or under one of {', '.join(NESTED_KEYS)}"
        )
    return Checkpoint(path, state, optimizer_state=_optimizer_state_in(obj) if isinstance(obj, dict) else None)


def _state_dict_or_none(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return None
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


class CheckpointNote(UserWarning):
    """Something a user should know about a checkpoint that still loads (the CLI prints it as one line)."""


# buffers PyTorch itself fills in when a state dict lacks them: BatchNorm's counter, new in PyTorch 0.4.1
OPTIONAL_BUFFERS = ("num_batches_tracked",)


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str = "checkpoint") -> None:
    """Load weights strictly, naming missing, unexpected, mis-shaped and non-finite tensors.

    The one exception is what PyTorch loads too: state dicts from before PyTorch 0.4.1 lack
    BatchNorm's `num_batches_tracked`; those keep the model's own value, with a CheckpointNote.
    """
    expected = model.state_dict()
    optional = [k for k in expected if k not in state_dict and k.rpartition(".")[2] in OPTIONAL_BUFFERS]
    if optional:
        state_dict = {**state_dict, **{k: expected[k] for k in optional}}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append("missing keys: " + short_list(missing))
    if unexpected:
        problems.append("unexpected keys: " + short_list(unexpected))
    if mismatched:
        problems.append("shape mismatch: " + short_list(mismatched))
    if problems:
        raise CheckpointError(f"{path} does not fit the model ({'; '.join(problems)}); check model=... and its options")
    nonfinite = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{path} has non-finite (NaN/inf) values in {short_list(nonfinite)}")
    model.load_state_dict(state_dict, strict=True)
    if optional:
        names = sorted({k.rpartition(".")[2] for k in optional})
        warnings.warn(
            CheckpointNote(
                f"{path} has no {', '.join(names)} for {len(optional)} BatchNorm layers "
                "(saved by PyTorch < 0.4.1); kept the model's defaults, as PyTorch does"
            ),
            stacklevel=2,
        )


def short_list(items: Sequence[str], limit: int = 5) -> str:
    """'a, b, c, d, e and 2 more': the first `limit` items of a list a message names."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
