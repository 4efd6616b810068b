"""Fused scaled-dot-product attention (FlashAttention-2 forward) with masks and T5's bias.

``attention(q, k, v, *, causal, attention_mask, bias, relative_bias, scale)``:
``q`` ``[B, H, Lq, D]``, ``k``/``v`` ``[B, H, Lk, D]`` in SDPA layout with any
strides, so a view of a fused QKV projection needs no copy. Scores never reach
memory: each program streams key blocks through an online softmax held in
registers (Dao 2023, "FlashAttention-2"). On top of that:

* ``causal`` is bottom-right aligned (query ``i`` sees keys ``<= i + Lk - Lq``),
  the KV-cache convention; key blocks wholly above the diagonal are never read
  and blocks wholly below it skip the mask arithmetic;
* ``attention_mask`` ``[B, Lk]`` (1/True = attend) is read one key block at a time;
* ``bias`` (anything broadcastable to ``[B, H, Lq, Lk]``) is read through
  stride-0 views, never materialized;
* ``relative_bias`` (:class:`RelativeBias`) is T5's bucketed relative-position
  bias, looked up inside the kernel from a per-head table over the signed
  distances around ``+-max_distance`` (``[H, 2*(max_distance+512)+1]`` fp32, built
  per call, bit-exact with Hugging Face's ``_relative_position_bucket``): nothing of
  size ``Lq x Lk`` is ever built. The bias depends only on key - query, so a tile's is
  Toeplitz: each tile near the diagonal loads the ``BLOCK_M + BLOCK_N - 1`` distances it
  spans as one contiguous band and gathers the tile from it on chip (not one load per
  element); key blocks lying wholly beyond ``max_distance`` (where the bucket
  saturates) add one scalar instead;
* decoding (few query blocks, long ``Lk``) splits the keys across programs and
  merges the partial softmaxes in a second kernel (flash-decoding, Dao et al. 2023);
* K and V stream through Hopper's tensor-memory accelerator (TMA): each program builds
  ``[Lk, D]`` tensor descriptors for its head on the device, and the descriptor
  zero-fills past ``Lk`` and ``D``, so no key block needs address masks. That needs a
  unit last stride and 16-byte aligned heads and rows (any fused-QKV view of fp16/bf16
  with ``D % 8 == 0`` qualifies); other layouts, head dims under 16, GPUs before Hopper and
  T5's decode step use pointer loads (``cp.async``). :func:`attention_tma` turns TMA off in a block, as does
  ``TRIFUSE_ATTENTION_TMA=0`` for the process.

Any head dim ``D`` from 1 to 256 runs the kernel: the head is padded to a power-of-two
block of at least 16 columns (``tl.dot``'s minimum), whose columns past ``D`` load as zeros.

A query row that sees no key at all (all masked, causal with ``Lq > Lk``, or an
all ``-inf`` bias) returns zeros, as flash-attn does, never NaN. fp16, bf16 and
fp32 run the kernel (fp32 with 3xTF32 dots: tensor cores, about 1e-6 from fp64); fp64 always runs the
reference, and so does bf16 on the CPU (Triton's interpreter has no correct bf16
dot). Forward only (inference): there is no autograd formula.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import os
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from ._checks import check_float
from . import cpu
from ._dispatch import HAS_TRITON, INTERPRET, next_power_of_2, path, use_triton

LOG2E = 1.4426950408889634

_HAS_DESCRIPTORS = False
if HAS_TRITON:
    import triton
    import triton.language as tl

    _HAS_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")

    @triton.jit
    def _rel_tile(BAND0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # T5's bias for one [BLOCK_M, BLOCK_N] tile: Toeplitz, (i, j) -> BAND0[j - i]. One
        # contiguous vector load of the BLOCK_M + BLOCK_N - 1 distances the tile spans, then
        # a gather from that band (in registers / shared memory) forms the tile.
        if BLOCK_M >= BLOCK_N:
            BAND: tl.constexpr = 2 * BLOCK_M
        else:
            BAND: tl.constexpr = 2 * BLOCK_N
        t = tl.arange(0, BAND)
        band = tl.load(BAND0 - (BLOCK_M - 1) + t, mask=t < BLOCK_M + BLOCK_N - 1, other=0.0)
        idx = tl.arange(0, BLOCK_N)[None, :] - tl.arange(0, BLOCK_M)[:, None] + (BLOCK_M - 1)
        return tl.reshape(tl.gather(band, tl.reshape(idx, [BLOCK_M * BLOCK_N]), 0), [BLOCK_M, BLOCK_N])

    @triton.jit
    def _attn_blocks(
        acc, l_i, m_i, q,  # running state [BM, BD], [BM], [BM] and the query block [BM, BD]
        K_HEAD,  # this (batch, head)'s keys: a pointer, or a [Lk, D] tensor descriptor when TMA
        V_HEAD,  # this (batch, head)'s values, likewise
        MASK_ROW,  # this batch's row of the padding mask (read when HAS_MASK)
        BIAS_HEAD,  # this (batch, head)'s additive bias (read when HAS_BIAS)
        REL_HEAD,  # this head's T5 bias by signed distance, centred, times log2(e) (read when REL)
        stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn, stride_biasm, stride_biasn,
        offs_m, offs_d, m0, lo, hi,
        Lq, Lk, D, causal_off, rel_off, max_distance, rel_center, rel_lo, rel_hi, qk_scale,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        HAS_BIAS: tl.constexpr, REL: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
        TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Key blocks [lo, hi) into the online softmax. MASKED blocks may hold keys past
        # Lk or above the causal diagonal; the caller only hands unmasked ones the
        # fast path. Scores are kept in log2 units so the exponentials are exp2.
        d_ok = offs_d < D
        row_ok = offs_m < Lq
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < Lk
            if HAS_MASK:
                # Issued before QK^T, so that its latency hides behind the dot instead of
                # stalling after the dot's wait.
                if MASKED:
                    km = tl.load(MASK_ROW + offs_n * stride_maskn, mask=n_ok, other=0)
                else:
                    km = tl.load(MASK_ROW + offs_n * stride_maskn)
            if TMA:
                # Bulk tensor copies (Hopper's TMA): the descriptor zero-fills keys past Lk and
                # columns past D, so no block needs an address mask.
                kt = tl.trans(K_HEAD.load([start_n, 0]))  # [BD, BN]
                v = V_HEAD.load([start_n, 0])  # [BN, BD]
            else:
                kt_ptrs = K_HEAD + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn  # [BD, BN]
                v_ptrs = V_HEAD + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BN, BD]
                if MASKED:
                    kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
                    v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                elif EVEN_D:
                    kt = tl.load(kt_ptrs)
                    v = tl.load(v_ptrs)
                else:
                    kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
                    v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # [BM, BN]

            if HAS_BIAS:
                b_ptrs = BIAS_HEAD + offs_m[:, None] * stride_biasm + offs_n[None, :] * stride_biasn
                if MASKED:
                    b_ok = row_ok[:, None] & n_ok[None, :]
                else:
                    b_ok = row_ok[:, None]  # padded query rows of the last block still need a guard
                s += tl.load(b_ptrs, mask=b_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            # T5 bias. REL: 0 none, 1 decide per block, 2 all keys >= max_distance before
            # the queries (one scalar), 3 the band near the diagonal (lookup), 4 all keys
            # >= max_distance after them (one scalar). The table reaches BLOCK_M + BLOCK_N
            # past max_distance, so band blocks need no clamp: each row reads a contiguous run.
            if REL == 1:
                rp_min = start_n - (m0 + BLOCK_M - 1 + rel_off)
                rp_max = start_n + BLOCK_N - 1 - (m0 + rel_off)
                if rp_min >= max_distance:
                    s += rel_hi
                elif rp_max <= -max_distance:
                    s += rel_lo
                else:
                    s += _rel_tile(REL_HEAD + (rel_center - rel_off) + (start_n - m0), BLOCK_M, BLOCK_N)
            elif REL == 2:
                s += rel_lo
            elif REL == 3:
                s += _rel_tile(REL_HEAD + (rel_center - rel_off) + (start_n - m0), BLOCK_M, BLOCK_N)
            elif REL == 4:
                s += rel_hi

            if MASKED:
                if CAUSAL:
                    keep = n_ok[None, :] & (offs_n[None, :] <= offs_m[:, None] + causal_off)  # [BM, BN]
                    s = tl.where(keep, s, float("-inf"))
                else:
                    s = tl.where(n_ok[None, :], s, float("-inf"))
            if HAS_MASK:
                s = tl.where((km != 0)[None, :], s, float("-inf"))

            # The running max starts at fp32's lowest finite value, not -inf, so a row with nothing
            # visible yet keeps a finite max and exp2(-inf - max) is exactly 0 rather than NaN; no
            # per-element guard needed (it cost 19 registers on causal hd64 128x64, 8 warps: one
            # block per SM instead of two). Every score is finite or -inf, so nothing is lost.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if REL != 0 and BLOCK_M <= 32:
                # Never true (m_new is finite), but without it Triton 3.6, the GPU image's, spills
                # 4 B in T5's decode step (tests/aot_hopper.py; 3.9 is the same either way).
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd(
        Q,  # queries [B, H, Lq, D], any strides
        K,  # keys [B, H, Lk, D], any strides
        V,  # values [B, H, Lk, D], any strides
        OUT,  # output [B, H, Lq, D] (written unless SPLIT)
        MASK,  # padding mask [B, Lk], nonzero = attend, int or uint8 (read when HAS_MASK)
        BIAS,  # additive bias viewed as [B, H, Lq, Lk], stride 0 where broadcast (HAS_BIAS)
        REL,  # relative bias by distance -rel_center..rel_center [H, 2*rel_center+1], fp32, x log2(e)
        O_PART,  # per-split normalized output [S, B*H, Lq, D], fp32 (written when SPLIT)
        LSE,  # per-split log2-sum-exp [S, B*H, Lq], fp32, -inf if empty (written when SPLIT)
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_maskb, stride_maskn,
        stride_biasb, stride_biash, stride_biasm, stride_biasn,
        stride_relh,
        stride_ps, stride_pbh, stride_pm, stride_pd,
        stride_ls, stride_lbh, stride_lm,
        H, Lq, Lk, D, causal_off, rel_off, max_distance, rel_center, qk_scale, keys_per_split,
        LQ_KEY, LK_KEY,  # bucketed sizes, only an autotuning key
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_REL: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
        EVEN_D: tl.constexpr,  # D == BLOCK_D: unmasked key blocks need no mask at all
        TMA: tl.constexpr,  # K and V through tensor descriptors (rows 16-byte aligned, unit last stride)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Program (query block, batch*head, key split).
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        split = tl.program_id(2)
        b = (bh // H).to(tl.int64)  # base offsets can pass 2**31 on big batches
        h = (bh % H).to(tl.int64)
        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < Lq
        d_ok = offs_d < D

        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
        K_HEAD = K + b * stride_kb + h * stride_kh
        V_HEAD = V + b * stride_vb + h * stride_vh
        if TMA:
            K_HEAD = tl.make_tensor_descriptor(K_HEAD, shape=[Lk, D], strides=[stride_kn, 1],
                                               block_shape=[BLOCK_N, BLOCK_D])
            V_HEAD = tl.make_tensor_descriptor(V_HEAD, shape=[Lk, D], strides=[stride_vn, 1],
                                               block_shape=[BLOCK_N, BLOCK_D])
        MASK_ROW = MASK + b * stride_maskb
        BIAS_HEAD = BIAS + b * stride_biasb + h * stride_biash
        REL_HEAD = REL + h * stride_relh
        rel_lo = 0.0
        rel_hi = 0.0
        if HAS_REL:
            rel_lo = tl.load(REL_HEAD + rel_center - max_distance)
            rel_hi = tl.load(REL_HEAD + rel_center + max_distance)

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], -3.4028234663852886e38, dtype=tl.float32)  # fp32's lowest: see _attn_blocks

        # This split's keys [lo, hi). Blocks that are wholly in range (and, if causal,
        # wholly at or below the diagonal for the block's first row) run unmasked; the
        # rest up to the last row's horizon run masked; keys beyond it are never read.
        lo = split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, Lk)
        full_end = hi
        end = hi
        if CAUSAL:
            full_end = tl.minimum(full_end, m0 + causal_off + 1)
            end = tl.minimum(end, m0 + BLOCK_M + causal_off)
        mid = lo + (tl.maximum(full_end - lo, 0) // BLOCK_N) * BLOCK_N
        if HAS_REL:
            # The unmasked blocks in three runs, so that only the band near the diagonal
            # pays for the lookup (its registers and spills stay out of the other loops):
            # [lo, band_lo) keys wholly max_distance or more before every query of the
            # block, [band_lo, band_hi) the band, [band_hi, mid) wholly max_distance after.
            left_last = m0 + rel_off - max_distance - BLOCK_N + 1  # last start_n of a left block
            band_lo = tl.minimum(lo + (tl.maximum(left_last - lo + BLOCK_N, 0) // BLOCK_N) * BLOCK_N, mid)
            right_first = m0 + BLOCK_M - 1 + rel_off + max_distance  # first start_n of a right block
            band_hi = lo + ((tl.maximum(right_first - lo, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
            band_hi = tl.minimum(tl.maximum(band_hi, band_lo), mid)
            acc, l_i, m_i = _attn_blocks(
                acc, l_i, m_i, q, K_HEAD, V_HEAD, MASK_ROW, BIAS_HEAD, REL_HEAD,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn, stride_biasm, stride_biasn,
                offs_m, offs_d, m0, lo, band_lo,
                Lq, Lk, D, causal_off, rel_off, max_distance, rel_center, rel_lo, rel_hi, qk_scale,
                False, CAUSAL, HAS_MASK, HAS_BIAS, 2, EVEN_D, DOT_PREC, TMA, BLOCK_M, BLOCK_N,
            )
            acc, l_i, m_i = _attn_blocks(
                acc, l_i, m_i, q, K_HEAD, V_HEAD, MASK_ROW, BIAS_HEAD, REL_HEAD,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn, stride_biasm, stride_biasn,
                offs_m, offs_d, m0, band_lo, band_hi,
                Lq, Lk, D, causal_off, rel_off, max_distance, rel_center, rel_lo, rel_hi, qk_scale,
                False, CAUSAL, HAS_MASK, HAS_BIAS, 3, EVEN_D, DOT_PREC, TMA, BLOCK_M, BLOCK_N,
            )
            acc, l_i, m_i = _attn_blocks(
                acc, l_i, m_i, q, K_HEAD, V_HEAD, MASK_ROW, BIAS_HEAD, REL_HEAD,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn, stride_biasm, stride_biasn,
                offs_m, offs_d, m0, band_hi, mid,
                Lq, Lk, D, causal_off, rel_off, max_distance, rel_center, rel_lo, rel_hi, qk_scale,
                False, CAUSAL, HAS_MASK, HAS_BIAS, 4, EVEN_D, DOT_PREC, TMA, BLOCK_M, BLOCK_N,
            )
        else:
            acc, l_i, m_i = _attn_blocks(
                acc, l_i, m_i, q, K_HEAD, V_HEAD, MASK_ROW, BIAS_HEAD, REL_HEAD,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn, stride_biasm, stride_biasn,
                offs_m, offs_d, m0, lo, mid,
                Lq, Lk, D, causal_off, rel_off, max_distance, rel_center, rel_lo, rel_hi, qk_scale,
                False, CAUSAL, HAS_MASK, HAS_BIAS, 0, EVEN_D, DOT_PREC, TMA, BLOCK_M, BLOCK_N,
            )
        # Then the blocks that need masking (the causal diagonal, the ragged end of Lk).
        acc, l_i, m_i = _attn_blocks(
            acc, l_i, m_i, q, K_HEAD, V_HEAD, MASK_ROW, BIAS_HEAD, REL_HEAD,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn, stride_biasm, stride_biasn,
            offs_m, offs_d, m0, mid, end,
            Lq, Lk, D, causal_off, rel_off, max_distance, rel_center, rel_lo, rel_hi, qk_scale,
            True, CAUSAL, HAS_MASK, HAS_BIAS, 1 if HAS_REL else 0, EVEN_D, DOT_PREC, TMA, BLOCK_M, BLOCK_N,
        )

        # Rows that saw no key have l == 0 and acc == 0: dividing by 1 leaves zeros.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        io_ok = row_ok[:, None] & d_ok[None, :]
        if SPLIT:
            bh64 = bh.to(tl.int64)
            split64 = split.to(tl.int64)
            p_ptrs = (O_PART + split64 * stride_ps + bh64 * stride_pbh
                      + offs_m[:, None] * stride_pm + offs_d[None, :] * stride_pd)
            tl.store(p_ptrs, out, mask=io_ok)
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            tl.store(LSE + split64 * stride_ls + bh64 * stride_lbh + offs_m * stride_lm, lse, mask=row_ok)
        else:
            o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
            tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=io_ok)

    @triton.jit
    def _attn_combine(
        O_PART,  # per-split normalized output [S, B*H, Lq, D], fp32
        LSE,  # per-split log2-sum-exp [S, B*H, Lq], fp32
        OUT,  # output [B, H, Lq, D]
        stride_ps, stride_pbh, stride_pm, stride_pd,
        stride_ls, stride_lbh, stride_lm,
        stride_ob, stride_oh, stride_om, stride_od,
        H, D, num_splits,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per (query row, batch*head): each split's output is weighted by
        # its share exp2(lse_s - lse) of the row's total softmax mass.
        m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < num_splits
        lse = tl.load(LSE + offs_s * stride_ls + bh * stride_lbh + m * stride_lm, mask=s_ok,
                      other=float("-inf"))
        lse_max = tl.max(lse, 0)
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty: all weights 0
        w = tl.math.exp2(lse - lse_max)  # [BS]
        total = tl.sum(w, 0)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        # Splits one at a time: a [S, D] tile would not fit registers at S=64, D=256.
        for s in range(0, num_splits):
            w_s = tl.math.exp2(tl.load(LSE + s * stride_ls + bh * stride_lbh + m * stride_lm) - lse_max)
            o = tl.load(O_PART + s * stride_ps + bh * stride_pbh + m * stride_pm + offs_d * stride_pd,
                        mask=offs_d < D, other=0.0)
            acc += w_s * o
        out = acc / tl.where(total == 0.0, 1.0, total)
        b = bh // H
        h = bh % H
        tl.store(OUT + b * stride_ob + h * stride_oh + m * stride_om + offs_d * stride_od,
                 out.to(OUT.dtype.element_ty), mask=offs_d < D)

    def _hopper_fits(c, block_d: int, rel: bool, bias: bool, mask: bool = False, causal: bool = False) -> bool:
        # Whether ptxas holds this config for sm_90 without spilling registers and within
        # 227 KB of shared memory, as measured on the launches the engine and benchmarks make
        # (tests/aot_hopper.py, table in bench/static/hopper-sm90.md; Triton 3.9, and 3.6, the GPU
        # image's, for fp16: "3.6" marks configs pruned because only 3.6 spills them).
        # CI (tests/test_compile_hopper.py) fails when a config kept here spills, so the rules
        # follow the compiler, not a guess; `aot_hopper.py --unpruned` shows what is dropped.
        bm, bn, w = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
        if rel:  # the T5 band: 100-175 registers in the shipped tiles (182-254 with the old gather)
            if bm <= 32:
                return (bm, bn) == (16, 64)  # 16x256 and 32x128 spill at head dim 64; 16x128 sits at 255
            if block_d > 64:
                return (bm, bn, w) == (64, 32, 4)  # 128x64 8w sits at 255 registers, the rest spill
            return (bm, bn, w) in ((64, 32, 4), (64, 64, 4), (128, 64, 8))  # with a mask 128x32 hits 255
        if block_d <= 64 and (bm, bn) == (16, 256):
            return False  # 4 bytes of spill at head dim 64
        if mask and block_d <= 64 and (bm, bn, w) == (128, 64, 4):
            return False  # 4 bytes of spill once the mask load is issued ahead of QK^T
        if block_d > 64 and (bm, bn, w) == (128, 64, 4):
            return False  # spills at head dim 128 (the 8-warp 128x64 does not)
        if block_d > 64 and (bm, bn) in ((64, 128), (16, 256)):
            return False  # 3.6: 8 bytes of spill at head dim 128 (3.9: 255 and 141 registers)
        if bias and bm <= 32 and (bm, bn) == (32, 64):
            return False  # 3.6: 8 bytes of spill on the dense-bias decode step
        if causal and block_d > 64 and (bm, bn) == (128, 128):
            return False  # 3.6 with TMA loads: 12 bytes of spill (3.9: 241 registers; 255 without TMA)
        if bias and block_d > 64 and (bm, bn) == (128, 128):
            return False  # the bias tile's stages overflow shared memory at head dim 128
        return True

    def _prune_configs(configs, named_args, **kwargs):
        # Short query blocks for decode (a 128-row block would be 127/128 padding),
        # full-size blocks otherwise; then only configs Hopper holds without spilling.
        def arg(name):
            return kwargs.get(name, named_args.get(name))

        lq, block_d = arg("LQ_KEY"), arg("BLOCK_D")
        want_small = lq is not None and lq <= 32
        kept = [c for c in configs if (c.kwargs["BLOCK_M"] <= 32) == want_small]
        if arg("DOT_PREC") == "tf32x3":  # fp32: three dots per product, only the smallest tiles hold
            # At head dim 128 even 64x32 spills (156-436 B, with or without TMA): 16x32 (159-202
            # registers) is all that holds there, for prefill too.
            fp32_tiles = ((16, 32),) if block_d is not None and block_d > 64 else ((64, 32), (16, 32))
            return [c for c in kept if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) in fp32_tiles] or \
                [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (16, 32)]
        kept = [c for c in kept if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (16, 32)]  # fp32's
        if block_d is not None and block_d >= 256:  # K/V stages of 256-wide rows overflow shared memory
            kept = [c for c in kept if c.kwargs["BLOCK_N"] <= (128 if c.kwargs["BLOCK_M"] <= 32 else 64)] or kept
        if block_d is not None:
            kept = [c for c in kept if _hopper_fits(c, block_d, bool(arg("HAS_REL")), bool(arg("HAS_BIAS")),
                                                    bool(arg("HAS_MASK")), bool(arg("CAUSAL")))] or kept
        return kept or configs

    _GPU_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 32, 4, 4),
            (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4),
            # decode / short queries
            (16, 64, 4, 3), (16, 128, 4, 3), (16, 256, 8, 2), (32, 64, 4, 3), (32, 128, 4, 3),
            (16, 32, 4, 3),  # fp32 decode only
        ]
    ]
    if not INTERPRET:
        _attn_fwd_tuned = triton.autotune(
            configs=_GPU_CONFIGS,
            key=["LQ_KEY", "LK_KEY", "BLOCK_D", "CAUSAL", "HAS_MASK", "HAS_BIAS", "HAS_REL", "SPLIT", "TMA"],
            prune_configs_by={"early_config_prune": _prune_configs},
        )(_attn_fwd)


#: Block sizes under Triton's interpreter: one small fixed config (autotuning would
#: rerun every config on the CPU). Tests may swap it to cover BLOCK_M != BLOCK_N.
_INTERPRET_BLOCKS = (32, 32)
#: Smallest and largest head dim attention takes (256 is what fits registers). Head dims under
#: ``_MIN_BLOCK_D`` run padded to it: tl.dot needs K >= 16, and the padded columns are masked.
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256
_MIN_BLOCK_D = 16
#: How far past max_distance the T5 lookup reaches: at least BLOCK_M + BLOCK_N of any config.
_REL_PAD = 512
#: Split-K never gives a split fewer keys than this (the merge would cost more than it saves).
_SPLIT_MIN_KEYS = 256
_MAX_SPLITS = 64
_MAX_FORCED_SPLITS = 1024
#: Split boundaries fall on multiples of every BLOCK_N an autotuned config may use.
_GPU_SPLIT_ALIGN = 256


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _split_align() -> int:
    return _INTERPRET_BLOCKS[1] if INTERPRET else _GPU_SPLIT_ALIGN


def _split_plan(batch_heads: int, lq: int, lk: int, requested: int, n_sm: int) -> Tuple[int, int]:
    """(number of key splits, keys per split). ``requested`` > 0 forces (at most) that many.

    Automatic: split only when the query blocks alone (B*H*ceil(Lq/16..64)) leave
    the GPU under two waves and the keys are long enough that every split keeps
    at least ``_SPLIT_MIN_KEYS`` keys.
    """
    if requested > 0:
        splits = min(requested, _MAX_FORCED_SPLITS)
    else:
        block_m = 16 if lq <= 16 else 32 if lq <= 32 else 64
        programs = batch_heads * -(-lq // block_m)
        if programs >= n_sm or lk < 2 * _SPLIT_MIN_KEYS:
            return 1, lk
        splits = min(-(-2 * n_sm // programs), lk // _SPLIT_MIN_KEYS, _MAX_SPLITS)
    align = _split_align()
    per = -(-(-(-lk // max(1, splits))) // align) * align
    splits = -(-lk // per)
    if splits <= 1:
        return 1, lk
    return splits, per


def _tma_rows(t: Tensor) -> bool:
    """Whether ``t`` ``[B, H, L, D]`` can be read through a TMA descriptor per (batch, head):
    unit last stride, and every head's base and row start 16-byte aligned (Hopper's rule)."""
    es = t.element_size()
    return (t.stride(3) == 1 and t.stride(2) > 0 and t.data_ptr() % 16 == 0
            and all(s * es % 16 == 0 for s in t.stride()[:3]))


_tma_scoped: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("trifuse_attention_tma", default=None)


@contextlib.contextmanager
def attention_tma(enabled: bool) -> Iterator[None]:
    """``with kernels.attention_tma(False): ...`` reads K/V with plain pointer loads (Ampere-style
    ``cp.async``) instead of Hopper's TMA in this thread, e.g. to time one against the other.
    The process-wide default is on unless ``TRIFUSE_ATTENTION_TMA=0``."""
    token = _tma_scoped.set(bool(enabled))
    try:
        yield
    finally:
        _tma_scoped.reset(token)


def _use_tma(k: Tensor, v: Tensor) -> bool:
    """K/V through tensor descriptors: on Hopper and newer (and under the interpreter, which
    runs them too) when the layout allows, unless turned off (:func:`attention_tma`)."""
    enabled = _tma_scoped.get()
    if enabled is None:
        enabled = os.environ.get("TRIFUSE_ATTENTION_TMA", "1") != "0"
    if not enabled or not _HAS_DESCRIPTORS:
        return False
    if k.device.type == "cuda" and not _hopper_or_newer(k.device.index if k.device.index is not None
                                                        else torch.cuda.current_device()):
        return False
    return _tma_rows(k) and _tma_rows(v)


def _scratch(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    # Global memory for the descriptors a kernel builds on the device (128 bytes a program).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side descriptors need Triton's scratch allocator, which is per thread (a
    ContextVar): set ours where none is, and leave a caller's own allocator alone."""
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_scratch)


