"""Attention over packed variable-length sequences (flash-attention's varlen layout), T5's bias included.

``attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal,
relative_bias, scale)``: ``q`` ``[total_q, H, D]`` and ``k``/``v`` ``[total_k, H, D]`` hold the
tokens of ``B`` sequences back to back, no padding; sequence ``b`` owns query rows
``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` (int32
prefix sums from 0, as ``flash_attn_varlen_func`` takes them). A batch of padded sentences
unpadded this way costs what its real tokens cost, in attention and in every layer around it.

* ``causal`` is bottom-right aligned per sequence, as in :func:`kernels.attention`: query ``i``
  of a sequence with ``lq`` queries and ``lk`` keys sees its keys ``j <= i + lk - lq``::

      lq=2, lk=5:   1 1 1 1 0        lq=5, lk=2:   0 0   (sees nothing: zeros)
                    1 1 1 1 1                      0 0
                                                   0 0
                                                   1 0
                                                   1 1

* ``relative_bias`` (:class:`kernels.RelativeBias`, T5's bucketed bias, the same object
  :func:`kernels.attention` takes) uses positions local to each sequence: key ``j`` and query
  ``i`` of one sequence are ``j - (i + offset)`` apart, with ``offset = query_offset`` or, when
  that is ``None``, ``lk - lq`` of the sequence. The kernel reads a per-head table by signed
  distance, clamped at ``+-max_distance`` (where T5's bucket saturates), so nothing of size
  ``lq x lk`` is built.
* A sequence may have length 0; a query that sees no key returns zeros, never NaN.

The Triton kernel runs one program per (query block, head, sequence) and exits at once when
the block lies past its sequence's end (flash-attention's Triton varlen forward): the grid is
sized by ``max_seqlen_q``, so the checks insist it is at least every sequence's length. K and V
stream through Hopper's TMA when the layout allows (unit last stride, 16-byte aligned rows): the
descriptor covers one sequence's keys and zero-fills past its end. On the CPU (no interpreter)
the op runs :func:`kernels.cpu.sdpa` (SDPA's kernel, or batched matmuls for long bf16 sequences) on
groups of sequences of similar length, which beats padding the batch back for attention
(bench/packed.py); fp64 runs the reference, as does bf16 under the interpreter.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

from . import cpu
from ._checks import check_float, check_qkv
from ._dispatch import HAS_TRITON, INTERPRET, eager_native, get_backend, next_power_of_2, path, use_triton
from .attention import MAX_HEAD_DIM, MIN_HEAD_DIM, RelativeBias, attention_reference, relative_position_bucket

LOG2E = 1.4426950408889634

if HAS_TRITON:
    import triton
    import triton.language as tl

    _HAS_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")

    @triton.jit
    def _varlen_fwd(
        Q,  # queries [total_q, H, D], any strides
        K,  # keys [total_k, H, D], any strides
        V,  # values [total_k, H, D], any strides
        OUT,  # output [total_q, H, D]
        CU_Q,  # int32 [B + 1]: sequence b's queries are rows CU_Q[b]..CU_Q[b+1]
        CU_K,  # int32 [B + 1]: likewise its keys
        REL,  # T5 bias by signed distance -max_distance..max_distance, [H, 2*max_distance+1] fp32 x log2(e)
        stride_qt, stride_qh, stride_qd,
        stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd,
        stride_ot, stride_oh, stride_od,
        stride_relh,
        D, qk_scale, rel_offset, max_distance,
        LQ_KEY,  # max_seqlen_q bucketed: only an autotuning key
        CAUSAL: tl.constexpr, HAS_REL: tl.constexpr,
        REL_FIXED: tl.constexpr,  # the T5 query offset is rel_offset for every sequence (else lk - lq)
        DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr,
        TMA: tl.constexpr,  # K and V through tensor descriptors (16-byte aligned rows, unit last stride)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2)
        q_start = tl.load(CU_Q + b)
        Lq = tl.load(CU_Q + b + 1) - q_start
        m0 = pid_m * BLOCK_M
        if m0 >= Lq:  # past this sequence's queries (the grid is sized by the longest)
            return
        k_start = tl.load(CU_K + b)
        Lk = tl.load(CU_K + b + 1) - k_start
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < Lq
        d_ok = offs_d < D
        q_rows = q_start.to(tl.int64) + offs_m
        q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
        K_SEQ = K + k_start.to(tl.int64) * stride_kt + h * stride_kh
        V_SEQ = V + k_start.to(tl.int64) * stride_vt + h * stride_vh
        if TMA:
            K_SEQ = tl.make_tensor_descriptor(K_SEQ, shape=[Lk, D], strides=[stride_kt, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
            V_SEQ = tl.make_tensor_descriptor(V_SEQ, shape=[Lk, D], strides=[stride_vt, 1],
                                              block_shape=[BLOCK_N, BLOCK_D])
        causal_off = Lk - Lq
        rel_off = rel_offset if REL_FIXED else causal_off
        REL_HEAD = REL + h * stride_relh + max_distance  # the entry for distance 0

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], -3.4028234663852886e38, dtype=tl.float32)  # finite: exp2(-inf - m) = 0
        hi = Lk
        if CAUSAL:  # keys past the last row's horizon are never read
            hi = tl.minimum(hi, m0 + BLOCK_M + causal_off)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < Lk
            if TMA:
                kt = tl.trans(K_SEQ.load([start_n, 0]))  # [BD, BN], zero past Lk and D
                v = V_SEQ.load([start_n, 0])  # [BN, BD]
            else:
                kt_ptrs = K_SEQ + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kt
                v_ptrs = V_SEQ + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
                if EVEN_D:
                    kt = tl.load(kt_ptrs, mask=n_ok[None, :], other=0.0)
                    v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
                else:
                    kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
                    v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # [BM, BN], log2 units
            if HAS_REL:
                dist = offs_n[None, :] - (offs_m[:, None] + rel_off)
                dist = tl.minimum(tl.maximum(dist, -max_distance), max_distance)  # buckets saturate there
                s += tl.load(REL_HEAD + dist)
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw no key: zeros
        tl.store(OUT + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od,
                 out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    def _prune_configs(configs, named_args, **kwargs):
        # Short sequences take the 64-row blocks (a 128-row block of a 24-token sentence is
        # mostly idle); fp32's three dots per product hold only the smallest tiles; the T5
        # lookup and wide heads drop the 8-warp 128x64 tile (bench/static/aot_hopper.py).
        def arg(name):
            return kwargs.get(name, named_args.get(name))

        block_d = arg("BLOCK_D")
        if arg("DOT_PREC") == "tf32x3":  # 32x32 spills at wide heads (bench/static/hopper-sm90.md)
            tile = (16, 32) if block_d is not None and block_d > 64 else (32, 32)
            return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == tile]
        kept = [c for c in configs if c.kwargs["BLOCK_M"] > 32]  # the 32- and 16-row tiles are fp32's
        lq = arg("LQ_KEY")
        if lq is not None and lq <= 64:
            kept = [c for c in kept if c.kwargs["BLOCK_M"] <= 64]
        if block_d is not None and block_d > 64:
            kept = [c for c in kept if c.kwargs["BLOCK_N"] <= 64 and not (c.kwargs["BLOCK_M"] == 128
                                                                          and arg("HAS_REL"))]
        return kept or configs

    _GPU_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (64, 128, 4, 3),
                             (32, 32, 4, 3), (16, 32, 4, 3)]  # the last two for fp32 only (narrow, wide heads)
    ]
    if not INTERPRET:
        _varlen_fwd_tuned = triton.autotune(
            configs=_GPU_CONFIGS, key=["LQ_KEY", "BLOCK_D", "CAUSAL", "HAS_REL", "TMA", "DOT_PREC"],
            prune_configs_by={"early_config_prune": _prune_configs},
        )(_varlen_fwd)

#: Block sizes under Triton's interpreter (one fixed config; tests may change it).
_INTERPRET_BLOCKS = (16, 32)


# ----------------------------------------------------------------------------
# T5's bias by signed distance.


def _relative_by_distance(rb_table: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """``[H, 2*max_distance+1]`` fp32: the bias at distance ``-max_distance..max_distance``.
    Beyond ``+-max_distance`` T5's bucket no longer changes, so clamping the distance is exact."""
    rp = torch.arange(-max_distance, max_distance + 1, device=rb_table.device)
    buckets = relative_position_bucket(rp, bidirectional, num_buckets, max_distance)
    return rb_table[buckets].t().float().contiguous()


