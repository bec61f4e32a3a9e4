"""A GPT-2-shaped causal language model in plain PyTorch, for benchmarks on machines without `transformers`.

Pre-norm blocks (nn.TransformerEncoderLayer with norm_first, GELU, 4x MLP) under a causal mask, learned positions,
a final LayerNorm and a head tied to the token embedding, as in GPT-2 (Radford et al. 2019). It takes the dict
batches `token_cross_entropy` reads ({"input_ids", "labels"}) and returns the logits. Parameter counts match GPT-2's
configs to within the biases nn.MultiheadAttention adds: 24 x 1024 (GPT-2 medium) has 355M.
"""

from __future__ import annotations

import torch
from torch import nn

CONFIGS = {  # name: (layers, width, heads)
    "gpt2-medium": (24, 1024, 16),  # 355M
    "1.3b": (24, 2048, 16),  # 1.31B
    "smoke": (2, 32, 2),
}


class CausalLM(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, vocab: int = 50257, positions: int = 1024) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(positions, width)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied, as in GPT-2
        nn.init.normal_(self.tokens.weight, std=0.02)  # GPT-2's initialization of the embeddings
        nn.init.normal_(self.positions.weight, std=0.01)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        h = self.tokens(input_ids) + self.positions(torch.arange(length, device=input_ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device, dtype=h.dtype)
        return self.head(self.norm(self.blocks(h, mask=causal, is_causal=True)))


def token_batch(sequences: int, length: int, vocab: int = 50257, seed: int = 0, device: str = "cpu") -> dict:
    """One batch of Zipf-distributed token ids (as word frequencies are), labels the inputs themselves."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, sequences * length, replacement=True, generator=g).reshape(sequences, length)
    return {"input_ids": ids.to(device), "labels": ids.to(device)}
