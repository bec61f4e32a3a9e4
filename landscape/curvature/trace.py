"""Trace estimators over a symmetric linear operator: Hutchinson, Hutch++, XTrace, and the exact trace by unit vectors.

Pure functions: each draws its probes from a torch.Generator seeded with `seed` on the
operator's device, counts its own matvecs (rows passed to `products`), and returns a
TraceResult with the estimate, its standard error and, optionally, per-block traces
(e.g. one block per parameter tensor of a Hessian). `progress` (landscape.engine.progress) counts
matvecs as each `products` call returns. Probes, sketches and bases are row blocks (k, n), one
vector per row (landscape.engine.operators): in the code and its comments a basis Q holds its vectors
as rows, so the papers' QᵀAQ and I − QQᵀ (column bases) read QAQᵀ = Q (AQᵀ) and I − QᵀQ here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from landscape.engine.checks import check_int
from landscape.engine.inner import LOCAL, InnerProduct
from landscape.engine.operators import LinearOperator
from landscape.engine.probes import rademacher_rows, seeded_generator, sphere_rows
from landscape.engine.progress import Progress
from landscape.results import Result
from landscape.statistics import stderr, t_quantile


@dataclass(frozen=True)
class TraceResult(Result):
    """A trace estimate with its standard error, cost and provenance."""

    estimate: float
    stderr: float  # standard error of the estimate
    n_matvecs: int
    seconds: float
    method: str  # "hutchinson" / "hutchpp" / "xtrace", or "exact" (unit_trace)
    seed: int
    samples: np.ndarray | None  # per-sample estimates whose mean is `estimate` and whose spread gives `stderr`
    blocks: dict[str, tuple[float, float]] | None  # per-block (estimate, stderr) of the diagonal-block traces

    @property
    def ci(self) -> tuple[float, float]:
        """The 95% interval estimate ± t·stderr, Student-t with (samples − 1) df (normal if the samples were not kept).

        Its coverage of the exact trace of real-network Hessians is measured in tests/test_coverage.py."""
        half = (t_quantile(len(self.samples) - 1) if self.samples is not None else t_quantile(math.inf)) * self.stderr
        return self.estimate - half, self.estimate + half


HUTCHINSON_BLOCK = 10  # probes per `products` call of Hutchinson's estimator, by default
# the fewest matvecs each estimator takes: Hutchinson's stderr needs two probes, the sketches two halves of two
TRACE_MATVEC_MINIMUMS = {"xtrace": 4, "hutchpp": 4, "hutchinson": 2}


def _check_blocks(blocks: dict[str, slice] | None, n: int, op: LinearOperator) -> None:
    """Blocks must be named, non-empty, forward slices inside [0, n], of an operator on whole vectors."""
    if blocks is None:
        return
    if op.inner.sharded:
        raise ValueError("per-block traces need whole vectors: a sharded operator gives the total trace only")
    if not isinstance(blocks, dict) or not blocks:
        raise ValueError("blocks must be a non-empty dict mapping names to slices of the flat vector")
    for name, block in blocks.items():
        if not isinstance(block, slice):
            raise ValueError(f"block {name!r} must be a slice, got {type(block).__name__}")
        bounds_ok = all(b is None or (isinstance(b, (int, np.integer)) and 0 <= b <= n) for b in (block.start, block.stop))
        if not bounds_ok or (block.step is not None and block.step < 1) or not range(*block.indices(n)):
            raise ValueError(f"block {name!r} = {block} is not a non-empty forward slice of [0, {n})")


def _block_sums(contributions: torch.Tensor, blocks: dict[str, slice]) -> dict[str, torch.Tensor]:
    """Row sums of a (k, n) tensor of per-coordinate contributions (one row per probe) over each block's coordinates."""
    return {name: contributions[:, block].sum(1) for name, block in blocks.items()}


def _mean_stderr(samples: np.ndarray) -> tuple[float, float]:
    return float(samples.mean()), stderr(samples)