# ----------------------------------------------------------------------------
# The specification: the padded reference, one sequence at a time.


def _spans(cu: Tensor) -> list:
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def _reference(q, k, v, cu_q, cu_k, rel_table, rel_bidirectional, rel_num_buckets, rel_max_distance,
               rel_query_offset, causal, scale) -> Tensor:
    out = torch.zeros_like(q)
    for (qs, qe), (ks, ke) in zip(_spans(cu_q), _spans(cu_k)):
        if qe == qs or ke == ks:  # nothing to compute, or no key to see: zeros
            continue
        rb = None
        if rel_table is not None:
            rb = RelativeBias(rel_table, rel_bidirectional, rel_num_buckets, rel_max_distance, rel_query_offset)
        seq = (t.transpose(0, 1)[None] for t in (q[qs:qe], k[ks:ke], v[ks:ke]))  # [1, H, L, D]
        out[qs:qe] = attention_reference(*seq, causal=causal, relative_bias=rb, scale=scale)[0].transpose(0, 1)
    return out


#: A group of sequences padded together for one SDPA call may hold at most this many times the
#: attention area (sum of length^2) its sequences need.
_GROUP_WASTE = 2.0


def _groups(lengths: list) -> list:
    """Sequence indices grouped by length, longest first, each group's padded area (count x longest^2)
    within :data:`_GROUP_WASTE` of its real area: a few SDPA calls instead of one per sequence."""
    groups, area = [], 0
    for i in sorted((i for i, n in enumerate(lengths) if n), key=lambda i: -lengths[i]):
        n = lengths[i]
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] ** 2 <= _GROUP_WASTE * (area + n * n):
            groups[-1].append(i)
            area += n * n
        else:
            groups.append([i])
            area = n * n
    return groups


