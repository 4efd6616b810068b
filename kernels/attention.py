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

from ._checks import check_float, check_qkv
from . import cpu
from ._buckets import relative_position_bucket  # re-exported: kernels.relative_position_bucket
from ._dispatch import HAS_TRITON, INTERPRET, eager_native, next_power_of_2, path, use_triton

LOG2E = 1.4426950408889634

_HAS_DESCRIPTORS = False
if HAS_TRITON:  # the kernels, under the names the launcher (and bench/static/aot_hopper.py) patch
    import triton

    from ._attention_triton import HAS_DESCRIPTORS as _HAS_DESCRIPTORS
    from ._attention_triton import _attn_combine, _attn_fwd
    from ._attention_triton import attn_fwd_tuned as _attn_fwd_tuned


# ----------------------------------------------------------------------------
# The launcher.

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
        # Not for T5's decode step, where descriptors save nothing and the GPU image's Triton
        # spills with them (docs/kernels.md).
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
           num_splits: int = 0, qkv_checked: bool = False) -> None:
    """Every argument's check; ``qkv_checked``: :func:`_check_qkv` passed already (the wrapper's :func:`_unpack`)."""
    if not qkv_checked:
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
    check_qkv(op, q, k, v, "B, H, L, D")
    qs, ks, vs = q.shape, k.shape, v.shape
    # One comparison for the common case; the loop below finds what to say when it fails.
    if not (ks[0] == vs[0] == qs[0] and ks[1] == vs[1] == qs[1] and ks[3] == vs[3] == qs[3]):
        for name, t in (("k", k), ("v", v)):
            for dim, what in ((0, "batch size"), (1, "number of heads"), (3, "head dim")):
                if t.shape[dim] != q.shape[dim]:
                    raise ValueError(
                        f"{op}: {name} has {what} {t.shape[dim]} but q has {q.shape[dim]} "
                        f"(q {tuple(q.shape)}, {name} {tuple(t.shape)})"
                    )
    if vs[2] != ks[2]:
        raise ValueError(f"{op}: k has {ks[2]} keys but v has {vs[2]} values")
    if ks[2] == 0:
        raise ValueError(f"{op}: k and v must hold at least one key")
    d = qs[3]
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
    fast = eager_native(q, k, v, attention_mask, bias, table)  # the eager fast path (kernels._dispatch)
    if table is not None and (fast or q.dtype != torch.float64 and path(q) == "native"):
        _check(op, q, k, v, attention_mask, bias, table, nb, md, scale, int(_num_splits), qkv_checked=True)
        dense = relative_bias.dense(q.shape[2], k.shape[2], q.dtype)  # shared by every layer's call
        bias, table = (dense if bias is None else bias.to(q.dtype) + dense), None
    elif fast:
        _check(op, q, k, v, attention_mask, bias, None, nb, md, scale, int(_num_splits), qkv_checked=True)
    if fast:
        return cpu.attention(q, k, v, attention_mask, bias, None, bidir, nb, md, qoff, bool(causal), scale)
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
    _check(op, q, k, v, attention_mask, bias, table, nb, md, scale, qkv_checked=True)
    return _reference(q, k, v, attention_mask, bias, table, bidir, nb, md, qoff, bool(causal), scale)
