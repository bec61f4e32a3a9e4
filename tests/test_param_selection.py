"""Parameter selections (landscape.engine.params.select_parameters) against known name lists, their errors, and LoRA adapters
(requires_grad) on a tiny GPT-2: the Objective differentiates the adapters alone, exactly."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator
from landscape.engine.params import select_parameters


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv1d(1, 1, 3)


class Net(nn.Module):
    """Two blocks, a tied head (head.weight is embed.weight) and a parameter owned by the top-level module."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight
        self.scale = nn.Parameter(torch.ones(1))


def block_names(i: int) -> list[str]:
    return [f"blocks.{i}.{n}" for n in ("attn.weight", "attn.bias", "norm.weight", "norm.bias", "conv.weight", "conv.bias")]


ALL = ["scale", "embed.weight", *block_names(0), *block_names(1)]


@pytest.mark.parametrize(
    "selection, expected",
    [
        ("all", ALL),
        (
            "weights",
            ["embed.weight", "blocks.0.attn.weight", "blocks.0.conv.weight", "blocks.1.attn.weight", "blocks.1.conv.weight"],
        ),
        ("no-bn", [n for n in ALL if ".norm." not in n]),
        ("no-bn-bias", [n for n in ALL if ".norm." not in n and not n.endswith("bias")]),
        ("re:^blocks\\.1\\.", block_names(1)),
        ("glob:*.attn.*", ["blocks.0.attn.weight", "blocks.0.attn.bias", "blocks.1.attn.weight", "blocks.1.attn.bias"]),
        (
            "glob:blocks.0.*, *.weight",
            ["embed.weight", *block_names(0), "blocks.1.attn.weight", "blocks.1.norm.weight", "blocks.1.conv.weight"],
        ),
        ("glob:scale", ["scale"]),
        (
            "module:Linear",
            ["embed.weight", "blocks.0.attn.weight", "blocks.0.attn.bias", "blocks.1.attn.weight", "blocks.1.attn.bias"],
        ),  # the tied head's weight counts once, under its first name
        ("module:LayerNorm,Conv1d", [n for n in ALL if ".norm." in n or ".conv." in n]),
        ("module:torch.nn.Conv1d", [n for n in ALL if ".conv." in n]),
        ("module:_ConvNd", [n for n in ALL if ".conv." in n]),  # a base class name matches its subclasses
        ("module:Net", ["scale"]),  # only the parameters a module owns directly
    ],
)
def test_each_selection_gives_the_known_names(selection, expected):
    assert select_parameters(Net(), selection) == expected


def test_frozen_parameters_are_never_selected():
    net = Net()
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith("blocks.1.attn"))
    assert select_parameters(net, "all") == ["blocks.1.attn.weight", "blocks.1.attn.bias"]
    assert select_parameters(net, "module:Linear") == ["blocks.1.attn.weight", "blocks.1.attn.bias"]
    with pytest.raises(ValueError, match=r"matches no trainable parameter \(it matches 4 with requires_grad=False"):
        select_parameters(net, "glob:*.conv.*")


@pytest.mark.parametrize(
    "selection, message",
    [
        (
            "bias",
            "unknown parameter selection 'bias'; choose from all, weights, no-bn, no-bn-bias, re:PATTERN, "
            "glob:PATTERN[,PATTERN], module:TYPE[,TYPE]",
        ),
        ("glob:*.mlp.*", "'glob:*.mlp.*' matches no trainable parameter; choose from all, weights"),
        ("re:mlp", "'re:mlp' matches no trainable parameter; choose from"),
        ("re:(", "'re:(': not a regular expression"),
        ("glob: ,", "names nothing after the colon; choose from"),
        (
            "module:Tanh",
            "no module of type Tanh; the model's modules with parameters are Conv1d, Embedding, LayerNorm, Linear, Net",
        ),
        ("module:ReLU", "'module:ReLU' matches no trainable parameter"),  # present, but owns no parameters
        ("module:torch.nn.Nope", "cannot import torch.nn.Nope"),
        ("module:torch.zeros", "torch.zeros is not a torch.nn.Module class"),
    ],
)
def test_a_bad_selection_is_a_one_line_error(selection, message):
    net = Net()
    net.act = nn.ReLU()
    with pytest.raises(ValueError) as error:
        select_parameters(net, selection)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_adapters_are_the_measured_parameters_and_their_hvp_is_exact():
    """peft's LoRA on GPT-2's c_attn: the frozen base stays fixed and the Objective's Hessian equals the dense Hessian
    of the token-by-token reference loss over the adapter vector alone."""
    peft = pytest.importorskip("peft")
    from landscape.inputs.batches import token_cross_entropy
    from tests.helpers import gpt2, reference_lm_loss, token_batches

    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )  # random A and B: a point where both adapters matter
    model, batches = peft.get_peft_model(gpt2(), config).eval(), token_batches()
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n.split(".")[-3] for n in adapters] == ["lora_A", "lora_B"]
    objective = Objective(model, batches, loss=token_cross_entropy, dtype=torch.float64, device="cpu")
    assert list(objective.layout.names) == adapters and objective.describe()["params"] == "all"
    assert objective.n_params == sum(sizes[n] for n in adapters) == 2 * 8 + 24 * 2

    loss, w_all, _ = reference_lm_loss(model, batches)  # over every parameter, frozen or not
    starts = dict(zip(sizes, np.cumsum([0, *sizes.values()])))
    where = torch.cat([torch.arange(starts[n], starts[n] + sizes[n]) for n in adapters])
    with sdpa_kernel(SDPBackend.MATH):
        dense = torch.autograd.functional.hessian(lambda a: loss(w_all.scatter(0, where, a)), w_all[where])
    assert objective.loss() == pytest.approx(float(loss(w_all)), rel=1e-12)
    product = HessianOperator(objective).products(torch.eye(objective.n_params, dtype=torch.float64))
    assert float((product - dense).norm() / dense.norm()) <= 1e-10
