"""Built-in and user data sets, and the fixed measurement set every result records.

A data spec string names where the data comes from (`digits`, `mnist1d`, `cifar10:DIR`,
`cifar100:DIR`, `npz:FILE`, `module:callable`); `load_data` turns it into a `Dataset` of
tensors, and a `MeasurementSet` fixes which samples, in which batches, a measurement uses.
"""

from __future__ import annotations

import codecs
import os
import pickle
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landscape.inputs.user_code import accepts, call_user, import_callable

SPLITS = ("train", "test")
SPEC_FORMS = "digits, mnist1d, cifar10:DIR, cifar100:DIR, npz:FILE, module:callable"
HOLDOUT_FRACTION = 0.2


class DataError(ValueError):
    """A data spec or file that cannot be used: the message names it and the fix."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test tensors of a classification data set, with the normalization applied to them."""

    spec: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    normalization: dict | None = None
    test_source: str = "provided"  # where the test split came from, e.g. a seeded hold-out

    def __post_init__(self) -> None:
        for name in SPLITS:
            x, y = self.split(name)
            if x.dtype != torch.float32 or y.dtype != torch.int64 or y.ndim != 1 or len(x) != len(y):
                raise DataError(
                    f"data {self.spec!r}: {name} split needs float32 x of shape (N, ...) and int64 labels of shape (N,); "
                    f"got x {x.dtype} {tuple(x.shape)}, y {y.dtype} {tuple(y.shape)}"
                )
        if self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise DataError(
                f"data {self.spec!r}: test inputs {tuple(self.x_test.shape[1:])} differ from train inputs {self.input_shape}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the "train" or "test" split."""
        if name == "train":
            return self.x_train, self.y_train
        if name == "test":
            return self.x_test, self.y_test
        raise DataError(f"unknown split {name!r}; use 'train' or 'test'")

    def split_origin(self, name: str) -> str | None:
        """Where a split's samples came from when the toolkit chose them (a hold-out of the user's x/y); None when given."""
        if self.test_source == "provided":
            return None
        given, held = len(self.y_train) + len(self.y_test), len(self.y_test)
        if name == "train":
            return (
                f"{len(self.y_train)} of the {given} samples in x/y; the other {held} are the test split, "
                f"a {self.test_source}; give x_test and y_test to measure all of x/y"
            )
        return f"the {held} of the {given} samples in x/y held out as the test split, a {self.test_source}"

    def describe(self) -> dict:
        """JSON-ready summary: spec, split sizes, input shape, classes, normalization, test split origin."""
        return {
            "spec": self.spec,
            "n_train": len(self.y_train),
            "n_test": len(self.y_test),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "normalization": self.normalization,
            "test_source": self.test_source,
        }


@dataclass(frozen=True, eq=False)
class BatchSet:
    """Batches a `module:callable` made itself, for models whose batches are not (x, y) arrays: HuggingFace dicts,
    token sequences of several lengths, tuples. The measurement set is these batches, in order, as given."""

    spec: str
    train: tuple
    test: tuple = ()

    def batches(self, split: str) -> list:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
        chosen = list(self.train if split == "train" else self.test)
        if not chosen:
            raise DataError(
                f"data {self.spec!r} has no {split} batches: return a dict with 'train' and 'test' lists to measure both"
            )
        return chosen

    def describe(self) -> dict:
        from landscape.inputs.batches import batch_size

        return {
            "spec": self.spec,
            "n_train": sum(batch_size(b) for b in self.train),
            "n_test": sum(batch_size(b) for b in self.test),
            "batches": True,
        }


def load_data(spec: str, *, normalize: bool | None = None, seed: int = 0) -> Dataset | BatchSet:
    """Load a data set from its spec string.

    `normalize=None` takes the spec's default: per-channel standardization with train
    statistics for `digits` and CIFAR; off for `mnist1d` (already standardized by its
    generator), `npz` and `module` (used as stored). `seed` drives every random choice:
    the digits split, the npz hold-out, the mnist1d generator (offset so 0 is its standard set), and is passed to a
    `module:callable` that accepts it.
    """
    kind, _, rest = spec.partition(":")
    if spec == "digits":
        return _finish(spec, *_digits(seed), num_classes=10, normalize=True if normalize is None else normalize)
    if spec == "mnist1d":
        x, y, x_test, y_test = _mnist1d(seed)
        return _finish(spec, x, y, x_test, y_test, num_classes=10, normalize=bool(normalize))
    if kind in ("cifar10", "cifar100") and rest:
        x, y, x_test, y_test = _cifar(kind, Path(rest), spec)
        return _finish(
            spec,
            x,
            y,
            x_test,
            y_test,
            num_classes=10 if kind == "cifar10" else 100,
            normalize=True if normalize is None else normalize,
        )
    if kind == "npz" and rest:
        return _npz(spec, Path(rest), seed, bool(normalize))
    if rest and kind not in ("digits", "mnist1d", "cifar10", "cifar100", "npz"):
        return _module(spec, seed, normalize)
    raise DataError(f"unknown data spec {spec!r}; use one of: {SPEC_FORMS}")


@dataclass(frozen=True)
class DataSpec:
    """How to rebuild a data set: the spec string plus the options that change its contents."""

    spec: str
    seed: int = 0
    normalize: bool | None = None

    def load(self) -> Dataset | BatchSet:
        return load_data(self.spec, normalize=self.normalize, seed=self.seed)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "seed": self.seed, "normalize": self.normalize}

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        return cls(d["spec"], int(d.get("seed", 0)), d.get("normalize"))


