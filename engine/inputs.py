"""Example inputs: random batches shaped like real traffic, for checks, exports and benchmarks.

The families' ``example_inputs`` (:mod:`engine.family`) build on these; ``trifuse check``,
``export.verify`` and the benchmarks call them through the contract.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def token_batch(vocab_size: int, pad_token_id, batch: int, seq: int, device=None,
                seed: int = 0) -> Tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` ``[batch, seq]``: random tokens in ``[3, vocab_size)`` with
    mixed lengths (the first row full, then shorter down to ``seq // 4``), right-padded with
    ``pad_token_id`` (0 when ``None``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq), generator=g)
    lengths = torch.linspace(seq, max(1, seq // 4), batch).round().long()
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    pad = 0 if pad_token_id is None else pad_token_id
    return ids.masked_fill(mask == 0, pad).to(device), mask.to(device)


def check_length(seq: int, limit: int) -> None:
    if seq > limit:
        raise ValueError(f"seq={seq} exceeds the model's {limit} positions")


def images(batch: int, channels: int, height: int, width: int, device=None, seed: int = 0) -> Tensor:
    """``[batch, channels, height, width]`` standard-normal pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=g).to(device)
