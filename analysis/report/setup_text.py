"""The words every setup line uses for a measurement set: its batches, its BatchNorm mode, where its samples came from.

One home for them, so `measure`'s table, `compare`'s report and the surface captions say the same thing.
"""

from __future__ import annotations


def batching(setup: dict) -> str:
    """ "3 batches of ≤256 (seed 0)"; a user's own batches: "2 batches of 8–16 samples, as the data gives them"."""
    m = setup["measurement"]
    if m.get("batch_size") is None:
        sizes = setup.get("batch_sizes") or []
        size = "" if not sizes else f" of {sizes[0]}" if len(sizes) == 1 else f" of {min(sizes)}–{max(sizes)}"
        return f"{setup['n_batches']} batches{size}, as the data gives them"
    return f"{setup['n_batches']} batches of ≤{m['batch_size']} (seed {m['seed']})"


def norm_mode(setup: dict) -> str:
    """ "BN eval mode" (running statistics) or "BN train mode"; "no BatchNorm" where the model has none."""
    if setup.get("batchnorm") is False:  # results written before the key was recorded keep the mode
        return "no BatchNorm"
    return f"BN {setup['mode']} mode"


def precision(setup: dict) -> str:
    """ "float32"; a model run in low precision: "bfloat16 model, float32 solvers" (and float16's loss scale)."""
    solver = setup.get("solver_dtype")
    if not solver:
        return setup["dtype"]
    scale = f", loss scale {setup['loss_scale']:g}" if setup.get("loss_scale") else ""
    return f"{setup['dtype']} model, {solver} solvers{scale}"


def sample_origin(setup: dict) -> str | None:
    """Where the samples came from when the toolkit chose them (npz x/y without a test split: a seeded hold-out)."""
    return setup["measurement"].get("origin")
