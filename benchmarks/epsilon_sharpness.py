"""ε-sharpness maximizers on real checkpoints: φ reached per pass, against the trivial lower bounds.

Problems (CPU, eval mode, float32, one thread): the mnist1d MLP 40-100-100-10 (15,210 parameters)
trained by the demo recipe of analysis/experiments/recipes.py (SGD at batch 32 and 2000, seed 0; a third of the documented recipe's epochs), measured on all
4000 training samples; and a digits MLP 64-100-100-10 (17,610 parameters, SGD at batch 512 for 40
epochs) on 500 training samples. At ε ∈ {1e-4, 5e-4, 1e-3}:
- the trivial lower bounds: φ at the corner b·sign(∇L), and the best of 20 fixed projected sign
  steps from z = 0 (step b and step b/4);
- the first release's maximizer (L-BFGS-B on the box rescaled to [−1, 1]^p from random starts,
  10 iterations, 3 restarts), which barely moved;
- landscape's sign ascent and L-BFGS-B in raw coordinates at 5, 10 and 20 iterations from z = 0 and
  the corner only (restarts=0), and at the defaults (20 iterations, 2 random restarts as well).
Each row: best φ, forwards, gradients and seconds. Writes benchmarks/results/epsilon_sharpness.json.
Usage: python benchmarks/epsilon_sharpness.py [--cache runs/bench-eps]   (5-10 minutes on 2 shared cores, training included)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from analysis.experiments.recipes import DEMO, LARGE, SMALL, config  # noqa: E402
from landscape.engine.from_checkpoint import objective_from_checkpoint  # noqa: E402
from landscape.inputs.checkpoints import load_checkpoint  # noqa: E402
from landscape.inputs.data import MeasurementSet  # noqa: E402
from landscape.sharpness.box import epsilon_sharpness  # noqa: E402
from landscape.training.loop import TrainConfig, train  # noqa: E402

EPS = (1e-4, 5e-4, 1e-3)


def phi(objective, z, clean):
    return 100 * (objective.loss(objective.w + z) - clean) / (1 + clean)


def trivial_bounds(objective, eps, clean):
    w = objective.w
    b = eps * (w.abs() + 1)
    corner = phi(objective, b * torch.where(objective.grad() >= 0, 1.0, -1.0).to(w.dtype), clean)
    steps = 0.0
    for fraction in (1.0, 0.25):
        z = torch.zeros_like(w)
        for _ in range(20):
            z = torch.clamp(z + fraction * b * torch.sign(objective.grad(w + z)), -b, b)
            steps = max(steps, phi(objective, z, clean))
    return corner, steps


def first_release(objective, eps, clean, restarts=3, max_iter=10, seed=0):
    """The first release's maximizer: L-BFGS-B on t = z/b ∈ [−1, 1]^p from uniform random starts."""
    w = objective.w
    bound = (eps * (w.abs() + 1)).double().numpy()
    generator = torch.Generator().manual_seed(seed)
    visited = []

    def negative(t):
        z = torch.as_tensor(t * bound, dtype=w.dtype)
        loss = objective.loss(w + z)
        visited.append(loss)
        return -loss, -objective.grad(w + z).double().numpy() * bound

    start = time.perf_counter()
    for _ in range(restarts):
        t0 = 2 * torch.rand(len(bound), generator=generator, dtype=torch.float64).numpy() - 1
        scipy.optimize.minimize(
            negative,
            t0,
            jac=True,
            method="L-BFGS-B",
            bounds=scipy.optimize.Bounds(-np.ones(len(bound)), np.ones(len(bound))),
            options={"maxiter": max_iter, "ftol": 0.0, "gtol": 0.0},
        )
    best = 100 * (max([clean, *visited]) - clean) / (1 + clean)
    return {"phi": best, "forwards": len(visited) + 1, "grads": len(visited), "seconds": time.perf_counter() - start}


def problems(cache: Path) -> dict:
    runs = {
        "mnist1d MLP, SGD B=32": config("sgd", SMALL, 0, recipe=DEMO),
        "mnist1d MLP, SGD B=2000": config("sgd", LARGE, 0, recipe=DEMO),
        "digits MLP, SGD B=512": TrainConfig(
            data="digits", model="mlp", batch_size=512, lr=0.1, epochs=40, seed=0, save_every=1000
        ),
    }
    out = {}
    for name, run in runs.items():
        folder = cache / f"{run.data}-b{run.batch_size}-e{run.epochs}"
        path = train(run, folder, resume=(folder / "state.pt").exists(), progress=False)
        n = 500 if run.data == "digits" else None
        out[name] = objective_from_checkpoint(
            load_checkpoint(path), measurement=MeasurementSet("train", n, 1000, 0), device="cpu"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/bench-eps", help="folder for the trained checkpoints")
    args = parser.parse_args()
    rows = []
    for name, objective in problems(Path(args.cache)).items():
        clean = objective.loss()
        for eps in EPS:
            corner, steps = trivial_bounds(objective, eps, clean)
            row = {
                "problem": name,
                "n_params": objective.n_params,
                "loss": clean,
                "eps": eps,
                "corner": corner,
                "sign_steps_20": steps,
                "first_release": first_release(objective, eps, clean),
                "runs": [],
            }
            settings = [(m, it, 0) for m in ("sign-ascent", "lbfgsb") for it in (5, 10, 20)]
            for method, max_iter, restarts in settings + [("sign-ascent", 20, 2), ("lbfgsb", 20, 2)]:
                r = epsilon_sharpness(objective, eps, method=method, max_iter=max_iter, restarts=restarts, seed=0)
                row["runs"].append(
                    {
                        "method": method,
                        "max_iter": max_iter,
                        "restarts": restarts,
                        "phi": r.value,
                        "per_start": dict(zip(r.start_kinds, np.round(r.values, 6).tolist())),
                        "forwards": r.n_forward,
                        "grads": r.n_grad,
                        "seconds": r.seconds,
                        "above_bounds": bool(r.value >= max(corner, steps)),
                    }
                )
            rows.append(row)
            print(
                f"{name}, ε={eps:g}: corner {corner:.4g}, 20 sign steps {steps:.4g}, "
                f"first release {row['first_release']['phi']:.3g}",
                flush=True,
            )
            for run in row["runs"]:
                print(
                    f"  {run['method']:11s} {run['max_iter']:2d} it, {run['restarts']} random: φ {run['phi']:.5g} "
                    f"({run['forwards']} fwd, {run['grads']} grad, {run['seconds']:.2f}s)"
                    f"{'' if run['above_bounds'] else '  BELOW a trivial bound'}",
                    flush=True,
                )
    print("wrote", write_results("epsilon_sharpness", {"rows": rows}))


if __name__ == "__main__":
    main()