# ---------------------------------------------------------------- built-in sets


def _digits(seed: int) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 8x8 digits in [0, 1], split 1437/360 stratified by class with `seed` (cached on disk)."""
    x, y, train, test = _disk_cached(f"digits-seed{seed}", lambda: _digits_arrays(seed))
    x, y = torch.tensor(x).unsqueeze(1), torch.tensor(y)
    train, test = torch.tensor(train), torch.tensor(test)
    return x[train], y[train], x[test], y[test]


def _digits_arrays(seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train, test = train_test_split(np.arange(len(digits.target)), test_size=360, stratify=digits.target, random_state=seed)
    return ((digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64), np.sort(train), np.sort(test))


MNIST1D_DEFAULT_SEED = 42


def _mnist1d(seed: int) -> tuple[torch.Tensor, ...]:
    """mnist1d's procedural data set (Greydanus 2020), inputs shaped (1, 40), cached on disk.

    The generator runs with seed 42 + `seed`, so seed 0 gives mnist1d's standard set. It
    reseeds numpy's and Python's global RNGs; their state is restored afterwards.
    """
    x, y, x_test, y_test = _disk_cached(f"mnist1d-seed{seed}", lambda: _mnist1d_arrays(seed))
    return (
        torch.tensor(x, dtype=torch.float32).unsqueeze(1),
        torch.tensor(y, dtype=torch.int64),
        torch.tensor(x_test, dtype=torch.float32).unsqueeze(1),
        torch.tensor(y_test, dtype=torch.int64),
    )


def _mnist1d_arrays(seed: int) -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = MNIST1D_DEFAULT_SEED + seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


_MEMORY_CACHE: dict[str, tuple[np.ndarray, ...]] = {}


def cache_dir() -> Path:
    """Where built-in data sets are cached: $LANDSCAPE_CACHE, else $XDG_CACHE_HOME/landscape, else ~/.cache/landscape."""
    if os.environ.get("LANDSCAPE_CACHE"):
        return Path(os.environ["LANDSCAPE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "landscape"


def _disk_cached(name: str, compute: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Arrays built once per machine: a generator run (mnist1d) or scikit-learn's loader and split (digits), whose
    import alone costs ~1 s of every command's start-up. Read back from an .npz file written atomically; a file
    that cannot be read or written is rebuilt or skipped, never an error. Copies are returned, so no caller can
    modify the cache."""
    if name not in _MEMORY_CACHE:
        path = cache_dir() / f"{name}.npz"
        try:
            with np.load(path) as stored:
                arrays = tuple(stored[f"a{i}"] for i in range(len(stored.files)))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing, damaged or foreign
            arrays = tuple(np.asarray(a) for a in compute())
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                with open(partial, "wb") as f:
                    np.savez(f, **{f"a{i}": a for i, a in enumerate(arrays)})
                os.replace(partial, path)
            except OSError:
                pass
        _MEMORY_CACHE[name] = arrays
    return tuple(a.copy() for a in _MEMORY_CACHE[name])


# ---------------------------------------------------------------- CIFAR pickles

