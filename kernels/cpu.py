"""The native path: what trifuse's ops run on CPU tensors when Triton's interpreter is off.

Each function keeps its op's contract (the reference beside the Triton kernel is the
specification) and runs it on PyTorch's own fused CPU kernels, which are vectorized
(AVX2/AVX-512, AVX512_BF16 where the CPU has it) and use every intra-op thread:

* attention (:func:`sdpa`, :func:`plan` picks the kernel): PyTorch's SDPA, whose CPU
  flash kernel streams key blocks through an online softmax in fp32 (bf16 and fp16
  inputs included) and returns zeros for a row that sees no key, as the reference
  does; for bf16 with at least :data:`MATMUL_MIN` queries and keys, two batched GEMMs
  around an fp32 softmax (:func:`_sdpa_matmul`, fp32 scores, chunked to
  :data:`SCORES_MAX`); for bf16 decoding steps over at most :data:`UPCAST_MAX_KEYS` keys'
  elements, SDPA's fp32 kernel on fp32 copies.
  Masks and biases become one mask; T5's relative bias is
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

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._buckets import relative_position_bucket
from ._dispatch import plain_eager


def _buckets(bidirectional: bool, num_buckets: int, max_distance: int, query_offset: int, lq: int, lk: int,
             device: torch.device) -> Tensor:
    """``[Lq, Lk]`` int64: the bucket of key ``j`` for query ``i``, ``bucket(j - (i + query_offset))``."""
    rp = torch.arange(lk, device=device)[None, :] - (torch.arange(lq, device=device)[:, None] + query_offset)
    return relative_position_bucket(rp, bidirectional, num_buckets, max_distance)


#: :func:`_buckets_cached` keeps indices of at most this many elements (1 MiB of int64 each, 32 MiB for the
#: whole cache): long sequences rebuild theirs, so the cache's memory is bounded whatever the lengths seen.
BUCKETS_CACHE_MAX = 1 << 17


@functools.lru_cache(maxsize=32)
def _buckets_cached(bidirectional: bool, num_buckets: int, max_distance: int, query_offset: int, lq: int, lk: int,
                    device: torch.device) -> Tensor:
    """:func:`_buckets`, kept per setting and size: the index depends on no weight, and building it costs
    a dozen small ops (T5's models ask once per forward, for the same few sizes)."""
    with torch.inference_mode(False):  # a plain tensor, usable in and out of inference mode
        return _buckets(bidirectional, num_buckets, max_distance, query_offset, lq, lk, device)


def relative_bias_dense(table: Tensor, bidirectional: bool, num_buckets: int, max_distance: int,
                        query_offset: int, lq: int, lk: int, dtype: torch.dtype) -> Tensor:
    """T5's bias ``[1, H, Lq, Lk]`` in ``dtype``: ``table[bucket(j - (i + query_offset)), h]``; gathered from
    ``table`` as it is now (only the bucket index is cached, up to :data:`BUCKETS_CACHE_MAX` elements, and
    only in plain eager mode: never a traced, fake or symbolic tensor)."""
    args = (bidirectional, num_buckets, max_distance, query_offset, lq, lk, table.device)
    small = lq * lk <= BUCKETS_CACHE_MAX
    buckets = _buckets_cached(*args) if small and plain_eager() else _buckets(*args)  # [Lq, Lk]
    return table.to(dtype)[buckets].permute(2, 0, 1).unsqueeze(0)


#: bf16 attention with at least this many queries and keys runs :func:`_sdpa_matmul`.
MATMUL_MIN = 96
#: bf16 attention with at most this many queries (decoding) runs SDPA's fp32 kernel on fp32 copies ...
UPCAST_MAX_Q = 8
#: ... when its keys hold at most this many elements (fp32 copies of k and v: 8 MiB); past it the copies'
#: memory traffic costs more than SDPA's bf16 kernel loses (measured: 8 x 12 heads x 512 keys x 64 lost).
UPCAST_MAX_KEYS = 1 << 20
#: :func:`_sdpa_matmul`'s scores: one chunk holds at most this many fp32 scores (1 MiB, about one
#: core's L2), chunked over batch items, then heads, then query rows, so memory follows the chunk.
SCORES_MAX = 1 << 18


def plan(q: Tensor, k: Tensor) -> str:
    """Which kernel :func:`sdpa` runs: ``"matmul"`` (:func:`_sdpa_matmul`), ``"fp32"`` (SDPA on fp32
    copies) or ``"sdpa"``. fp32 and fp16 always take SDPA's kernel (for fp32 it is as fast as the
    matmuls or faster). SDPA's bf16 kernel runs two small oneDNN GEMM calls per block of 32 query rows,
    which two batched GEMMs over whole heads beat from about 96 x 96 up, and its bf16 decoding step is
    slower than its fp32 one while the fp32 copies stay small; docs/cpu.md has the measurements."""
    if q.dtype != torch.bfloat16 or q.device.type != "cpu":
        return "sdpa"
    lq, lk = q.shape[-2], k.shape[-2]
    if lq >= MATMUL_MIN and lk >= MATMUL_MIN:
        return "matmul"
    return "fp32" if lq <= UPCAST_MAX_Q and k.numel() <= UPCAST_MAX_KEYS else "sdpa"


def sdpa(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], bias: Optional[Tensor], scale: float,
         causal: bool = False) -> Tensor:
    """``softmax(q @ k^T * scale + bias)`` over the keys ``keep`` allows, ``@ v``; ``[B, H, Lq, D]``, contiguous.

    ``keep``: bool broadcastable to ``[B, H, Lq, Lk]`` (True = attend) or None; ``bias``: additive,
    broadcastable, or None; ``causal``: query ``i`` sees keys ``j <= i`` (top-left; callers pass it
    with ``Lq == Lk`` only). A row that sees no key returns zeros. The kernel is :func:`plan`'s."""
    lq, lk = q.shape[2], k.shape[2]
    how = plan(q, k)
    if causal and (how == "matmul" or keep is not None or bias is not None):
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril_()
        keep, causal = (tri if keep is None else keep & tri), False
    if how == "matmul":
        return _sdpa_matmul(q, k, v, keep, bias, scale)
    dtype = q.dtype
    if how == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    mask = keep
    if bias is not None:
        mask = bias.to(q.dtype)
        if keep is not None:
            mask = mask.masked_fill(~keep, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return out.to(dtype, memory_format=torch.contiguous_format)


def _chunks(B: int, H: int, lq: int, lk: int) -> Tuple[int, int, int]:
    """Batch items, heads and query rows per chunk, whole items first, within :data:`SCORES_MAX`."""
    head = lq * lk
    if H * head <= SCORES_MAX:
        return max(1, SCORES_MAX // (H * head)), H, lq
    if head <= SCORES_MAX:
        return 1, SCORES_MAX // head, lq
    return 1, 1, max(1, SCORES_MAX // lk)


def _slice(t: Optional[Tensor], b: slice, h: slice, i: slice) -> Optional[Tensor]:
    """``t`` (broadcastable to ``[B, H, Lq, Lk]``, any rank up to 4) cut to one chunk."""
    if t is None:
        return None
    while t.dim() < 4:
        t = t[None]
    return t[b if t.shape[0] > 1 else slice(None), h if t.shape[1] > 1 else slice(None),
             i if t.shape[2] > 1 else slice(None)]


def _sdpa_matmul(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], bias: Optional[Tensor],
                 scale: float) -> Tensor:
    """Two batched GEMMs around an fp32 softmax, chunked (:func:`_chunks`): the scores in fp32
    (``q`` and ``k`` are exact in fp32, so the scores carry only fp32 rounding), bias and mask added
    to them, the probabilities rounded to ``v``'s dtype for the second GEMM, as SDPA's kernel does."""
    B, H, lq, D = q.shape
    lk = k.shape[2]
    out = torch.empty(B, H, lq, D, dtype=q.dtype, device=q.device)
    add = None
    if keep is not None:  # additive 0 / -inf, in keep's own (broadcast) shape
        add = torch.zeros(keep.shape, dtype=torch.float32, device=q.device).masked_fill_(~keep, float("-inf"))
    nb, nh, nq = _chunks(B, H, lq, lk)
    kt = k.to(torch.float32).transpose(-1, -2)  # [B, H, D, Lk]
    for b0 in range(0, B, nb):
        for h0 in range(0, H, nh):
            for i0 in range(0, lq, nq):
                b, h, i = slice(b0, b0 + nb), slice(h0, h0 + nh), slice(i0, i0 + nq)
                qc = q[b, h, i].to(torch.float32, copy=True).mul_(scale)
                s = torch.matmul(qc, kt[b, h])  # fp32 [nb, nh, nq, Lk]
                parts = [t for t in (_slice(bias, b, h, i), _slice(add, b, h, i)) if t is not None]
                for t in parts:
                    s.add_(t)
                torch.ops.aten._softmax.out(s, -1, False, out=s)
                if parts and bool(s[..., 0].isnan().any()):
                    # Rows whose every score is -inf (masked): softmax's 0/0; the op's contract is zeros
                    # there. A NaN from the inputs themselves stays NaN.
                    dead = parts[0] if len(parts) == 1 else parts[0].float() + parts[1]
                    s.masked_fill_(torch.isneginf(dead).all(-1, keepdim=True), 0.0)
                torch.matmul(s.to(v.dtype), v[b, h], out=out[b, h, i])
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], bias: Optional[Tensor],
              rel_table: Optional[Tensor], rel_bidirectional: bool, rel_num_buckets: int,
              rel_max_distance: int, rel_query_offset: int, causal: bool, scale: float) -> Tensor:
    """The attention op's contract on :func:`sdpa`; ``q`` ``[B, H, Lq, D]``, ``k``/``v`` ``[B, H, Lk, D]``,
    any strides."""
    lq, lk = q.shape[2], k.shape[2]
    if rel_table is not None:
        rel = relative_bias_dense(rel_table, rel_bidirectional, rel_num_buckets, rel_max_distance,
                                  rel_query_offset, lq, lk, q.dtype)
        bias = rel if bias is None else bias.to(q.dtype) + rel
    # The op's causal is bottom-right aligned: one query (a decoding step) sees every key, so no mask
    # to build; top-left (sdpa's) only when Lq == Lk.
    causal = causal and lq > 1
    top_left = causal and lq == lk
    keep = None
    if causal and not top_left:
        qpos = torch.arange(lq, device=q.device)[:, None]
        keep = torch.arange(lk, device=q.device)[None, :] <= qpos + (lk - lq)  # [Lq, Lk], True = attend
    if mask is not None:
        keys = (mask if mask.dtype == torch.bool else mask.ne(0))[:, None, None, :]  # [B, 1, 1, Lk]
        keep = keys if keep is None else keep & keys
    return sdpa(q, k, v, keep, bias, scale, causal=top_left)


def norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
         rms: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``(norm(x + residual), x + residual)`` (or ``(norm(x), None)``) on PyTorch's native norms."""
    h = x if residual is None else x + residual
    dtype = x.dtype
    w = weight if weight is None or weight.dtype is dtype else weight.to(dtype)
    n = (x.shape[-1],)
    # torch.layer_norm / torch.rms_norm: F.*'s kernels without their __torch_function__ checks.
    if rms:
        y = torch.rms_norm(h, n, w, eps)
    else:
        y = torch.layer_norm(h, n, w, bias if bias is None or bias.dtype is dtype else bias.to(dtype), eps)
    return y, None if residual is None else h.contiguous()


def gelu(x: Tensor, bias: Optional[Tensor], gate: Optional[Tensor], approximate: str) -> Tensor:
    """``gelu(x + bias) * gate`` in ``x``'s dtype (PyTorch's GELU computes in fp32 inside)."""
    if bias is None:
        h = torch._C._nn.gelu(x, approximate=approximate).contiguous()
    else:
        h = torch._C._nn.gelu_(x + (bias if bias.dtype is x.dtype else bias.to(x.dtype)), approximate=approximate)
    if gate is not None:
        h.mul_(gate)
    return h
