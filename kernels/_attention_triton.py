"""The Triton side of :mod:`kernels.attention`: the FlashAttention-2 forward kernel, the split-K
merge, and the autotuning configs that hold on Hopper. Read it as Triton's tutorial 06
(``06-fused-attention.py``): one inner loop over key blocks (``_attn_blocks``), called by the
kernel for each kind of key-block run (the ``_FULL`` ... ``_EDGE`` modes below) the way the
tutorial's ``_attn_fwd_inner`` is called per ``STAGE``.

The op, the launcher and the reference live in :mod:`kernels.attention`, which imports the
kernels under their own names (``_attn_fwd``, ``_attn_combine``: the names compiled kernels carry in
the static report, bench/static/hopper-sm90.md). Why the tiles and the guards are what they are
(measured with ``bench/static/aot_hopper.py``) is told in docs/kernels.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._dispatch import INTERPRET

#: Device-side tensor descriptors (Hopper's TMA) exist in this Triton.
HAS_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")

# The kinds of key-block run (the ``MODE`` of ``_attn_blocks``). Blocks wholly visible to every
# query of the query block run unmasked, as one run without T5's bias or as three with it, so that
# only the band near the diagonal pays for the per-distance lookup (its registers stay out of the
# other loops); then the blocks that need masks.
_FULL = tl.constexpr(0)  # wholly visible, no T5 bias
_FAR_BEFORE = tl.constexpr(1)  # wholly visible, every key max_distance or more before every query: one scalar
_BAND = tl.constexpr(2)  # wholly visible, near the diagonal: T5's bias looked up per distance
_FAR_AFTER = tl.constexpr(3)  # wholly visible, every key max_distance or more after every query: one scalar
_EDGE = tl.constexpr(4)  # the causal diagonal and the ragged end of Lk: masked; T5's bias decided per block

_LOG2E = tl.constexpr(1.4426950408889634)
_FP32_LOWEST = tl.constexpr(-3.4028234663852886e38)


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
    heads,  # this program's (K, V, mask row, bias, T5 table): K/V a pointer, or a [Lk, D] descriptor when TMA
    strides,  # (kn, kd, vn, vd, maskn, biasm, biasn)
    pos,  # (offs_m, offs_d, m0, Lq, Lk, D, causal_off, rel_off, max_distance, rel_center, rel_lo, rel_hi, qk_scale)
    lo, hi,  # the key blocks [lo, hi)
    MODE: tl.constexpr,  # which run: _FULL, _FAR_BEFORE, _BAND, _FAR_AFTER or _EDGE
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REL: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Key blocks [lo, hi) into the online softmax. _EDGE blocks may hold keys past Lk or above
    # the causal diagonal; the other modes get only blocks that need no mask. Scores are kept in
    # log2 units so the exponentials are exp2.
    K_HEAD, V_HEAD, MASK_ROW, BIAS_HEAD, REL_HEAD = heads
    stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn, stride_biasm, stride_biasn = strides
    offs_m, offs_d, m0, Lq, Lk, D, causal_off, rel_off, max_distance, rel_center, rel_lo, rel_hi, qk_scale = pos
    MASKED: tl.constexpr = MODE == _EDGE
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
            s += tl.load(b_ptrs, mask=b_ok, other=0.0).to(tl.float32) * _LOG2E
        # T5's bias. The table reaches BLOCK_M + BLOCK_N past max_distance, so band blocks need
        # no clamp: each row reads a contiguous run.
        if MODE == _EDGE and HAS_REL:
            rp_min = start_n - (m0 + BLOCK_M - 1 + rel_off)
            rp_max = start_n + BLOCK_N - 1 - (m0 + rel_off)
            if rp_min >= max_distance:
                s += rel_hi
            elif rp_max <= -max_distance:
                s += rel_lo
            else:
                s += _rel_tile(REL_HEAD + (rel_center - rel_off) + (start_n - m0), BLOCK_M, BLOCK_N)
        elif MODE == _FAR_BEFORE:
            s += rel_lo
        elif MODE == _BAND:
            s += _rel_tile(REL_HEAD + (rel_center - rel_off) + (start_n - m0), BLOCK_M, BLOCK_N)
        elif MODE == _FAR_AFTER:
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
        # per-element guard needed. Every score is finite or -inf, so nothing is lost.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if HAS_REL and BLOCK_M <= 32:
            # Never true (m_new is finite): kept on T5's decode step, where the compiler
            # allocates better with it (docs/kernels.md).
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
    m_i = tl.full([BLOCK_M], _FP32_LOWEST, dtype=tl.float32)  # see _attn_blocks

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
    heads = (K_HEAD, V_HEAD, MASK_ROW, BIAS_HEAD, REL_HEAD)
    strides = (stride_kn, stride_kd, stride_vn, stride_vd, stride_maskn, stride_biasm, stride_biasn)
    pos = (offs_m, offs_d, m0, Lq, Lk, D, causal_off, rel_off, max_distance, rel_center, rel_lo, rel_hi, qk_scale)
    if HAS_REL:
        # [lo, band_lo) keys wholly max_distance or more before every query of the block,
        # [band_lo, band_hi) the band, [band_hi, mid) wholly max_distance or more after.
        left_last = m0 + rel_off - max_distance - BLOCK_N + 1  # last start_n of a left block
        band_lo = tl.minimum(lo + (tl.maximum(left_last - lo + BLOCK_N, 0) // BLOCK_N) * BLOCK_N, mid)
        right_first = m0 + BLOCK_M - 1 + rel_off + max_distance  # first start_n of a right block
        band_hi = lo + ((tl.maximum(right_first - lo, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        band_hi = tl.minimum(tl.maximum(band_hi, band_lo), mid)
        acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, heads, strides, pos, lo, band_lo, _FAR_BEFORE,
                                     CAUSAL, HAS_MASK, HAS_BIAS, HAS_REL, EVEN_D, DOT_PREC, TMA, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, heads, strides, pos, band_lo, band_hi, _BAND,
                                     CAUSAL, HAS_MASK, HAS_BIAS, HAS_REL, EVEN_D, DOT_PREC, TMA, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, heads, strides, pos, band_hi, mid, _FAR_AFTER,
                                     CAUSAL, HAS_MASK, HAS_BIAS, HAS_REL, EVEN_D, DOT_PREC, TMA, BLOCK_M, BLOCK_N)
    else:
        acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, heads, strides, pos, lo, mid, _FULL,
                                     CAUSAL, HAS_MASK, HAS_BIAS, HAS_REL, EVEN_D, DOT_PREC, TMA, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_blocks(acc, l_i, m_i, q, heads, strides, pos, mid, end, _EDGE,
                                 CAUSAL, HAS_MASK, HAS_BIAS, HAS_REL, EVEN_D, DOT_PREC, TMA, BLOCK_M, BLOCK_N)

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


# ----------------------------------------------------------------------------
# Autotuning on the GPU: the configs, and the tiles each launch keeps on Hopper.

#: (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M <= 32 serves decode / short queries;
#: 16x32 serves fp32 only.
_TILES = [
    (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 32, 4, 4),
    (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4),
    (16, 64, 4, 3), (16, 128, 4, 3), (16, 256, 8, 2), (32, 64, 4, 3), (32, 128, 4, 3),
    (16, 32, 4, 3),
]
GPU_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in _TILES]

# What ptxas holds for sm_90 without spilling registers and within 227 KB of shared memory, as
# measured on the launches the engine and the benchmarks make (bench/static/aot_hopper.py; the table is
# bench/static/hopper-sm90.md, the history docs/kernels.md). CI (tests/test_compile_hopper.py)
# fails when a kept config spills, so these follow the compiler, not a guess; `aot_hopper.py
# --unpruned` shows what they drop. Head dims are "narrow" (BLOCK_D <= 64) or "wide". A warps
# entry of None matches any.

#: T5's bias: the only tiles that hold, by head dim (the band lookup is register-hungry).
_T5_TILES = {
    "narrow": ((16, 64, None), (64, 32, 4), (64, 64, 4), (128, 64, 8)),
    "wide": ((16, 64, None), (64, 32, 4)),
}
#: Other launches: (BLOCK_M, BLOCK_N, warps, head dims, the flag that brings the spill on or
#: None for always) of the tiles that do not hold.
_SPILLING_TILES = (
    (16, 256, None, "any", None),  # spills at head dim 64 and 128
    (128, 64, 4, "narrow", "HAS_MASK"),  # spills once the mask load is issued ahead of QK^T
    (128, 64, 4, "wide", None),  # the 8-warp 128x64 holds
    (64, 128, None, "wide", None),
    (32, 64, None, "any", "HAS_BIAS"),  # the dense-bias decode step
    (128, 128, None, "wide", "CAUSAL"),  # with TMA loads
    (128, 128, None, "wide", "HAS_BIAS"),  # the bias tile's stages overflow shared memory
)
#: fp32 (three dots per product with 3xTF32) holds only the smallest tiles, by head dim.
_FP32_TILES = {"narrow": ((64, 32), (16, 32)), "wide": ((16, 32),)}


def _width(block_d: int) -> str:
    return "narrow" if block_d <= 64 else "wide"


def hopper_fits(c, block_d: int, rel: bool, bias: bool, mask: bool = False, causal: bool = False) -> bool:
    """Whether config ``c`` holds on sm_90 for a launch with these flags (the tables above)."""
    bm, bn, w = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
    width = _width(block_d)
    if rel:
        return any((bm, bn) == (tm, tn) and tw in (None, w) for tm, tn, tw in _T5_TILES[width])
    flags = {None: True, "HAS_MASK": mask, "HAS_BIAS": bias, "CAUSAL": causal}
    return not any((bm, bn) == (tm, tn) and tw in (None, w) and widths in ("any", width) and flags[flag]
                   for tm, tn, tw, widths, flag in _SPILLING_TILES)


def prune_configs(configs, named_args, **kwargs):
    """The autotuner's early pruning: short query blocks for decode (a 128-row block would be
    127/128 padding), full-size blocks otherwise; then only the tiles Hopper holds."""
    def arg(name):
        return kwargs.get(name, named_args.get(name))

    def tile(c):
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]

    lq, block_d = arg("LQ_KEY"), arg("BLOCK_D")
    want_small = lq is not None and lq <= 32
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] <= 32) == want_small]
    if arg("DOT_PREC") == "tf32x3":  # fp32: prefill too runs the small tiles at wide heads
        fp32_tiles = _FP32_TILES["wide" if block_d is not None and block_d > 64 else "narrow"]
        return [c for c in kept if tile(c) in fp32_tiles] or [c for c in configs if tile(c) == (16, 32)]
    kept = [c for c in kept if tile(c) != (16, 32)]  # fp32's
    if block_d is not None and block_d >= 256:  # K/V stages of 256-wide rows overflow shared memory
        kept = [c for c in kept if c.kwargs["BLOCK_N"] <= (128 if c.kwargs["BLOCK_M"] <= 32 else 64)] or kept
    if block_d is not None:
        kept = [c for c in kept if hopper_fits(c, block_d, bool(arg("HAS_REL")), bool(arg("HAS_BIAS")),
                                               bool(arg("HAS_MASK")), bool(arg("CAUSAL")))] or kept
    return kept or configs


#: The autotuned kernel (compiled launches; the interpreter runs one fixed tile instead, as
#: autotuning would rerun every config on the CPU).
attn_fwd_tuned = None
if not INTERPRET:
    attn_fwd_tuned = triton.autotune(
        configs=GPU_CONFIGS,
        key=["LQ_KEY", "LK_KEY", "BLOCK_D", "CAUSAL", "HAS_MASK", "HAS_BIAS", "HAS_REL", "SPLIT", "TMA"],
        prune_configs_by={"early_config_prune": prune_configs},
    )(_attn_fwd)