_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy's array rebuild function, whatever its module is called
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # files pickled by numpy < 2 (the originals)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # files pickled by numpy >= 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and plain values; any other global is refused, so no code runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays are allowed")


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (N, 3072), labels (N,)) from one CIFAR python batch file, read without running code."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a corrupt or hostile pickle can fail in many ways; all mean "unusable file"
        raise DataError(f"{path}: not a readable CIFAR python batch ({e}); re-download the 'python version' archive") from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(f"{path}: a CIFAR python batch must be a dict with b'data' and {label_key!r}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),):
        raise DataError(
            f"{path}: expected uint8 data of shape (N, 3072) and N labels; got {data.dtype} {data.shape} and {labels.shape} labels"
        )
    return data, labels


# each CIFAR kind's "python version" archive: (its folder, its label key, its training files, its test file)
CIFAR_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", b"labels", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
    "cifar100": ("cifar-100-python", b"fine_labels", ("train",), "test"),
}


def cifar_folder(kind: str, root: Path) -> Path:
    """Where the `kind` batches are read from: `root` itself, or its cifar-*-python subfolder when `root` has no test file."""
    folder, _, _, test_file = CIFAR_LAYOUTS[kind]
    return root / folder if not (root / test_file).exists() and (root / folder).is_dir() else root


def has_cifar(kind: str, root: Path) -> bool:
    """Whether `root` (or its cifar-*-python subfolder) holds every file of the `kind` archive."""
    _, _, train_files, test_file = CIFAR_LAYOUTS[kind]
    found = cifar_folder(kind, root)
    return all((found / name).is_file() for name in [*train_files, test_file])


def _cifar(kind: str, root: Path, spec: str) -> tuple[torch.Tensor, ...]:
    """CIFAR-10/100 "python version" batches (Krizhevsky 2009) in `root` or `root`/cifar-*-python, as (3, 32, 32) in [0, 1]."""
    folder, label_key, train_files, test_file = CIFAR_LAYOUTS[kind]
    if not root.is_dir():
        raise DataError(f"{spec}: directory {root} not found; point it at the extracted {folder} folder (or its parent)")
    root = cifar_folder(kind, root)
    expected = f"{kind} needs {', '.join(train_files)} and {test_file} (the python-version archive, extracted)"
    for name in [*train_files, test_file]:
        if not (root / name).is_file():
            raise DataError(f"{spec}: missing {root / name}; {expected}")

    def as_tensors(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
        x = torch.from_numpy(data).reshape(-1, 3, 32, 32).to(torch.float32) / 255.0  # row-major, channel-first RGB
        return x, torch.from_numpy(labels)

    x, y = as_tensors([_read_batch(root / name, label_key) for name in train_files])
    x_test, y_test = as_tensors([_read_batch(root / test_file, label_key)])
    return x, y, x_test, y_test


# ---------------------------------------------------------------- user data


def _labels(y: Any, where: str) -> torch.Tensor:
    """int64 labels from an integer (or integer-valued) 1-D array; DataError otherwise."""
    y = np.asarray(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y)  # a callable's CUDA tensors too
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D class indices; got shape {y.shape}")
    if y.dtype.kind not in "iub":
        if y.dtype.kind != "f" or not np.all(np.isfinite(y) & (y == np.round(y))):
            raise DataError(f"{where}: labels must be integer class indices; got {y.dtype} values such as {y[:3].tolist()}")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels must be non-negative class indices; found {int(y.min())}")
    return torch.from_numpy(y.astype(np.int64))


def _inputs(x: Any, where: str) -> torch.Tensor:
    """float32 inputs of shape (N, ...) with at least one feature axis."""
    try:
        x = torch.as_tensor(np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x), dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: inputs must be a numeric array ({e})") from e
    if x.ndim < 2:
        raise DataError(f"{where}: inputs must have shape (N, features...); got {tuple(x.shape)}")
    return x


def _batch_set(spec: str, out: Any) -> BatchSet | None:
    """`out` as a BatchSet if it is a list of batches or {"train": [...], "test": [...]}; None otherwise."""
    if isinstance(out, dict) and "train" in out and set(out) <= {"train", "test"}:
        train, test = out["train"], out.get("test", ())
    elif isinstance(out, list):
        train, test = out, ()
    else:
        return None
    for name, batches in (("train", train), ("test", test)):
        if not isinstance(batches, (list, tuple)):
            raise DataError(f"{spec}: {name} batches must be a list, got {type(batches).__name__}")
        for i, batch in enumerate(batches):
            if not _is_batch(batch):
                raise DataError(
                    f"{spec}: {name} batch {i} is a {type(batch).__name__}; a batch is an (x, y) tuple of "
                    "tensors or a dict of tensors (HuggingFace style)"
                )
    if not train:
        raise DataError(f"{spec}: returned no train batches")
    return BatchSet(spec, tuple(train), tuple(test))


def _is_batch(batch: Any) -> bool:
    if isinstance(batch, dict):
        return bool(batch) and all(isinstance(v, torch.Tensor) for v in batch.values())
    return isinstance(batch, (tuple, list)) and bool(batch) and all(isinstance(v, torch.Tensor) for v in batch)


def _user_arrays(
    where: str, x: Any, y: Any, x_test: Any = None, y_test: Any = None, *, seed: int, num_classes: int | None = None
) -> tuple[tuple[torch.Tensor, ...], int, str]:
    """Checked tensors; without a test split, a seeded 20% hold-out of x/y."""
    if (x_test is None) != (y_test is None):
        raise DataError(f"{where}: give both x_test and y_test, or neither (then a seeded 20% hold-out is used)")
    x, y = _inputs(x, where), _labels(y, where)
    if len(x) != len(y):
        raise DataError(f"{where}: x has {len(x)} samples but y has {len(y)}; they must match")
    if x_test is None:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, round(HOLDOUT_FRACTION * len(y))) if len(y) > 1 else 0
        test, train = order[:n_test].sort().values, order[n_test:].sort().values
        x, y, x_test, y_test = x[train], y[train], x[test], y[test]
        source = f"seeded {HOLDOUT_FRACTION:.0%} hold-out of x/y (seed={seed})"
    else:
        x_test, y_test = _inputs(x_test, where), _labels(y_test, where)
        if len(x_test) != len(y_test):
            raise DataError(f"{where}: x_test has {len(x_test)} samples but y_test has {len(y_test)}; they must match")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{where}: x_test samples have shape {tuple(x_test.shape[1:])}, x samples {tuple(x.shape[1:])}")
        source = "provided"
    n_seen = max((int(t.max()) for t in (y, y_test) if len(t)), default=-1) + 1
    if num_classes is None:
        num_classes = n_seen
    elif num_classes < n_seen:
        raise DataError(f"{where}: num_classes={num_classes} but labels go up to {n_seen - 1}")
    return (x, y, x_test, y_test), int(num_classes), source


