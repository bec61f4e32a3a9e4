"""How often each stated 95% interval covers a known truth, over many seeds: the coverage suite's machinery.

The truths are independent of the estimators: the exact trace of the dense float64 Hessian of a real (small, briefly
trained) network, a high-precision Monte Carlo expected loss drawn through tests/ground_truth.py's loss (or the
closed form on a quadratic), and Kendall's τ of a bivariate normal, (2/π)·arcsin ρ. tests/test_coverage.py runs it
with 200 seeds, benchmarks/coverage.py with more, writing benchmarks/results/coverage.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from analysis.report.rank_correlation import correlate
from landscape.curvature.trace import TraceResult, hutchinson, hutchpp, xtrace
from landscape.engine.objective import Objective
from landscape.engine.operators import DenseOperator
from landscape.examples import quadratic
from landscape.sharpness.perturb import expected_loss, noise_std, sharpness_curve
from landscape.statistics import binomial_interval, t_quantile
from tests.ground_truth import dense_hessian, dense_reference
from tests.helpers import classification_batches, tiny_convnet_bn, tiny_mlp
from tests.model_zoo import ZOO, zoo_batches

ESTIMATORS: dict[str, Callable[..., TraceResult]] = {"hutchinson": hutchinson, "hutchpp": hutchpp, "xtrace": xtrace}
_SLACK = 1e-9  # relative: an estimate that is exact up to rounding (a sketch that held all of range(A)) covers


@dataclass(frozen=True)
class Coverage:
    """`hits` of `n` seeds whose interval held the truth; `z_rms`: rms of (estimate − truth)/stderr (≈ 1 if honest)."""

    quantity: str
    problem: str
    hits: int
    n: int
    z_rms: float

    @property
    def rate(self) -> float:
        return self.hits / self.n

    @property
    def interval(self) -> tuple[float, float]:
        """95% Clopper–Pearson interval of the coverage itself."""
        return binomial_interval(self.hits, self.n)

    def to_dict(self) -> dict:
        low, high = self.interval
        fields = {"quantity": self.quantity, "problem": self.problem, "hits": self.hits, "n": self.n}
        return fields | {"coverage": self.rate, "coverage_ci": [low, high], "z_rms": self.z_rms}

    def line(self) -> str:
        low, high = self.interval
        return (
            f"{self.quantity:34s} {self.problem:14s} {self.rate:6.1%} [{low:.1%}, {high:.1%}] of {self.n}, z_rms {self.z_rms:.2f}"
        )


def pooled(coverages: Sequence[Coverage], quantity: str) -> Coverage:
    """One quantity's coverage over every problem, seeds pooled."""
    hits, n = sum(c.hits for c in coverages), sum(c.n for c in coverages)
    z_rms = math.sqrt(sum(c.z_rms**2 * c.n for c in coverages) / n)
    return Coverage(quantity, "all", hits, n, z_rms)


def _tally(quantity: str, problem: str, estimates, stderrs, halfwidths, truth: float) -> Coverage:
    estimates, stderrs, halfwidths = (np.asarray(v, float) for v in (estimates, stderrs, halfwidths))
    error = np.abs(estimates - truth)
    hits = int((error <= halfwidths + _SLACK * (1 + abs(truth))).sum())
    z = np.where(stderrs > 0, error / np.where(stderrs > 0, stderrs, 1), 0.0)
    return Coverage(quantity, problem, hits, len(estimates), float(np.sqrt(np.mean(z**2))))


# ----------------------------------------------------------------------------------------- problems
def _fit(model: nn.Module, batches: list, steps: int) -> nn.Module:
    """A few full-batch Adam steps (BatchNorm on its running statistics), so the Hessian is a trained network's."""
    model.eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        sum(nn.functional.cross_entropy(model(x), y, reduction="sum") for x, y in batches).backward()
        optimizer.step()
    return model


@dataclass
class Network:
    """A real network and its measurement set, small enough for a dense Hessian (the truth, computed once)."""

    name: str
    model: nn.Module
    batches: list

    @cached_property
    def objective(self) -> Objective:
        return Objective(self.model, self.batches, dtype=torch.float64, device="cpu")

    @cached_property
    def hessian(self) -> torch.Tensor:
        h = dense_hessian(self.model, self.batches, "eval")
        return (h + h.T) / 2

    @property
    def blocks(self) -> dict[str, slice]:
        return self.objective.layout.slices()


