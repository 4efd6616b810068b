"""Input checks shared by the ops: each failure names the argument and the problem.

They run in both the real and the fake (meta) implementation of every custom op,
so torch.export / torch.compile report bad input while tracing, too.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got {t.dtype}"
        )


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> None:
    """Attention's inputs: float tensors with one dim per name in ``layout`` (``"B, H, L, D"``),
    ``k`` and ``v`` in ``q``'s dtype and on its device. Shapes beyond the rank are the op's to check."""
    ndim = layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, t)
        if t.dim() != ndim:
            raise ValueError(f"{op}: {name} must be {ndim}-D [{layout}], got shape {tuple(t.shape)}")
    dtype, device = q.dtype, q.device
    if k.dtype is dtype and v.dtype is dtype and k.device == device and v.device == device:
        return  # the common case, in four comparisons; the loop below says what is wrong otherwise
    for name, t in (("k", k), ("v", v)):
        if t.dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has dtype {dtype}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {device}")


def check_like(op: str, name: str, t: Optional[torch.Tensor], ref: torch.Tensor, ref_name: str,
               *, shape: Optional[Sequence[int]] = None, same_dtype: bool = True) -> None:
    """``t`` (if given) is a float tensor on ``ref``'s device, of ``shape`` (default: ``ref``'s)."""
    if t is None:
        return
    check_float(op, name, t)
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    want = ref.shape if shape is None else shape  # torch.Size is a tuple: no conversion on the way
    if t.shape != want:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(want)}")


def check_eps(op: str, eps: float) -> None:
    if not eps >= 0.0:  # also rejects NaN
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, width]`` with unit column stride, without a copy when the layout allows.

    A row stride (e.g. a slice of a wider buffer) is kept; only a non-unit column
    stride or leading dims that do not flatten force a copy.
    """
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2
