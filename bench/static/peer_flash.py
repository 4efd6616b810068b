"""A deliberately plain FlashAttention-2 forward in the shape of Triton's tutorial 06, as a peer.

Not shipped and not used by the engine: a baseline for the static Hopper report
(bench/static/aot_hopper.py binds it at the tiles trifuse's own attention uses and puts the
two side by side: registers, spills, shared memory, SASS size). Written here, not
copied: same structure as the tutorial's forward, our own code.

* one program per (query block, batch*head); Q, K, V and O are read and written
  through device-side tensor descriptors (TMA on Hopper) over the ``[B*H*L, D]`` rows
  of contiguous ``[B, H, L, D]`` tensors;
* online softmax in base 2, ``scale * log2(e)`` folded into the scores;
* causal in two sweeps: the key blocks wholly below the query block's diagonal
  without a mask, then the diagonal blocks with one;
* none of trifuse's generality: no padding mask, no bias, ``L`` a multiple of both
  block sizes, head dim a power of two (the whole row is one block), ``Lq == Lk``.

On a GPU the descriptors need Triton's scratch allocator (set here if none is set);
the interpreter and an ahead-of-time compile do not.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _peer_sweep(acc, row_sum, row_max, q, k_desc, v_desc, row_base, q_pos, key_lo, key_hi, qk_scale,
                DIAGONAL: tl.constexpr, BLOCK_N: tl.constexpr):
    # Keys [key_lo, key_hi) of one (batch, head) into the running softmax. Only DIAGONAL
    # sweeps compare positions; the others trust the caller that every key is visible.
    for n0 in tl.range(key_lo, key_hi, BLOCK_N):
        k = k_desc.load([row_base + n0, 0])  # [BLOCK_N, D]
        scores = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N], unscaled
        if DIAGONAL:
            k_pos = n0 + tl.arange(0, BLOCK_N)
            scores = tl.where(q_pos[:, None] >= k_pos[None, :], scores * qk_scale, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            p = tl.math.exp2(scores - new_max[:, None])
        else:
            # The scale rides on the max and on the subtraction (one FMA per score).
            new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
            p = tl.math.exp2(scores * qk_scale - new_max[:, None])
        decay = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * decay + tl.sum(p, 1)
        v = v_desc.load([row_base + n0, 0])  # [BLOCK_N, D]
        acc = tl.dot(p.to(v.dtype), v, acc * decay[:, None])
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def _peer_fwd(Q, K, V, Out, seq_len, n_rows, qk_scale,
              CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M  # first query of this block, within its sequence
    row_base = tl.program_id(1) * seq_len  # this (batch, head)'s first row in the [B*H*L, D] view

    view_shape = [n_rows, HEAD_DIM]
    q_desc = tl.make_tensor_descriptor(Q, shape=view_shape, strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K, shape=view_shape, strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V, shape=view_shape, strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(Out, shape=view_shape, strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])

    q = q_desc.load([row_base + m0, 0])
    q_pos = m0 + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    if CAUSAL:
        # Sweep 1: key blocks ending at or before this query block's first row (no mask).
        # Sweep 2: the rest up to its last row, masked; key 0..m0 is in every row's view,
        # so no row's max stays -inf. Rounding down also covers BLOCK_N > BLOCK_M.
        diag_lo = (m0 // BLOCK_N) * BLOCK_N
        acc, row_sum, row_max = _peer_sweep(acc, row_sum, row_max, q, k_desc, v_desc, row_base, q_pos,
                                            0, diag_lo, qk_scale, False, BLOCK_N)
        acc, row_sum, row_max = _peer_sweep(acc, row_sum, row_max, q, k_desc, v_desc, row_base, q_pos,
                                            diag_lo, m0 + BLOCK_M, qk_scale, True, BLOCK_N)
    else:
        acc, row_sum, row_max = _peer_sweep(acc, row_sum, row_max, q, k_desc, v_desc, row_base, q_pos,
                                            0, seq_len, qk_scale, False, BLOCK_N)

    o_desc.store([row_base + m0, 0], (acc / row_sum[:, None]).to(Out.dtype.element_ty))


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def peer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   BLOCK_M: int = 128, BLOCK_N: int = 64, num_warps: int = 8, num_stages: int = 3,
                   scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale [+ causal mask]) v`` for contiguous ``[B, H, L, D]`` fp16/bf16/fp32
    tensors, ``L`` a multiple of ``BLOCK_M`` and ``BLOCK_N``, ``D`` a power of two >= 16."""
    B, H, L, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"peer_attention: q, k, v must share one shape [B, H, L, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("peer_attention: q, k, v must be contiguous")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"peer_attention: fp16, bf16 or fp32 q, k, v of one dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if L % BLOCK_M or L % BLOCK_N:
        raise ValueError(f"peer_attention: L={L} must be a multiple of BLOCK_M={BLOCK_M} and BLOCK_N={BLOCK_N}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"peer_attention: head dim {D} must be a power of two >= 16")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    if q.device.type == "cuda":
        from triton.runtime import _allocation

        if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:  # leave a caller's allocator be
            triton.set_allocator(_scratch)
    _peer_fwd[(L // BLOCK_M, B * H)](q, k, v, out, L, B * H * L, scale * LOG2E, CAUSAL=bool(causal),
                                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HEAD_DIM=D,
                                      num_warps=num_warps, num_stages=num_stages)
    return out