def _sdpa_grouped(q, k, v, cu, by_dist, rel_max_distance, causal, scale) -> Tensor:
    """Sequences with as many queries as keys: gathered by length into a few padded calls of
    :func:`kernels.cpu.sdpa`."""
    out = torch.zeros_like(q)
    c = cu.tolist()
    lengths = [e - s for s, e in zip(c[:-1], c[1:])]
    for group in _groups(lengths):
        L = lengths[group[0]]
        pos = torch.arange(L)
        lens = torch.tensor([lengths[i] for i in group])
        valid = pos[None, :] < lens[:, None]  # [g, L]
        idx = (torch.tensor([c[i] for i in group])[:, None] + pos[None, :]).masked_fill_(~valid, 0)
        qg, kg, vg = (t[idx].transpose(1, 2) for t in (q, k, v))  # [g, H, L, D]
        keep = None if len(group) == 1 else valid[:, None, None, :]  # keys
        bias = None
        if by_dist is not None:
            dist = (pos[None, :] - pos[:, None]).clamp_(-rel_max_distance, rel_max_distance) + rel_max_distance
            bias = by_dist[:, dist][None]  # [1, H, L, L]
        o = cpu.sdpa(qg, kg, vg, keep, bias, scale, causal=causal)  # [g, H, L, D]
        out[idx[valid]] = o.transpose(1, 2)[valid]
    return out


