"""Attention over a paged KV cache: many sequences' query tokens against keys read through block tables.

``paged_attention(q, k_pool, v_pool, block_tables, token_seq, kv_lens, *, scale, relative_bias)``:

* ``q`` ``[T, H, D]``: the query tokens of one engine step, any mix of sequences (a prefill chunk
  of one, one decode token of another, ...), any strides;
* ``k_pool`` / ``v_pool`` ``[N, BS, H, D]``: one layer's pool of ``N`` blocks of ``BS`` token slots;
* ``block_tables`` ``[S, MB]`` int32: sequence ``s``'s ``i``-th block of keys is pool block
  ``block_tables[s, i]`` (entries past a sequence's length are never read);
* ``token_seq`` ``[T]`` int32: the sequence (row of ``block_tables``) each query token belongs to;
* ``kv_lens`` ``[T]`` int32: query ``t`` sees keys ``0 .. kv_lens[t] - 1`` of its sequence. Causal
  self-attention passes the query's position + 1 (its own key included); cross-attention passes the
  encoder length. Every ``kv_lens[t]`` is at least 1;
* ``relative_bias`` (:class:`kernels.RelativeBias`, causal self-attention only): T5's bucketed bias
  for key ``j`` of query ``t`` at distance ``j - (kv_lens[t] - 1)``, looked up in-kernel from the
  same ``[H, 2c+1]`` table the dense kernel uses (``kernels.attention``); ``query_offset`` is ignored.

Returns ``[T, H, D]`` in ``q``'s dtype. Three implementations of one specification:

* the Triton kernel (CUDA, or Triton's interpreter): one program per (query token, head, key split),
  streaming ``BLOCK_N`` keys at a time through the block table with an online softmax in fp32
  (exp2, log2(e)-scaled scores). One query row per program, so the products are ``tl.sum`` over
  ``[BLOCK_N, BLOCK_D]`` tiles rather than ``tl.dot`` (the decode case: a 16-row dot would be 15/16
  padding; no bf16 dot either, so bf16 runs under the interpreter too). Long keys with few programs
  split across programs and a second kernel merges the partial softmaxes (flash-decoding);
* the CPU path: the step's keys gathered once into a padded ``[S, Lmax]`` batch and one masked
  :func:`kernels.cpu.sdpa` call (SDPA's kernel; for bf16 its fp32 one on fp32 copies, faster at one
  query per row);
* :func:`paged_attention_reference`, a loop over query tokens in fp64 (the specification).

Anchors: vLLM's PagedAttention (Kwon et al., SOSP 2023) and ``triton_unified_attention``
(a flat grid over query tokens reading block tables); flash-decoding (Dao et al., 2023).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import cpu
from ._checks import check_float
from ._dispatch import HAS_TRITON, INTERPRET, eager_native, next_power_of_2, use_triton
from .attention import MAX_HEAD_DIM, MIN_HEAD_DIM, RelativeBias, relative_position_bucket

LOG2E = 1.4426950408889634

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_fwd(
        Q,  # queries [T, H, D], any strides
        K,  # key pool [N, BS, H, D], any strides
        V,  # value pool [N, BS, H, D], any strides
        BT,  # block tables [S, MB] int32
        SEQ,  # token -> sequence [T] int32
        KV_LEN,  # token -> number of keys it sees [T] int32
        REL,  # T5 bias by signed distance -rel_center..rel_center [H, 2*rel_center+1], fp32, x log2(e)
        OUT,  # output [T, H, D] (written unless SPLIT)
        O_PART,  # per-split normalized output [S_split, T, H, D] fp32 (written when SPLIT)
        LSE,  # per-split log2-sum-exp [S_split, T, H] fp32, -inf when the split saw no key
        stride_qt, stride_qh, stride_qd,
        stride_kn, stride_ks, stride_kh, stride_kd,
        stride_vn, stride_vs, stride_vh, stride_vd,
        stride_bts, stride_btb,
        stride_ot, stride_oh, stride_od,
        stride_ps, stride_pt, stride_ph, stride_pd,
        stride_ls, stride_lt, stride_lh,
        stride_relh,
        H, D, max_distance, rel_center, qk_scale, keys_per_split,
        HAS_REL: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,  # the pool's block size (tokens per block)
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        seq = tl.load(SEQ + t).to(tl.int64)
        kv_len = tl.load(KV_LEN + t)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(Q + t * stride_qt + h * stride_qh + offs_d * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
        q = q * qk_scale  # scores come out in log2 units
        BT_ROW = BT + seq * stride_bts
        qpos = kv_len - 1  # the query's own position (causal self-attention)

        m_i = tl.full([], -3.4028234663852886e38, tl.float32)  # fp32's lowest finite: no -inf - -inf in the loop
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        lo = split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, kv_len)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            block = tl.load(BT_ROW + (offs_n // BLOCK_SIZE) * stride_btb, mask=n_ok, other=0).to(tl.int64)
            within = (offs_n % BLOCK_SIZE).to(tl.int64)
            kv_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(K + block[:, None] * stride_kn + within[:, None] * stride_ks + h * stride_kh
                        + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0).to(tl.float32)  # [BN, BD]
            s = tl.sum(k * q[None, :], 1)  # [BN]
            if HAS_REL:
                dist = tl.minimum(tl.maximum(offs_n - qpos, -max_distance), max_distance)  # saturates past it
                s += tl.load(REL + h * stride_relh + rel_center + dist, mask=n_ok, other=0.0)
            s = tl.where(n_ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new)
            v = tl.load(V + block[:, None] * stride_vn + within[:, None] * stride_vs + h * stride_vh
                        + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            l_i = l_i * alpha + tl.sum(p, 0)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)
        if SPLIT:
            s64 = split.to(tl.int64)
            tl.store(O_PART + s64 * stride_ps + t * stride_pt + h * stride_ph + offs_d * stride_pd, out, mask=d_ok)
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            tl.store(LSE + s64 * stride_ls + t * stride_lt + h * stride_lh, lse)
        else:
            tl.store(OUT + t * stride_ot + h * stride_oh + offs_d * stride_od, out.to(OUT.dtype.element_ty),
                     mask=d_ok)

    @triton.jit
    def _paged_merge(
        O_PART,  # per-split normalized output [S_split, T, H, D] fp32
        LSE,  # per-split log2-sum-exp [S_split, T, H] fp32
        OUT,  # output [T, H, D]
        stride_ps, stride_pt, stride_ph, stride_pd,
        stride_ls, stride_lt, stride_lh,
        stride_ot, stride_oh, stride_od,
        D, num_splits,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per (query token, head): split s weighs exp2(lse_s - max lse).
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        lse = tl.load(LSE + offs_s * stride_ls + t * stride_lt + h * stride_lh, mask=offs_s < num_splits,
                      other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.math.exp2(lse - top)  # [BS]; 0 for empty splits
        o = tl.load(O_PART + offs_s[:, None] * stride_ps + t * stride_pt + h * stride_ph
                    + offs_d[None, :] * stride_pd, mask=(offs_s[:, None] < num_splits) & (offs_d[None, :] < D),
                    other=0.0)  # [BS, BD]: at most 16 splits, so the tile stays small
        total = tl.sum(w, 0)
        out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(OUT + t * stride_ot + h * stride_oh + offs_d * stride_od, out.to(OUT.dtype.element_ty),
                 mask=offs_d < D)

    def _prune(configs, named_args, **kwargs):
        # A [BLOCK_N, BLOCK_D] fp32 tile of keys (then values) per program: keep the configs where it
        # takes at most 64 registers a thread; they compile spill-free at 48-128 registers on sm_90
        # (bench/static/hopper-sm90.md, checked by tests/test_compile_hopper.py). No 2-warp configs:
        # 32 keys on 2 warps spilled 8 B at fp16 hd128 and at fp32 with T5's bias at hd64.
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        kept = [c for c in configs if c.kwargs["BLOCK_N"] * block_d <= 64 * 32 * c.num_warps]
        return kept or configs[:1]

    _GPU_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=2)
                    for bn, w in ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8))]
    if not INTERPRET:
        _paged_fwd_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["BLOCK_D", "HAS_REL", "SPLIT", "BLOCK_SIZE"],
                                           prune_configs_by={"early_config_prune": _prune})(_paged_fwd)


#: Keys per program step under the interpreter (the GPU autotunes 32..128).
_BLOCK_N = 64
#: Split boundaries fall on multiples of every BLOCK_N a config may use.
_SPLIT_ALIGN = 128
#: Splits are worth it when the (token, head) programs alone leave the GPU this short of work.
_SPLIT_MIN_KEYS = 256
MAX_SPLITS = 16


def _split_plan(programs: int, max_kv: int, requested: int, n_sm: int) -> tuple:
    """``(splits, keys per split)``: split the keys only when the (token, head) programs fill less
    than two waves and every split keeps at least ``_SPLIT_MIN_KEYS`` keys; ``requested`` > 0 forces."""
    if requested > 0:
        splits = min(requested, MAX_SPLITS)
    elif programs >= 2 * n_sm or max_kv < 2 * _SPLIT_MIN_KEYS:
        return 1, max(max_kv, 1)
    else:
        splits = min(-(-2 * n_sm // programs), max_kv // _SPLIT_MIN_KEYS, MAX_SPLITS)
    if splits <= 1:
        return 1, max(max_kv, 1)
    per = -(-max_kv // max(splits, 1))
    per = -(-per // _SPLIT_ALIGN) * _SPLIT_ALIGN  # whole key blocks per split, whatever BLOCK_N runs
    splits = -(-max_kv // per)
    return (splits, per) if splits > 1 else (1, max(max_kv, 1))


def _rel_lut(rel: RelativeBias, heads: int) -> Tensor:
    """``[H, 2*max_distance+1]`` fp32 bias by signed distance ``-max_distance..max_distance``, times log2(e)."""
    md = int(rel.max_distance)
    dist = torch.arange(-md, md + 1, device=rel.table.device)
    buckets = relative_position_bucket(dist, bool(rel.bidirectional), int(rel.num_buckets), md)
    return (rel.table.float()[buckets].t() * LOG2E).contiguous()


def _launch(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, token_seq: Tensor, kv_lens: Tensor,
            max_kv: int, scale: float, lut: Optional[Tensor], max_distance: int, num_splits: int) -> Tensor:
    T, H, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if T == 0:
        return out
    block_d = max(16, next_power_of_2(D))  # no tl.dot here, but 16-wide rows keep loads vectorized
    n_sm = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    splits, per = _split_plan(T * H, max_kv, num_splits, n_sm)
    dummy = q
    if splits > 1:
        o_part = torch.empty((splits, T, H, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((splits, T, H), dtype=torch.float32, device=q.device)
    else:
        o_part, lse = dummy, dummy
    part_strides = o_part.stride() if splits > 1 else (0, 0, 0, 0)
    lse_strides = lse.stride() if splits > 1 else (0, 0, 0)
    rel = lut if lut is not None else dummy
    args = (q, k_pool, v_pool, block_tables, token_seq, kv_lens, rel, out, o_part, lse,
            *q.stride(), *k_pool.stride(), *v_pool.stride(), *block_tables.stride(), *out.stride(),
            *part_strides, *lse_strides, rel.stride(0) if lut is not None else 0,
            H, D, max_distance, max_distance, scale * LOG2E, per)
    flags = dict(HAS_REL=lut is not None, SPLIT=splits > 1, BLOCK_SIZE=k_pool.shape[1], BLOCK_D=block_d)
    if INTERPRET:
        _paged_fwd[(T, H, splits)](*args, **flags, BLOCK_N=_BLOCK_N)
    else:
        _paged_fwd_tuned[(T, H, splits)](*args, **flags)
    if splits > 1:
        _paged_merge[(T, H)](o_part, lse, out, *o_part.stride(), *lse.stride(), *out.stride(), D, splits,
                             BLOCK_S=max(2, next_power_of_2(splits)), BLOCK_D=block_d,
                             **({} if INTERPRET else {"num_warps": 4}))
    return out


# ----------------------------------------------------------------------------
# The CPU path and the specification.


def _gather_keys(pool: Tensor, block_tables: Tensor, rows: Tensor, length: int) -> Tensor:
    """``[len(rows), length, H, D]``: the first ``length`` keys of the given sequences (block-table rows)."""
    bs = pool.shape[1]
    pos = torch.arange(length, device=pool.device)
    blocks = block_tables[rows.long()][:, pos // bs].long()  # [R, length]
    slots = blocks * bs + pos % bs
    return pool.reshape(-1, *pool.shape[2:])[slots]


def _cpu(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, token_seq: Tensor, kv_lens: Tensor,
         max_kv: int, scale: float, lut: Optional[Tensor], max_distance: int) -> Tensor:
    # Every query token against its sequence's keys gathered to one padded batch [T, Lmax]: one
    # attention call per step and layer, masks by kv_len. Decode steps have one token per sequence,
    # so nothing is gathered twice; a prefill chunk's tokens share their sequence's gather.
    T, H, D = q.shape
    if T == 1 or bool((token_seq[1:] > token_seq[:-1]).all()):  # one token per sequence (decoding)
        k = _gather_keys(k_pool, block_tables, token_seq, max_kv)  # [T, Lmax, H, D]
        v = _gather_keys(v_pool, block_tables, token_seq, max_kv)
    else:  # prefill chunks: each sequence's keys gathered once, then shared by its tokens
        seqs, inverse = torch.unique(token_seq, return_inverse=True)
        k = _gather_keys(k_pool, block_tables, seqs, max_kv)[inverse]
        v = _gather_keys(v_pool, block_tables, seqs, max_kv)[inverse]
    pos = torch.arange(max_kv, device=q.device)
    visible = pos[None, :] < kv_lens[:, None].long()  # [T, Lmax]
    bias = None
    if lut is not None:
        dist = (pos[None, :] - (kv_lens[:, None].long() - 1)).clamp(-max_distance, max_distance) + max_distance
        bias = (lut[:, dist].permute(1, 0, 2) / LOG2E)[:, :, None, :]  # [T, H, 1, Lmax], natural-log units
    # One query per row: cpu.sdpa's kernel for it (bf16 runs SDPA's fp32 kernel on fp32 copies).
    out = cpu.sdpa(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), visible[:, None, None, :], bias, scale)
    return out[:, :, 0, :]


def _reference(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, token_seq: Tensor,
               kv_lens: Tensor, scale: float, rel: Optional[RelativeBias]) -> Tensor:
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    bs = k_pool.shape[1]
    out = torch.empty(q.shape, dtype=ct, device=q.device)
    for t in range(q.shape[0]):
        n = int(kv_lens[t])
        pos = torch.arange(n, device=q.device)
        slots = block_tables[int(token_seq[t])].long()[pos // bs] * bs + pos % bs
        k = k_pool.reshape(-1, *k_pool.shape[2:])[slots].to(ct)  # [n, H, D]
        v = v_pool.reshape(-1, *v_pool.shape[2:])[slots].to(ct)
        s = torch.einsum("hd,nhd->hn", q[t].to(ct), k) * scale
        if rel is not None:
            buckets = relative_position_bucket(pos - (n - 1), bool(rel.bidirectional), int(rel.num_buckets),
                                               int(rel.max_distance))
            s = s + rel.table.to(ct)[buckets].t()
        out[t] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out.to(q.dtype)


def _check(op: str, q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, token_seq: Tensor,
           kv_lens: Tensor, rel_table: Optional[Tensor], scale: float) -> None:
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        check_float(op, name, t)
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be 3-D [T, H, D], got shape {tuple(q.shape)}")
    T, H, D = q.shape
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has dtype {q.dtype}")
        if t.dim() != 4 or tuple(t.shape[2:]) != (H, D):
            raise ValueError(f"{op}: {name} must be [blocks, block_size, H, D] with H, D = {(H, D)}, got "
                             f"{tuple(t.shape)}")
    if k_pool.shape != v_pool.shape:
        raise ValueError(f"{op}: k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} differ")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim {D} is unsupported; expected {MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
    for name, t, dims in (("block_tables", block_tables, 2), ("token_seq", token_seq, 1), ("kv_lens", kv_lens, 1)):
        if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != dims:
            raise TypeError(f"{op}: {name} must be a {dims}-D int32 tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if token_seq.shape[0] != T or kv_lens.shape[0] != T:
        raise ValueError(f"{op}: token_seq {tuple(token_seq.shape)} and kv_lens {tuple(kv_lens.shape)} must hold "
                         f"one entry per query token ({T})")
    if rel_table is not None:
        check_float(op, "relative_bias.table", rel_table)
        if rel_table.dim() != 2 or rel_table.shape[1] != H:
            raise ValueError(f"{op}: relative_bias.table must be [num_buckets, H={H}], got {tuple(rel_table.shape)}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")


def _check_values(op: str, k_pool: Tensor, block_tables: Tensor, token_seq: Tensor, kv_lens: Tensor) -> int:
    """The index checks (one host read each): returns the longest ``kv_len``."""
    T = token_seq.shape[0]
    if T == 0:
        return 0
    lo, hi = int(kv_lens.min()), int(kv_lens.max())
    if lo < 1:
        raise ValueError(f"{op}: every query must see at least one key (kv_lens >= 1), got min {lo}")
    if hi > block_tables.shape[1] * k_pool.shape[1]:
        raise ValueError(f"{op}: kv_lens reach {hi} but block_tables hold {block_tables.shape[1]} blocks of "
                         f"{k_pool.shape[1]}")
    if int(token_seq.min()) < 0 or int(token_seq.max()) >= block_tables.shape[0]:
        raise ValueError(f"{op}: token_seq must index block_tables' {block_tables.shape[0]} rows")
    if block_tables.numel() and (int(block_tables.min()) < 0 or int(block_tables.max()) >= k_pool.shape[0]):
        raise ValueError(f"{op}: block_tables must hold block ids in [0, {k_pool.shape[0]})")
    return hi


# ----------------------------------------------------------------------------
# The op.


def _run(q, k_pool, v_pool, block_tables, token_seq, kv_lens, scale, rel_table, rel_bidirectional, rel_num_buckets,
         rel_max_distance, num_splits) -> Tensor:
    """The op's body: checks, then Triton, the reference or the CPU path (the eager fast path calls it directly)."""
    op = "paged_attention"
    _check(op, q, k_pool, v_pool, block_tables, token_seq, kv_lens, rel_table, scale)
    max_kv = _check_values(op, k_pool, block_tables, token_seq, kv_lens)
    rel = None if rel_table is None else RelativeBias(rel_table, rel_bidirectional, rel_num_buckets, rel_max_distance)
    if q.shape[0] == 0:
        return q.new_empty(q.shape)
    if use_triton(q) and q.dtype != torch.float64:
        lut = None if rel is None else _rel_lut(rel, q.shape[1])
        return _launch(q, k_pool, v_pool, block_tables, token_seq, kv_lens, max_kv, scale, lut, rel_max_distance,
                       num_splits)
    from ._dispatch import get_backend

    if get_backend() == "reference":
        return _reference(q, k_pool, v_pool, block_tables, token_seq, kv_lens, scale, rel)
    lut = None if rel is None else _rel_lut(rel, q.shape[1])
    return _cpu(q, k_pool, v_pool, block_tables, token_seq, kv_lens, max_kv, scale, lut, rel_max_distance)


