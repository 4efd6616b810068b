"""Pooling token states into one vector per sequence."""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def mean_pool(last_hidden_state: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Mean over the unmasked tokens: sentence-transformers' sentence embedding."""
    if attention_mask is None:
        return last_hidden_state.mean(1)
    m = attention_mask.to(last_hidden_state.dtype).unsqueeze(-1)  # [B, L, 1]
    return (last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