def _npz(spec: str, path: Path, seed: int, normalize: bool) -> Dataset:
    """Arrays x, y (and optionally x_test, y_test) from a .npz file, used as stored."""
    if not path.is_file():
        raise DataError(f"{spec}: file {path} not found; expected an .npz with arrays x, y (optional x_test, y_test)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{spec}: cannot read {path} as .npz of numeric arrays ({e}); save it with numpy.savez") from e
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{spec}: {path} has no array {key!r} (found {sorted(arrays)}); save x and y with numpy.savez")
    parts, num_classes, source = _user_arrays(
        f"{spec}", arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test"), seed=seed
    )
    return _finish(spec, *parts, num_classes=num_classes, normalize=normalize, test_source=source)


def _module(spec: str, seed: int, normalize: bool | None) -> Dataset | BatchSet:
    """A user callable returning a Dataset, x_train, y_train, x_test, y_test (dict or tuple, optional num_classes),
    or its own batches: a list of batches, or a dict with "train" (and "test") lists of them (a BatchSet)."""
    fn = import_callable(spec, DataError)
    out = call_user(spec, fn, seed=seed) if accepts(fn, "seed") else call_user(spec, fn)
    keys = ("x_train", "y_train", "x_test", "y_test")
    batch_set = _batch_set(spec, out)
    if batch_set is not None:
        return batch_set
    if isinstance(out, Dataset):
        if normalize and out.normalization is None:
            return _finish(
                spec,
                out.x_train,
                out.y_train,
                out.x_test,
                out.y_test,
                num_classes=out.num_classes,
                normalize=True,
                test_source=out.test_source,
            )
        return replace(out, spec=spec)
    if isinstance(out, dict) and all(k in out for k in keys):
        arrays, num_classes = [out[k] for k in keys], out.get("num_classes")
    elif isinstance(out, tuple) and len(out) in (4, 5):
        arrays, num_classes = list(out[:4]), (out[4] if len(out) == 5 else None)
    else:
        raise DataError(
            f"{spec}: returned {type(out).__name__}; return a landscape.inputs.data.Dataset, a dict with "
            f"{', '.join(keys)} (optional num_classes), a tuple (x_train, y_train, x_test, y_test[, num_classes]), "
            "or batches: a list of them or a dict with 'train' and 'test' lists (a batch: (x, y) or a dict)"
        )
    parts, num_classes, source = _user_arrays(spec, *arrays, seed=seed, num_classes=num_classes)
    return _finish(spec, *parts, num_classes=num_classes, normalize=bool(normalize), test_source=source)


# ---------------------------------------------------------------- normalization


