"""The eigenvalue coverage suite's problems and its tally: does every CERTIFIED Lanczos value lie within its stated bound
of the true i-th eigenvalue? Shared by tests/test_lanczos_coverage.py and benchmarks/certification.py.

Problems are dense symmetric matrices with controlled spectra (the hard cases: close top pairs from 1e-4 to 1e-1
relative, a close pair at the k-th place, exact multiplicity, tight clusters, negative eigenvalues larger in magnitude
than λ1) and real networks' dense Hessians (an MLP, a BatchNorm ConvNet and a residual block, at initialization,
mid-training and trained), each solved cold and warm-started from a NEIGHBOURING eigenvector (λ2's for λ1: the start
that hides λ1 best, as after the top two swap during training).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from landscape.curvature.spectrum import lanczos
from landscape.engine.operators import DenseOperator
from tests.helpers import dense

PAIR_GAPS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # λ2 = (1 − gap)·λ1


@dataclass(frozen=True)
class Problem:
    """A symmetric matrix with a known spectrum, and how to ask Lanczos for it."""

    name: str
    matrix: np.ndarray
    k: int
    which: str = "LA"
    warm: bool = False  # start from the eigenvector of the (k+1)-th wanted eigenvalue instead of a random vector

    def truth(self) -> tuple[np.ndarray, np.ndarray]:
        values, vectors = np.linalg.eigh(self.matrix)
        order = {"LA": np.argsort(-values), "SA": np.argsort(values), "LM": np.argsort(-np.abs(values))}[self.which]
        return values[order], vectors[:, order]


@dataclass
class Tally:
    """Runs, certified values, misses (certified values outside their bound), uncertified runs and products spent."""

    runs: int = 0
    certified_values: int = 0
    misses: list[str] = field(default_factory=list)
    uncertified: list[str] = field(default_factory=list)
    matvecs: list[int] = field(default_factory=list)

    def add(
        self,
        problem: Problem,
        truth: tuple[np.ndarray, np.ndarray],
        seed: int,
        tol: float,
        stop: str = "certified",
        bounded: bool = False,
    ) -> None:
        """One Lanczos run against `truth` (problem.truth()); with a cheaper `stop` (never certified) every converged run
        counts as a claim; `bounded`: in 2k + 10 stored vectors (thick restarts)."""
        values, vectors = truth
        start = torch.as_tensor(vectors[:, min(problem.k, len(values) - 1)]) if problem.warm else None
        op = DenseOperator(torch.as_tensor(problem.matrix))
        max_vectors = 2 * problem.k + 10 if bounded else None
        result = lanczos(op, problem.k, which=problem.which, tol=tol, seed=seed, start=start, stop=stop, max_vectors=max_vectors)
        self.runs += 1
        self.matvecs.append(result.n_matvecs)
        label = f"{problem.name} k={problem.k} {problem.which}{' warm' if problem.warm else ''} seed={seed}"
        if not (result.certified if stop == "certified" else result.converged):
            self.uncertified.append(label)
            return
        self.certified_values += len(result.values)
        error = np.abs(result.values - values[: problem.k])
        if np.any(error > result.error_bounds):
            worst = int(np.argmax(error / result.error_bounds))
            self.misses.append(f"{label}: λ{worst + 1} off by {error[worst]:.3g}, bound {result.error_bounds[worst]:.3g}")

    def to_dict(self) -> dict:
        return {
            "runs": self.runs,
            "certified_values": self.certified_values,
            "misses": self.misses,
            "uncertified": self.uncertified,
            "matvecs_median": float(np.median(self.matvecs)) if self.matvecs else None,
            "matvecs_max": max(self.matvecs, default=None),
        }


def synthetic_problems(n: int = 300, seeds: range = range(2)) -> Iterator[Problem]:
    """The controlled spectra, for k = 1, 3, 5 (cold and warm), over `seeds` matrices each."""
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        bulk = rng.uniform(-0.1, 0.3, n)
        spectra = {f"top pair {gap:g}": [1.0, 1.0 - gap, 0.7, 0.62, 0.55, 0.5] for gap in PAIR_GAPS}
        spectra |= {
            "pair at 5/6 (3%)": [1.0, 0.8, 0.65, 0.6, 0.5, 0.485],
            "double λ1": [1.0, 1.0, 0.8, 0.6, 0.5, 0.45],
            "double λ2": [1.0, 0.8, 0.8, 0.6, 0.5, 0.45],
            "cluster of 6 within 1%": [1.0, 0.998, 0.996, 0.994, 0.992, 0.99],
            "negative -3 and -2": [1.0, 0.9, 0.7, 0.6, 0.5, 0.45, -3.0, -2.0],
        }
        for name, top in spectra.items():
            matrix, _ = dense(np.concatenate([top, bulk[: n - len(top)]]), seed=seed)
            for k in (1, 3, 5):
                for warm in (False, True):
                    yield Problem(f"{name} (matrix {seed})", matrix, k, warm=warm)
        negative, _ = dense(np.concatenate([[1.0, 0.9, -3.0, -2.99], bulk[: n - 4]]), seed=seed)
        for which in ("SA", "LM"):  # the far end and the largest magnitudes, a close pair among them
            for k in (1, 3):
                yield Problem(f"negative pair (matrix {seed})", negative, k, which=which)


def network_problems(hessians: dict[str, np.ndarray]) -> Iterator[Problem]:
    """Real networks' dense Hessians (name -> matrix), k = 1, 3, 5, cold and warm."""
    for name, matrix in hessians.items():
        for k in (1, 3, 5):
            for warm in (False, True):
                yield Problem(name, matrix, k, warm=warm)


def network_hessians(stages: dict[str, int]) -> dict[str, np.ndarray]:
    """The dense float64 Hessians of the suite's three real networks after each stage's number of Adam steps."""
    from tests.interval_coverage import networks

    return {f"{net.name} after {steps} steps": net.hessian.numpy() for label, steps in stages.items() for net in networks(steps)}


def run(problems: Iterator[Problem], seeds: range, tol: float = 1e-3, stop: str = "certified", bounded: bool = False) -> Tally:
    tally = Tally()
    for problem in problems:
        truth = problem.truth()
        for seed in seeds:
            tally.add(problem, truth, seed, tol, stop, bounded)
    return tally
