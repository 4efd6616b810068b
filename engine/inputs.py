"""Example inputs: random batches shaped like real traffic, for checks, exports and benchmarks.

The families' ``example_inputs`` (:mod:`engine.family`) build on these; ``trifuse check``,
``export.verify`` and the benchmarks call them through the contract.
"""

from __future__ import annotations

from typing import Sequence, Tuple

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


# ----------------------------------------------------------------------------
# Input checks the families share (a ValueError naming the input, before any work).


def check_token_ids(name: str, ids, vocab_size: int) -> None:
    """``ids`` is a non-empty ``[batch, seq]`` integer tensor of ids in ``[0, vocab_size)``. The range is
    not read under ``torch.compile`` or CUDA-graph capture (it would synchronize or break the graph)."""
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape [batch, seq]")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)}): batch size and length must be >= 1")
    if torch.compiler.is_compiling() or (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = (int(t) for t in torch.aminmax(ids))  # one pass; Python ints compare without new tensors
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}); got [{lo}, {hi}]")


def check_mask(name: str, mask, shapes: Sequence[tuple]) -> None:
    """``mask`` is ``None`` or an integer/bool tensor of one of ``shapes``."""
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.is_floating_point():
        raise ValueError(f"{name} must be an integer or bool tensor (1 = attend)")
    if tuple(mask.shape) not in shapes:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {' or '.join(map(str, shapes))}")


def encoder_hidden_state(encoder_outputs) -> Tensor:
    """An encoder-decoder's ``encoder_outputs`` argument as the encoder's last hidden state: the tensor,
    an output's ``encoder_last_hidden_state`` or ``last_hidden_state`` (trifuse's or transformers'), or
    the first item of a tuple."""
    if isinstance(encoder_outputs, Tensor):
        return encoder_outputs
    if getattr(encoder_outputs, "encoder_last_hidden_state", None) is not None:
        return encoder_outputs.encoder_last_hidden_state
    if isinstance(encoder_outputs, (tuple, list)) and encoder_outputs:
        return encoder_outputs[0]
    if getattr(encoder_outputs, "last_hidden_state", None) is not None:
        return encoder_outputs.last_hidden_state
    raise ValueError("encoder_outputs must be the encoder's last hidden state, a tuple starting with it, "
                     "or an output with last_hidden_state")
