"""Per-block curvature: λ1, trace and spectral density of each parameter block's diagonal Hessian block.

A block b is a set of coordinates of the flat parameter vector, given as one slice or several (the parameters
one module owns directly, e.g. `fc1` holding fc1.weight and fc1.bias; or every parameter of one role, e.g. all
attention weights of a transformer, one slice per layer), and H_bb is the Hessian restricted to it:
H_bb v = (H [v on b, 0 elsewhere])_b. The per-block view comes from PyHessian's per-layer analysis (Yao et
al. 2020); grouped by role it shows the block heterogeneity of transformer Hessians (Zhang et al. 2024, "Why
transformers need Adam: a Hessian perspective"). λ1(H_bb) and the density of H_bb come from Lanczos and SLQ on
the restricted operator, block by block (one full product per step); the traces tr(H_bb) of all blocks come
from ONE trace estimate over the full operator whose probes are split by block (landscape.curvature.trace's
`blocks=`), so they share probes and add up to the full trace estimate.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from landscape.curvature.density import Spectrum, slq_density
from landscape.curvature.spectrum import lanczos
from landscape.curvature.trace import TraceResult, xtrace
from landscape.engine.operators import LinearOperator
from landscape.engine.params import FlatLayout
from landscape.results import Result

PER_LAYER_METRICS = ("eig", "trace", "density")  # what per_layer can measure per block
DEFAULT_METRICS = ("eig", "trace")
ROOT = "(model)"  # the block name of parameters the top-level module owns itself
GROUPINGS = ("module", "role")  # one block per module (module_blocks) or per role (role_blocks)
TRANSFORMER_ROLES = ("embedding", "attention", "mlp", "norm", "head", "other")
NETWORK_ROLES = ("embedding", "conv", "norm", "linear", "other")  # models without attention (CNNs, MLPs)
ATTENTION_NAMES = ("attn", "attention", "self_attn", "self_attention", "cross_attn", "cross_attention")

Block = slice | tuple[slice, ...]  # coordinates of the flat vector: one slice, or several in order


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


def _is_attention(name: str, module: nn.Module) -> bool:
    """An attention module: nn.MultiheadAttention, a class named *Attention* (GPT2Attention, BertSelfAttention,
    ViTAttention, ...), or a module attribute named like one (attn, self_attn, attention, ...)."""
    return (
        isinstance(module, nn.MultiheadAttention)
        or "attention" in type(module).__name__.lower()
        or name.rpartition(".")[2] in ATTENTION_NAMES
    )


def _is_norm(module: nn.Module) -> bool:
    """BatchNorm, LayerNorm, GroupNorm, RMSNorm and their look-alikes (T5LayerNorm, LlamaRMSNorm): a class named *Norm*."""
    name = type(module).__name__
    return "Norm" in name and "Normal" not in name


def parameter_roles(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """The role of each named parameter of `model`: for a model with attention (a transformer) embedding, attention,
    mlp, norm, head or other; for one without (a CNN, an MLP) embedding, conv, norm, linear or other.

    Decided by the module that owns the parameter and its ancestors, first match wins:
    norm: the owner is a normalization layer (BatchNorm, LayerNorm, RMSNorm, ...). embedding: the owner is an
    nn.Embedding, or a name on the way down contains "embed" (ViT's patch projection and class token, BERT's
    position embeddings, a pos_embed parameter), or the parameter is a *_token (cls_token). Transformers: attention: inside an attention module
    (GPT-2's c_attn and c_proj, BERT's query/key/value and attention output); mlp: elsewhere inside a
    transformer layer (the module that holds an outermost attention module: GPT-2's h.3, BERT's layer.3);
    head: everything else (BERT's pooler and classifier; GPT-2's lm_head where it is not tied to the
    embedding). Other models: conv (any nn.ConvNd), linear (nn.Linear), other. Tied weights appear once in
    named_parameters(), under their first name, so they get one role.

    Raises:
        ValueError: a name that is not a parameter of `model`.
    """
    modules = dict(model.named_modules())
    attention = [n for n, m in modules.items() if n and _is_attention(n, m)]
    outermost = [n for n in attention if not any(n.startswith(a + ".") for a in attention)]
    layers = {n.rpartition(".")[0] for n in outermost} - {""}  # the root itself is no layer
    transformer = bool(attention)
    params = dict(model.named_parameters())
    roles = {}
    for name in names:
        if name not in params:
            raise ValueError(f"{name} is not a parameter of the {type(model).__name__} model")
        owner_name, _, leaf = name.rpartition(".")
        owner = modules[owner_name]
        chain = owner_name.split(".") if owner_name else []
        prefixes = [".".join(chain[: i + 1]) for i in range(len(chain))]
        if _is_norm(owner):
            role = "norm"
        elif (
            isinstance(owner, (nn.Embedding, nn.EmbeddingBag))
            or any("embed" in c.lower() for c in (*chain, leaf))
            or leaf.endswith("token")
        ):
            role = "embedding"
        elif transformer:
            if any(p in attention for p in prefixes):
                role = "attention"
            elif any(p in layers for p in prefixes):
                role = "mlp"
            else:
                role = "head"
        elif isinstance(owner, nn.modules.conv._ConvNd):
            role = "conv"
        elif isinstance(owner, (nn.Linear, nn.Bilinear)):
            role = "linear"
        else:
            role = "other"
        roles[name] = role
    return roles


def role_blocks(model: nn.Module, layout: FlatLayout) -> dict[str, tuple[slice, ...]]:
    """One block per role of `parameter_roles` (attention, mlp, embedding, norm, head for a transformer; conv, norm,
    linear for a CNN), each the slices of the flat vector its parameters occupy (adjacent ones merged), in the
    order of TRANSFORMER_ROLES or NETWORK_ROLES; roles no parameter has are left out.

    Every parameter of `layout` is in exactly one block, so the blocks partition the flat vector.
    """
    roles = parameter_roles(model, layout.names)
    found: dict[str, list[slice]] = {}
    for name, part in layout.slices().items():
        parts = found.setdefault(roles[name], [])
        if parts and parts[-1].stop == part.start:
            parts[-1] = slice(parts[-1].start, part.stop)
        else:
            parts.append(part)
    order = TRANSFORMER_ROLES if any(r in found for r in ("attention", "mlp", "head")) else NETWORK_ROLES
    return {role: tuple(found[role]) for role in order if role in found}


def parameter_blocks(model: nn.Module, layout: FlatLayout, by: str = "module") -> dict[str, Block]:
    """The blocks `per_layer` measures: by "module" (`module_blocks`) or by "role" (`role_blocks`)."""
    if by == "module":
        return dict(module_blocks(layout))
    if by == "role":
        return dict(role_blocks(model, layout))
    raise ValueError(f"blocks by {by!r}: choose from {', '.join(GROUPINGS)}")


def block_slices(block: Block | Sequence[slice], n: int) -> tuple[slice, ...]:
    """`block` as forward slices of [0, n) with explicit bounds, in the given order, adjacent ones merged.

    Raises:
        ValueError: an empty or out-of-range slice, a step other than 1 among several slices, or overlapping slices.
    """
    parts = (block,) if isinstance(block, slice) else tuple(block)
    if not parts or not all(isinstance(s, slice) for s in parts):
        raise ValueError(f"a block must be a slice or a non-empty sequence of slices, got {block!r}")
    out: list[slice] = []
    for part in parts:
        start, stop, step = part.indices(n)
        in_range = all(b is None or 0 <= b <= n for b in (part.start, part.stop))
        if not in_range or step < 1 or not range(start, stop, step):
            raise ValueError(f"block slice {part} is not a non-empty forward slice of [0, {n})")
        if step != 1 and len(parts) > 1:
            raise ValueError(f"block slice {part} has step {step}; a block of several slices takes step 1 only")
        if out and step == 1 and out[-1].step == 1 and out[-1].stop == start:
            out[-1] = slice(out[-1].start, stop, 1)
        else:
            out.append(slice(start, stop, step))
    ordered = sorted(out, key=lambda s: s.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.stop:
            raise ValueError(f"block slices {a} and {b} overlap")
    return tuple(out)


class BlockOperator(LinearOperator):
    """H_bb: `op` restricted to the coordinates of `block`, one slice or several, as a compact operator of their
    total size (each probe row scattered into a zero full vector on the way in, each product row gathered back
    from those coordinates on the way out). Its own vectors hold only the block, so a solver on it stores
    n_b-vectors, not n-vectors."""

    def __init__(self, op: LinearOperator, block: Block | Sequence[slice]) -> None:
        if getattr(getattr(op, "inner", None), "sharded", False):
            raise ValueError("a block of the parameters needs whole vectors: a sharded operator has no per-block curvature")
        self.slices = block_slices(block, op.shape[0])
        sizes = [len(range(s.start, s.stop, s.step)) for s in self.slices]
        super().__init__(sum(sizes), op.dtype, op.device)
        self.op, self.block = op, block
        offsets = [0, *itertools.accumulate(sizes)]
        self.parts = tuple(slice(a, b) for a, b in zip(offsets, offsets[1:]))  # each slice's place in the compact vector

    def products(self, V: torch.Tensor) -> torch.Tensor:
        self.n_matvecs += V.shape[0]
        padded = torch.zeros(V.shape[0], self.op.shape[0], dtype=V.dtype, device=V.device)
        for full, part in zip(self.slices, self.parts):
            padded[:, full] = V[:, part]
        out = self.op.products(padded)
        del padded
        if len(self.slices) == 1:
            return out[:, self.slices[0]]
        return torch.cat([out[:, full] for full in self.slices], dim=1)


@dataclass(frozen=True)
class BlockCurvature(Result):
    """One block's λ1 (with its Lanczos residual), trace (with its standard error) and spectral density; None where
    not measured."""

    name: str
    n_params: int
    lambda1: float | None
    residual: float | None  # some eigenvalue of H_bb lies within it of lambda1 (rigorous Lanczos bound)
    converged: bool | None
    eig_matvecs: int  # full-operator products Lanczos spent on this block
    trace: float | None
    trace_stderr: float | None
    certified: bool | None = None  # lambda1 is the block's top eigenvalue within `residual` (`lanczos`'s certified stop)
    density: Spectrum | None = None  # SLQ density of H_bb (its n_matvecs: full-operator products spent on it)
    n_slices: int = 1  # the pieces of the flat vector the block is made of (a role: one or more per layer)


@dataclass(frozen=True)
class PerLayerResult(Result):
    """Per-block curvature, the shared trace estimate it came from, cost and provenance."""

    blocks: tuple[BlockCurvature, ...]
    metrics: tuple[str, ...]
    trace_estimate: TraceResult | None  # the one full-operator estimate whose probes gave every block's trace
    n_matvecs: int
    seconds: float
    seed: int
    grouping: str = "module"  # how the blocks were formed: "module", "role" (GROUPINGS) or "custom"


def _shared_trace(
    op: LinearOperator,
    blocks: Mapping[str, tuple[slice, ...]],
    trace: Callable[..., TraceResult],
    n_probes: int,
    seed: int,
    progress,
) -> TraceResult:
    """One trace run whose probes are split by block. Blocks of one slice each go to `trace` as they are; blocks of
    several slices are first made contiguous by a permutation of the coordinates (P H Pᵀ, the blocks' slices
    first, in order, then the rest), which leaves every diagonal block and the total trace unchanged."""
    if all(len(parts) == 1 for parts in blocks.values()):
        return trace(op, n_probes, seed=seed, blocks={name: parts[0] for name, parts in blocks.items()}, progress=progress)
    ordered = [s for parts in blocks.values() for s in parts]
    for a, b in zip(sorted(ordered, key=lambda s: s.start), sorted(ordered, key=lambda s: s.start)[1:]):
        if b.start < a.stop:
            raise ValueError(f"blocks overlap at slices {a} and {b}: per-block traces need disjoint blocks")
    covered, gaps = 0, []
    for s in sorted(ordered, key=lambda s: s.start):
        if s.start > covered:
            gaps.append(slice(covered, s.start))
        covered = s.stop
    gaps += [slice(covered, op.shape[0])] if covered < op.shape[0] else []
    permuted = BlockOperator(op, ordered + gaps)
    contiguous, offset = {}, 0
    for name, parts in blocks.items():
        size = sum(s.stop - s.start for s in parts)
        contiguous[name] = slice(offset, offset + size)
        offset += size
    return trace(permuted, n_probes, seed=seed, blocks=contiguous, progress=progress)


def per_layer(
    op: LinearOperator,
    blocks: Mapping[str, Block | Sequence[slice]],
    metrics: Iterable[str] = DEFAULT_METRICS,
    *,
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    trace: Callable[..., TraceResult] = xtrace,
    n_probes: int = 100,
    density_runs: int = 4,
    density_steps: int = 60,
    free_bytes: int | None = None,
    seed: int = 0,
    progress: bool | str = False,
    grouping: str = "custom",
) -> PerLayerResult:
    """λ1(H_bb) by Lanczos and the SLQ density of each restricted block, and tr(H_bb) of every block from one shared
    trace estimate.

    The block-diagonal view of the Hessian that PyHessian's per-layer analysis (Yao et al. 2020) and HAWQ (Dong et
    al. 2019) rank layers by; with blocks by role (`role_blocks`) the heterogeneity across attention, MLP,
    embedding and norm blocks of Zhang et al. 2024 ("Why transformers need Adam: a Hessian perspective").
    λ1(H_bb) comes from `lanczos` (certified stop) on H restricted to block b, its density from `slq_density` on
    the same restriction (each step one full product); the traces of all blocks come from ONE `trace` run over the
    full operator whose probes are split by block, so the block traces share probes and add up to the full
    trace estimate.

    Args:
        op: a symmetric operator on the flat parameter vector (e.g. HessianOperator).
        blocks: {name: slice, or sequence of slices, of the flat vector}, e.g. `module_blocks(objective.layout)` or
            `role_blocks(objective.model, objective.layout)`; disjoint where traces are measured.
        metrics: any of "eig", "trace", "density".
        tol: the Lanczos tolerance per block.
        max_matvecs: the Lanczos budget per block (None: lanczos's default).
        trace: the trace estimator: xtrace (default; Epperly et al. 2024), hutchpp or hutchinson.
        n_probes: the matvec budget of the one trace run.
        density_runs: SLQ probe vectors per block.
        density_steps: SLQ Lanczos steps per run (at most the block's size).
        free_bytes: memory the operator's products leave free, for SLQ's choice of recurrence (`slq_density`).
        seed: seed of the Lanczos starts, the trace probes and the SLQ probes.
        progress: a progress bar (True, or a label), off by default.
        grouping: how the blocks were formed, recorded in the result ("module", "role" or "custom").

    Returns:
        PerLayerResult: one BlockCurvature per block (λ1 with its residual and certification, trace with its
            standard error, the density; None where not measured), the shared `trace_estimate`, and the cost
            (`n_matvecs` in full-operator products, `seconds`).

    Raises:
        ValueError: an unknown or empty metrics list, a bad block, or overlapping multi-slice blocks with "trace".

    Examples:
        Two blocks of diag(4, 1, 2, 3), one of them two slices: λ1 per block is exact, the block traces are
        estimates whose sum is the (here exact) full trace:

        >>> import torch
        >>> from landscape.engine.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([4.0, 1.0, 2.0, 3.0], dtype=torch.float64)))
        >>> result = per_layer(op, {"a": slice(0, 2), "b": (slice(2, 3), slice(3, 4))})
        >>> [(block.name, round(block.lambda1, 6)) for block in result.blocks]
        [('a', 4.0), ('b', 3.0)]
        >>> round(sum(block.trace for block in result.blocks), 6)
        10.0
    """
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in PER_LAYER_METRICS]
    if unknown or not metrics:
        raise ValueError(f"per-layer metrics {', '.join(metrics) or '(none)'}: choose from {', '.join(PER_LAYER_METRICS)}")
    if not blocks:
        raise ValueError("per_layer needs at least one block")
    start = time.perf_counter()
    parts = {name: block_slices(block, op.shape[0]) for name, block in blocks.items()}
    traced = _shared_trace(op, parts, trace, n_probes, seed, progress) if "trace" in metrics else None
    rows = []
    for name, block in parts.items():
        restricted = BlockOperator(op, block)
        eig = lanczos(restricted, 1, tol=tol, max_matvecs=max_matvecs, seed=seed, progress=progress) if "eig" in metrics else None
        density = None
        if "density" in metrics:
            steps = min(density_steps, restricted.shape[0])
            density = slq_density(
                restricted, n_runs=density_runs, n_steps=steps, seed=seed, progress=progress, free_bytes=free_bytes
            )
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
                density=density,
                n_slices=len(block),
            )
        )
    n_matvecs = sum(r.eig_matvecs + (r.density.n_matvecs if r.density is not None else 0) for r in rows)
    n_matvecs += traced.n_matvecs if traced is not None else 0
    return PerLayerResult(
        blocks=tuple(rows),
        metrics=metrics,
        trace_estimate=traced,
        n_matvecs=n_matvecs,
        seconds=time.perf_counter() - start,
        seed=int(seed),
        grouping=grouping,
    )