def networks(steps: int = 100) -> list[Network]:
    """An MLP, a ConvNet with BatchNorm and a residual block (torchvision style, BN), each after `steps` of training."""
    mlp = classification_batches(50, (12,), 4, [20, 20, 10])[2]
    conv = classification_batches(40, (1, 4, 4), 3, [16, 16, 8])[2]
    block = [(x.float(), y) for x, y in zoo_batches("torchvision-basic-block", (20, 20))]
    return [
        Network("mlp", _fit(tiny_mlp(), mlp, steps), mlp),
        Network("convnet-bn", _fit(tiny_convnet_bn(), conv, steps), conv),
        Network("resnet-block", _fit(ZOO["torchvision-basic-block"].build(), block, steps), block),
    ]


# -------------------------------------------------------------------------------------------- trace
def trace_coverage(method: str, network: Network, budget: int, seeds: Sequence[int], blocks: bool = False) -> list[Coverage]:
    """The trace's 95% interval (TraceResult.ci) against the dense Hessian's exact trace; per parameter tensor too."""
    op = DenseOperator(network.hessian)
    results = [ESTIMATORS[method](op, budget, seed=s, blocks=network.blocks if blocks else None) for s in seeds]
    quantity = f"trace {method} ({budget} matvecs)"
    halves = [(r.ci[1] - r.ci[0]) / 2 for r in results]
    truth = float(torch.trace(network.hessian))
    out = [_tally(quantity, network.name, [r.estimate for r in results], [r.stderr for r in results], halves, truth)]
    if blocks:
        estimates, stderrs, block_halves = [], [], []
        for name, b in network.blocks.items():
            truth = float(torch.trace(network.hessian[b, b]))
            for r, half in zip(results, halves):
                estimate, err = r.blocks[name]
                estimates.append(estimate - truth)
                stderrs.append(err)
                block_halves.append(half / r.stderr * err if r.stderr > 0 else 0.0)
        out.append(_tally(f"{quantity}, per tensor", network.name, estimates, stderrs, block_halves, 0.0))
    return out


# ------------------------------------------------------------------------------ expected loss, curve
def expected_increase(network: Network, radius: float, n_pairs: int = 20_000, seed: int = 12345) -> tuple[float, float]:
    """E L(w+u) − L(w), u ~ U[−a, a]^n, by Monte Carlo over antithetic pairs through the dense reference loss.

    Returns (value, its standard error); with 2·10⁴ pairs the error is ~3% of a 50-pair 95% half-width.
    """
    loss, w0 = dense_reference(network.model, network.batches, "eval")
    batched = torch.func.vmap(loss)
    generator = torch.Generator().manual_seed(seed)
    values = []
    with torch.no_grad():
        for start in range(0, n_pairs, 5000):
            u = radius * (2 * torch.rand(min(5000, n_pairs - start), len(w0), generator=generator, dtype=w0.dtype) - 1)
            values.append((batched(w0 + u) + batched(w0 - u)) / 2)
        clean = float(loss(w0))
    pairs = torch.cat(values).numpy()
    return float(pairs.mean()) - clean, float(pairs.std(ddof=1) / math.sqrt(len(pairs)))


def expected_loss_coverage(network: Network, radius: float, seeds: Sequence[int], n_samples: int = 100) -> Coverage:
    """expected_loss's 95% CI of the increase (uniform, absolute noise, antithetic) against a Monte Carlo truth."""
    truth = expected_increase(network, radius)[0]
    runs = [expected_loss(network.objective, radius, n_samples=n_samples, seed=seed) for seed in seeds]
    halves = [(r.increase_ci[1] - r.increase_ci[0]) / 2 for r in runs]
    centres = [(r.increase_ci[1] + r.increase_ci[0]) / 2 for r in runs]  # the interval need not be symmetric
    label = f"expected loss a={radius:g} ({n_samples} draws)"
    coverage = _tally(label, network.name, centres, [r.stderr for r in runs], halves, truth)
    z = [(r.increase - truth) / r.stderr for r in runs]
    return Coverage(label, network.name, coverage.hits, coverage.n, float(np.sqrt(np.mean(np.square(z)))))


