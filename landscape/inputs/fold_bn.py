"""BatchNorm folded into the weights: an equivalent eval-mode model whose parameters carry the BN statistics.

In eval mode BN is the per-channel affine map y = γ·(x − μ)/√(σ² + ε) + β with fixed running μ, σ². A
convolution or linear layer whose only use is to feed that BN is replaced by one fused layer with weight
W·γ/√(σ² + ε) and bias β + (b − μ)·γ/√(σ² + ε) (as Andriushchenko et al. (2023) suggest, so adaptive
sharpness scales the weights the network really applies). A BN with no such layer before it (pre-activation
blocks, BN on the input) becomes a ChannelAffine: the same map with scale γ/√(σ² + ε) and shift β − μ·scale
as its parameters. Either way the function in eval mode is unchanged and no running statistic remains.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

_FUSABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ChannelAffine(nn.Module):
    """y = scale·x + shift per channel (dimension 1), the eval-mode BN with its statistics merged in."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(scale.detach().clone())
        self.bias = nn.Parameter(shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


@dataclass(frozen=True)
class FoldedModel:
    """The folded model, and which BatchNorm layers went into a preceding layer (`fused`) or became a ChannelAffine (`merged`)."""

    model: nn.Module
    fused: tuple[str, ...]
    merged: tuple[str, ...]

    def describe(self) -> dict:
        return {"fused": len(self.fused), "merged": len(self.merged)}


def fold_batch_norm(model: nn.Module) -> FoldedModel:
    """An eval-mode copy of `model` with every BatchNorm folded into the layer before it, or into its own scale and shift.

    The BN → weights folding of Andriushchenko et al. (2023): the copy computes the same function as `model`
    in eval mode (to rounding), has no BN running statistics, and its parameters are the folded weights.
    Fusing needs the layer pairs, found by tracing the forward (torch.fx); a model that cannot be traced
    gets every BN merged into a ChannelAffine instead. `model` itself is not changed.

    Args:
        model: a network; its BatchNorm layers must keep running statistics.

    Returns:
        FoldedModel: the folded `model` (in eval mode) and the names of the fused and the merged BN layers.

    Raises:
        ValueError: a BatchNorm without running statistics (it normalizes with each batch's own, as in
            an Objective with mode="train"), which no fixed weights reproduce.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2))
        >>> for bn in (net[1], net[3]):
        ...     _ = bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        >>> folded = fold_batch_norm(net)
        >>> folded.fused, folded.merged
        (('1',), ('3',))
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(folded.model(x), net.eval()(x), atol=1e-6)
        True
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            raise ValueError(
                f"BatchNorm {name!r} has no running statistics (it normalizes with each batch's own, as mode='train' "
                "does): only eval-mode BN can be folded into fixed weights; measure in mode='eval'"
            )
    model = copy.deepcopy(model).eval()
    fused: list[str] = []
    try:
        model = fx.symbolic_trace(model, concrete_args=_defaults(model))
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to merging every BN in place
        pass
    else:
        fused = _fuse_pairs(model)
    merged = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            scale, shift = _affine(module)
            _set_module(model, name, ChannelAffine(scale, shift))
            merged.append(name)
    return FoldedModel(model.eval(), tuple(fused), tuple(merged))


def _defaults(model: nn.Module) -> dict:
    """forward's arguments with defaults (return_features=False, ...), traced at those values, not as tensors."""
    signature = inspect.signature(model.forward)
    return {n: p.default for n, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def _affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of the eval-mode BN y = scale·x + shift."""
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
    return scale, shift


def _fuse_pairs(graph_module: fx.GraphModule) -> list[str]:
    """Fuse each (conv or linear → BN) pair of the traced graph where both are called once and the layer feeds only the BN."""
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = []
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        before = node.args[0] if node.args else None
        if not isinstance(before, fx.Node) or before.op != "call_module" or len(before.users) != 1:
            continue
        layer, bn = modules[before.target], modules[node.target]
        if not isinstance(layer, _FUSABLE) or calls[before.target] != 1 or calls[node.target] != 1:
            continue
        if isinstance(layer, nn.Linear) and layer.out_features != bn.num_features:
            continue
        with torch.no_grad():
            fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
            _set_module(graph_module, before.target, fuse(layer, bn))
        node.replace_all_uses_with(before)
        graph_module.graph.erase_node(node)
        _set_module(graph_module, node.target, None)
        fused.append(node.target)
    graph_module.graph.lint()
    graph_module.recompile()
    return fused


def _set_module(root: nn.Module, name: str, module: nn.Module | None) -> None:
    """Put `module` at the dotted `name` of `root` (None removes it)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if module is None:
        delattr(parent, child)
    else:
        setattr(parent, child, module)
