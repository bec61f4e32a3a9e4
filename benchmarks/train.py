"""Training methods side by side: test accuracy of a short run each, and per-step cost relative to SGD.

(a) every method trains the digits MLP for a few epochs (same seed, batch, lr) → test accuracy;
(b) seconds per optimizer step at equal batch size on the digits MLP and on C3 with a
CIFAR-shaped batch, as a ratio to plain SGD. Writes benchmarks/results/train.json.
Usage: python benchmarks/train.py [--epochs 15]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import seconds_per_call, write_results  # noqa: E402

from landscape.inputs.checkpoints import load_checkpoint  # noqa: E402
from landscape.inputs.data import load_data  # noqa: E402
from landscape.inputs.models import model_for_data  # noqa: E402
from landscape.training.loop import TrainConfig, train  # noqa: E402
from landscape.training.optim import make_optimizer  # noqa: E402

METHODS = {  # the method's main option at a typical value for this scale
    "sgd": {},
    "smoothout": {"a": 0.01},
    "adasmoothout": {"a": 0.05},
    "ssgd": {"sigma": 0.01},
    "nso": {"sigma": 0.01},
    "nrs": {"radius": 0.01},
    "sam": {"rho": 0.05},
    "asam": {"rho": 0.5},
}


def accuracy_runs(epochs: int) -> dict:
    rows = {}
    for name, options in METHODS.items():
        config = TrainConfig(
            data="digits",
            model="mlp",
            optimizer=name,
            optimizer_kwargs=options,
            batch_size=64,
            lr=0.05,
            epochs=epochs,
            save_every=epochs,
        )
        with tempfile.TemporaryDirectory() as tmp:
            meta = load_checkpoint(train(config, tmp, progress=False)).meta
        rows[name] = {
            "options": options,
            "test_accuracy": meta["metrics"]["test_accuracy"],
            "train_loss": meta["metrics"]["train_loss"],
        }
        print(name, rows[name], flush=True)
    return rows


def step_costs(problem: str) -> dict:
    """Seconds per optimizer step on one batch of 128 for every method, and the ratio to SGD."""
    if problem == "mlp-digits":
        data = load_data("digits")
        x, y = data.x_train[:128], data.y_train[:128]
        shape, classes = data.input_shape, 10
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
        shape, classes = (3, 32, 32), 10
    rows = {}
    for name, options in METHODS.items():
        torch.manual_seed(0)
        model, _ = model_for_data(problem.split("-")[0], shape, num_classes=classes)
        opt = make_optimizer(name, model, lr=1e-3, momentum=0.9, **options)
        rows[name] = {"step_s": seconds_per_call(lambda: opt.step(model, x, y, F.cross_entropy))}
    for row in rows.values():
        row["over_sgd"] = row["step_s"] / rows["sgd"]["step_s"]
    print(problem, {k: round(v["over_sgd"], 2) for k, v in rows.items()}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    payload = {
        "accuracy": {
            "data": "digits",
            "model": "mlp",
            "batch_size": 64,
            "lr": 0.05,
            "epochs": args.epochs,
            "runs": accuracy_runs(args.epochs),
        },
        "step_cost": {"batch_size": 128, "problems": {p: step_costs(p) for p in ("mlp-digits", "c3")}},
    }
    print("wrote", write_results("train", payload))


if __name__ == "__main__":
    main()
