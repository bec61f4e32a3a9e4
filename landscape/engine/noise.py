"""Weight-noise draws shared by training and measuring: the distributions, their unit-variance factors, and
SmoothOut's noise per tensor (Wen et al. 2018; AdaSmoothOut's filter-wise scale)."""

from __future__ import annotations

import math

import torch

from landscape.engine.params import rescale_filters

DISTRIBUTIONS = ("uniform", "gaussian", "laplace", "rademacher", "sphere")
# the factor that scales a draw of each `draw` distribution to standard deviation 1 (per coordinate)
TO_UNIT_STD = {"uniform": math.sqrt(3.0), "gaussian": 1.0, "laplace": math.sqrt(0.5), "rademacher": 1.0, "sphere": 1.0}
NOISE_SCALES = ("absolute", "weight", "filter")


def draw(distribution: str, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise shaped like `like`: uniform U(−1,1), gaussian N(0,1), laplace (scale 1), rademacher ±1,
    or sphere (a Gaussian direction with norm √numel, the norm of a Rademacher draw)."""
    kw = {"generator": generator, "device": like.device, "dtype": like.dtype}
    if distribution == "uniform":
        return torch.rand(like.shape, **kw).mul_(2).sub_(1)
    if distribution == "gaussian":
        return torch.randn(like.shape, **kw)
    if distribution == "laplace":  # difference of two Exp(1) draws: never log(0)
        e = torch.empty((2, *like.shape), device=like.device, dtype=like.dtype).exponential_(generator=generator)
        return e[0] - e[1]
    if distribution == "rademacher":
        return torch.randint(0, 2, like.shape, **kw).mul_(2).sub_(1)
    if distribution == "sphere":
        z = torch.randn(like.shape, **kw)
        return z.mul_(math.sqrt(z.numel()) / z.norm())
    raise ValueError(f"unknown noise distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}")


def smoothout_noise(
    weight: torch.Tensor, a: float, scale: str, generator: torch.Generator, distribution: str = "uniform"
) -> torch.Tensor:
    """SmoothOut noise (Wen et al. 2018) for one tensor: `absolute` a·u, `weight` a·|w|·u, or `filter`
    (AdaSmoothOut): rows of the (out_channels, −1) reshape rescaled to norm a·‖w_row‖, ±a|w_j| for 1-D."""
    u = draw(distribution, weight, generator)
    if scale == "absolute":
        return u.mul_(a)
    if scale == "weight":
        return u.mul_(a * weight.abs())
    if scale == "filter":
        return rescale_filters({"w": u}, {"w": weight}, factor=a)["w"]
    raise ValueError(f"unknown noise scale {scale!r}; use one of {', '.join(NOISE_SCALES)}")
