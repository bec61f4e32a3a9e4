"""Directions in weight space for loss surfaces: random filter-normalized, between two checkpoints, PCA of a trajectory.

A surface point is origin + Σ_j c_j·d_j, where the origin is the Objective's checkpoint and each
d_j is a flat vector in the Objective's parameter layout (plus, optionally, a direction for the
floating-point buffers such as BN running statistics).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from landscape.engine.objective import Objective
from landscape.engine.params import rescale_filters, tensor_digest
from landscape.results import to_jsonable

NORMALIZATIONS = ("filter", "layer", "weight", "none")
ONE_D_POLICIES = ("ignore", "copy")


class DirectionError(ValueError):
    """Directions that cannot be built for this objective (another architecture, bad options)."""


@dataclass(frozen=True)
class Directions:
    """`dim` directions (rows of `vectors`, shape (dim, n_params)) and how they were made.

    `buffers` maps buffer names (BN running statistics) to (dim, *shape) directions when the
    buffers move with the point (interpolation, or random directions with `states=True`).
    For PCA directions, `trajectory` holds the (T, dim) coordinates of the trajectory's
    checkpoints relative to the origin and `labels` their names.
    """

    vectors: torch.Tensor
    kind: str
    spec: dict
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    trajectory: np.ndarray | None = None
    labels: tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        return self.vectors.shape[0]

    def fingerprint(self) -> str:
        """SHA-256 of the vectors, buffer directions, kind and spec: equal fingerprints, equal surfaces."""
        salt = json.dumps([self.kind, to_jsonable(self.spec)], sort_keys=True)
        return tensor_digest({"vectors": self.vectors, **{f"buffer:{n}": b for n, b in self.buffers.items()}}, salt)

    def to_dict(self) -> dict:
        """JSON summary (the vectors themselves live in the surface's HDF5 file)."""
        return to_jsonable(
            {
                "kind": self.kind,
                "dim": self.dim,
                "n_params": self.vectors.shape[1],
                "spec": self.spec,
                "norms": self.vectors.norm(dim=1),
                "buffers": sorted(self.buffers),
                "trajectory": self.trajectory,
                "labels": list(self.labels),
                "fingerprint": self.fingerprint(),
            }
        )


def random_directions(
    objective: Objective,
    dim: int = 2,
    *,
    seed: int = 0,
    normalization: str = "filter",
    one_d: str = "ignore",
    states: bool = False,
) -> Directions:
    """Gaussian directions normalized per filter, layer or weight (Li et al. 2018, "Visualizing the Loss Landscape").

    Filter normalization makes surfaces of differently scaled networks comparable: each filter
    of the direction gets the norm of the weight filter it moves. Drawn in float64 on the CPU
    from `seed`, so the same seed gives the same directions on every device.

    Args:
        objective: the checkpoint (its parameter layout and weights) the directions start from.
        dim: 1 or 2 directions.
        seed: seed of the Gaussian draw.
        normalization: "filter" (default): each filter (row of the weight reshaped to (out, −1))
            gets the norm of the matching weight filter; "layer": each tensor gets its weight
            tensor's norm; "weight": d ← d·w elementwise; "none": raw Gaussian.
        one_d: tensors with ≤ 1 dimension (biases, BN affine): "ignore" (zero, the reference's
            `biasbn`) or "copy" (d = w).
        states: give the BN running statistics a direction too, by the same rules, so they stay
            fixed unless one_d="copy", as in the reference.

    Returns:
        Directions: `vectors` of shape (dim, n_params) on the objective's device and dtype, BN
            `buffers` directions if `states`, and the `spec` (seed, normalization, policies).

    Raises:
        DirectionError: an unknown normalization or 1-D policy, or dim not 1 or 2.

    Examples:
        A (1, 2) weight is one filter of norm √2, so the direction gets norm √2 too:

        >>> from landscape.examples import quadratic
        >>> objective = quadratic()                  # one Linear(2, 1) layer at w = (1, 1)
        >>> directions = random_directions(objective, 1, seed=0)
        >>> directions.vectors.shape, round(float(directions.vectors.norm()), 4)
        (torch.Size([1, 2]), 1.4142)
    """
    if normalization not in NORMALIZATIONS:
        raise DirectionError(f"unknown normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")
    if one_d not in ONE_D_POLICIES:
        raise DirectionError(f"unknown 1-D policy {one_d!r}; use 'ignore' (zero) or 'copy'")
    if dim not in (1, 2):
        raise DirectionError(f"surfaces have 1 or 2 directions, got dim={dim}")
    generator = torch.Generator().manual_seed(int(seed))
    raw = torch.randn(dim, objective.n_params, generator=generator, dtype=torch.float64)
    weights = objective.layout.unflatten(objective.w.detach().cpu().double())
    normalized = _normalize(objective.layout.unflatten(raw), weights, normalization, one_d)
    vectors = objective.layout.flatten(normalized)
    buffers = {}
    if states:
        for name, value in _float_buffers(objective).items():
            d = torch.randn(dim, *value.shape, generator=generator, dtype=torch.float64)
            buffers[name] = _normalize({name: d}, {name: value.cpu().double()}, normalization, one_d)[name]
    spec = {"seed": int(seed), "normalization": normalization, "one_d": one_d, "states": states}
    return _on_device(objective, vectors, buffers, kind="random", spec=spec)


def between(objective: Objective, other: nn.Module, label: str = "other") -> Directions:
    """The 1-D direction θ_B − θ_A from the objective's checkpoint A to model B, BN buffers included.

    The linear interpolation of Goodfellow, Vinyals & Saxe (2015), as Keskar et al. (2017)'s
    parametric plot: θ(α) = θ_A + α(θ_B − θ_A), α = 1 is checkpoint B. Floating-point buffers
    (BN running statistics) are interpolated with the weights.

    Args:
        objective: checkpoint A (the origin, α = 0).
        other: model B, of the same architecture.
        label: B's name in errors and in the direction's spec.

    Returns:
        Directions: one vector θ_B − θ_A in the objective's layout, and the buffers' differences.

    Raises:
        DirectionError: B lacks a parameter or buffer of A, has other shapes, or non-finite weights.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from landscape.examples import quadratic
        >>> objective = quadratic()                  # one Linear(2, 1) layer at w = (1, 1)
        >>> other = nn.Linear(2, 1, bias=False)
        >>> _ = other.weight.data.copy_(torch.tensor([[0.0, 1.0]]))
        >>> between(objective, other).vectors
        tensor([[-1.,  0.]], dtype=torch.float64)
    """
    w_other, buffers_other = flat_state(objective, other, label)
    vectors = (w_other - objective.w).unsqueeze(0)
    fixed = _float_buffers(objective)
    buffers = {name: (value - fixed[name]).unsqueeze(0) for name, value in buffers_other.items()}
    return Directions(vectors, "between", {"other": label}, buffers)


def pca_directions(objective: Objective, trajectory: Sequence[nn.Module], labels: Sequence[str]) -> Directions:
    """Top-2 principal components of the trajectory's offsets θ_i − θ_final (Li et al. 2018, §7).

    The offsets are centred before the SVD (as scikit-learn's PCA does in the reference); the
    components are unit vectors, so surface coordinates are in weight units. Records the explained
    variance ratios and the trajectory's own coordinates (projections onto the components) for overlay.
    """
    if len(trajectory) < 3:
        raise DirectionError(f"PCA of a trajectory needs at least 3 checkpoints, got {len(trajectory)}")
    offsets = torch.stack([flat_state(objective, m, label)[0] for m, label in zip(trajectory, labels)]).double()
    offsets -= objective.w.double()
    centred = offsets - offsets.mean(dim=0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:2]
    coords = offsets @ components.T
    signs = torch.where(coords[0] > 0, -1.0, 1.0).to(coords)  # the run starts at negative coordinates
    components, coords = components * signs[:, None], coords * signs
    variance = singular.square()
    spec = {"explained_variance_ratio": (variance[:2] / variance.sum()).tolist(), "n_checkpoints": len(trajectory)}
    return Directions(components.to(objective.dtype), "pca", spec, trajectory=coords.cpu().numpy(), labels=tuple(labels))


def flat_state(objective: Objective, model: nn.Module, label: str = "model") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Another model's parameters in the objective's flat layout, and its float buffers; refuses other architectures."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    tensors = {}
    for name, shape in zip(objective.layout.names, objective.layout.shapes):
        if name not in params:
            raise DirectionError(f"{label} has no parameter {name!r}: it is not the same architecture")
        if tuple(params[name].shape) != tuple(shape):
            raise DirectionError(f"{label}: parameter {name!r} has shape {tuple(params[name].shape)}, expected {tuple(shape)}")
        tensors[name] = params[name].detach()
    w = objective.layout.flatten(tensors).to(device=objective.device, dtype=objective.dtype)
    if not torch.isfinite(w).all():
        raise DirectionError(f"{label} has non-finite weights")
    own = _float_buffers(objective)
    missing = sorted(set(own) - set(buffers))
    if missing:
        raise DirectionError(f"{label} has no buffer {missing[0]!r}: it is not the same architecture")
    return w, {name: buffers[name].detach().to(own[name]) for name in own}


def _float_buffers(objective: Objective) -> dict[str, torch.Tensor]:
    """The objective's floating-point buffers (BN running mean and variance; none in BN train mode)."""
    return {name: b for name, b in objective.model.named_buffers() if b.is_floating_point()}


def _normalize(
    direction: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], normalization: str, one_d: str
) -> dict[str, torch.Tensor]:
    """Apply the normalization to each (dim, *shape) tensor; ≤1-D tensors by the 1-D policy."""
    out = {}
    for name, d in direction.items():
        w = weights[name]
        if w.ndim <= 1:
            out[name] = torch.zeros_like(d) if one_d == "ignore" else w.expand_as(d).clone()
        elif normalization == "filter":
            out[name] = rescale_filters({name: d}, {name: w})[name]
        elif normalization == "layer":
            out[name] = d * (w.norm() / d.flatten(1).norm(dim=1).clamp_min(1e-12)).reshape(-1, *[1] * w.ndim)
        elif normalization == "weight":
            out[name] = d * w
        else:
            out[name] = d
    return out


def _on_device(objective: Objective, vectors: torch.Tensor, buffers: dict[str, torch.Tensor], **kw) -> Directions:
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=objective.device, dtype=objective.dtype)

    return Directions(move(vectors), buffers={n: move(b) for n, b in buffers.items()}, **kw)