def _sdpa(q, k, v, cu_q, cu_k, rel_table, rel_bidirectional, rel_num_buckets, rel_max_distance,
          rel_query_offset, causal, scale) -> Tensor:
    """The CPU path: PyTorch's SDPA. Self-attention (every sequence's queries are its keys) runs a
    few length-grouped padded calls (:func:`_groups`); other layouts one call per sequence."""
    by_dist = None
    if rel_table is not None:
        by_dist = _relative_by_distance(rel_table, rel_bidirectional, rel_num_buckets, rel_max_distance).to(q.dtype)
    if torch.equal(cu_q, cu_k) and rel_query_offset in (None, 0):
        return _sdpa_grouped(q, k, v, cu_q, by_dist, rel_max_distance, causal, scale)
    out = torch.zeros_like(q)
    for (qs, qe), (ks, ke) in zip(_spans(cu_q), _spans(cu_k)):
        lq, lk = qe - qs, ke - ks
        if lq == 0 or lk == 0:
            continue
        bias = keep = None
        if by_dist is not None:
            off = lk - lq if rel_query_offset is None else rel_query_offset
            dist = (torch.arange(lk)[None, :] - torch.arange(lq)[:, None] - off).clamp_(
                -rel_max_distance, rel_max_distance) + rel_max_distance
            bias = by_dist[:, dist]  # [H, lq, lk]
        if causal and lq != lk:
            keep = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        # [1, H, L, D] views: 4-D inputs take SDPA's fused CPU kernel (3-D ones its unfused math path).
        seq = (t.transpose(0, 1)[None] for t in (q[qs:qe], k[ks:ke], v[ks:ke]))
        o = cpu.sdpa(*seq, keep, bias, scale, causal=causal and lq == lk)[0]
        if causal and lq > lk:  # rows that see no key: zeros
            o[:, : lq - lk] = 0
        out[qs:qe] = o.transpose(0, 1)
    return out


# ----------------------------------------------------------------------------
# Checks: each names the argument and the problem. The value checks (prefix sums, lengths) read
# the tensors back, so they run outside tracing only.


