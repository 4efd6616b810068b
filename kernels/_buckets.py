"""T5's relative-position buckets, shared by the Triton launcher and the CPU path."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def relative_position_bucket(relative_position: Tensor, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """T5's bucket of ``relative_position`` (key - query), as Hugging Face computes it.

    Same arithmetic as ``T5Attention._relative_position_bucket`` step for step
    (float32 log, truncation towards zero), so the buckets agree exactly.
    Returns int64. Beyond ``+-max_distance`` the bucket no longer changes.
    """
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        distance = torch.abs(relative_position)
    else:
        distance = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Must stay the exact float32 expression HF evaluates, or boundary buckets move.
    if_large = max_exact + (
        torch.log(distance.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return buckets + torch.where(is_small, distance, if_large)