def curve_coverage(
    network: Network, radii: Sequence[float], seeds: Sequence[int], n_samples: int = 20, n_probes: int = 20
) -> list[Coverage]:
    """The sharpness curve's 95% CI at each radius (each an expected-loss CI) against a 10⁵-pair Monte Carlo, and its
    prediction ½a²·tr(SHS) ± t·stderr against the dense Hessian's exact value (uniform, absolute noise)."""
    objective = network.objective
    truths = [expected_increase(network, a)[0] for a in radii]
    s = noise_std(objective).double()
    exact = 0.5 * float((s * s * network.hessian.diagonal()).sum()) * np.asarray(radii) ** 2
    curves = [sharpness_curve(objective, radii, n_samples=n_samples, n_probes=n_probes, seed=seed) for seed in seeds]
    out = []
    for i, (a, truth) in enumerate(zip(radii, truths)):
        centres = [(c.increase_ci[i, 1] + c.increase_ci[i, 0]) / 2 for c in curves]  # the interval need not be symmetric
        halves = [(c.increase_ci[i, 1] - c.increase_ci[i, 0]) / 2 for c in curves]
        label = f"sharpness curve a={a:g} ({n_samples} draws)"
        out.append(_tally(label, network.name, centres, [c.increase_stderr[i] for c in curves], halves, truth))
    q = t_quantile(n_probes - 1)
    for i, a in enumerate(radii):
        label = f"curve prediction a={a:g} ({n_probes} probes)"
        stderrs = [c.prediction_stderr[i] for c in curves]
        out.append(_tally(label, network.name, [c.prediction[i] for c in curves], stderrs, q * np.asarray(stderrs), exact[i]))
    return out


def quadratic_coverage(radius: float, seeds: Sequence[int], n_samples: int = 100) -> Coverage:
    """Expected loss on landscape.examples.quadratic (H = diag(4, 1)), whose increase is exactly (a²/6)·tr H."""
    objective = quadratic()
    runs = [expected_loss(objective, radius, n_samples=n_samples, seed=seed) for seed in seeds]
    halves = [(r.increase_ci[1] - r.increase_ci[0]) / 2 for r in runs]
    centres = [(r.increase_ci[1] + r.increase_ci[0]) / 2 for r in runs]
    label = f"expected loss a={radius:g} ({n_samples} draws)"
    return _tally(label, "quadratic", centres, [r.stderr for r in runs], halves, 5 * radius**2 / 6)


# ------------------------------------------------------------------------------------------ correlate
def tau_coverage(n_runs: int, rho: float, seeds: Sequence[int], resamples: int = 1000) -> list[Coverage]:
    """correlate's bootstrap intervals of τ, ψ and Ψ when (measure, gap) is bivariate normal with correlation ρ.

    The runs sit on a grid of two hyperparameters that the values ignore, so every group's τ, hence ψ_i and Ψ, has
    the population value (2/π)·arcsin ρ (τ-b is unbiased for continuous data).
    """
    truth = 2 / math.pi * math.asin(rho)
    grid = [{"lr": i % 4, "batch": i // 4} for i in range(n_runs)]
    problem = f"n={n_runs}, tau={truth:.2f}"
    found: dict[str, list] = {"tau": [], "psi lr": [], "Psi": []}
    for seed in seeds:
        rng = np.random.default_rng(10_000 + seed)
        x = rng.standard_normal(n_runs)
        y = rho * x + math.sqrt(1 - rho**2) * rng.standard_normal(n_runs)
        c = correlate(x, y, grid, ["lr", "batch"], resamples=resamples, seed=seed)
        found["tau"].append(c.tau)
        found["psi lr"].append(c.granulated["lr"])
        found["Psi"].append(c.psi)
    out = []
    for name, estimates in found.items():
        inside = [e.low <= truth <= e.high for e in estimates]
        width = np.array([(e.high - e.low) / (2 * 1.96) for e in estimates])  # normal-equivalent stderr, for z_rms
        z = np.abs(np.array([e.value for e in estimates]) - truth) / np.where(width > 0, width, np.inf)
        out.append(Coverage(f"correlate {name} bootstrap", problem, int(sum(inside)), len(inside), float(np.sqrt(np.mean(z**2)))))
    return out
