"""Whether the model an Objective copied has changed in place since: the trap of measuring inside a training loop.

An Objective measures a private copy of the model taken when it was built (its point w is fixed), so after more
training it would still answer for the old weights. PyTorch counts every in-place write to a tensor (`_version`):
an optimizer step, a `with torch.no_grad(): p -= ...` update, `load_state_dict`, a train-mode forward that moves
BatchNorm statistics. Comparing those counters costs nothing next to a loss or an HVP. Writes through `.data`
bypass the counter and are not seen.
"""

from __future__ import annotations

import weakref
from itertools import chain

from torch import nn


class SourceWatch:
    """The version counters of a model's parameters and buffers when it was copied; weak references only."""

    def __init__(self, model: nn.Module) -> None:
        tensors = chain(model.parameters(), model.buffers())
        self._seen = [(weakref.ref(t), t._version) for t in tensors]

    def changed(self) -> bool:
        """True once a parameter or buffer of the model (still alive) was written in place since the copy."""
        for ref, version in self._seen:
            tensor = ref()
            if tensor is not None and tensor._version != version:
                return True
        return False
