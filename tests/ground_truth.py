"""Dense ground truth for the Objective: its loss as a plain function of flat weights, and its Hessian.

Independent of the Objective's own machinery: a deep copy of the module, evaluated with
torch.func.functional_call, BatchNorm put in train mode by hand (no module replacement),
buffers cloned for every call, dropout always off (the Objective's declared modes).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from landscape.engine.params import FlatLayout, select_parameters


def dense_reference(model: nn.Module, batches, mode: str, selection: str = "all"):
    """(loss of flat float64 weights, the checkpoint's flat weights) over `batches`, sample-weighted."""
    net = copy.deepcopy(model).double().eval()
    if mode == "train":  # batch statistics in BatchNorm only; dropout stays off
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    names = select_parameters(net, selection)
    params = dict(net.named_parameters())
    layout = FlatLayout.of({n: params[n] for n in names})
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    buffers = {n: b.detach().clone() for n, b in net.named_buffers()}
    total = sum(len(y) for _, y in batches)

    def loss(w: torch.Tensor) -> torch.Tensor:
        state = {**fixed, **layout.unflatten(w)}
        out = 0
        for x, y in batches:  # fresh buffers per call: train-mode BN and counters mutate them
            current = {n: b.clone() for n, b in buffers.items()}
            logits = functional_call(net, {**state, **current}, (x.double(),))
            out = out + len(y) / total * F.cross_entropy(logits, y)
        return out

    w0 = layout.flatten({n: params[n].detach() for n in names})
    return loss, w0


def dense_hessian(model: nn.Module, batches, mode: str, selection: str = "all") -> torch.Tensor:
    loss, w0 = dense_reference(model, batches, mode, selection)
    return torch.autograd.functional.hessian(loss, w0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