@torch.library.custom_op("trifuse::paged_attention", mutates_args=())
def _paged_op(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, token_seq: Tensor, kv_lens: Tensor,
              scale: float, rel_table: Optional[Tensor], rel_bidirectional: bool, rel_num_buckets: int,
              rel_max_distance: int, num_splits: int) -> Tensor:
    return _run(q, k_pool, v_pool, block_tables, token_seq, kv_lens, scale, rel_table, rel_bidirectional,
                rel_num_buckets, rel_max_distance, num_splits)


@_paged_op.register_fake
def _(q, k_pool, v_pool, block_tables, token_seq, kv_lens, scale, rel_table, rel_bidirectional, rel_num_buckets,
      rel_max_distance, num_splits):
    _check("paged_attention", q, k_pool, v_pool, block_tables, token_seq, kv_lens, rel_table, scale)
    return q.new_empty(q.shape)


def _unpack(relative_bias: Optional[RelativeBias]):
    if relative_bias is None:
        return None, False, 32, 128
    if not isinstance(relative_bias, RelativeBias):
        raise TypeError(f"paged_attention: relative_bias must be a kernels.RelativeBias, got "
                        f"{type(relative_bias).__name__}")
    rb = relative_bias
    return rb.table, bool(rb.bidirectional), int(rb.num_buckets), int(rb.max_distance)


def paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, token_seq: Tensor,
                    kv_lens: Tensor, *, scale: Optional[float] = None, relative_bias: Optional[RelativeBias] = None,
                    _num_splits: int = 0) -> Tensor:
    """``softmax(q_t . K_s^T * scale + bias) V_s`` for each query token ``t`` of sequence ``s = token_seq[t]``
    over its first ``kv_lens[t]`` keys, read through ``block_tables``; see the module docstring.

    ``scale`` defaults to ``1/sqrt(D)``. ``_num_splits`` (private) forces up to that many key splits on the
    Triton path (0: automatic). fp64 runs the reference; the ``reference`` backend too.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    table, bidir, nb, md = _unpack(relative_bias)
    args = (q, k_pool, v_pool, block_tables, token_seq, kv_lens, float(scale), table, bidir, nb, md, int(_num_splits))
    if eager_native(q, k_pool, v_pool, block_tables, token_seq, kv_lens, table):  # kernels._dispatch's fast path
        return _run(*args)
    return torch.ops.trifuse.paged_attention(*args)


def paged_attention_reference(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, token_seq: Tensor,
                              kv_lens: Tensor, *, scale: Optional[float] = None,
                              relative_bias: Optional[RelativeBias] = None) -> Tensor:
    """The specification of :func:`paged_attention`: one query token at a time, in fp32 (fp64 for fp64)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    table = _unpack(relative_bias)[0]
    _check("paged_attention_reference", q, k_pool, v_pool, block_tables, token_seq, kv_lens, table, scale)
    _check_values("paged_attention_reference", k_pool, block_tables, token_seq, kv_lens)
    return _reference(q, k_pool, v_pool, block_tables, token_seq, kv_lens, float(scale), relative_bias)