def _result(
    method: str,
    samples: torch.Tensor,
    block_samples: dict[str, torch.Tensor] | None,
    n_matvecs: int,
    seed: int,
    start: float,
    stderrs: dict[str | None, float] | None = None,
) -> TraceResult:
    """Estimate = mean of the samples, stderr = their standard deviation / √count (also per block), unless `stderrs`
    gives it ({None: the total's, name: a block's}; XTrace's samples are not independent)."""
    values = samples.double().cpu().numpy()
    estimate, stderr = _mean_stderr(values)
    per_block = None
    if block_samples is not None:
        per_block = {name: _mean_stderr(s.double().cpu().numpy()) for name, s in block_samples.items()}
    if stderrs is not None:
        stderr = stderrs[None]
        per_block = None if per_block is None else {name: (e, stderrs[name]) for name, (e, _) in per_block.items()}
    return TraceResult(
        estimate=estimate,
        stderr=stderr,
        n_matvecs=n_matvecs,
        seconds=time.perf_counter() - start,
        method=method,
        seed=int(seed),
        samples=values,
        blocks=per_block,
    )


def hutchinson(
    op: LinearOperator,
    n_probes: int = 100,
    *,
    block_size: int = HUTCHINSON_BLOCK,
    target_rel_stderr: float | None = None,
    blocks: dict[str, slice] | None = None,
    seed: int = 0,
    progress: bool | str = False,
) -> TraceResult:
    """Girard–Hutchinson estimator (Girard 1989; Hutchinson 1989): mean of zᵀAz over Rademacher probes z.

    Unbiased, with variance 2·Σ_{i≠j} A_ij² per probe: exact for a diagonal matrix, slow where
    the off-diagonal mass is large (Hutch++ and XTrace then need fewer matvecs). Probes go
    through `op.products` `block_size` at a time, as the rows of a block. Per-block traces use
    the same probes: the mean of z_bᵀ(Az)_b, unbiased for the trace of diagonal block b.

    Args:
        op: a symmetric operator (HessianOperator, GGNOperator, DenseOperator, ...).
        n_probes: the most probes (matvecs) to spend, at least 2.
        block_size: probes per `products` call.
        target_rel_stderr: stop once stderr ≤ target·|estimate| (checked after each block of
            probes, from the second on); None: spend all `n_probes`.
        blocks: {name: slice of the vector} for per-block traces from the same probes (e.g. one
            block per parameter tensor); None: the total only.
        seed: seed of the probes.
        progress: a progress bar (True, or a label), off by default.

    Returns:
        TraceResult: `estimate`, its `stderr` (from the spread of the per-probe values in
            `samples`), `blocks` {name: (estimate, stderr)} if asked, `n_matvecs`, `seconds`.

    Raises:
        ValueError: bad counts, a non-positive target, or blocks outside the operator.

    Examples:
        On a diagonal matrix every Rademacher probe gives the exact trace:

        >>> import torch
        >>> from landscape.engine.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)))
        >>> result = hutchinson(op, 10)
        >>> result.estimate, result.stderr, result.n_matvecs
        (10.0, 0.0, 10)
    """
    n = op.shape[0]
    check_int("n_probes", n_probes, TRACE_MATVEC_MINIMUMS["hutchinson"])
    check_int("block_size", block_size, 1)
    if target_rel_stderr is not None and not target_rel_stderr > 0:
        raise ValueError(f"target_rel_stderr must be positive, got {target_rel_stderr!r}")
    _check_blocks(blocks, n, op)
    start = time.perf_counter()
    totals, per_block, used, n_blocks = [], {name: [] for name in blocks or {}}, 0, 0
    with Progress(n_probes, "hutchinson", "matvec", progress) as bar:
        for contributions in hutchinson_contributions(op, n_probes, block_size, seed, bar):
            used, n_blocks = used + contributions.shape[0], n_blocks + 1
            totals.append(op.inner.reduce(contributions.sum(1)))
            for name, sums in _block_sums(contributions, blocks or {}).items():
                per_block[name].append(sums)
            del contributions  # before the next block is drawn
            if target_rel_stderr is not None and n_blocks >= 2:
                estimate, stderr = _mean_stderr(torch.cat(totals).double().cpu().numpy())
                if stderr <= target_rel_stderr * abs(estimate):
                    break
    block_samples = {name: torch.cat(s) for name, s in per_block.items()} if blocks else None
    return _result("hutchinson", torch.cat(totals), block_samples, used, seed, start)