def _bucket(n: int, cap: int) -> int:
    return min(next_power_of_2(n), cap)


def _launch(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], bias: Optional[Tensor],
            rel_lut: Optional[Tensor], rel_off: int, max_distance: int, causal: bool,
            scale: float, num_splits: int) -> Tensor:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_d = max(_MIN_BLOCK_D, next_power_of_2(D))  # q, K, V columns past D load as zeros
    dummy = q  # pointers the kernel never reads still need a tensor
    if mask is not None:
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_strides = (mask_arg.stride(0), mask_arg.stride(1))
    else:
        mask_arg, mask_strides = dummy, (0, 0)
    if bias is not None:
        if bias.dtype == torch.float64:
            bias = bias.float()
        bias_arg = bias[(None,) * (4 - bias.dim())].expand(B, H, Lq, Lk)  # stride 0 where broadcast
        bias_strides = bias_arg.stride()
    else:
        bias_arg, bias_strides = dummy, (0, 0, 0, 0)
    rel_arg = rel_lut if rel_lut is not None else dummy
    n_sm = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
        if q.device.type == "cuda" else 132
    splits, per_split = _split_plan(B * H, Lq, Lk, num_splits, n_sm)
    if splits > 1:
        o_part = torch.empty((splits, B * H, Lq, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((splits, B * H, Lq), dtype=torch.float32, device=q.device)
        part_strides, lse_strides = o_part.stride(), lse.stride()
    else:
        o_part, lse, part_strides, lse_strides = dummy, dummy, (0, 0, 0, 0), (0, 0, 0)

    args = (
        q, k, v, out, mask_arg, bias_arg, rel_arg, o_part, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *mask_strides, *bias_strides, rel_arg.stride(0) if rel_lut is not None else 0,
        *part_strides, *lse_strides,
        H, Lq, Lk, D, Lk - Lq, rel_off, max_distance, max_distance + _REL_PAD, scale * LOG2E, per_split,
        _bucket(Lq, 4096), _bucket(Lk, 16384),
    )
    flags = dict(
        CAUSAL=causal, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
        HAS_REL=rel_lut is not None, SPLIT=splits > 1,
        # fp32: 3xTF32 on the tensor cores (about 1e-6 from fp64, where exact-fp32 FMA dots spill
        # kilobytes at every tile on Hopper and one TF32 pass is 3e-3 off); fp16/bf16: default.
        DOT_PREC="tf32x3" if q.dtype == torch.float32 else None,
        EVEN_D=block_d == D, BLOCK_D=block_d,
        # Not for T5's decode step: there Triton 3.6 (the GPU image's) spills 4 B with
        # descriptors, and 3.9 saves no registers (bench/static/hopper-sm90.md).
        # Nor for head dims under one block: rows that short gain nothing from bulk copies.
        TMA=_use_tma(k, v) and not (rel_lut is not None and Lq <= 32) and D >= _MIN_BLOCK_D,
    )
    if flags["TMA"] and q.device.type == "cuda":
        _ensure_allocator()
    if INTERPRET:
        bm, bn = _INTERPRET_BLOCKS
        bm = min(bm, max(16, next_power_of_2(Lq)))
        _attn_fwd[(triton.cdiv(Lq, bm), B * H, splits)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn)
    else:
        grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H, splits)  # noqa: E731
        _attn_fwd_tuned[grid](*args, **flags)
    if splits > 1:
        _attn_combine[(Lq, B * H)](
            o_part, lse, out, *o_part.stride(), *lse.stride(), *out.stride(),
            H, D, splits, BLOCK_S=next_power_of_2(splits), BLOCK_D=block_d, num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------
# T5's relative position bias.


@dataclasses.dataclass(frozen=True, eq=False)
class RelativeBias:
    """T5's relative-position bias, computed inside the attention kernel.

    ``table``: ``[num_buckets, H]``, T5's ``relative_attention_bias.weight``.
    ``bidirectional``: True for the encoder, False for the (causal) decoder.
    ``query_offset``: absolute position of query 0 (keys sit at ``0..Lk-1``); the
    default ``Lk - Lq`` is decoding with a cache, and ``0`` when ``Lq == Lk``.
    The bias at (query ``i``, key ``j``) is ``table[bucket(j - (i + query_offset)), h]``.
    """

    table: Tensor
    bidirectional: bool = True
    num_buckets: int = 32
    max_distance: int = 128
    query_offset: Optional[int] = None

    def dense(self, lq: int, lk: int, dtype: torch.dtype) -> Tensor:
        """The bias ``[1, H, Lq, Lk]`` materialized (the native CPU path adds it to the scores), built
        once per object and size: a model makes one ``RelativeBias`` per forward and its layers share it."""
        offset = lk - lq if self.query_offset is None else int(self.query_offset)
        key = (lq, lk, offset, dtype)
        cache = self.__dict__.setdefault("_dense", {})
        if key not in cache:
            cache[key] = cpu.relative_bias_dense(self.table, bool(self.bidirectional), int(self.num_buckets),
                                                 int(self.max_distance), offset, lq, lk, dtype)
        return cache[key]

    def __repr__(self) -> str:  # the table itself is noise in a repr
        return (f"RelativeBias(table=<{tuple(self.table.shape)} {self.table.dtype}>, "
                f"bidirectional={self.bidirectional}, num_buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}, query_offset={self.query_offset})")


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


# The lookup table is gathered from the live ``table`` on every call, never cached by the
# tensor's identity: a cache keyed on ``id``/``_version`` goes stale when weights are swapped
# by ``.data =`` (as ``nn.Module._apply`` does) and cannot be read at all for tensors made
# under ``torch.inference_mode()`` (no version counter). What is cached is the part that
# depends only on the settings: which table entry each (head, distance) cell reads.


@functools.lru_cache(maxsize=64)
def _relative_lut_index(reach: int, bidirectional: bool, num_buckets: int, max_distance: int, heads: int,
                        device: torch.device) -> Tensor:
    """``[H, 2*reach+1]`` flat indices into a ``[num_buckets, H]`` table (row-major), by signed distance."""
    with torch.inference_mode(False):  # a plain tensor, usable in and out of inference mode
        rp = torch.arange(-reach, reach + 1, device=device)
        buckets = relative_position_bucket(rp, bidirectional, num_buckets, max_distance)  # [2*reach+1]
        return (buckets[None, :] * heads + torch.arange(heads, device=device)[:, None]).contiguous()


def _relative_lut(table: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """``[H, 2*c+1]`` fp32 bias by signed distance ``-c..c`` (``c = max_distance + _REL_PAD``), times log2(e).

    Independent of the sequence length. The kernel reads it only for key blocks
    within ``max_distance + BLOCK_M + BLOCK_N`` of the diagonal; farther blocks take
    the edge value, exact because buckets saturate at ``+-max_distance``. Built from
    ``table`` as it is now (one gather and one scale), so it follows every weight change.
    """
    index = _relative_lut_index(max_distance + _REL_PAD, bool(bidirectional), num_buckets, max_distance,
                                table.shape[1], table.device)
    lut = torch.take(table, index)  # [H, 2c+1], contiguous
    return lut.float().mul_(LOG2E) if lut.dtype != torch.float32 else lut.mul_(LOG2E)


# ----------------------------------------------------------------------------
# The specification.


def _reference(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], bias: Optional[Tensor],
               rel_table: Optional[Tensor], rel_bidirectional: bool, rel_num_buckets: int,
               rel_max_distance: int, rel_query_offset: int, causal: bool, scale: float) -> Tensor:
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    Lq, Lk = q.shape[2], k.shape[2]
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    if bias is not None:
        s = s + bias.to(ct)
    qpos = torch.arange(Lq, device=q.device)[:, None]
    kpos = torch.arange(Lk, device=q.device)[None, :]
    if rel_table is not None:
        buckets = relative_position_bucket(kpos - (qpos + rel_query_offset), rel_bidirectional,
                                           rel_num_buckets, rel_max_distance)  # [Lq, Lk]
        s = s + rel_table.to(ct)[buckets].permute(2, 0, 1)[None]
    if causal:
        s = s.masked_fill(kpos > qpos + (Lk - Lq), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # a row seeing no key: p = 0, not NaN
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v.to(ct)) / torch.where(l == 0, torch.ones_like(l), l)
    return out.to(q.dtype).contiguous()


# ----------------------------------------------------------------------------
# Checks (run by the real and the fake implementation).

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check(op: str, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], bias: Optional[Tensor],
           rel_table: Optional[Tensor], rel_num_buckets: int, rel_max_distance: int, scale: float,
           num_splits: int = 0) -> None:
    _check_qkv(op, q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{op}: attention_mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype not in _MASK_DTYPES:
            raise TypeError(
                f"{op}: attention_mask must be bool or integer (1 = attend), got {mask.dtype}; "
                "pass an additive float mask as bias"
            )
        if tuple(mask.shape) != (B, Lk):
            raise ValueError(f"{op}: attention_mask has shape {tuple(mask.shape)}, expected [B, Lk] = {(B, Lk)}")
        if mask.device != q.device:
            raise ValueError(f"{op}: attention_mask is on {mask.device} but q is on {q.device}")
    if bias is not None:
        check_float(op, "bias", bias)
        if bias.device != q.device:
            raise ValueError(f"{op}: bias is on {bias.device} but q is on {q.device}")
        full = (B, H, Lq, Lk)
        shape = tuple(bias.shape)
        padded = (1,) * (4 - len(shape)) + shape
        if len(shape) > 4 or any(s != 1 and s != f for s, f in zip(padded, full)):
            raise ValueError(f"{op}: bias of shape {shape} does not broadcast to [B, H, Lq, Lk] = {full}")
    if rel_table is not None:
        check_float(op, "relative_bias.table", rel_table)
        if rel_table.device != q.device:
            raise ValueError(f"{op}: relative_bias.table is on {rel_table.device} but q is on {q.device}")
        if tuple(rel_table.shape) != (rel_num_buckets, H):
            raise ValueError(
                f"{op}: relative_bias.table has shape {tuple(rel_table.shape)}, expected "
                f"[num_buckets, H] = {(rel_num_buckets, H)}"
            )
        if rel_num_buckets < 4 or rel_max_distance <= rel_num_buckets // 2:
            raise ValueError(
                f"{op}: relative_bias needs num_buckets >= 4 and max_distance > num_buckets // 2, "
                f"got num_buckets={rel_num_buckets}, max_distance={rel_max_distance}"
            )
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    if num_splits < 0:
        raise ValueError(f"{op}: num_splits must be >= 0 (0 = automatic), got {num_splits}")


def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, t)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
        for dim, what in ((0, "batch size"), (1, "number of heads"), (3, "head dim")):
            if t.shape[dim] != q.shape[dim]:
                raise ValueError(
                    f"{op}: {name} has {what} {t.shape[dim]} but q has {q.shape[dim]} "
                    f"(q {tuple(q.shape)}, {name} {tuple(t.shape)})"
                )
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: k has {k.shape[2]} keys but v has {v.shape[2]} values")
    if k.shape[2] == 0:
        raise ValueError(f"{op}: k and v must hold at least one key")
    d = q.shape[3]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim {d} is unsupported; expected {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")


def _unpack(op: str, q: Tensor, k: Tensor, v: Tensor, relative_bias: Optional[RelativeBias],
            scale: Optional[float]):
    """The wrapper's keyword options as plain op arguments."""
    _check_qkv(op, q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if relative_bias is None:
        return None, True, 32, 128, 0, float(scale)
    if not isinstance(relative_bias, RelativeBias):
        raise TypeError(f"{op}: relative_bias must be a kernels.RelativeBias, got {type(relative_bias).__name__}")
    rb = relative_bias
    offset = k.shape[2] - q.shape[2] if rb.query_offset is None else int(rb.query_offset)
    return rb.table, bool(rb.bidirectional), int(rb.num_buckets), int(rb.max_distance), offset, float(scale)


# ----------------------------------------------------------------------------
# The op.


def _kernel_takes(q: Tensor) -> bool:
    """Dispatch: the Triton kernel, unless fp64 (reference by design) or bf16 under the
    interpreter (its bf16 dot is wrong, so bf16 on the CPU runs the reference)."""
    if not use_triton(q) or q.dtype == torch.float64:
        return False
    return not (q.device.type == "cpu" and q.dtype == torch.bfloat16)


@torch.library.custom_op("trifuse::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, attention_mask: Optional[Tensor], bias: Optional[Tensor],
                  rel_table: Optional[Tensor], rel_bidirectional: bool, rel_num_buckets: int,
                  rel_max_distance: int, rel_query_offset: int, causal: bool, scale: float,
                  num_splits: int) -> Tensor:
    _check("attention", q, k, v, attention_mask, bias, rel_table, rel_num_buckets, rel_max_distance,
           scale, num_splits)
    if _kernel_takes(q):
        lut = None
        if rel_table is not None:
            lut = _relative_lut(rel_table, rel_bidirectional, rel_num_buckets, rel_max_distance)
        return _launch(q, k, v, attention_mask, bias, lut, rel_query_offset, rel_max_distance,
                       causal, scale, num_splits)
    if q.dtype != torch.float64 and path(q) == "native":
        return cpu.attention(q, k, v, attention_mask, bias, rel_table, rel_bidirectional, rel_num_buckets,
                             rel_max_distance, rel_query_offset, causal, scale)
    return _reference(q, k, v, attention_mask, bias, rel_table, rel_bidirectional, rel_num_buckets,
                      rel_max_distance, rel_query_offset, causal, scale)


@_attention_op.register_fake
def _(q, k, v, attention_mask, bias, rel_table, rel_bidirectional, rel_num_buckets, rel_max_distance,
      rel_query_offset, causal, scale, num_splits):
    _check("attention", q, k, v, attention_mask, bias, rel_table, rel_num_buckets, rel_max_distance,
           scale, num_splits)
    return q.new_empty(q.shape)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
              attention_mask: Optional[Tensor] = None, bias: Optional[Tensor] = None,
              relative_bias: Optional[RelativeBias] = None, scale: Optional[float] = None,
              _num_splits: int = 0) -> Tensor:
    """``softmax(q @ k^T * scale + bias + relative_bias + masks) @ v``, fused.

    ``q``: ``[B, H, Lq, D]``; ``k``, ``v``: ``[B, H, Lk, D]``; any strides; same float
    dtype and device; ``D`` in 1..256. Returns ``[B, H, Lq, D]`` in ``q``'s dtype,
    contiguous.

    * ``scale``: defaults to ``1/sqrt(D)`` (T5 uses ``1.0``).
    * ``causal``: query ``i`` sees keys ``j <= i + Lk - Lq`` (bottom-right aligned).
    * ``attention_mask``: ``[B, Lk]`` bool or integer, nonzero = attend.
    * ``bias``: additive float tensor broadcastable to ``[B, H, Lq, Lk]``.
    * ``relative_bias``: :class:`RelativeBias`, T5's bucketed bias computed in-kernel.

    A query row that sees no key (everything masked) returns **zeros**, never NaN.
    fp64 inputs (and bf16 on the CPU interpreter) run the PyTorch reference. ``_num_splits`` (private) forces
    split-K decoding into at most that many key splits; 0 chooses automatically.
    """
    op = "attention"
    table, bidir, nb, md, qoff, scale = _unpack(op, q, k, v, relative_bias, scale)
    if table is not None and q.dtype != torch.float64 and path(q) == "native":
        _check(op, q, k, v, attention_mask, bias, table, nb, md, scale)
        dense = relative_bias.dense(q.shape[2], k.shape[2], q.dtype)  # shared by every layer's call
        bias, table = (dense if bias is None else bias.to(q.dtype) + dense), None
    return torch.ops.trifuse.attention(q, k, v, attention_mask, bias, table, bidir, nb, md, qoff,
                                       bool(causal), scale, int(_num_splits))


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                        attention_mask: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        relative_bias: Optional[RelativeBias] = None, scale: Optional[float] = None) -> Tensor:
    """The specification of :func:`attention` in plain PyTorch, computed in fp32 (fp64 for fp64).

    Materializes the ``[B, H, Lq, Lk]`` scores; rows that see no key return zeros.
    """
    op = "attention_reference"
    table, bidir, nb, md, qoff, scale = _unpack(op, q, k, v, relative_bias, scale)
    _check(op, q, k, v, attention_mask, bias, table, nb, md, scale)
    return _reference(q, k, v, attention_mask, bias, table, bidir, nb, md, qoff, bool(causal), scale)
