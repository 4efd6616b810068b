"""Fused bias + GELU, optionally gated: ``gelu(x + bias) * gate``.

Covers the feed-forward activations of the engine's models: BERT and ViT (exact,
erf), GPT-2 (``gelu_new``, the tanh approximation) and T5 v1.1 / FLAN-T5 (gated
GELU, ``gelu(x W0) * (x W1)``). The bias add of the preceding projection is
folded in so the activation is one read and one write.

Reference: Hendrycks & Gimpel 2016, "Gaussian Error Linear Units".
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_float, check_like, rows_view
from . import cpu
from ._dispatch import HAS_TRITON, INTERPRET, eager_native, next_power_of_2, path, use_triton

APPROXIMATIONS = ("none", "tanh")

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gelu_fwd(
        X,  # input rows [M, N], unit column stride
        B,  # bias [N] (read when HAS_BIAS)
        G,  # gate rows [M, N] (read when HAS_GATE)
        Y,  # output rows [M, N], contiguous
        stride_xm, stride_gm, stride_ym,
        M, N,
        HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, TANH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = (rows < M)[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)[:, None]
        cols2 = cols[None, :]
        x = tl.load(X + rows * stride_xm + cols2, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if TANH:
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) * (...)
            # tanh(u) = 1 - 2 / (exp(2u) + 1); |u| <= 20 already gives +-1 in fp32, and the
            # clamp keeps exp from overflowing to inf.
            u = tl.minimum(tl.maximum(u, -20.0), 20.0)
            t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
            y = 0.5 * x * (1.0 + t)
        else:
            y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        if HAS_GATE:
            y *= tl.load(G + rows * stride_gm + cols2, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + rows * stride_ym + cols2, y.to(Y.dtype.element_ty), mask=mask)


_MAX_BLOCK_N = 1024
_TILE_ELEMENTS = 32768 if INTERPRET else 4096  # see kernels/norm.py


def _launch(x: Tensor, bias: Optional[Tensor], gate: Optional[Tensor], approximate: str) -> Tensor:
    n = x.shape[-1]
    x2 = rows_view(x)
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    y2 = y.view(m, n)
    g2 = rows_view(gate) if gate is not None else x2
    b_arg = bias.contiguous() if bias is not None else x2
    block_n = min(next_power_of_2(n), _MAX_BLOCK_N)
    block_m = min(max(1, _TILE_ELEMENTS // block_n), next_power_of_2(m))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gelu_fwd[grid](x2, b_arg, g2, y2, x2.stride(0), g2.stride(0), y2.stride(0), m, n,
                    HAS_BIAS=bias is not None, HAS_GATE=gate is not None,
                    TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n,
                    num_warps=min(8, max(1, block_m * block_n // 512)))
    return y


def gelu_reference(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none",
                   gate: Optional[Tensor] = None) -> Tensor:
    """``gelu(x + bias) * gate`` in fp32 (fp64 for fp64), returned in ``x``'s dtype."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(ct)
    if bias is not None:
        h = h + bias.to(ct)
    if approximate == "tanh":
        y = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h.pow(3))))
    else:
        y = 0.5 * h * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
    if gate is not None:
        y = y * gate.to(ct)
    return y.to(x.dtype)


def _check(x: Tensor, bias: Optional[Tensor], gate: Optional[Tensor], approximate: str) -> None:
    check_float("gelu", "x", x)
    shape = x.shape
    if not shape:
        raise ValueError("gelu: x must have at least one dimension")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"gelu: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    check_like("gelu", "bias", bias, x, "x", shape=(shape[-1],), same_dtype=False)
    check_like("gelu", "gate", gate, x, "x")


@torch.library.custom_op("trifuse::gelu", mutates_args=())
def _gelu_op(x: Tensor, bias: Optional[Tensor], gate: Optional[Tensor], approximate: str) -> Tensor:
    _check(x, bias, gate, approximate)
    if use_triton(x) and x.dtype != torch.float64:
        return _launch(x, bias, gate, approximate)
    if x.dtype != torch.float64 and path(x) == "native":
        return cpu.gelu(x, bias, gate, approximate)
    return gelu_reference(x, bias, approximate, gate).contiguous()


@_gelu_op.register_fake
def _(x, bias, gate, approximate):
    _check(x, bias, gate, approximate)
    return x.new_empty(x.shape)


def gelu(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none",
         gate: Optional[Tensor] = None) -> Tensor:
    """``gelu(x + bias)``, times ``gate`` when given (T5 v1.1's gated GELU).

    ``approximate="none"`` is the exact erf form (BERT, ViT), ``"tanh"`` the tanh
    approximation (GPT-2's ``gelu_new``). ``bias`` is ``[N]`` over the last dim;
    ``gate`` has ``x``'s shape and dtype.
    """
    if eager_native(x, bias, gate):  # the eager fast path (kernels._dispatch.eager_native)
        _check(x, bias, gate, approximate)
        return cpu.gelu(x, bias, gate, approximate)
    return torch.ops.trifuse.gelu(x, bias, gate, approximate)
