"""The native path: what trifuse's ops run on CPU tensors when Triton's interpreter is off.

Each function keeps its op's contract (the reference beside the Triton kernel is the
specification) and runs it on PyTorch's own fused CPU kernels, which are vectorized
(AVX2/AVX-512, AVX512_BF16 where the CPU has it) and use every intra-op thread:

* attention: :func:`torch.nn.functional.scaled_dot_product_attention`, whose CPU
  flash kernel streams key blocks through an online softmax in fp32 (bf16 and fp16
  inputs included) and returns zeros for a row that sees no key, as the reference
  does. Masks and biases become one SDPA ``attn_mask``; T5's relative bias is
  materialized ``[1, H, Lq, Lk]`` (the attention wrapper builds it once per
  :class:`~kernels.attention.RelativeBias`, so a model's layers share it, as
  Hugging Face shares ``position_bias``);
* norms: ``x + residual`` then ``F.layer_norm`` / ``F.rms_norm``, which accumulate
  in fp32 for bf16 and fp16 inputs; the sum is kept in the input dtype (the
  reference rounds it there too before returning it);
* GELU: ``x + bias`` then an in-place ``gelu_``, two passes over memory, no fp32 copy.

fp64 runs the reference (the specification's own precision).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._buckets import relative_position_bucket


def relative_bias_dense(table: Tensor, bidirectional: bool, num_buckets: int, max_distance: int,
                        query_offset: int, lq: int, lk: int, dtype: torch.dtype) -> Tensor:
    """T5's bias ``[1, H, Lq, Lk]`` in ``dtype``: ``table[bucket(j - (i + query_offset)), h]``."""
    rp = torch.arange(lk, device=table.device)[None, :] - (torch.arange(lq, device=table.device)[:, None]
                                                             + query_offset)
    buckets = relative_position_bucket(rp, bidirectional, num_buckets, max_distance)  # [Lq, Lk]
    return table.to(dtype)[buckets].permute(2, 0, 1).unsqueeze(0)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], bias: Optional[Tensor],
              rel_table: Optional[Tensor], rel_bidirectional: bool, rel_num_buckets: int,
              rel_max_distance: int, rel_query_offset: int, causal: bool, scale: float) -> Tensor:
    """The attention op's contract on SDPA; ``q`` ``[B, H, Lq, D]``, ``k``/``v`` ``[B, H, Lk, D]``, any strides."""
    lq, lk = q.shape[2], k.shape[2]
    if rel_table is not None:
        rel = relative_bias_dense(rel_table, rel_bidirectional, rel_num_buckets, rel_max_distance,
                                  rel_query_offset, lq, lk, q.dtype)
        bias = rel if bias is None else bias.to(q.dtype) + rel
    # SDPA's is_causal is top-left aligned: the same as ours (bottom-right) only when Lq == Lk.
    is_causal = causal and lq == lk and mask is None and bias is None
    attn_mask = None
    if causal and not is_causal:
        qpos = torch.arange(lq, device=q.device)[:, None]
        attn_mask = torch.arange(lk, device=q.device)[None, :] <= qpos + (lk - lq)  # [Lq, Lk], True = attend
    if mask is not None:
        keys = (mask if mask.dtype == torch.bool else mask.ne(0))[:, None, None, :]  # [B, 1, 1, Lk]
        attn_mask = keys if attn_mask is None else attn_mask & keys
    if bias is not None:
        bias = bias.to(q.dtype)
        if attn_mask is not None:
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        attn_mask = bias
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return out.contiguous()


def norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
         rms: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``(norm(x + residual), x + residual)`` (or ``(norm(x), None)``) on PyTorch's native norms."""
    h = x if residual is None else x + residual
    w = None if weight is None else weight.to(x.dtype)
    n = (x.shape[-1],)
    if rms:
        y = F.rms_norm(h, n, w, eps)
    else:
        y = F.layer_norm(h, n, w, None if bias is None else bias.to(x.dtype), eps)
    return y, None if residual is None else h.contiguous()


def gelu(x: Tensor, bias: Optional[Tensor], gate: Optional[Tensor], approximate: str) -> Tensor:
    """``gelu(x + bias) * gate`` in ``x``'s dtype (PyTorch's GELU computes in fp32 inside)."""
    if bias is None:
        h = F.gelu(x, approximate=approximate).contiguous()
    else:
        h = torch.ops.aten.gelu_(x + bias.to(x.dtype), approximate=approximate)
    if gate is not None:
        h.mul_(gate)
    return h