def _check(q, k, v, cu_q, cu_k, max_q, max_k, rel_table, rel_num_buckets, rel_max_distance, scale) -> None:
    op = "attention_varlen"
    check_qkv(op, q, k, v, "total_tokens, H, D")
    for name, t in (("k", k), ("v", v)):
        if t.shape[1:] != q.shape[1:]:
            raise ValueError(f"{op}: {name} has [H, D] = {tuple(t.shape[1:])} but q has {tuple(q.shape[1:])}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: k has {k.shape[0]} tokens but v has {v.shape[0]}")
    if not MIN_HEAD_DIM <= q.shape[2] <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim {q.shape[2]} is unsupported; expected {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
            raise TypeError(f"{op}: {name} must be a 1-D int32 tensor [B + 1], got {got}")
        if cu.device != q.device:
            raise ValueError(f"{op}: {name} is on {cu.device} but q is on {q.device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{op}: cu_seqlens_q has {cu_q.numel()} entries but cu_seqlens_k has {cu_k.numel()}: "
                         "both are [B + 1]")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if m < 0:
            raise ValueError(f"{op}: {name} must be >= 0, got {m}")
    if rel_table is not None:
        check_float(op, "relative_bias.table", rel_table)
        if rel_table.device != q.device:
            raise ValueError(f"{op}: relative_bias.table is on {rel_table.device} but q is on {q.device}")
        if tuple(rel_table.shape) != (rel_num_buckets, q.shape[1]):
            raise ValueError(f"{op}: relative_bias.table has shape {tuple(rel_table.shape)}, expected "
                             f"[num_buckets, H] = {(rel_num_buckets, q.shape[1])}")
        if rel_num_buckets < 4 or rel_max_distance <= rel_num_buckets // 2:
            raise ValueError(f"{op}: relative_bias needs num_buckets >= 4 and max_distance > num_buckets // 2")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")


def _check_values(q, k, cu_q, cu_k, max_q, max_k) -> None:
    op = "attention_varlen"
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    for name, cu, total, mx, mname in (("cu_seqlens_q", cu_q, q.shape[0], max_q, "max_seqlen_q"),
                                       ("cu_seqlens_k", cu_k, k.shape[0], max_k, "max_seqlen_k")):
        c = cu.tolist()
        if c[0] != 0:
            raise ValueError(f"{op}: {name} must start at 0, got {c[0]}")
        lengths = [b - a for a, b in zip(c[:-1], c[1:])]
        if any(n < 0 for n in lengths):
            i = next(i for i, n in enumerate(lengths) if n < 0)
            raise ValueError(f"{op}: {name} must not decrease, but entry {i + 1} ({c[i + 1]}) < entry {i} ({c[i]})")
        if c[-1] > total:
            raise ValueError(f"{op}: {name} ends at {c[-1]}, past the {total} tokens given")
        if lengths and max(lengths) > mx:
            raise ValueError(f"{op}: {mname}={mx} is smaller than the longest sequence ({max(lengths)} tokens)")


# ----------------------------------------------------------------------------
# The op.


def _kernel_takes(q: Tensor) -> bool:
    if not use_triton(q) or q.dtype == torch.float64:
        return False
    return not (q.device.type == "cpu" and q.dtype == torch.bfloat16)  # the interpreter's bf16 dot is wrong


def _path(q: Tensor) -> str:
    """``triton``; ``native`` (SDPA per sequence: the ``native`` backend, or CPU tensors the kernel does not
    take); else ``reference`` (fp64, the ``reference`` backend, or a device Triton cannot run on)."""
    if get_backend() == "reference" or q.dtype == torch.float64:
        return "reference"
    if _kernel_takes(q):
        return "triton"
    return "native" if path(q) == "native" or q.device.type == "cpu" else "reference"


def _tma_ok(t: Tensor) -> bool:
    """Rows of ``t`` ``[total, H, D]`` readable by a per-(sequence, head) descriptor: unit last
    stride and every head's base and row start 16-byte aligned (Hopper's rule)."""
    es = t.element_size()
    return (t.stride(2) == 1 and t.stride(0) > 0 and t.data_ptr() % 16 == 0
            and all(s * es % 16 == 0 for s in t.stride()[:2]))


def _use_tma(k: Tensor, v: Tensor) -> bool:
    if os.environ.get("TRIFUSE_ATTENTION_TMA", "1") == "0" or not _HAS_DESCRIPTORS:
        return False
    if k.device.type == "cuda" and torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    return _tma_ok(k) and _tma_ok(v)


def _launch(q, k, v, cu_q, cu_k, max_q, by_dist, rel_offset, max_distance, causal, scale) -> Tensor:
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)  # rows past cu_q[-1] stay zero
    B = cu_q.numel() - 1
    H, D = q.shape[1], q.shape[2]
    if B == 0 or max_q == 0 or q.shape[0] == 0:
        return out
    block_d = max(MIN_HEAD_DIM, next_power_of_2(D))
    rel = by_dist.mul(LOG2E) if by_dist is not None else q
    tma = _use_tma(k, v)
    if tma and q.device.type == "cuda":
        from .attention import _ensure_allocator  # the descriptors' scratch allocator, shared with attention

        _ensure_allocator()
    args = (q, k, v, out, cu_q, cu_k, rel, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            rel.stride(0) if by_dist is not None else 0,
            D, scale * LOG2E, 0 if rel_offset is None else rel_offset, max_distance,
            min(next_power_of_2(max_q), 4096))
    flags = dict(CAUSAL=causal, HAS_REL=by_dist is not None, REL_FIXED=rel_offset is not None,
                 DOT_PREC="tf32x3" if q.dtype == torch.float32 else None, EVEN_D=block_d == D, TMA=tma,
                 BLOCK_D=block_d)
    if INTERPRET:
        bm, bn = _INTERPRET_BLOCKS
        _varlen_fwd[(triton.cdiv(max_q, bm), H, B)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn)
    else:
        grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), H, B)  # noqa: E731
        _varlen_fwd_tuned[grid](*args, **flags)
    return out


