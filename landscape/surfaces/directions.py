"""Directions in weight space for loss surfaces: random filter-normalized, between two checkpoints, PCA of a
trajectory, the top Hessian eigenvectors, the gradient, and the plane through three checkpoints.

A surface point is origin + Σ_j c_j·d_j, where the origin is the Objective's checkpoint and each
d_j is a flat vector in the Objective's parameter layout (plus, optionally, a direction for the
floating-point buffers such as BN running statistics). Eigenvector, gradient, PCA and
three-checkpoint directions are orthonormal, so a coordinate is a distance in weight space.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from landscape.curvature.spectrum import lanczos
from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator
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
    checkpoints relative to the origin and `labels` their names; for a three-checkpoint plane,
    the (3, 2) coordinates of the three checkpoints and their names.
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

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Directions:
        """The same directions with vectors and buffer directions on `device` in `dtype` (e.g. read back from a file)."""
        return replace(
            self,
            vectors=self.vectors.to(device=device, dtype=dtype),
            buffers={n: b.to(device=device, dtype=dtype) for n, b in self.buffers.items()},
        )

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


def eigenvector_directions(
    objective: Objective, k: int = 2, *, tol: float = 1e-3, seed: int = 0, max_matvecs: int | None = None
) -> Directions:
    """The top-k Hessian eigenvectors as unit directions, by the certified Lanczos (landscape.curvature.spectrum).

    The plane's axes are the sharpest directions at the checkpoint, so the surface shows the
    curvature the eigenvalues measure: on a quadratic, L(origin + x·v₁ + y·v₂) = L₀ + x·g·v₁ + y·g·v₂
    + ½λ₁x² + ½λ₂y². The vectors are unit Ritz vectors (orthonormal, Hessian-orthogonal), so a
    coordinate is a distance in weight space; each sign is fixed so its largest entry is positive.
    BN running statistics stay at the checkpoint's (the Hessian is over the parameters).

    Args:
        objective: the checkpoint and measurement set whose Hessian is used.
        k: 1 or 2 eigenvectors (a line or a plane).
        tol: Lanczos's relative tolerance on the eigenvalues.
        seed: seed of Lanczos's start and check vectors.
        max_matvecs: Lanczos's budget of Hessian-vector products (None: its default).

    Returns:
        Directions: kind "eigenvector"; `spec` holds the eigenvalues, their residuals, whether
            Lanczos converged and `certified` them as the top k (a close pair it could not separate
            in its budget is not), the Hessian-vector products spent and the seed.

    Raises:
        DirectionError: k not 1 or 2.

    Examples:
        The quadratic's Hessian is diag(4, 1): the sharpest direction is the first weight.

        >>> from landscape.examples import quadratic
        >>> directions = eigenvector_directions(quadratic(), 2)
        >>> [round(v, 6) for v in directions.spec["eigenvalues"]], directions.spec["certified"]
        ([4.0, 1.0], True)
        >>> directions.vectors.abs().round(decimals=6)
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """
    if k not in (1, 2):
        raise DirectionError(f"surfaces have 1 or 2 directions, got k={k} eigenvectors")
    vectors, spec = _top_eigenvectors(objective, k, tol, seed, max_matvecs)
    return Directions(vectors, "eigenvector", spec)


def gradient_direction(
    objective: Objective, dim: int = 1, *, tol: float = 1e-3, seed: int = 0, max_matvecs: int | None = None
) -> Directions:
    """The normalized full-batch gradient ĝ = ∇L/‖∇L‖; with dim=2 also the top Hessian eigenvector made orthogonal to it.

    Along ĝ the loss falls (negative coordinates) or rises at the rate ‖∇L‖; the second axis of
    the plane is the sharpest direction (certified Lanczos) with its ĝ-component removed
    (Gram–Schmidt), so both axes are unit vectors and coordinates are distances in weight space.

    Args:
        objective: the checkpoint and measurement set.
        dim: 1 (the gradient alone) or 2 (gradient × top eigenvector).
        tol: Lanczos's relative tolerance for the eigenvector (dim=2).
        seed: Lanczos's seed (dim=2).
        max_matvecs: Lanczos's budget of Hessian-vector products (dim=2).

    Returns:
        Directions: kind "gradient"; `spec` holds ‖∇L‖, the curvature ĝᵀHĝ along the gradient and,
            with dim=2, the eigenvalue, its Lanczos record and the cosine between ĝ and the eigenvector.

    Raises:
        DirectionError: dim not 1 or 2, a zero or non-finite gradient, or an eigenvector parallel to it.

    Examples:
        L(w) = ((2w₀ − 2)² + (w₁ − 1)²)/2 at w = (2, 1): ∇L = (4, 0), curvature 4 along it.

        >>> import torch
        >>> from torch import nn
        >>> from landscape.engine.objective import Objective
        >>> from landscape.examples import quadratic
        >>> from landscape.inputs.batches import mean_squared_error
        >>> model = nn.Linear(2, 1, bias=False)
        >>> _ = model.weight.data.copy_(torch.tensor([[2.0, 1.0]]))
        >>> objective = Objective(model, quadratic().batches, loss=mean_squared_error, dtype=torch.float64)
        >>> directions = gradient_direction(objective)
        >>> directions.vectors, directions.spec["gradient_norm"], directions.spec["curvature"]
        (tensor([[1., 0.]], dtype=torch.float64), 4.0, 4.0)
    """
    if dim not in (1, 2):
        raise DirectionError(f"surfaces have 1 or 2 directions, got dim={dim}")
    g = objective.grad().detach()
    norm = float(g.norm())
    if not np.isfinite(norm) or norm == 0.0:
        raise DirectionError(
            f"the gradient at this checkpoint is {'zero' if norm == 0.0 else 'not finite'}: no gradient direction"
        )
    unit = g / norm
    spec: dict = {"gradient_norm": norm, "curvature": float(unit @ objective.hvp(unit)), "loss": objective.loss()}
    vectors = unit.unsqueeze(0)
    if dim == 2:
        top, eig = _top_eigenvectors(objective, 1, tol, seed, max_matvecs)
        cosine = float(top[0] @ unit)
        second = top[0] - cosine * unit
        if float(second.norm()) < 1e-6:
            raise DirectionError("the top Hessian eigenvector is parallel to the gradient: no plane; use dim=1")
        vectors = torch.stack([unit, second / second.norm()])
        spec.update({**eig, "cosine": cosine})
    return Directions(vectors, "gradient", spec)


def checkpoint_plane(objective: Objective, b: nn.Module, c: nn.Module, labels: Sequence[str] = ("A", "B", "C")) -> Directions:
    """The plane through three checkpoints A (the objective's), B and C (Garipov et al. 2018, "Loss Surfaces, Mode
    Connectivity, and Fast Ensembling of DNNs").

    Orthonormal axes by Gram–Schmidt: û = (θ_B − θ_A)/‖θ_B − θ_A‖, v̂ = the part of θ_C − θ_A
    orthogonal to û, normalized. A coordinate is a distance in weight space, so the plot keeps the
    triangle's true shape: A is at (0, 0), B at (‖θ_B − θ_A‖, 0), C at (⟨θ_C − θ_A, û⟩, ‖v‖);
    `trajectory` holds these three points and `labels` their names. Floating-point buffers (BN
    running statistics) move affinely with the point so that each checkpoint's own buffers are
    exact at its coordinates, as `between` interpolates them on a line.

    Args:
        objective: checkpoint A, the origin.
        b: model B, of the same architecture.
        c: model C, of the same architecture.
        labels: the names of A, B and C (plot markers, errors, the spec).

    Returns:
        Directions: kind "plane", vectors (û, v̂), the buffers' directions, the checkpoints' coordinates.

    Raises:
        DirectionError: another architecture, B equal to A, or C on the line through A and B.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from landscape.examples import quadratic
        >>> objective = quadratic()                  # A: w = (1, 1)
        >>> b, c = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
        >>> _ = b.weight.data.copy_(torch.tensor([[3.0, 1.0]])), c.weight.data.copy_(torch.tensor([[2.0, 4.0]]))
        >>> plane = checkpoint_plane(objective, b, c)
        >>> plane.trajectory
        array([[0., 0.],
               [2., 0.],
               [1., 3.]])
    """
    if len(labels) != 3:
        raise DirectionError(f"a three-checkpoint plane takes three labels (A, B, C), got {len(labels)}")
    (w_b, buffers_b), (w_c, buffers_c) = flat_state(objective, b, labels[1]), flat_state(objective, c, labels[2])
    u, offset_c = (w_b - objective.w).double(), (w_c - objective.w).double()
    length = float(u.norm())
    if length == 0.0:
        raise DirectionError(f"{labels[1]} has the same weights as {labels[0]}: no plane")
    u_hat = u / length
    along = float(offset_c @ u_hat)
    v = offset_c - along * u_hat
    height = float(v.norm())
    if height <= 1e-9 * max(length, float(offset_c.norm())):
        raise DirectionError(f"{labels[2]} lies on the line through {labels[0]} and {labels[1]}: no plane")
    vectors = torch.stack([u_hat, v / height]).to(objective.dtype)
    buffers = {}
    for name, a_value in _float_buffers(objective).items():
        d_u = (buffers_b[name] - a_value) / length
        d_v = (buffers_c[name] - a_value - along * d_u) / height
        buffers[name] = torch.stack([d_u, d_v])
    coords = np.array([[0.0, 0.0], [length, 0.0], [along, height]])
    spec = {"labels": list(labels), "distances": {"AB": length, "AC": float(offset_c.norm())}}
    return Directions(vectors, "plane", spec, buffers, trajectory=coords, labels=tuple(labels))


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


def _top_eigenvectors(objective: Objective, k: int, tol: float, seed: int, max_matvecs: int | None) -> tuple[torch.Tensor, dict]:
    """The top-k unit Hessian eigenvectors by certified Lanczos, signs fixed (largest entry positive), and their record."""
    result = lanczos(HessianOperator(objective), k, tol=tol, seed=seed, max_matvecs=max_matvecs, return_vectors=True)
    vectors = result.vectors.detach().to(device=objective.device, dtype=objective.dtype)
    largest = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    vectors = vectors * torch.where(largest < 0, -1.0, 1.0).to(vectors)
    spec = {
        "eigenvalues": [float(v) for v in result.values],
        "residuals": [float(r) for r in result.residuals],
        "certified": bool(result.certified),
        "converged": bool(result.converged),
        "n_matvecs": int(result.n_matvecs),
        "seed": int(seed),
        "tol": float(tol),
        "max_matvecs": max_matvecs,
    }
    return vectors, spec


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
