"""Fused LayerNorm and RMSNorm over the last dim, optionally with the residual add.

``layer_norm(x, weight, bias, eps, residual)`` and ``rms_norm(x, weight, eps,
residual)``: with ``residual`` the kernel forms ``h = x + residual`` and returns
``(norm(h), h)`` from one pass over memory, the shape a transformer block needs
(post-LN BERT keeps the first, pre-LN GPT-2/ViT keep both). The sum is
normalized in fp32 before it is rounded back to the input dtype.

References: Ba et al. 2016 (LayerNorm), Zhang & Sennrich 2019 (RMSNorm, as in
T5's ``T5LayerNorm``: no mean subtraction, no bias, variance in fp32); the
Triton layer-norm tutorial for the kernel shape.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_eps, check_float, check_like, rows_view
from . import cpu
from ._dispatch import HAS_TRITON, INTERPRET, eager_native, next_power_of_2, path, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _norm_fwd(
        X,  # input rows [M, N], unit column stride
        R,  # residual rows [M, N] (read when HAS_RESIDUAL)
        W,  # weight [N] (read when HAS_WEIGHT)
        B,  # bias [N] (read when HAS_BIAS)
        Y,  # output rows [M, N], contiguous
        H,  # x + residual [M, N], contiguous (written when HAS_RESIDUAL)
        stride_xm, stride_rm, stride_ym, stride_hm,
        M, N, eps,
        IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One program normalizes BLOCK_M whole rows held in registers (BLOCK_N >= N):
        # narrow rows are batched so a program still moves a useful amount of data.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = (rows < M)[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)[:, None]  # row * stride can pass 2**31 on big activations
        cols = cols[None, :]
        x = tl.load(X + rows * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(R + rows * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(H + rows * stride_hm + cols, x.to(H.dtype.element_ty), mask=mask)
        if IS_RMS:
            var = tl.sum(x * x, axis=1) / N
            y = x * tl.rsqrt(var + eps)[:, None]
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)  # two-pass variance: no cancellation
            var = tl.sum(xc * xc, axis=1) / N
            y = xc * tl.rsqrt(var + eps)[:, None]
        if HAS_WEIGHT:
            y *= tl.load(W + cols, mask=col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=col_ok[None, :], other=0.0).to(tl.float32)
        tl.store(Y + rows * stride_ym + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _load_sum(X, R, row, stride_xm, stride_rm, cols, mask, HAS_RESIDUAL: tl.constexpr):
        # x (+ residual) for one chunk of a row, in fp32; every sweep of the looped
        # kernel recomputes it so all sweeps see exactly the same unrounded sum.
        x = tl.load(X + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(R + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _norm_fwd_looped(
        X, R, W, B, Y, H,  # as in _norm_fwd
        stride_xm, stride_rm, stride_ym, stride_hm,
        M, N, eps,
        IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # Rows wider than registers hold: one program per row, sweeping it in chunks
        # (mean, then centred variance, then normalize), trading re-reads for accuracy.
        row = tl.program_id(0).to(tl.int64)
        mean = 0.0
        if not IS_RMS:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = _load_sum(X, R, row, stride_xm, stride_rm, cols, mask, HAS_RESIDUAL)
                if HAS_RESIDUAL:
                    tl.store(H + row * stride_hm + cols, x.to(H.dtype.element_ty), mask=mask)
                acc += x
            mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = _load_sum(X, R, row, stride_xm, stride_rm, cols, mask, HAS_RESIDUAL)
            if IS_RMS and HAS_RESIDUAL:
                tl.store(H + row * stride_hm + cols, x.to(H.dtype.element_ty), mask=mask)
            xc = tl.where(mask, x - mean, 0.0)
            acc += xc * xc
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = _load_sum(X, R, row, stride_xm, stride_rm, cols, mask, HAS_RESIDUAL)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                y *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + row * stride_ym + cols, y.to(Y.dtype.element_ty), mask=mask)


#: Widest row normalized from registers in one pass; wider rows take the looped kernel.
MAX_FUSED_WIDTH = 16384
#: Elements one program of the one-pass kernel aims to hold (rows x padded width). The
#: interpreter runs a program as vectorized numpy, so there fewer, larger tiles are cheaper.
_TILE_ELEMENTS = 32768 if INTERPRET else 4096


def _launch(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
            bias: Optional[Tensor], eps: float, rms: bool) -> Tuple[Tensor, Optional[Tensor]]:
    n = x.shape[-1]
    x2 = rows_view(x)
    r2 = rows_view(residual) if residual is not None else None
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    if m == 0 or n == 0:
        return y, h
    y2 = y.view(m, n)
    h2 = h.view(m, n) if h is not None else y2
    # Pointers that the kernel never reads still need a valid tensor argument.
    r_arg = r2 if r2 is not None else x2
    w_arg = weight.contiguous() if weight is not None else x2
    b_arg = bias.contiguous() if bias is not None else x2
    flags = dict(IS_RMS=rms, HAS_RESIDUAL=residual is not None,
                 HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None)
    args = (x2, r_arg, w_arg, b_arg, y2, h2,
            x2.stride(0), r_arg.stride(0), y2.stride(0), h2.stride(0), m, n, eps)
    block_n = next_power_of_2(n)
    if block_n <= MAX_FUSED_WIDTH:
        block_m = min(max(1, _TILE_ELEMENTS // block_n), next_power_of_2(m))
        num_warps = min(16, max(1, block_m * block_n // 512))
        _norm_fwd[(triton.cdiv(m, block_m),)](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                                                num_warps=num_warps)
    else:
        _norm_fwd_looped[(m,)](*args, **flags, BLOCK_N=4096, num_warps=16)
    return y, h


# ----------------------------------------------------------------------------
# The specification.


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layer_norm_reference(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                         eps: float = 1e-5, residual: Optional[Tensor] = None):
    """LayerNorm of ``x`` (or of ``x + residual``) over the last dim, in fp32 (fp64 for fp64).

    Returns ``y``, or ``(y, h)`` with ``h = x + residual`` in ``x``'s dtype.
    """
    ct = _compute_dtype(x)
    h = x.to(ct) if residual is None else x.to(ct) + residual.to(ct)
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).square().mean(-1, keepdim=True)
    y = (h - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    y = y.to(x.dtype)
    return y if residual is None else (y, h.to(x.dtype))


def rms_norm_reference(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6,
                       residual: Optional[Tensor] = None):
    """T5's RMSNorm of ``x`` (or of ``x + residual``): ``h / sqrt(mean(h^2) + eps) * weight``."""
    ct = _compute_dtype(x)
    h = x.to(ct) if residual is None else x.to(ct) + residual.to(ct)
    y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(ct)
    y = y.to(x.dtype)
    return y if residual is None else (y, h.to(x.dtype))


