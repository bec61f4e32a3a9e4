"""The training recipes behind `landscape demo` and `landscape figures` (METHODS.md's small-scale check).

An MLP on mnist1d with SGD momentum 0.9: small batch 32 (lr 0.01, 20 epochs) against large
batch 2000 (lr 0.1, 200 epochs), and each flat-minimum method at its default noise size.
"""

from __future__ import annotations

from pathlib import Path

from landscape.train import TrainConfig, train

SMALL, LARGE = 32, 2000
BATCH = {SMALL: {"lr": 0.01, "epochs": 20}, LARGE: {"lr": 0.1, "epochs": 200}}
METHODS = ("sgd", "smoothout", "adasmoothout", "ssgd", "nso", "nrs", "sam")
METHOD_OPTIONS = {"smoothout": {"a": 0.02}}  # the others at landscape.optim's defaults


def label(method: str, batch: int) -> str:
    return f"{method} B={batch}"


def config(method: str, batch: int, seed: int, epoch_fraction: float = 1.0) -> TrainConfig:
    """The recipe for one run; `epoch_fraction` < 1 shortens it (quick versions for tests)."""
    epochs = max(1, round(BATCH[batch]["epochs"] * epoch_fraction))
    return TrainConfig(data="mnist1d", model="mlp", optimizer=method, optimizer_kwargs=METHOD_OPTIONS.get(method, {}),
                       batch_size=batch, lr=BATCH[batch]["lr"], epochs=epochs, seed=seed,
                       save_every=max(1, epochs // 10))  # 11 trajectory checkpoints: enough for `surface --pca`


def train_runs(specs: list[tuple[str, int]], seeds: int, cache: Path, *, epoch_fraction: float = 1.0,
               progress: bool | str = False) -> tuple[list[str], list[str]]:
    """Train (or reuse from `cache`) every (method, batch) × seed: checkpoint paths and their labels, in order."""
    paths, labels = [], []
    for method, batch in specs:
        for seed in range(seeds):
            run = config(method, batch, seed, epoch_fraction)
            folder = cache / f"{method}-b{batch}-e{run.epochs}-seed{seed}"
            paths.append(str(train(run, folder, resume=True, progress=progress)))
            labels.append(label(method, batch))
    return paths, labels
