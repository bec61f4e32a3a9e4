"""Per-layer curvature: λ1 and the trace of each parameter block's diagonal Hessian block.

Users of PyHessian (issue #10) and pytorch-hessian-eigenthings (issue #19) asked for per-layer
eigenvalues. A block b is a contiguous slice of the flat parameter vector (by default the
parameters one module owns directly, e.g. `fc1` holding fc1.weight and fc1.bias), and H_bb is the
Hessian restricted to it: H_bb v = (H [v on b, 0 elsewhere])_b. λ1(H_bb) comes from Lanczos on
that restricted operator, block by block (one full product per step); the traces tr(H_bb) of all
blocks come from ONE trace estimate over the full operator whose probes are split by block
(landscape.curvature.trace's `blocks=`), so they share probes and add up to the full trace estimate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from landscape.curvature.spectrum import lanczos
from landscape.curvature.trace import TraceResult, xtrace
from landscape.engine.operators import LinearOperator
from landscape.engine.params import FlatLayout
from landscape.results import Result

PER_LAYER_METRICS = ("eig", "trace")
ROOT = "(model)"  # the block name of parameters the top-level module owns itself


def module_blocks(layout: FlatLayout) -> dict[str, slice]:
    """One block per module that owns parameters directly, named by the module (`fc1` for fc1.weight and fc1.bias).

    A module's own parameters are consecutive in named_parameters() order, so each block is one slice.
    """
    blocks: dict[str, slice] = {}
    for name, part in layout.slices().items():
        owner = name.rpartition(".")[0] or ROOT
        if owner in blocks and blocks[owner].stop != part.start:
            raise ValueError(f"the parameters of module {owner} are not consecutive in the flat vector")
        blocks[owner] = slice(blocks[owner].start if owner in blocks else part.start, part.stop)
    return blocks


class BlockOperator(LinearOperator):
    """H_bb: `op` restricted to the coordinates `block` (each probe row zero elsewhere on the way in, each product
    row cut to those coordinates on the way out)."""

    def __init__(self, op: LinearOperator, block: slice) -> None:
        super().__init__(len(range(*block.indices(op.shape[0]))), op.dtype, op.device)
        self.op, self.block = op, block

    def products(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[0]
        padded = torch.zeros(V.shape[0], self.op.shape[0], dtype=V.dtype, device=V.device)
        padded[:, self.block] = V
        return self.op.products(padded)[:, self.block]


@dataclass(frozen=True)
class BlockCurvature(Result):
    """One block's λ1 (with its Lanczos residual) and trace (with its standard error); None where not measured."""

    name: str
    n_params: int
    lambda1: float | None
    residual: float | None  # some eigenvalue of H_bb lies within it of lambda1 (rigorous Lanczos bound)
    converged: bool | None
    eig_matvecs: int  # full-operator products Lanczos spent on this block
    trace: float | None
    trace_stderr: float | None
    certified: bool | None = None  # lambda1 is the block's top eigenvalue within `residual` (`lanczos`'s certified stop)


@dataclass(frozen=True)
class PerLayerResult(Result):
    """Per-block curvature, the shared trace estimate it came from, cost and provenance."""

    blocks: tuple[BlockCurvature, ...]
    metrics: tuple[str, ...]
    trace_estimate: TraceResult | None  # the one full-operator estimate whose probes gave every block's trace
    n_matvecs: int
    seconds: float
    seed: int


def per_layer(
    op: LinearOperator,
    blocks: Mapping[str, slice],
    metrics: Iterable[str] = PER_LAYER_METRICS,
    *,
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    trace: Callable[..., TraceResult] = xtrace,
    n_probes: int = 100,
    seed: int = 0,
    progress: bool | str = False,
) -> PerLayerResult:
    """λ1(H_bb) by Lanczos on each restricted block and tr(H_bb) of every block from one shared trace estimate.

    The block-diagonal view of the Hessian that HAWQ (Dong et al. 2019) ranks layers by and that
    PyHessian and hessian-eigenthings users asked for. λ1(H_bb) comes from `lanczos` on H
    restricted to block b (each step one full product); the traces of all blocks come from ONE
    `trace` run over the full operator whose probes are split by block, so the block traces share
    probes and add up to the full trace estimate.

    Args:
        op: a symmetric operator on the flat parameter vector (e.g. HessianOperator).
        blocks: {name: slice of the flat vector}, e.g. `module_blocks(objective.layout)`.
        metrics: "eig", "trace" or both.
        tol: the Lanczos tolerance per block.
        max_matvecs: the Lanczos budget per block (None: lanczos's default).
        trace: the trace estimator: xtrace (default; Epperly et al. 2024), hutchpp or hutchinson.
        n_probes: the matvec budget of the one trace run.
        seed: seed of the Lanczos starts and of the trace probes.
        progress: a progress bar (True, or a label), off by default.

    Returns:
        PerLayerResult: one BlockCurvature per block (λ1 with its residual and convergence, trace
            with its standard error; None where not measured), the shared `trace_estimate`, and
            the cost (`n_matvecs` in full-operator products, `seconds`).

    Raises:
        ValueError: an unknown or empty metrics list.

    Examples:
        Two blocks of diag(4, 1, 2): λ1 per block is exact, the block traces are estimates
        whose sum is the (here exact) full trace:

        >>> import torch
        >>> from landscape.engine.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([4.0, 1.0, 2.0], dtype=torch.float64)))
        >>> result = per_layer(op, {"a": slice(0, 2), "b": slice(2, 3)})
        >>> [(block.name, round(block.lambda1, 6)) for block in result.blocks]
        [('a', 4.0), ('b', 2.0)]
        >>> round(sum(block.trace for block in result.blocks), 6)
        7.0
    """
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in PER_LAYER_METRICS]
    if unknown or not metrics:
        raise ValueError(f"per-layer metrics {', '.join(metrics) or '(none)'}: choose from {', '.join(PER_LAYER_METRICS)}")
    start = time.perf_counter()
    traced = trace(op, n_probes, seed=seed, blocks=dict(blocks), progress=progress) if "trace" in metrics else None
    rows = []
    for name, block in blocks.items():
        restricted = BlockOperator(op, block)
        eig = lanczos(restricted, 1, tol=tol, max_matvecs=max_matvecs, seed=seed, progress=progress) if "eig" in metrics else None
        estimate, stderr = traced.blocks[name] if traced is not None else (None, None)
        rows.append(
            BlockCurvature(
                name=name,
                n_params=restricted.shape[0],
                lambda1=None if eig is None else float(eig.values[0]),
                residual=None if eig is None else float(eig.residuals[0]),
                converged=None if eig is None else eig.converged,
                certified=None if eig is None else eig.certified,
                eig_matvecs=0 if eig is None else eig.n_matvecs,
                trace=estimate,
                trace_stderr=stderr,
            )
        )
    n_matvecs = sum(r.eig_matvecs for r in rows) + (traced.n_matvecs if traced is not None else 0)
    return PerLayerResult(
        blocks=tuple(rows),
        metrics=metrics,
        trace_estimate=traced,
        n_matvecs=n_matvecs,
        seconds=time.perf_counter() - start,
        seed=int(seed),
    )