# ----------------------------------------------------------------------------
# The ops.


def _check(op: str, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
           bias: Optional[Tensor], eps: float) -> None:
    check_float(op, "x", x)
    shape = x.shape
    if not shape:
        raise ValueError(f"{op}: x must have at least one dimension")
    check_like(op, "residual", residual, x, "x")
    n = (shape[-1],)
    # Parameters may be kept in another float dtype than the activations (fp32 weights
    # with fp16 activations is common); the kernel reads them in fp32 either way.
    check_like(op, "weight", weight, x, "x", shape=n, same_dtype=False)
    check_like(op, "bias", bias, x, "x", shape=n, same_dtype=False)
    check_eps(op, eps)


def _fused_reference(x, residual, weight, bias, eps, rms):
    """The references' contract (fp32 math, fp64 for fp64) through PyTorch's fused native norms:
    what the ops run where Triton does not. Same result to rounding, several times faster on the
    CPU than the step-by-step specification above."""
    ct = _compute_dtype(x)
    h = x.to(ct) if residual is None else x.to(ct) + residual.to(ct)
    w = None if weight is None else weight.to(ct)
    if rms:
        y = F.rms_norm(h, (h.shape[-1],), w, eps)
    else:
        y = F.layer_norm(h, (h.shape[-1],), w, None if bias is None else bias.to(ct), eps)
    return y.to(x.dtype).contiguous(), None if residual is None else h.to(x.dtype).contiguous()


def _run(op, x, residual, weight, bias, eps, rms):
    _check(op, x, residual, weight, bias, eps)
    if use_triton(x) and x.dtype != torch.float64:
        return _launch(x, residual, weight, bias, eps, rms)
    if x.dtype != torch.float64 and path(x) == "native":
        return cpu.norm(x, residual, weight, bias, eps, rms)
    return _fused_reference(x, residual, weight, bias, eps, rms)


@torch.library.custom_op("trifuse::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return _run("layer_norm", x, None, weight, bias, eps, rms=False)[0]


@torch.library.custom_op("trifuse::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       eps: float) -> Tuple[Tensor, Tensor]:
    return _run("layer_norm", x, residual, weight, bias, eps, rms=False)


@torch.library.custom_op("trifuse::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    return _run("rms_norm", x, None, weight, None, eps, rms=True)[0]


@torch.library.custom_op("trifuse::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    return _run("rms_norm", x, residual, weight, None, eps, rms=True)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    _check("layer_norm", x, None, weight, bias, eps)
    return x.new_empty(x.shape)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    _check("layer_norm", x, residual, weight, bias, eps)
    return x.new_empty(x.shape), x.new_empty(x.shape)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    _check("rms_norm", x, None, weight, None, eps)
    return x.new_empty(x.shape)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    _check("rms_norm", x, residual, weight, None, eps)
    return x.new_empty(x.shape), x.new_empty(x.shape)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, residual: Optional[Tensor] = None):
    """LayerNorm over the last dim of ``x``; ``weight``/``bias`` of shape ``[N]`` or None.

    With ``residual`` (same shape and dtype as ``x``) returns ``(layer_norm(x + residual), x + residual)``
    computed in one pass. Any float dtype in, the same dtype out, fp32 math inside.
    """
    if eager_native(x, residual, weight, bias):  # the eager fast path (kernels._dispatch.eager_native)
        _check("layer_norm", x, residual, weight, bias, eps)
        y, h = cpu.norm(x, residual, weight, bias, eps, False)
        return y if residual is None else (y, h)
    if residual is None:
        return torch.ops.trifuse.layer_norm(x, weight, bias, eps)
    y, h = torch.ops.trifuse.add_layer_norm(x, residual, weight, bias, eps)
    return y, h


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6,
             residual: Optional[Tensor] = None):
    """T5's RMSNorm over the last dim of ``x`` (no mean subtraction, no bias, fp32 variance).

    With ``residual`` returns ``(rms_norm(x + residual), x + residual)`` computed in one pass.
    """
    if eager_native(x, residual, weight):
        _check("rms_norm", x, residual, weight, None, eps)
        y, h = cpu.norm(x, residual, weight, None, eps, True)
        return y if residual is None else (y, h)
    if residual is None:
        return torch.ops.trifuse.rms_norm(x, weight, eps)
    y, h = torch.ops.trifuse.add_rms_norm(x, residual, weight, eps)
    return y, h
