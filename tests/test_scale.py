"""The 45M-parameter GPT-2 config of benchmarks/scale.py (6 layers, 512 wide, GPT-2's 50,257-token vocabulary) through
the Objective at its real size, against float64 ground truth.

Float32 is what users measure in. Here its Hessian-vector products (the `reuse` path `auto` takes, the graph kept)
are compared with double backward in float64 of the same model on the same tokens, on probes drawn as Lanczos and
Hutchinson draw them. A short corpus (4 sequences of 32 tokens) keeps the test to seconds; the parameter count,
vocabulary and depth are the config's own.
"""

import pytest
import torch

from landscape.engine.objective import Objective
from landscape.inputs.batches import token_cross_entropy
from tests.ground_truth import rel_err

transformers = pytest.importorskip("transformers")

VOCAB = 50257


def config_45m() -> tuple[torch.nn.Module, list[dict]]:
    config = transformers.GPT2Config(n_layer=6, n_embd=512, n_head=8, vocab_size=VOCAB, n_positions=1024)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)  # Zipf-like token frequencies
    ids = torch.multinomial(weights, 4 * 32, replacement=True, generator=g).reshape(4, 32)
    return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


@pytest.mark.slow
def test_float32_hvps_of_a_45m_gpt2_match_float64_ones():
    model, batches = config_45m()
    single = Objective(model, batches, loss=token_cross_entropy, device="cpu", hvp_check=False)
    assert single.n_params > 45_000_000 and single.hvp_method == "reuse"
    g = torch.Generator().manual_seed(1)
    V = torch.stack([torch.randn(single.n_params, generator=g), torch.randint(0, 2, (single.n_params,), generator=g) * 2.0 - 1])
    products = single.hvp_batched(V)
    del single
    double = Objective(model.double(), batches, loss=token_cross_entropy, device="cpu", dtype=torch.float64,
                       hvp_method="double-backward", hvp_check=False)  # fmt: skip
    expected = double.hvp_batched(V.double())
    for product, truth in zip(products, expected):
        assert rel_err(product.double(), truth) < 1e-4
        assert truth.norm() > 0