def hutchinson_contributions(
    op: LinearOperator, n_probes: int, block_size: int, seed: int, bar: Progress
) -> Iterator[torch.Tensor]:
    """Blocks of Hutchinson's per-coordinate contributions z ⊙ Az, Rademacher z seeded by `seed`, `block_size` probes
    at a time (k, n), until `n_probes` are spent: zᵀAz is a row's sum, and the row itself is an unbiased estimate of
    diag(A) (Bekas, Kokiopoulou & Saad 2007). Shared by the trace and the diagonal estimators (the same probes)."""
    generator = seeded_generator(op.device, seed)
    used = 0
    while used < n_probes:
        z = rademacher_rows(generator, min(block_size, n_probes - used), op)
        contributions = _counted(op, z, bar).mul_(z)  # in place: a block is block_size n-vectors
        used += z.shape[0]
        del z
        yield contributions


def hutchpp(
    op: LinearOperator,
    n_matvecs: int = 102,
    *,
    seed: int = 0,
    blocks: dict[str, slice] | None = None,
    progress: bool | str = False,
) -> TraceResult:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): exact trace on a sketched range plus Hutchinson on the rest.

    A third of the budget sketches S, Q = orth(AS); tr(QᵀAQ) is exact and the remaining probes
    estimate tr((I−QQᵀ)A(I−QQᵀ)). A matrix of rank ≤ n_matvecs // 3 gets its exact trace; for a
    positive semi-definite matrix the relative error falls like 1/matvecs, not Hutchinson's 1/√matvecs.

    Args:
        op: a symmetric operator (HessianOperator, GGNOperator, DenseOperator, ...).
        n_matvecs: the budget, at least 4: n_matvecs // 3 for the sketch, as many for A·Q, the
            rest Hutchinson probes.
        seed: seed of the sketch and the probes.
        blocks: {name: slice of the vector} for per-block traces from the same probes (e.g. one
            block per parameter tensor); None: the total only.
        progress: a progress bar (True, or a label), off by default.

    Returns:
        TraceResult: `estimate`, its `stderr` over the deflated probes, `blocks` if asked (the
            low-rank part's exact block diagonal plus the probes'), `n_matvecs`, `seconds`.

    Raises:
        ValueError: a budget below 4, or blocks outside the operator.

    Examples:
        The all-ones 6×6 matrix has rank 1, so the sketch holds all of it:

        >>> import torch
        >>> from landscape.engine.operators import DenseOperator
        >>> result = hutchpp(DenseOperator(torch.ones(6, 6, dtype=torch.float64)), 6)
        >>> round(result.estimate, 6), result.stderr
        (6.0, 0.0)
    """
    n, inner = op.shape[0], op.inner
    check_int("n_matvecs", n_matvecs, TRACE_MATVEC_MINIMUMS["hutchpp"])
    _check_blocks(blocks, n, op)
    start = time.perf_counter()
    generator = seeded_generator(op.device, seed)
    n_sketch = min(n_matvecs // 3, n)
    n_probes = n_matvecs - 2 * n_sketch
    with Progress(2 * n_sketch + n_probes, "hutchpp", "matvec", progress) as bar:
        q, _ = _orthonormal_rows(_counted(op, rademacher_rows(generator, n_sketch, op), bar), inner)
        aq = _counted(op, q, bar)  # row i: A q_i, i.e. (AQᵀ)ᵀ
        small = inner.reduce(q @ aq.T)  # QAQᵀ
        z = rademacher_rows(generator, n_probes, op)
        a_deflated = _counted(op, z - inner.reduce(z @ q.T) @ q, bar)
    # z ⊙ (I−QᵀQ)A(I−QᵀQ)z: per-coordinate Hutchinson contributions of the deflated part, one row per probe
    contributions = z * (a_deflated - inner.reduce(a_deflated @ q.T) @ q)
    samples = torch.trace(small) + inner.reduce(contributions.sum(1))
    block_samples = None
    if blocks is not None:
        # diag(PAP + PAP⊥ + P⊥AP) for P = QᵀQ: the low-rank part's exact diagonal, cross terms included
        # (they vanish in the total trace but not in a diagonal block); it sums to tr(QAQᵀ).
        low_rank_diag = (q * (2 * aq - small.T @ q)).sum(0, keepdim=True)
        low_rank = _block_sums(low_rank_diag, blocks)
        block_samples = {name: low_rank[name] + s for name, s in _block_sums(contributions, blocks).items()}
    return _result("hutchpp", samples, block_samples, 2 * n_sketch + n_probes, seed, start)


def xtrace(
    op: LinearOperator,
    n_matvecs: int = 100,
    *,
    seed: int = 0,
    blocks: dict[str, slice] | None = None,
    progress: bool | str = False,
) -> TraceResult:
    """XTrace (Epperly, Tropp & Webber 2024, SIAM J. Matrix Anal. Appl.): exchangeable Hutch++.

    m = n_matvecs/2 test vectors ω_i uniform on the sphere of radius √n. For each i, the range
    of AΩ without Aω_i gives a low-rank part whose trace is exact, and ω_i projected onto
    its complement and renormalized there (the paper's improved normalization, exactly
    unbiased for spherical vectors but not for Rademacher ones) estimates the rest. The m
    estimates are averaged. If rank A < m the sketch holds all of range(A) and the estimate is
    exact. The toolkit's default trace estimator: the lowest error per matvec of the three in
    benchmarks/curvature.py.

    The error estimate is not the paper's std(T_i)/√m: the leave-one-out estimates T_i share
    their sketches, are positively correlated, and that formula understated the error by ~20%
    (95% intervals covered the true trace of real-network Hessians in 88–91% of seeds; the
    authors' README warns it "tends to underestimate"). Here Var(mean) = s²/m + c, with s² the
    T_i's sample variance and c = Cov(T_i, T_j) (truncated at 0) estimated without bias by the mean over i ≠ j of
    δ_ij·δ_ji, δ_ij = T_i − T_i^(−j) and T_i^(−j) the estimate of T_i with ω_j left out of the
    sketch too: E[T_i | Ω without ω_i] = tr(A) makes Cov(T_i, T_j) = E[δ_ij·δ_ji] exactly (the
    leave-one-out variance idea of Epperly & Tropp 2024, "Efficient error and variance estimation
    for randomized matrix computations", SIAM J. Sci. Comput.). The leave-two-out estimates cost no
    matvecs, O(m²) small-matrix work. Coverage: docs/coverage.md, tests/test_coverage.py.

    Args:
        op: a symmetric operator of size ≥ 2 (HessianOperator, GGNOperator, DenseOperator, ...).
        n_matvecs: the budget, at least 4: n_matvecs // 2 test vectors (at most n) and as many
            products with the basis; a rank-deficient sketch spends fewer.
        seed: seed of the test vectors.
        blocks: {name: slice of the vector} for per-block traces from the same probes (e.g. one
            block per parameter tensor); None: the total only.
        progress: a progress bar (True, or a label), off by default.

    Returns:
        TraceResult: `estimate` (the mean of the m leave-one-out estimates in `samples`), its
            `stderr` (from their spread and covariance, above), `blocks` if asked, `n_matvecs` (the
            products actually made), `seconds`.

    Raises:
        ValueError: a budget below 4, an operator of size 1, or blocks outside the operator.

    Examples:
        The all-ones 6×6 matrix has rank 1: exact, per block too, after 4 products:

        >>> import torch
        >>> from landscape.engine.operators import DenseOperator
        >>> op = DenseOperator(torch.ones(6, 6, dtype=torch.float64))
        >>> result = xtrace(op, 6, blocks={"first two": slice(0, 2), "rest": slice(2, 6)})
        >>> round(result.estimate, 6), result.n_matvecs
        (6.0, 4)
        >>> {name: round(estimate, 6) for name, (estimate, stderr) in result.blocks.items()}
        {'first two': 2.0, 'rest': 4.0}
    """
    n, inner = op.shape[0], op.inner
    check_int("n_matvecs", n_matvecs, TRACE_MATVEC_MINIMUMS["xtrace"])
    _check_blocks(blocks, n, op)
    if n < 2:
        raise ValueError("xtrace needs an operator of size ≥ 2 (leave-one-out needs two test vectors)")
    start = time.perf_counter()
    sketch = xtrace_sketch(op, n_matvecs, seed, "xtrace", progress)
    samples, stderrs = xtrace_block_estimates(sketch, {None: slice(None), **(blocks or {})}, inner)
    block_samples = {name: torch.as_tensor(samples[name]) for name in blocks} if blocks is not None else None
    return _result("xtrace", torch.as_tensor(samples[None]), block_samples, sketch.n_matvecs, seed, start, stderrs)


def unit_trace(op: LinearOperator, *, block_size: int = HUTCHINSON_BLOCK, progress: bool | str = False) -> TraceResult:
    """The exact trace Σ_i e_iᵀAe_i, one product per unit vector (n products): for operators small enough to afford it.

    Args:
        op: a symmetric operator on whole vectors.
        block_size: unit vectors per `products` call.
        progress: a progress bar (True, or a label), off by default.

    Returns:
        TraceResult: the exact `estimate`, `stderr` 0, `method` "exact", `n_matvecs` = n.

    Examples:
        >>> import torch
        >>> from landscape.engine.operators import DenseOperator
        >>> result = unit_trace(DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)))
        >>> result.estimate, result.stderr, result.n_matvecs
        (5.0, 0.0, 2)
    """
    check_int("block_size", block_size, 1)
    if op.inner.sharded:
        raise ValueError("an exact trace by unit vectors needs whole vectors: a sharded operator takes an estimator")
    n = op.shape[0]
    start, total = time.perf_counter(), 0.0
    with Progress(n, "exact trace", "matvec", progress) as bar:
        for first in range(0, n, block_size):
            rows = torch.arange(first, min(first + block_size, n), device=op.device)
            units = torch.zeros(len(rows), n, dtype=op.dtype, device=op.device)
            units[torch.arange(len(rows), device=op.device), rows] = 1
            total += float(_counted(op, units, bar)[torch.arange(len(rows), device=op.device), rows].double().sum())
    return TraceResult(
        estimate=total,
        stderr=0.0,
        n_matvecs=n,
        seconds=time.perf_counter() - start,
        method="exact",
        seed=0,
        samples=None,
        blocks=None,
    )


def trace_vectors(method: str, n_matvecs: int, n: int, block_size: int = HUTCHINSON_BLOCK) -> int:
    """The most n-vectors a trace estimator holds at once beside the operator's own memory (the counts follow the
    code and are checked against the measured peak in tests/test_solver_memory.py).

    xtrace: the m = n_matvecs/2 test vectors, their products, the basis Q and A·Q, and the QR's workspace (5m);
    hutchpp: 2 per sketch vector and 4 per deflated probe; hutchinson: a block of probes and their products."""
    if method == "xtrace":
        return 5 * min(n_matvecs // 2, n) + 1
    if method == "hutchpp":
        sketch = min(n_matvecs // 3, n)
        return 2 * sketch + 4 * (n_matvecs - 2 * sketch)
    if method == "hutchinson":
        return 3 * min(block_size, n_matvecs)
    raise ValueError(f"unknown trace method {method!r}: xtrace, hutchpp or hutchinson")


def _counted(op: LinearOperator, V: torch.Tensor, bar: Progress) -> torch.Tensor:
    """op.products(V) for a (k, n) block of probe rows, its k rows counted on the progress bar."""
    out = op.products(V)
    bar.update(V.shape[0])
    return out


def _orthonormal_rows(y: torch.Tensor, inner: InnerProduct = LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Q, R with Y = RᵀQ for a (k, n) block of rows Y: orthonormal rows Q (k, n) spanning Y's rows, R (k, k) upper
    triangular. The QR factorization of Yᵀ (the column convention is LAPACK's; the transposes are views); for
    rows sharded over ranks, CholeskyQR2 on the summed Gram matrix (Fukaya et al. 2014), which needs Y of full rank."""
    if not inner.sharded:
        q, r = torch.linalg.qr(y.T)
        return q.T, r
    r = torch.eye(len(y), dtype=torch.float64, device=y.device)
    q = y
    for _ in range(2):  # a second pass restores orthogonality to rounding
        gram = inner.reduce(q @ q.T).double()
        factor, info = torch.linalg.cholesky_ex(gram, upper=True)
        if int(info):
            raise ValueError("the sketch is rank-deficient: a sharded operator's trace needs hutchinson() here")
        q = torch.linalg.solve_triangular(factor.T.to(q.dtype), q, upper=False)
        r = factor @ r
    return q, r.to(y.dtype)


