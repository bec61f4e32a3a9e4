"""CIFAR "python version" batch files written in the exact archive format, for tests that need CIFAR on disk."""

import pickle
from pathlib import Path

import numpy as np

from landscape.inputs.data import CIFAR_LAYOUTS


def write_cifar_batch(path, data: np.ndarray, labels: list[int], label_key: bytes) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"test", label_key: labels, b"data": data}, f, protocol=2)


def fake_cifar10(root, n=4):
    """n random images in each of the six CIFAR-10 files, written into `root` itself; {file: (data, labels)}."""
    rng = np.random.default_rng(0)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(n)]
        write_cifar_batch(root / name, data, labels, b"labels")
        batches[name] = (data, labels)
    return batches


def synthetic_cifar(root, kind: str, n_train: int, n_test: int, n_classes: int = 10, seed: int = 0) -> Path:
    """A learnable stand-in for the `kind` archive in root/<its folder> (as the archives extract): noisy images whose
    mean colour depends on the label (labels 0..n_classes-1), n_train split over the training files. Returns the folder."""
    folder_name, label_key, train_files, test_file = CIFAR_LAYOUTS[kind]
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(n_classes, 3))

    def images(n: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.integers(0, n_classes, size=n)
        pixels = colours[labels][:, :, None] + rng.normal(0, 40, size=(n, 3, 1024))
        return np.clip(pixels, 0, 255).astype(np.uint8).reshape(n, 3072), labels.tolist()

    for name, n in [*((f, n_train // len(train_files)) for f in train_files), (test_file, n_test)]:
        write_cifar_batch(folder / name, *images(n), label_key)
    return folder
