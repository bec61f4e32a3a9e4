"""The diagonal of a curvature operator, one number per parameter, with its standard error and per-tensor sums.

Three ways, picked by `method`:

- hutchinson: the mean of z ⊙ Az over Rademacher probes z (Bekas, Kokiopoulou & Saad 2007), unbiased; each
  coordinate's stderr is the spread of its probes' values. Exact for a diagonal matrix.
- xdiag: XDiag (Epperly, Tropp & Webber 2024, "XTrace: making the most of every sample in stochastic trace
  estimation"), the exchangeable low-rank + Hutchinson estimator. It reuses XTrace's sketch and leave-one-out
  construction (landscape.curvature.trace): for each of the m test vectors ω_i, P_i projects onto the sketch
  AΩ without Aω_i, and d_i = diag(2·P_iA − P_iAP_i) + c_i·ω_i ⊙ (I − P_i)A(I − P_i)ω_i, c_i = (n − m + 1)/‖(I −
  P_i)ω_i‖² (XTrace's normalization; unbiased for spherical ω). The estimate is the mean of the d_i. This is the
  paper's XDiag in the symmetric form of its XTrace: the low-rank part P_iA + AP_i − P_iAP_i is exact where the
  paper's P_iA leaves (I − P_i)AP_i to the probes, and its sums over a block of coordinates are exactly XTrace's
  per-block traces, whose stderr (leave-two-out covariance included) the per-tensor sums take. A matrix of rank
  below m comes out exact.
- exact: the operator's own diagonal where it has one cheaper than n products: for the GGN of cross-entropy
  (1/N)·Σ_i Σ_c (J_iᵀ S_i e_c)², S_i S_iᵀ = diag(p_i) − p_i p_iᵀ (N·C backward passes, C classes), for the
  empirical Fisher (1/N)·Σ_i g_i² (N backward passes); none for the Hessian.

The full diagonal stays in memory (`DiagonalResult.values`, `.stderrs`, per tensor by `.tensor(name)`); results
files hold only the sums per tensor and per block.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from landscape.curvature.blocks import Block, block_slices, role_blocks
from landscape.curvature.trace import (
    HUTCHINSON_BLOCK,
    XTraceSketch,
    _block_sums,
    _mean_stderr,
    hutchinson_contributions,
    xtrace_block_estimates,
    xtrace_sketch,
)
from landscape.engine.checks import check_int
from landscape.engine.objective import Objective
from landscape.engine.operators import LinearOperator, curvature_operator
from landscape.engine.progress import Progress
from landscape.results import Result

DIAGONAL_METHODS = ("xdiag", "hutchinson", "exact")
DIAGONAL_MATVEC_MINIMUMS = {"xdiag": 4, "hutchinson": 2, "exact": 0}
NOT_SAVED = {"json": False}  # a field to_dict leaves out (n floats)
COLUMNS = 1 << 16  # coordinates per step of XDiag's per-coordinate formula: its temporaries are (m, COLUMNS) blocks


@dataclass(frozen=True)
class BlockSum(Result):
    """The sum of the diagonal over one block of coordinates (a parameter tensor, a role), with its stderr."""

    name: str
    numel: int
    sum: float
    stderr: float
    shape: tuple[int, ...] | None = None  # a tensor's shape; None for a block of several tensors


@dataclass(frozen=True)
class DiagonalResult(Result):
    """diag(A) of a curvature operator: per-tensor (and per-block) sums ± stderr, their total, the cost, and the
    whole diagonal and its per-coordinate stderr (`values`, `stderrs`: in memory only, not in results files)."""

    method: str  # "xdiag", "hutchinson" or "exact"
    total: float  # the sum of the diagonal: an estimate of the trace
    total_stderr: float
    tensors: tuple[BlockSum, ...]  # one per block asked (per parameter tensor from `hessian_diagonal`)
    n_matvecs: int
    seconds: float
    seed: int
    n_backward: int = 0  # backward passes of the exact diagonal
    curvature: str | None = None  # hessian, ggn or fisher (None: an operator given directly)
    groups: tuple[BlockSum, ...] = ()  # sums over groups of tensors (by role: landscape.curvature.blocks.role_blocks)
    values: torch.Tensor | None = field(default=None, metadata=NOT_SAVED, repr=False, compare=False)
    stderrs: torch.Tensor | None = field(default=None, metadata=NOT_SAVED, repr=False, compare=False)

    def tensor(self, name: str) -> torch.Tensor:
        """The diagonal of tensor `name`, in its shape (needs `values`: a result read back from a file has none)."""
        if self.values is None:
            raise ValueError("this result holds no diagonal (results files keep only the sums): measure it again")
        start = 0
        for block in self.tensors:
            if block.name == name:
                part = self.values[start : start + block.numel]
                return part.reshape(block.shape) if block.shape is not None else part
            start += block.numel
        raise KeyError(f"no tensor {name!r}: {', '.join(b.name for b in self.tensors)}")


def hutchinson_diagonal(
    op: LinearOperator,
    n_probes: int = 100,
    *,
    block_size: int = HUTCHINSON_BLOCK,
    blocks: Mapping[str, Block] | None = None,
    seed: int = 0,
    progress: bool | str = False,
) -> DiagonalResult:
    """Hutchinson's diagonal estimator (Bekas, Kokiopoulou & Saad 2007): the mean of z ⊙ Az over Rademacher probes z.

    Coordinate a's error per probe is Σ_{c≠a} A_ac·z_a z_c, so it is exact for a diagonal matrix and slow where
    the rows carry off-diagonal mass. The probes are trace.hutchinson's (same seed, same probes), so the total and
    the block sums equal its trace and block traces.

    Args:
        op: a symmetric operator (HessianOperator, GGNOperator, DenseOperator, ...).
        n_probes: probes (matvecs), at least 2.
        block_size: probes per `products` call.
        blocks: {name: slice, or sequence of slices} to sum the diagonal over (e.g. the parameter tensors);
            None: the whole vector as one block.
        seed: seed of the probes.
        progress: a progress bar (True, or a label), off by default.

    Returns:
        DiagonalResult: the per-coordinate mean (`values`) and stderr (spread over probes / √probes), each block's
            sum with the stderr of its per-probe sums, `n_matvecs`, `seconds`.

    Examples:
        Every Rademacher probe of a diagonal matrix gives its diagonal:

        >>> import torch
        >>> from landscape.engine.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)))
        >>> result = hutchinson_diagonal(op, 6, blocks={"a": slice(0, 1), "b": slice(1, 4)})
        >>> result.values.tolist(), result.stderrs.abs().max().item()
        ([4.0, 3.0, 2.0, 1.0], 0.0)
        >>> [(b.name, b.sum, b.stderr) for b in result.tensors]
        [('a', 4.0, 0.0), ('b', 6.0, 0.0)]
    """
    n = op.shape[0]
    check_int("n_probes", n_probes, DIAGONAL_MATVEC_MINIMUMS["hutchinson"])
    check_int("block_size", block_size, 1)
    indices = _indices(blocks, op)
    start = time.perf_counter()
    mean = torch.zeros(n, dtype=torch.float64, device=op.device)
    m2 = torch.zeros_like(mean)
    count, sums, totals = 0, {name: [] for name in indices}, []
    with Progress(n_probes, "hutchinson diagonal", "matvec", progress) as bar:
        for contributions in hutchinson_contributions(op, n_probes, block_size, seed, bar):
            k = contributions.shape[0]
            totals.append(contributions.sum(1))
            for name, s in _block_sums(contributions, indices).items():
                sums[name].append(s)
            # Chan et al.'s pairwise update of the running mean and sum of squared deviations, in float64
            c = contributions.double()
            block_mean = c.mean(0)
            delta = block_mean - mean
            m2 += (c - block_mean).square_().sum(0) + delta.square() * (count * k / (count + k))
            mean += delta * (k / (count + k))
            count += k
            del contributions, c
    stats = {name: _mean_stderr(torch.cat(s).double().cpu().numpy()) for name, s in sums.items()}
    total = _mean_stderr(torch.cat(totals).double().cpu().numpy())  # the blocks share probes: their errors correlate
    return _result("hutchinson", mean, (m2 / (count - 1) / count).sqrt_(), stats, indices, count, 0, seed, start, op, total)


def xdiag(
    op: LinearOperator,
    n_matvecs: int = 100,
    *,
    blocks: Mapping[str, Block] | None = None,
    seed: int = 0,
    progress: bool | str = False,
) -> DiagonalResult:
    """XDiag (Epperly, Tropp & Webber 2024) in XTrace's symmetric form: exact on a sketched range, Hutchinson on the rest,
    every test vector used both ways (leave one out).

    d_i = diag(2·P_iA − P_iAP_i) + (n − m + 1)/‖(I − P_i)ω_i‖² · ω_i ⊙ (I − P_i)A(I − P_i)ω_i, averaged over the
    m = n_matvecs/2 spherical test vectors ω_i, P_i the projector onto A·[Ω without ω_i] (module docstring). Unbiased;
    exact when rank A < m. Each block's sum is XTrace's trace of that diagonal block, with XTrace's stderr
    (leave-two-out covariance, landscape.curvature.trace.xtrace); the per-coordinate stderr is the spread of the d_i
    / √m alone, which leaves out their positive correlation.

    Args:
        op: a symmetric operator of size ≥ 2 (HessianOperator, GGNOperator, DenseOperator, ...).
        n_matvecs: the budget, at least 4: n_matvecs // 2 test vectors and as many products with the basis.
        blocks: {name: slice, or sequence of slices} to sum the diagonal over (e.g. the parameter tensors);
            None: the whole vector as one block.
        seed: seed of the test vectors (XTrace's: same seed, same sketch).
        progress: a progress bar (True, or a label), off by default.

    Returns:
        DiagonalResult: the mean of the d_i (`values`) and their spread / √m (`stderrs`), each block's sum ± stderr,
            the total (XTrace's trace estimate) ± stderr, `n_matvecs` (the products made), `seconds`.

    Examples:
        The all-ones 6×6 matrix has rank 1, so 4 products give its diagonal exactly:

        >>> import torch
        >>> from landscape.engine.operators import DenseOperator
        >>> result = xdiag(DenseOperator(torch.ones(6, 6, dtype=torch.float64)), 4)
        >>> [round(v, 9) for v in result.values.tolist()], result.n_matvecs
        ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 3)
    """
    n = op.shape[0]
    check_int("n_matvecs", n_matvecs, DIAGONAL_MATVEC_MINIMUMS["xdiag"])
    if n < 2:
        raise ValueError("xdiag needs an operator of size ≥ 2 (leave-one-out needs two test vectors)")
    indices = _indices(blocks, op)
    start = time.perf_counter()
    sketch = xtrace_sketch(op, n_matvecs, seed, "xdiag", progress)
    samples, stderrs = xtrace_block_estimates(sketch, {None: slice(None), **(indices if blocks is not None else {})})
    total = (float(samples[None].mean()), stderrs[None])
    stats = {name: (float(samples[name].mean()), stderrs[name]) for name in indices} if blocks is not None else {"all": total}
    values, spread = _xdiag_coordinates(sketch)
    return _result("xdiag", values, spread, stats, indices, sketch.n_matvecs, 0, seed, start, op, total)


def exact_diagonal(op: LinearOperator, *, blocks: Mapping[str, Block] | None = None) -> DiagonalResult:
    """The operator's exact diagonal, where it has one cheaper than n products (`LinearOperator.exact_diagonal`): a
    dense matrix's; the GGN of cross-entropy's from N·C backward passes (N samples, C classes); the empirical
    Fisher's from N. A HessianOperator has none (a ValueError).

    Args:
        op: a DenseOperator, GGNOperator or FisherOperator.
        blocks: {name: slice, or sequence of slices} to sum the diagonal over; None: the whole vector.

    Returns:
        DiagonalResult: the diagonal (`values`), stderr 0 everywhere, block sums, `n_backward`, `seconds`.

    Examples:
        >>> import torch
        >>> from landscape.engine.operators import DenseOperator
        >>> result = exact_diagonal(DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)))
        >>> result.values.tolist(), result.total, result.n_backward
        ([2.0, 3.0], 5.0, 0)
    """
    indices = _indices(blocks, op)
    start = time.perf_counter()
    values, n_backward = op.exact_diagonal()
    values = values.double()
    stats = {name: (float(values[index].sum()), 0.0) for name, index in indices.items()}
    total = (float(values.sum()), 0.0)
    return _result("exact", values, torch.zeros_like(values), stats, indices, 0, n_backward, 0, start, op, total)


ESTIMATORS = {"xdiag": xdiag, "hutchinson": hutchinson_diagonal}


def hessian_diagonal(
    objective: Objective,
    method: str = "xdiag",
    *,
    curvature: str = "hessian",
    n_matvecs: int = 100,
    block_size: int = HUTCHINSON_BLOCK,
    seed: int = 0,
    progress: bool | str = False,
) -> DiagonalResult:
    """The diagonal of the objective's Hessian (or GGN, or empirical Fisher), summed per parameter tensor and per role.

    Args:
        objective: the checkpoint's loss.
        method: xdiag (default; Epperly, Tropp & Webber 2024), hutchinson (Bekas et al. 2007), or exact (curvature
            ggn with cross-entropy, or fisher: N·C or N backward passes, no matvecs).
        curvature: hessian, ggn or fisher (landscape.engine.operators.curvature_operator).
        n_matvecs: the matvec budget of xdiag and hutchinson.
        block_size: Hutchinson's probes per product call.
        seed: seed of the probes.
        progress: a progress bar (True, or a label), off by default.

    Returns:
        DiagonalResult with `tensors` one per parameter tensor (in the flat vector's order) and `groups` one per
        role of landscape.curvature.blocks.role_blocks (attention, mlp, ... or conv, linear, norm, ...).

    Raises:
        ValueError: an unknown method, method='exact' with curvature='hessian', or a sharded objective.
    """
    if method not in DIAGONAL_METHODS:
        raise ValueError(f"unknown diagonal method {method!r}; use one of {', '.join(DIAGONAL_METHODS)}")
    if method == "exact" and curvature == "hessian":
        raise ValueError(
            "method='exact' takes curvature='ggn' (N·C backward passes) or curvature='fisher' (N); the Hessian's "
            "diagonal has no exact shortcut: use method='xdiag'"
        )
    if getattr(objective, "inner", None) is not None and objective.inner.sharded:
        raise ValueError("the diagonal per parameter needs whole vectors: a sharded objective has none")
    op = curvature_operator(objective, curvature)
    tensors = objective.layout.slices()
    roles = role_blocks(objective.model, objective.layout)
    keys = {**{name: name for name in tensors}, **{f"{role} (role)": role for role in roles}}  # distinct keys
    blocks = {**tensors, **{f"{role} (role)": parts for role, parts in roles.items()}}
    if method == "exact":
        found = exact_diagonal(op, blocks=blocks)
    elif method == "hutchinson":
        found = hutchinson_diagonal(op, n_matvecs, block_size=block_size, blocks=blocks, seed=seed, progress=progress)
    else:
        found = xdiag(op, n_matvecs, blocks=blocks, seed=seed, progress=progress)
    shapes = dict(zip(objective.layout.names, objective.layout.shapes))
    sums = {keys[b.name]: b for b in found.tensors}
    per_tensor = tuple(_named(sums[name], name, tuple(shapes[name])) for name in tensors)
    per_role = tuple(_named(sums[role], role, None) for role in roles)
    return DiagonalResult(
        method=found.method,
        total=found.total,
        total_stderr=found.total_stderr,
        tensors=per_tensor,
        n_matvecs=found.n_matvecs,
        seconds=found.seconds,
        seed=found.seed,
        n_backward=found.n_backward,
        curvature=curvature,
        groups=per_role,
        values=found.values,
        stderrs=found.stderrs,
    )


def _named(block: BlockSum, name: str, shape: tuple[int, ...] | None) -> BlockSum:
    return BlockSum(name, block.numel, block.sum, block.stderr, shape)


def _indices(blocks: Mapping[str, Block] | None, op: LinearOperator) -> dict[str, slice | torch.Tensor]:
    """Each block as an index of the flat vector: its slice, or (several slices) a tensor of its coordinates."""
    if op.inner.sharded:
        raise ValueError("a diagonal per coordinate needs whole vectors: a sharded operator has none")
    n = op.shape[0]
    if blocks is None:
        return {"all": slice(0, n)}
    if not isinstance(blocks, Mapping) or not blocks:
        raise ValueError("blocks must be a non-empty dict mapping names to slices of the flat vector")
    out: dict[str, slice | torch.Tensor] = {}
    for name, block in blocks.items():
        parts = block_slices(block, n)
        if len(parts) == 1:
            out[name] = parts[0]
        else:
            out[name] = torch.cat([torch.arange(s.start, s.stop, s.step, device=op.device) for s in parts])
    return out


def _result(
    method: str,
    values: torch.Tensor,
    stderrs: torch.Tensor,
    stats: dict[str, tuple[float, float]],
    indices: dict[str, slice | torch.Tensor],
    n_matvecs: int,
    n_backward: int,
    seed: int,
    start: float,
    op: LinearOperator,
    total: tuple[float, float],
) -> DiagonalResult:
    """The result, each block's numel counted from its index; `total`: the diagonal's sum and its stderr."""
    numel = {name: len(range(*i.indices(op.shape[0]))) if isinstance(i, slice) else len(i) for name, i in indices.items()}
    return DiagonalResult(
        method=method,
        total=total[0],
        total_stderr=total[1],
        tensors=tuple(BlockSum(name, numel[name], s, e) for name, (s, e) in stats.items()),
        n_matvecs=int(n_matvecs),
        seconds=time.perf_counter() - start,
        seed=int(seed),
        n_backward=int(n_backward),
        values=values,
        stderrs=stderrs,
    )


def _xdiag_coordinates(sketch: XTraceSketch) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over i of XDiag's leave-one-out estimates d_i of the diagonal (module docstring), and their spread / √m.

    In the basis Q (rows q_k, Y = RᵀQ, G = R⁻ᵀ) leaving ω_i out of the sketch leaves Π_i = I − s_i s_iᵀ, s_i the
    normalized column i of G (no column, Π_i = I, when the sketch is rank-deficient): P_i = QᵀΠ_iQ. Then, with H =
    QAQᵀ, w_i = Qω_i, x_i = Π_i w_i and e_i = Π_i(r_i − Hx_i),
      diag(P_iA)_a = Σ_k q_ka (Aq_k)_a − (s_iᵀQ)_a (s_iᵀAQᵀ)_a, diag(P_iAP_i)_a = diag(QᵀHQ)_a − 2(s_iᵀQ)_a (s_iᵀHQ)_a +
      s_iᵀHs_i (s_iᵀQ)_a², (I − P_i)A(I − P_i)ω_i = y_i − Qᵀe_i − (AQᵀ)x_i:
    (m, columns) blocks of matrix products, computed COLUMNS coordinates at a time.
    """
    q, aq, omega, y, parts = sketch.q, sketch.aq, sketch.omega, sketch.y, sketch.parts
    m = omega.shape[0]
    h, w, r = parts.h, parts.w, parts.r
    if parts.g.shape[1]:
        s = parts.g / np.linalg.norm(parts.g, axis=0)  # column i: s_i
    else:
        s = np.zeros((len(h), m))
    x = w - s * (s * w).sum(0)  # column i: Π_i w_i
    e = r - h @ x
    e = e - s * (s * e).sum(0)
    scale = parts.codim / (parts.norms - (w * x).sum(0))  # (n − m + 1)/‖(I − P_i)ω_i‖²
    shs = ((h @ s) * s).sum(0)

    def small(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=q.dtype, device=q.device)

    st, hst, et, xt, shs_t, scale_t = small(s.T), small((h @ s).T), small(e.T), small(x.T), small(shs), small(scale)
    h_t = small(h)
    n = q.shape[1]
    mean = torch.empty(n, dtype=torch.float64, device=q.device)
    spread = torch.empty_like(mean)
    for begin in range(0, n, COLUMNS):
        c = slice(begin, min(begin + COLUMNS, n))
        qc, aqc = q[:, c], aq[:, c]
        sq, saq, shq = st @ qc, st @ aqc, hst @ qc
        low = 2 * ((qc * aqc).sum(0) - sq * saq) - ((qc * (h_t @ qc)).sum(0) - 2 * sq * shq + shs_t[:, None] * sq.square())
        residual = y[:, c] - et @ qc - xt @ aqc
        d = (low + scale_t[:, None] * omega[:, c] * residual).double()
        mean[c] = d.mean(0)
        spread[c] = d.std(0) / math.sqrt(m)
    return mean, spread