def _xtrace_basis(y: torch.Tensor, op: LinearOperator) -> tuple[torch.Tensor, np.ndarray, np.ndarray, int]:
    """Q, R of the sketch Y = AΩ (rows y_i = Aω_i), the leave-out directions G and the codimension XTrace rescales by.

    Q holds the orthonormal basis as rows (k, n); R is the triangular factor of the column sketch, AΩ = QᵀR.
    Column i of G = R⁻ᵀ = U Σ⁻¹ Vᵀ is orthogonal to every column of R but the i-th, so leaving ω_i (and ω_j)
    out of the sketch removes span(g_i) (span(g_i, g_j)) from range(Q). If Y is rank-deficient every
    leave-one-out range equals range(AΩ) = range(A): one basis, and G has no columns.
    """
    m, n = len(y), op.shape[0]  # n: the whole vector's length (a sharded operator's rows are pieces)
    q, r = _orthonormal_rows(y, op.inner)
    r = r.double().cpu().numpy()
    u, sv, vt = np.linalg.svd(r)
    rank = int((sv > sv[0] * m * torch.finfo(op.dtype).eps).sum())
    if rank == m:
        return q, r, u @ (vt / sv[:, None]), n - m + 1
    q = torch.as_tensor(u[:, :rank].T, dtype=op.dtype, device=op.device) @ q
    return q, sv[:rank, None] * vt[:rank], np.zeros((rank, 0)), n - rank