def _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rel_table, rel_bidirectional,
         rel_num_buckets, rel_max_distance, rel_query_offset, causal, scale, validated) -> Tensor:
    """The op's body: checks, then the path :func:`_path` picks (the eager fast path calls it directly)."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rel_table, rel_num_buckets,
           rel_max_distance, scale)
    if not validated:
        _check_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    rel = (rel_table, rel_bidirectional, rel_num_buckets, rel_max_distance, rel_query_offset)
    path = _path(q)
    if path == "triton":
        by_dist = None if rel_table is None else _relative_by_distance(*rel[:4])
        return _launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, by_dist, rel_query_offset,
                       rel_max_distance, causal, scale)
    if path == "native":
        return _sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, *rel, causal, scale)
    return _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *rel, causal, scale)


@torch.library.custom_op("trifuse::attention_varlen", mutates_args=())
def _varlen_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
               max_seqlen_k: int, rel_table: Optional[Tensor], rel_bidirectional: bool, rel_num_buckets: int,
               rel_max_distance: int, rel_query_offset: Optional[int], causal: bool, scale: float,
               validated: bool) -> Tensor:
    return _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rel_table, rel_bidirectional,
                rel_num_buckets, rel_max_distance, rel_query_offset, causal, scale, validated)


@_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rel_table, rel_bidirectional,
      rel_num_buckets, rel_max_distance, rel_query_offset, causal, scale, validated):
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rel_table, rel_num_buckets,
           rel_max_distance, scale)
    return q.new_empty(q.shape)


def _unpack(q: Tensor, relative_bias: Optional[RelativeBias], scale: Optional[float]):
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if isinstance(q, Tensor) and q.dim() == 3 else 1.0
    if relative_bias is None:
        return None, True, 32, 128, None, float(scale)
    if not isinstance(relative_bias, RelativeBias):
        raise TypeError(f"attention_varlen: relative_bias must be a kernels.RelativeBias, "
                        f"got {type(relative_bias).__name__}")
    rb = relative_bias
    offset = None if rb.query_offset is None else int(rb.query_offset)
    return rb.table, bool(rb.bidirectional), int(rb.num_buckets), int(rb.max_distance), offset, float(scale)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     relative_bias: Optional[RelativeBias] = None, scale: Optional[float] = None,
                     _validated: bool = False) -> Tensor:
    """Attention within each of ``B`` packed sequences; see the module docstring.

    ``q`` ``[total_q, H, D]``, ``k``/``v`` ``[total_k, H, D]`` (any strides, one float dtype and
    device, ``D`` in 16..256); ``cu_seqlens_q``/``cu_seqlens_k`` int32 ``[B + 1]``, non-decreasing
    from 0; ``max_seqlen_*`` at least the longest sequence. Returns ``[total_q, H, D]`` in ``q``'s
    dtype (rows past ``cu_seqlens_q[-1]`` are zeros). ``scale`` defaults to ``1/sqrt(D)``.
    ``_validated`` (private): the prefix sums were checked already (the engine's packed batches,
    built once per forward, skip reading them back to the host at every layer).
    """
    table, bidir, nb, md, qoff, scale = _unpack(q, relative_bias, scale)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), table, bidir, nb, md, qoff,
            bool(causal), scale, bool(_validated))
    if eager_native(q, k, v, cu_seqlens_q, cu_seqlens_k, table):  # the eager fast path (kernels._dispatch)
        return _run(*args)
    return torch.ops.trifuse.attention_varlen(*args)


def attention_varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                               max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                               relative_bias: Optional[RelativeBias] = None, scale: Optional[float] = None) -> Tensor:
    """The specification: :func:`kernels.attention_reference` on each sequence (fp32, fp64 for fp64)."""
    table, bidir, nb, md, qoff, scale = _unpack(q, relative_bias, scale)
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, table, nb, md, scale)
    _check_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, table, bidir, nb, md, qoff, bool(causal), scale)