def _finish(
    spec: str,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    *,
    normalize: bool,
    test_source: str = "provided",
) -> Dataset:
    """The Dataset, standardized with train statistics per channel (axis 1) when asked."""
    normalization = None
    if normalize:
        x, x_test, normalization = _standardize(x, x_test)
    return Dataset(spec, x, y, x_test, y_test, num_classes, normalization, test_source)


def _standardize(x: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Subtract the train mean and divide by the train std per channel (axis 1); constant channels keep std 1."""
    dims = [d for d in range(x.ndim) if d != 1]
    x64 = x.double()
    mean = x64.mean(dim=dims)
    std = x64.std(dim=dims, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    shape = (1, -1) + (1,) * (x.ndim - 2)

    def norm(t: torch.Tensor) -> torch.Tensor:
        return ((t.double() - mean.view(shape)) / std.view(shape)).float()

    return norm(x), norm(x_test), {"mean": mean.tolist(), "std": std.tolist(), "axis": 1}


# ---------------------------------------------------------------- measurement set


@dataclass(frozen=True)
class MeasurementSet:
    """Which samples a measurement uses and how they are batched: a split, an optional seeded subset, a batch size."""

    split: str = "train"
    n_samples: int | None = None
    batch_size: int = 256
    seed: int = 0
    max_length: int | None = None  # token sequences cut to their first max_length tokens (dict batches)

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise DataError(f"max_length must be at least 2 (a next-token loss needs two tokens); got {self.max_length}")
        if self.split not in SPLITS:
            raise DataError(f"unknown split {self.split!r}; use 'train' or 'test'")
        if self.batch_size < 1:
            raise DataError(f"batch_size must be at least 1; got {self.batch_size}")
        if self.n_samples is not None and self.n_samples < 1:
            raise DataError(f"n_samples must be at least 1 (or None for the whole split); got {self.n_samples}")

    def indices(self, dataset: Dataset) -> torch.Tensor:
        """Sorted int64 indices into the split: all of it, or a seeded random subset without replacement."""
        n = len(dataset.split(self.split)[1])
        if self.n_samples is None:
            return torch.arange(n)
        if self.n_samples > n:
            raise DataError(
                f"n_samples={self.n_samples} but the {self.split} split of {dataset.spec!r} has {n} samples; ask for at most {n}"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return order[: self.n_samples].sort().values

    def batches(self, dataset: Dataset | BatchSet) -> list:
        """The fixed (x, y) batches in index order; the last one may be smaller and is kept. A BatchSet's own batches
        as given (a user's batches are the measurement set: n_samples does not apply to them)."""
        if isinstance(dataset, BatchSet):
            if self.n_samples is not None:
                raise DataError(
                    f"n_samples={self.n_samples}: data {dataset.spec!r} gives its own batches; choose the samples in the callable"
                )
            from landscape.inputs.batches import truncated

            batches = dataset.batches(self.split)
            return batches if self.max_length is None else [truncated(b, self.max_length) for b in batches]
        x, y = dataset.split(self.split)
        idx = self.indices(dataset)
        return [(x[chunk], y[chunk]) for chunk in idx.split(self.batch_size)]

    def describe(self, dataset: Dataset | None = None) -> dict:
        """JSON-ready record: split, actual n_samples, whether it is a subset, batch_size, seed, n_batches, data spec."""
        if isinstance(dataset, BatchSet):
            from landscape.inputs.batches import batch_size

            batches = self.batches(dataset)
            return {
                "split": self.split,
                "n_samples": sum(batch_size(b) for b in batches),
                "subset": False,
                "batch_size": None,
                "seed": self.seed,
                "n_batches": len(batches),
                "data": dataset.spec,
                **({"max_length": self.max_length} if self.max_length is not None else {}),
            }
        n = len(self.indices(dataset)) if dataset is not None else self.n_samples
        return {
            "split": self.split,
            "n_samples": n,
            "subset": self.n_samples is not None,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "n_batches": -(-n // self.batch_size) if n is not None else None,
            "data": dataset.spec if dataset is not None else None,
            **({"origin": origin} if dataset is not None and (origin := dataset.split_origin(self.split)) else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> MeasurementSet:
        """Rebuild from `describe()` output (extra keys ignored); it selects the same samples."""
        n = d.get("n_samples") if d.get("subset", True) else None
        length = d.get("max_length")
        return cls(
            d.get("split", "train"),
            None if n is None else int(n),
            int(d.get("batch_size") or 256),
            int(d.get("seed", 0)),
            None if length is None else int(length),
        )
