"""The floating-point precisions a model is measured in, by the names the command line and results files use.

bfloat16 and float16 run the model only; the solvers (Lanczos, the trace estimators) stay in float32.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)  # the model runs in these; the solvers' vectors stay float32
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """A dtype's name to the torch dtype; bfloat16 and float16 run the model only (the solvers stay float32)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}")
    return DTYPES[name]
