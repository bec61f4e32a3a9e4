"""Our worst- and average-case sharpness against Andriushchenko et al. (2023)'s own code, on the same model and data.

Their repository (github.com/tml-epfl/sharpness-vs-generalization) is not vendored: give the folder holding its
sharpness.py, utils.py and models.py with --reference. Their code is imported as it is; it calls .cuda() on every
tensor, so on a machine without a GPU this driver makes Tensor.cuda return the tensor itself and drops
device="cuda" from rand_like (nothing else of theirs is changed). Their eval_APGD_sharpness can only run from
zero (rand_init=True fails on a tuple where a function is expected, and restarts need it), so its spread here is
over their step-size multiplier (0.5, 1, 2); ours is over our gradient start and --restarts random starts.

Model and data: their plain ResNet-18 (models.ResNet18, conv → BN, width --width) trained --epochs of Adam on the
digits upsampled to 3x32x32, measured in eval mode on the first 256 training samples in two batches of 128 (their
worst case is the mean over batches of each batch's own maximum: our m-sharpness with m = 128; their average case
is the mean loss under noise, our average-case). Logit normalization is their LogitNormalizationWrapper on their
side and our logit_normalization option on ours. BN folding: their public code declares --merge_bn_stats but never
reads it, so both codes are given the same model folded by our fold_batch_norm (theirs the folded module itself).

Writes benchmarks/results/andriushchenko_reference.json.
Usage: python benchmarks/andriushchenko_reference.py --reference /path/to/sharpness-vs-generalization
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import write_results  # noqa: E402

from landscape.engine.objective import Objective  # noqa: E402
from landscape.inputs.data import load_data  # noqa: E402
from landscape.inputs.fold_bn import fold_batch_norm  # noqa: E402
from landscape.sharpness.balls import average_case, m_sharpness  # noqa: E402

N, M = 256, 128  # measured samples and their batch size (Andriushchenko et al.'s bs_sharpness)


def without_gpu() -> None:
    """Let their CUDA-only calls run on the CPU: .cuda() is the identity, device="cuda" is dropped from rand_like."""
    if torch.cuda.is_available():
        return
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    rand_like = torch.rand_like
    torch.rand_like = lambda t, *args, device=None, **kwargs: rand_like(t, *args, **kwargs)


def digits_32(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits training split as 3x32x32 images (each pixel repeated 4x4, the channel 3 times), shuffled by `seed`."""
    x, y = load_data("digits").split("train")
    x = F.interpolate(x.float(), scale_factor=4, mode="nearest").repeat(1, 3, 1, 1)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def theirs_worst(sharpness, model, batches, rho, norm, mult, n_iters) -> float:
    with contextlib.redirect_stdout(io.StringIO()):  # their code prints its checkpoints and step-size cuts
        value, _, _ = sharpness.eval_APGD_sharpness(
            model, batches, lambda out, t: F.cross_entropy(out, t), None, None, rho=rho, step_size_mult=mult,
            n_iters=n_iters, n_restarts=1, rand_init=False, adaptive=True, version="default", norm=norm,
        )  # fmt: skip
    return float(value)