@dataclass(frozen=True)
class _XTraceParts:
    """What every XTrace estimate needs beyond the Gram matrices, in the basis Q (m × m unless noted).

    g: the leave-out directions G = R⁻ᵀ (no columns if the sketch is rank-deficient); h: QAQᵀ; w: columns
    w_i = Qω_i; r: R (column i = QAω_i); norms: ‖ω_i‖² (m,); codim: n − m + 1, or n − rank if rank-deficient.
    """

    g: np.ndarray
    h: np.ndarray
    w: np.ndarray
    r: np.ndarray
    norms: np.ndarray
    codim: int


@dataclass(frozen=True)
class XTraceSketch:
    """What XTrace (and XDiag, landscape.curvature.diagonal) draw and compute before any estimate: the test vectors
    Ω (rows ω_i, uniform on the sphere of radius √n), Y = AΩ (rows y_i), the orthonormal basis Q of the sketch (rows)
    and AQᵀ (rows A q_k), all (m, n) or (rank, n) row blocks, and the small `parts` in the basis."""

    omega: torch.Tensor
    y: torch.Tensor
    q: torch.Tensor
    aq: torch.Tensor
    parts: _XTraceParts

    @property
    def n_matvecs(self) -> int:
        return len(self.omega) + len(self.q)


def xtrace_sketch(op: LinearOperator, n_matvecs: int, seed: int, label: str, progress: bool | str) -> XTraceSketch:
    """XTrace's sketch of `op` (Epperly, Tropp & Webber 2024): m = min(n_matvecs // 2, n) spherical test vectors ω_i,
    Y = AΩ, its basis Q and AQᵀ: 2m products (fewer if Y is rank-deficient), counted on a progress bar named `label`."""
    n, inner = op.shape[0], op.inner
    generator = seeded_generator(op.device, seed)
    m = min(n_matvecs // 2, n)
    omega = sphere_rows(generator, m, op)  # row i: ω_i
    with Progress(2 * m, label, "matvec", progress) as bar:
        y = _counted(op, omega, bar)  # row i: y_i = Aω_i
        q, r, g, codim = _xtrace_basis(y, op)
        aq = _counted(op, q, bar)
    h = inner.reduce(q @ aq.T).double().cpu().numpy()  # QAQᵀ
    h = (h + h.T) / 2
    w = inner.reduce(q @ omega.T).double().cpu().numpy()  # column i: w_i = Qω_i
    norms = inner.reduce((omega * omega).sum(1)).double().cpu().numpy()
    return XTraceSketch(omega, y, q, aq, _XTraceParts(g, h, w, r, norms, codim))


def xtrace_block_estimates(sketch: XTraceSketch, blocks: dict, inner: InnerProduct = LOCAL) -> tuple[dict, dict]:
    """XTrace's m leave-one-out estimates of each block's trace, and the stderr of their mean (`_xtrace_estimate`).

    `blocks`: {name: index of the vector's coordinates (a slice, or an index tensor)}; `inner` sums the Gram matrices
    over ranks for the whole vector (slice(None)) only: a block of coordinates is whole in every process.
    """
    samples, stderrs = {}, {}
    for name, b in blocks.items():
        s = sketch
        whole = isinstance(b, slice) and b == slice(None)
        gram = _xtrace_grams(s.q[:, b], s.aq[:, b], s.omega[:, b], s.y[:, b], inner if whole else LOCAL)
        samples[name], stderrs[name] = _xtrace_estimate(gram, s.parts)
    return samples, stderrs


def _xtrace_grams(
    q: torch.Tensor, aq: torch.Tensor, omega: torch.Tensor, y: torch.Tensor, inner: InnerProduct = LOCAL
) -> tuple[np.ndarray, ...]:
    """Gram matrices over a set of coordinates (all, or one block's) that XTrace's per-i diagonal sums need.

    q, aq, omega, y: row blocks (basis, its products, test vectors, theirs) restricted to those coordinates.
    """
    grams = tuple(inner.reduce(g) for g in (q @ aq.T, q @ q.T, omega @ q.T, omega @ aq.T, (omega * y).sum(1)))
    return tuple(g.double().cpu().numpy() for g in grams)


def _xtrace_estimate(grams: tuple[np.ndarray, ...], parts: _XTraceParts) -> tuple[np.ndarray, float]:
    """The m leave-one-out XTrace estimates T_i over the Gram matrices' coordinates, and the stderr of their mean.

    stderr² = s²/m + max(c, 0), c = mean_{i≠j} δ_ij·δ_ji with δ_ij = T_i − T_i^(−j) (see `xtrace`), and 0 when the
    sketch held all of range(A) (the estimate is then exact). A negative c is noise more often than not at small m
    (taken as is, 90% coverage at 30 matvecs on a BN ConvNet; truncated, 93%): never below the paper's s²/m.
    """
    m = parts.w.shape[1]
    index = np.arange(m)
    loo = _xtrace_samples(grams, parts, index, index[:, None], parts.codim)
    if parts.g.shape[1] == 0:
        return loo, 0.0
    first, second = np.nonzero(~np.eye(m, dtype=bool))  # ordered pairs (i, j), i ≠ j
    l2o = _xtrace_samples(grams, parts, first, np.stack([first, second], 1), parts.codim + 1)
    delta = np.zeros((m, m))
    delta[first, second] = loo[first] - l2o  # δ_ij
    covariance = (delta * delta.T).sum() / (m * (m - 1))
    return loo, float(np.sqrt(loo.var(ddof=1) / m + max(covariance, 0.0)))


def _xtrace_samples(
    grams: tuple[np.ndarray, ...], parts: _XTraceParts, test: np.ndarray, left_out: np.ndarray, codim: int
) -> np.ndarray:
    """XTrace estimates with test vector ω_i (i = test[p]) and the sketch of Ω without the columns left_out[p] (p, k).

    Estimate p is tr_b(2·PA − PAP) + codim/‖(I−P)ω_i‖² · ω_i,bᵀ[(I−P)A(I−P)ω_i]_b, summed over the coordinates b
    the Gram matrices cover, with P = QᵀΠQ, Π = I − U C⁻¹Uᵀ, U = G[:, left_out[p]], C = UᵀU (Q's rows the basis).
    Over all coordinates it is the paper's estimator; every term is a k × k block of an m × m product.
    """
    qaq, qq, omega_q, omega_aq, omega_y = grams
    g, h, w, r = parts.g, parts.h, parts.w, parts.r
    k = left_out.shape[1] if g.shape[1] else 0
    left_out = left_out[:, :k]

    def block(mat: np.ndarray) -> np.ndarray:  # (p, k, k): UᵀXU for X = mat, from GᵀXG
        full = g.T @ mat @ g
        return full[left_out[:, :, None], left_out[:, None, :]]

    def column(mat: np.ndarray) -> np.ndarray:  # (p, k): Uᵀ x_i for x_i column i of mat, from Gᵀ mat
        return (g.T @ mat)[left_out, test[:, None]]

    def row(mat: np.ndarray) -> np.ndarray:  # (p, k): x_iᵀU for x_i row i of mat, from mat G
        return (mat @ g)[test[:, None], left_out]

    def diag(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # (p,): row i of a times column i of b
        return np.einsum("ij,ji->i", a, b)[test]

    c_inv = np.linalg.inv(block(np.eye(len(h)))) if k else np.zeros((len(test), 0, 0))
    uhu, uw = block(h), column(w)
    x = np.einsum("pab,pb->pa", c_inv, uw)  # C⁻¹Uᵀw_i: Πw_i = w_i − Ux
    # low-rank part: tr(ΠX) = tr X − tr(C⁻¹UᵀXU); tr(ΠhΠ qq) for the block's QAQᵀ-sandwich
    low_rank = 2 * (np.trace(qaq) - np.einsum("pab,pba->p", c_inv, block(qaq))) - (
        np.sum(h * qq)
        - 2 * np.einsum("pab,pba->p", c_inv, block(qq @ h))
        + np.einsum("pab,pbc,pcd,pda->p", c_inv, uhu, c_inv, block(qq))
    )
    # deflated part: ω_bᵀ[Aω − PAω − APω + PAPω]_b with QAω_i = r_i, Pω_i = QᵀΠw_i; e = r_i − hΠw_i
    onehot = (left_out == test[:, None]).astype(float)  # Uᵀr_i = (GᵀR)[S, i] = e_i restricted to S
    ue = onehot - column(h @ w) + np.einsum("pab,pb->pa", uhu, x)  # Uᵀe
    y = np.einsum("pab,pb->pa", c_inv, ue)  # Πe = e − Uy
    omega_aq_pw = diag(omega_aq, w) - (row(omega_aq) * x).sum(1)
    omega_q_pe = diag(omega_q, r) - diag(omega_q @ h, w) + (row(omega_q @ h) * x).sum(1) - (row(omega_q) * y).sum(1)
    residual_sq = parts.norms[test] - ((w[:, test] * w[:, test]).sum(0) - (uw * x).sum(1))  # ‖(I − P)ω_i‖²
    return low_rank + codim / residual_sq * (omega_y[test] - omega_aq_pw - omega_q_pe)
