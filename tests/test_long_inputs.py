"""Sequences too long to differentiate: the memory plan counts attention's O(L²) memory (it measures the bytes autograd
saves on the real length), and its one-line refusal names a max_length that fits; MeasurementSet cuts sequences."""

import re

import pytest
import torch

from landscape.engine import memory
from landscape.engine.memory import InsufficientMemory
from landscape.engine.objective import Objective
from landscape.inputs.batches import sequence_length, token_cross_entropy, truncated
from landscape.inputs.data import DataError, MeasurementSet

transformers = pytest.importorskip("transformers")


def long_gpt2(length: int) -> tuple[torch.nn.Module, list[dict]]:
    config = transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=length, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (16, length), generator=torch.Generator().manual_seed(1))
    return model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]


def graph_bytes_per_item(length: int) -> float:
    model, batches = long_gpt2(length)
    return Objective(model, batches, loss=token_cross_entropy, hvp_check=False)._graph_bytes_per_sample()


def test_the_plan_counts_attention_memory_growing_with_the_square_of_the_length():
    short, long = graph_bytes_per_item(128), graph_bytes_per_item(512)
    assert long / short > 4.5  # linear terms alone would give 4; the 2 heads' L×L attention weights make it more


def test_a_sequence_too_long_is_refused_in_one_line_naming_a_length_that_fits(monkeypatch):
    model, batches = long_gpt2(512)
    needed = Objective(model, batches, loss=token_cross_entropy, hvp_method="double-backward").memory_plan.predicted_peak_bytes
    monkeypatch.setattr(memory, "available_bytes", lambda device: needed // 3)
    with pytest.raises(InsufficientMemory) as refusal:
        Objective(model, batches, loss=token_cross_entropy, hvp_method="double-backward")
    message = str(refusal.value)
    assert "\n" not in message and "batch_size=" in message and "--" not in message
    length = int(re.search(r"max_length=(\d+)", message).group(1))
    assert 2 <= length < 512
    shorter = [truncated(b, length) for b in batches]
    assert sequence_length(shorter[0]) == length and shorter[0]["labels"].shape == (16, length)
    Objective(model, shorter, loss=token_cross_entropy, hvp_method="double-backward")  # fits now


def test_measurement_sets_cut_token_sequences_and_leave_other_batches_alone():
    _, batches = long_gpt2(64)
    cut = truncated(batches[0], 10)
    assert {k: tuple(v.shape) for k, v in cut.items()} == {k: (16, 10) for k in batches[0]}
    assert torch.equal(cut["input_ids"], batches[0]["input_ids"][:, :10])
    pair = (torch.randn(4, 64), torch.zeros(4))
    assert truncated(pair, 10) is pair and truncated(batches[0], 64) is batches[0]
    with pytest.raises(DataError, match="max_length must be at least 2"):
        MeasurementSet(max_length=1)
