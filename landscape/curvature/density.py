"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ), in the memory the caller has.

SLQ needs only each run's tridiagonal T (its α and β), never the Lanczos vectors themselves, so the recurrence
need not keep them: `slq_density` keeps them all (full reorthogonalization, n_runs·(n_steps + 1) stored
n-vectors) where they fit, and otherwise runs the plain three-term recurrence in four n-vectors per run. In
floating point that recurrence loses orthogonality as Ritz values converge and then shows ghost copies of them
(Paige 1976, 1980), but the copies split the weight of the eigenvalue they copy, and the quadrature of the probe's
spectral measure stays accurate (Greenbaum 1989; Knizhnerman 1996; T. Chen 2023). The result says which
recurrence ran and the n-vectors it held (`Spectrum.reorthogonalization`, `Spectrum.stored_vectors`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from landscape.curvature.krylov import BREAKDOWN_ULPS  # one threshold for every Lanczos recurrence
from landscape.engine.checks import check_int
from landscape.engine.inner import InnerProduct
from landscape.engine.operators import LinearOperator
from landscape.engine.probes import rademacher, seeded_generator
from landscape.engine.progress import Progress
from landscape.results import Result

REORTHOGONALIZATIONS = ("full", "none")
DENSITY_BYTES = 2 * 2**30  # the default: full reorthogonalization where its stored vectors fit in this (2 GiB)
_WORKING_VECTORS = 2  # n-vectors per run beside the stored ones: the product and the vector being formed from it


@dataclass(frozen=True)
class Spectrum(Result):
    """A smoothed spectral density from stochastic Lanczos quadrature, with its raw quadrature."""

    grid: np.ndarray
    density: np.ndarray  # on `grid`, integrates to ~1
    nodes: np.ndarray  # (n_runs, n_steps) Ritz values per run
    weights: np.ndarray  # (n_runs, n_steps) quadrature weights per run, each row sums to 1
    sigma: float  # width of the Gaussian kernel
    n_matvecs: int
    seconds: float
    seed: int
    reorthogonalization: str = "full"  # "full": every Lanczos vector kept; "none": the three-term recurrence alone
    stored_vectors: int = 0  # the most n-vectors the recurrences held at once, all runs together (0: not recorded)


def held_vectors(n_runs: int, n_steps: int, n: int, reorthogonalize: str) -> int:
    """The most n-vectors `slq_density`'s recurrences hold at once: with "full" each run's basis (n_steps + 1 slots, at
    most n) and, with either, the product and the vector formed from it; "none" keeps two Lanczos vectors per run."""
    if reorthogonalize not in REORTHOGONALIZATIONS:
        raise ValueError(f"reorthogonalize must be one of {REORTHOGONALIZATIONS} or None, got {reorthogonalize!r}")
    stored = min(n_steps + 1, n) if reorthogonalize == "full" else 2
    return n_runs * (stored + _WORKING_VECTORS)


def default_reorthogonalize(
    n: int, n_runs: int, n_steps: int, dtype: torch.dtype = torch.float32, free_bytes: int | None = None
) -> str:
    """The recurrence `slq_density` runs by default: "full" where the n-vectors full reorthogonalization holds
    (`held_vectors`) fit in half of `free_bytes` (the memory the operator's products leave free, as a memory plan
    predicts it) or, where that is not known, in DENSITY_BYTES (2 GiB); else "none", whose memory does not grow
    with n_steps."""
    check_int("n", n, 1)
    room = DENSITY_BYTES if free_bytes is None else free_bytes // 2
    size = n * torch.finfo(dtype).bits // 8
    return "full" if held_vectors(n_runs, min(n_steps, n), n, "full") * size <= room else "none"


class _Lanczos:
    """b independent Lanczos recurrences (rows of `start`), advanced together by one `products` call per step.

    Each step forms w = Aq_j − β_{j−1}q_{j−1}, then α_j = q_jᵀw and w − α_j q_j (the order Paige 1972 found the most
    accurate). With `keep` every Lanczos vector is stored and w is orthogonalized twice (classical Gram–Schmidt)
    against its run's basis; without, only q_{j−1} and q_j are held. A breakdown (β ≈ 0, invariant subspace) is
    recorded as β = 0 exactly and the caller drops the recurrence (`drop`).
    """

    def __init__(self, op: LinearOperator, start: torch.Tensor, max_steps: int, keep: bool) -> None:
        b, length = start.shape  # a sharded operator's rows are this rank's pieces
        self.op, self.n, self.keep, self.inner = op, op.shape[0], keep, op.inner
        q = start / self.inner.row_norms(start)[:, None]
        if keep:
            self.basis = start.new_zeros(b, min(max_steps + 1, self.n), length)
            self.basis[:, 0] = q
            q = self.basis[:, 0]
        self.current, self.previous = q, None
        self.rows = np.arange(b)  # which original recurrence each running row belongs to
        self.alpha: list[list[float]] = [[] for _ in range(b)]
        self.beta: list[list[float]] = [[] for _ in range(b)]
        self.last_beta = np.zeros(b)
        self.norm_estimate = np.zeros(b)  # running Gershgorin bound on ‖T‖
        self.steps = 0
        self.n_matvecs = 0
        self.tiny = BREAKDOWN_ULPS * torch.finfo(start.dtype).eps

    def step(self) -> np.ndarray:
        """Advance every running recurrence by one matvec; return which of them broke down."""
        j, q = self.steps, self.current
        w = self.op.products(q)
        self.n_matvecs += q.shape[0]
        if j:  # out of place once (the operator's output is not ours to change), in place after
            w = torch.addcmul(w, self.previous, _column(self.last_beta, w), value=-1)
            alpha = self.inner.reduce(_dot(q, w))
            w.addcmul_(q, alpha[:, None], value=-1)
        else:
            alpha = self.inner.reduce(_dot(q, w))
            w = torch.addcmul(w, q, alpha[:, None], value=-1)
        if self.keep:
            _orthogonalize(w, self.basis[:, : j + 1], self.inner)
        beta = self.inner.row_norms(w)
        alpha_np, beta_np = alpha.double().cpu().numpy(), beta.double().cpu().numpy()
        self.norm_estimate = np.maximum(self.norm_estimate, np.abs(alpha_np) + beta_np + self.last_beta)
        broken = (beta_np <= self.tiny * self.norm_estimate) | (j + 1 >= self.n)
        beta_np[broken] = 0.0
        for row, a, bt in zip(self.rows, alpha_np, beta_np):
            self.alpha[row].append(float(a))
            self.beta[row].append(float(bt))
        if j + 1 < self.n:  # a broken row's next vector is garbage; `drop` removes it
            w.div_(beta.clamp_min(torch.finfo(w.dtype).tiny)[:, None])
            if self.keep:
                self.basis[:, j + 1] = w
                w = self.basis[:, j + 1]
            self.previous, self.current = self.current, w
        self.last_beta = beta_np
        self.steps += 1
        return broken

    def drop(self, broken: np.ndarray) -> None:
        """Stop the recurrences that broke down (their rows are compacted in place: no second copy of the basis)."""
        if not broken.any():
            return
        kept = np.flatnonzero(~broken)
        if self.keep:
            self.basis = _compact(self.basis, kept)
            j = self.steps
            self.current = self.basis[:, min(j, self.basis.shape[1] - 1)]
            self.previous = self.basis[:, j - 1]
        else:
            self.current, self.previous = _compact(self.current, kept), _compact(self.previous, kept)
        self.rows, self.last_beta, self.norm_estimate = self.rows[kept], self.last_beta[kept], self.norm_estimate[kept]

    def ritz(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values (ascending) and the eigenvectors S of the tridiagonal T of one recurrence."""
        alpha, beta = np.array(self.alpha[row]), np.array(self.beta[row])
        # numpy's dense eigh on the (≤ a few hundred)² tridiagonal: as accurate as scipy's eigh_tridiagonal,
        # and a short run does not pay scipy.linalg's import (0.18 s of a 2 s `landscape measure`)
        return np.linalg.eigh(np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1))


def _dot(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Row-wise qᵢᵀwᵢ of two (b, n) blocks, without a (b, n) temporary."""
    return torch.bmm(q.unsqueeze(1), w.unsqueeze(2)).reshape(-1)


def _column(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device)[:, None]


def _orthogonalize(w: torch.Tensor, basis: torch.Tensor, inner: InnerProduct) -> None:
    """Remove from each row of w (b, n), in place, its components along basis (b, j, n), twice."""
    rows = w.unsqueeze(1)  # (b, 1, n), a view of w
    for _ in range(2):
        rows.baddbmm_(inner.reduce(torch.bmm(basis, w.unsqueeze(2))).transpose(1, 2), basis, alpha=-1)


def _compact(t: torch.Tensor, kept: np.ndarray) -> torch.Tensor:
    """The rows `kept` (ascending) of t, moved to its front in place; a view of them."""
    for i, row in enumerate(kept):
        if i != row:
            t[i] = t[row]
    return t[: len(kept)]


def slq_density(
    op: LinearOperator,
    *,
    n_runs: int = 4,
    n_steps: int = 60,
    n_grid: int = 500,
    sigma: float | None = None,
    seed: int = 0,
    grid_margin: float = 0.05,
    progress: bool | str = False,
    reorthogonalize: str | None = None,
    free_bytes: int | None = None,
) -> Spectrum:
    """Spectral density by stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ubaru, Chen & Saad 2017).

    The Hessian spectral densities of Ghorbani, Krishnan & Xiao (2019). Each run starts Lanczos from a normalized
    Rademacher vector q, all runs sharing one `products` call per step; nodes are the Ritz values, weights the
    squared first components of T's eigenvectors: the Gauss quadrature of q's spectral measure, whose moments
    Σ_j w_j θ_j^p equal qᵀA^p q for p ≤ 2·n_steps − 1. The density averages Σ_j w_j·N(x; θ_j, σ²) over runs. A run
    that hits an invariant subspace early is padded with zero-weight nodes.

    The recurrence (`reorthogonalize`): "full" keeps every Lanczos vector and orthogonalizes each new one against
    them, n_runs·(n_steps + 3) n-vectors (4·63 = 252 by default: 1 GB at n = 1M in float32); "none" runs the plain
    three-term recurrence in 4·n_runs n-vectors. Without reorthogonalization a converged Ritz value reappears as
    ghost copies whose weights sum to its own, and the quadrature stays accurate (Greenbaum 1989; Knizhnerman 1996);
    the low moments, and the density at the kernel's width, agree with "full" (tests/test_density.py). None (the
    default) chooses "full" where its vectors fit in half of `free_bytes` or, without it, in 2 GiB
    (`default_reorthogonalize`); the result records the choice and the vectors held.

    Args:
        op: a symmetric operator (HessianOperator, GGNOperator, FisherOperator, DenseOperator, ...).
        n_runs: independent probe vectors; their spread is the density's uncertainty.
        n_steps: Lanczos steps (quadrature nodes) per run, at most n; one matvec per run and step.
        n_grid: points of the grid the density is evaluated on.
        sigma: width of the Gaussian kernel; None: (max node − min node)/100.
        seed: seed of the probe vectors.
        grid_margin: the grid extends grid_margin·range + 3σ past the extreme nodes.
        progress: a progress bar (True, or a label), off by default.
        reorthogonalize: "full", "none", or None to choose by memory.
        free_bytes: the memory the operator's products leave free (e.g. from a memory plan), for the choice.

    Returns:
        Spectrum: `grid` and `density` (integrating to about 1), the raw quadrature `nodes` and
            `weights` of every run (n_runs, n_steps), `sigma`, `n_matvecs`, `seconds`, `seed`,
            `reorthogonalization` (the recurrence that ran) and `stored_vectors` (the n-vectors it held).

    Raises:
        ValueError: a non-positive count, sigma, a negative grid_margin or free_bytes, an unknown reorthogonalize.

    Examples:
        With as many steps as the dimension the nodes are the eigenvalues and each run's
        weights (the squared probe components along the eigenvectors) sum to 1:

        >>> import torch
        >>> from landscape.engine.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5], dtype=torch.float64)))
        >>> spectrum = slq_density(op, n_runs=2, n_steps=4)
        >>> spectrum.nodes[0].round(6), spectrum.weights.sum(axis=1).round(6), spectrum.n_matvecs
        (array([0.5, 1. , 3. , 5. ]), array([1., 1.]), 8)
        >>> spectrum.reorthogonalization, spectrum.stored_vectors
        ('full', 12)
    """
    check_int("n_runs", n_runs, 1)
    check_int("n_steps", n_steps, 1)
    check_int("n_grid", n_grid, 2)
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    if not grid_margin >= 0:
        raise ValueError(f"grid_margin must be ≥ 0, got {grid_margin!r}")
    if free_bytes is not None:
        check_int("free_bytes", free_bytes, 0)
    start = time.perf_counter()
    n = op.shape[0]
    n_steps = min(n_steps, n)
    if reorthogonalize is None:
        reorthogonalize = default_reorthogonalize(n, n_runs, n_steps, op.dtype, free_bytes)
    stored_vectors = held_vectors(n_runs, n_steps, n, reorthogonalize)  # validates reorthogonalize
    probes = op.inner.random(seeded_generator(op.device, seed), lambda g, m: rademacher(g, (n_runs, m), op), n)
    recurrence = _Lanczos(op, probes, max_steps=n_steps, keep=reorthogonalize == "full")
    del probes
    with Progress(n_runs * n_steps, "density (SLQ)", "matvec", progress) as bar:
        while recurrence.steps < n_steps and len(recurrence.rows):
            running = len(recurrence.rows)
            recurrence.drop(recurrence.step())
            bar.update(running)
    nodes, weights = np.zeros((n_runs, n_steps)), np.zeros((n_runs, n_steps))
    for run in range(n_runs):
        theta, s = recurrence.ritz(run)
        nodes[run] = np.pad(theta, (0, n_steps - len(theta)), mode="edge")
        weights[run, : len(theta)] = s[0] ** 2
    spread = nodes.max() - nodes.min()
    scale = spread if spread > 0 else max(np.abs(nodes).max(), 1.0)
    sigma = float(sigma if sigma is not None else scale / 100)
    pad = grid_margin * scale + 3 * sigma
    grid = np.linspace(nodes.min() - pad, nodes.max() + pad, n_grid)
    kernel = np.exp(-0.5 * ((grid[:, None] - nodes.reshape(1, -1)) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    density = kernel @ weights.reshape(-1) / n_runs
    return Spectrum(
        grid=grid,
        density=density,
        nodes=nodes,
        weights=weights,
        sigma=sigma,
        n_matvecs=recurrence.n_matvecs,
        seconds=time.perf_counter() - start,
        seed=int(seed),
        reorthogonalization=reorthogonalize,
        stored_vectors=stored_vectors,
    )