def theirs_average(sharpness, model, batches, rho, norm, n_iters, seed) -> float:
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        value, _, _, _ = sharpness.eval_average_sharpness(
            model, batches, lambda out, t: F.cross_entropy(out, t), n_iters=n_iters, rho=rho, adaptive=True, norm=norm
        )
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="folder with their sharpness.py, utils.py and models.py")
    parser.add_argument("--width", type=int, default=4, help="their model_width (64 in the paper)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="APGD iterations (their n_iters, 20 in the paper)")
    parser.add_argument("--restarts", type=int, default=2, help="our random starts besides the gradient start")
    parser.add_argument("--noise-samples", type=int, default=100)
    args = parser.parse_args()
    without_gpu()
    sys.path.insert(0, str(Path(args.reference).resolve()))
    import models  # noqa: PLC0415 - theirs, from --reference
    import sharpness  # noqa: PLC0415

    torch.manual_seed(0)
    start = time.perf_counter()
    x, y = digits_32()
    net = train(models.ResNet18(10, model_width=args.width), x[N:], y[N:], args.epochs)
    train_seconds = time.perf_counter() - start
    xs, ys = x[:N], y[:N]
    folded = fold_batch_norm(net)
    theirs_batches = [(xs[i : i + M], None, ys[i : i + M], None, None) for i in range(0, N, M)]
    ours_batches = [(xs[i : i + M], ys[i : i + M]) for i in range(0, N, M)]
    rows = []
    settings = [  # (norm, rho, logit normalization, folded): their ResNet grids' radii
        ("linf", 0.002, False, True),
        ("linf", 0.002, True, True),
        ("linf", 0.002, True, False),
        ("l2", 1.0, False, True),
        ("l2", 1.0, True, True),
        ("l2", 1.0, True, False),
    ]
    for norm, rho, normalized, fold in settings:
        model = folded.model if fold else net
        wrapped = models.LogitNormalizationWrapper(model, normalize_logits=normalized).eval()
        t = time.perf_counter()
        mults = {m: theirs_worst(sharpness, wrapped, theirs_batches, rho, norm, m, args.steps) for m in (0.5, 1.0, 2.0)}
        t_theirs = time.perf_counter() - t
        objective = Objective(net, ours_batches, device="cpu")
        t = time.perf_counter()
        ours = m_sharpness(
            objective, M, rho, p="inf" if norm == "linf" else 2, adaptive=True, steps=args.steps,
            restarts=args.restarts, logit_normalization=normalized, fold_bn=fold,
        )  # fmt: skip
        t_ours = time.perf_counter() - t
        rows.append(
            {
                "measure": "adaptive worst case (m-sharpness, m = 128)",
                "norm": norm,
                "rho": rho,
                "logit_normalization": normalized,
                "bn": "folded" if fold else "eval-mode BN, unfolded",
                "theirs_by_step_size_mult": mults,
                "theirs_default": mults[1.0],
                "ours": ours.value,
                "ours_batch_values": ours.batch_values.tolist(),
                "ours_batch_spreads": ours.batch_spreads.tolist(),
                "ours_over_theirs_default": ours.value / mults[1.0],
                "seconds": {"theirs_3_runs": t_theirs, "ours": t_ours},
                "ours_gradients": ours.n_grad,
            }
        )
        print(rows[-1], flush=True)
    for norm, rho, normalized in (("l2", 0.1, True), ("linf", 0.2, True)):
        wrapped = models.LogitNormalizationWrapper(folded.model, normalize_logits=normalized).eval()
        theirs = [theirs_average(sharpness, wrapped, theirs_batches, rho, norm, args.noise_samples, s) for s in range(3)]
        objective = Objective(net, ours_batches, device="cpu")
        ours = average_case(
            objective, rho, p="inf" if norm == "linf" else 2, adaptive=True, n_samples=args.noise_samples,
            logit_normalization=normalized, fold_bn=True,
        )  # fmt: skip
        rows.append(
            {
                "measure": "adaptive average case",
                "norm": norm,
                "rho": rho,
                "logit_normalization": normalized,
                "bn": "folded",
                "theirs_three_seeds": theirs,
                "theirs_mean": float(np.mean(theirs)),
                "ours": ours.increase,
                "ours_ci95": list(ours.increase_ci),
            }
        )
        print(rows[-1], flush=True)
    clean = Objective(net, ours_batches, device="cpu").evaluate()
    path = write_results(
        "andriushchenko_reference",
        {
            "reference": "github.com/tml-epfl/sharpness-vs-generalization (sharpness.py, models.py, utils.py at 6d73be9)",
            "model": f"their ResNet18 (plain, conv → BN), model_width={args.width}, "
            f"{sum(p.numel() for p in net.parameters())} parameters, {len(folded.fused)} BN fused, "
            f"{len(folded.merged)} merged",
            "training": f"Adam lr 1e-3, {args.epochs} epochs on {len(y) - N} digits upsampled to 3x32x32, {train_seconds:.0f}s",
            "measured": f"{N} training samples in {N // M} batches of {M}, eval mode, float32, CPU; loss "
            f"{clean.loss:.4f}, accuracy {clean.accuracy:.3f}",
            "steps": args.steps,
            "our_restarts": args.restarts,
            "rows": rows,
        },
    )
    print(path)


if __name__ == "__main__":
    main()
