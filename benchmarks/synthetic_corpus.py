"""The synthetic corpus of benchmarks/scale.py: token ids with Zipf-like frequencies (as word frequencies are).

Its own module, free of benchmarks/common.py (which pins one thread), so a `landscape measure` subprocess can
take it as `--data synthetic_corpus:...` without changing its threads.
"""

from __future__ import annotations

import torch

VOCAB, SEQUENCES, LENGTH = 50257, 16, 64


def corpus(seed: int = 0, sequences: int = SEQUENCES, length: int = LENGTH) -> list[dict]:
    """`sequences` sequences of `length` tokens, Zipf-distributed ids (as word frequencies are), one batch."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, sequences * length, replacement=True, generator=g).reshape(sequences, length)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
