"""The run-time self-check of an Objective's HVP path: its first product against double backward and a repeat.

A fast path can be wrong on a model it traces badly (linearizing an in-place `out += h` without functionalization
gave wrong products after the first), so the first product of every path is checked once, on the caller's first
probe, against double backward (reverse over reverse, Pearlmutter 1994) and against the same product taken again.
A path that differs by more than the dtype's tolerance (`hvp_check_tolerance`), or for finite differences by more
than its own error estimate allows, is replaced by double backward, with one warning line.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from landscape.engine import finite_difference as fd
from landscape.engine.hvp_paths import FINITE_DIFFERENCE_HVP, HVP_PATHS, double_backward
from landscape.inputs.precision import LOW_PRECISION
from landscape.results import Result

if TYPE_CHECKING:
    from landscape.engine.objective import Objective

LOW_PRECISION_CHECK_EPS = 32  # self-check tolerance in the model's ε: 5.8 ε (4.5e-2) was the largest difference measured


class HVPCheckWarning(UserWarning):
    """The chosen HVP path failed its run-time self-check and was replaced by double backward."""


@dataclass(frozen=True)
class HVPCheck(Result):
    """The run-time self-check of the chosen HVP path on the first probe.

    `difference`: ‖Hv − H_ref v‖/‖H_ref v‖ against double backward; `repeat_difference`: the same
    product taken twice. Both must stay under `tolerance`; otherwise `replaced_by` names the path used.
    The finite-difference path's `tolerance` follows its `estimated_error` (relative, on the same probe:
    landscape.engine.finite_difference.check_tolerance); `skipped` says why no exact reference could be taken.
    """

    path: str
    difference: float
    repeat_difference: float
    tolerance: float
    seconds: float
    replaced_by: str | None = None
    n_extra_hvps: int = 2
    estimated_error: float | None = None
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return self.skipped is None and self.difference <= self.tolerance and self.repeat_difference <= self.tolerance

    def to_dict(self) -> dict:
        return {**super().to_dict(), "passed": self.passed}


def hvp_check_tolerance(dtype: torch.dtype) -> float:
    """Relative difference allowed between two exact HVP paths run with the model in `dtype`.

    10·√(machine ε) for float32 (3.5e-3) and float64 (1.5e-7). In bfloat16 and float16 two exact paths round
    differently at every layer: 32 ε (0.25 bfloat16, 0.031 float16), over five times the largest difference
    measured between them (5.8 ε, GPT-2 4×256 in bfloat16, benchmarks/precision.py); a wrong product differs by O(1).
    """
    if dtype in LOW_PRECISION:
        return LOW_PRECISION_CHECK_EPS * torch.finfo(dtype).eps
    return 10 * math.sqrt(torch.finfo(dtype).eps)


def self_checked(objective: Objective, V: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
    """The first products, checked against double backward and against a repeat; replaced if either differs.

    Costs two extra products on the first call only: one by the chosen path (the repeat) and
    one by double backward (the reference), both on the caller's first probe. A fast path that
    disagrees is dropped for double backward, with one warning line, and the block is recomputed.
    """
    objective._check_pending = False
    if objective.hvp_method == FINITE_DIFFERENCE_HVP:
        return finite_difference_checked(objective, V, products)
    if objective.hvp_method == "double-backward" or not objective.batches:
        return products
    if objective.model_dtype == torch.float16 and not bool(torch.isfinite(products).all()):
        objective._check_pending = True  # float16 overflowed: checked once the loss scale is backed off (_backed_off)
        return products
    start = time.perf_counter()
    if bool(V[0].any()):
        probe, first = V[:1], products[:1]
    else:  # a zero first probe checks nothing: take a seeded random one (one more product)
        probe = random_probe(objective)
        first = objective._local_hvp(probe)
    repeat = objective._local_hvp(probe)
    reference = double_backward(objective, probe)
    if objective.model_dtype == torch.float16 and not bool(torch.isfinite(torch.cat([repeat, reference])).all()):
        objective._check_pending = True  # an overflow in the check: backed off as one in the product is
        return torch.full_like(products, math.inf)
    check = HVPCheck(
        path=objective.hvp_method,
        difference=relative_difference(first, reference),
        repeat_difference=relative_difference(repeat, first),
        tolerance=hvp_check_tolerance(objective.model_dtype),
        seconds=time.perf_counter() - start,
    )
    objective.hvp_check_result = check
    if check.passed:
        return products
    replace_path(objective, check, f"(a repeated product by {check.repeat_difference:.2g}; tolerance {check.tolerance:.1g})")
    return objective._local_hvp(V)


def finite_difference_checked(objective: Objective, V: torch.Tensor, products: torch.Tensor) -> torch.Tensor:
    """`self_checked` for the finite-difference path: its first product against double backward, within a
    tolerance from its own error estimate; skipped, and said so, where the model has no double backward.

    Runs on every rank (its products are collective); a failed check moves to double backward, as an exact
    path's does. Costs one more finite-difference product (the repeat) and one exact one, on the first call.
    """
    objective._check_pending = False
    differences = HVP_PATHS[FINITE_DIFFERENCE_HVP]
    start, errors = time.perf_counter(), objective.last_hvp_errors
    if bool(V[0].any()):
        probe, first, error = V[:1], products[:1], float(errors[0])
    else:  # a zero first probe checks nothing: take a seeded random one (one more product)
        probe = random_probe(objective)
        first = differences(objective, probe, record=False)
        error = float(objective.last_hvp_errors[0])
    repeat = differences(objective, probe, record=False)
    objective.last_hvp_errors = errors
    check = HVPCheck(objective.hvp_method, math.nan, relative_difference(repeat, first), math.nan, 0.0, n_extra_hvps=2)
    try:
        reference = objective._reduced(double_backward(objective, probe))
    except (RuntimeError, NotImplementedError) as failure:  # no second derivative through this model
        reason = (str(failure).splitlines() or [type(failure).__name__])[0]
        skipped = f"no double backward through this model ({reason})"
        objective.hvp_check_result = dataclasses.replace(check, seconds=time.perf_counter() - start, skipped=skipped)
        return products
    estimated = error / max(float(reference.norm()), torch.finfo(objective.dtype).tiny)
    check = dataclasses.replace(
        check,
        difference=relative_difference(first, reference),
        tolerance=fd.check_tolerance(estimated, objective.model_dtype),
        seconds=time.perf_counter() - start,
        estimated_error=estimated,
    )
    objective.hvp_check_result = check
    if check.passed:
        return products
    replace_path(objective, check, f"(more than its error estimate allows: {check.tolerance:.1g})")
    return objective._reduced(objective._local_hvp(V))


def replace_path(objective: Objective, check: HVPCheck, detail: str) -> None:
    """After a failed self-check: one warning line, and double backward from now on."""
    warnings.warn(
        f"HVP self-check: the {check.path} path differs from double backward by {check.difference:.2g} {detail} "
        f"on this model; using double-backward",
        HVPCheckWarning,
        stacklevel=4,
    )
    objective.hvp_method, objective._cache = "double-backward", None
    objective.hvp_check_result = dataclasses.replace(check, replaced_by="double-backward")


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖/‖b‖ (absolute when b is zero); NaN anywhere counts as infinitely different."""
    scale = float(b.norm())
    difference = float((a - b).norm())
    if not math.isfinite(difference):
        return math.inf
    return difference / scale if scale > 0 else difference


def random_probe(objective: Objective) -> torch.Tensor:
    """A seeded Gaussian probe (1, n), for a first probe block that is all zeros."""
    g = torch.Generator(device=objective.device).manual_seed(0)
    return torch.randn(1, objective.n_params, generator=g, device=objective.device, dtype=objective.dtype)
