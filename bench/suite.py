"""What every benchmark suite shares: its options, its result, and the
check-then-time step each backend goes through.

A suite is a module with ``run(opts: Options) -> SuiteResult``. A backend's
output is compared with the float64 reference before it is timed; one that does
not match is reported as a mismatch and not timed, so a fast wrong answer never
shows up as a speed-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .timing import measure

# Largest |out - ref| <= atol + rtol * |ref| a backend may show against the float64
# reference; loose enough for any correct kernel in that dtype, tight enough to
# catch a wrong one.
CHECK_TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 6e-2),
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Options:
    device: torch.device
    dtype: torch.dtype
    backends: Optional[list[str]] = None  # None: the suite's defaults for this device
    quick: bool = False  # fewer shapes and shorter timings, for a smoke run
    warmup: int = 10
    min_time_s: float = 0.25
    # Sweep axes; None: the suite's defaults for this device.
    rows: Optional[list[int]] = None
    widths: Optional[list[int]] = None
    batch: Optional[list[int]] = None
    seq: Optional[list[int]] = None
    head_dims: Optional[list[int]] = None

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class SuiteResult:
    title: str
    rows: list[dict]
    ceilings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def max_abs_error(out, ref) -> float:
    return max((o.double() - r.double()).abs().max().item() if o.numel() else 0.0
               for o, r in zip(_as_tuple(out), _as_tuple(ref)))


def matches(out, ref, dtype: torch.dtype) -> bool:
    atol, rtol = CHECK_TOL[dtype]
    outs, refs = _as_tuple(out), _as_tuple(ref)
    return len(outs) == len(refs) and all(
        o.shape == r.shape and torch.allclose(o.double(), r.double().to(o.device), atol=atol, rtol=rtol)
        for o, r in zip(outs, refs))


def check_and_time(fn: Callable[[], object], ref, opts: Options, *, time_it: bool = True,
                   device: Optional[torch.device] = None) -> dict:
    """Run ``fn`` once and compare with ``ref``; time it only if it matches.

    Returns the row fields: ``status``, ``max_abs_err`` and the timing summary.
    """
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - a backend that fails is a result, not a crash
        return {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    err = max_abs_error(out, ref)
    if not matches(out, ref, opts.dtype):
        return {"status": "mismatch", "max_abs_err": err}
    if not time_it:
        return {"status": "checked", "max_abs_err": err}
    t = measure(fn, device or opts.device, warmup=2 if opts.quick else opts.warmup,
                min_time_s=0.02 if opts.quick else opts.min_time_s)
    return {"status": "ok", "max_abs_err": err, **t.summary()}


def pick_backends(opts: Options, available: Sequence[str], default: Sequence[str]) -> list[str]:
    if opts.backends is None:
        return list(default)
    unknown = [b for b in opts.backends if b not in available]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; this suite has {list(available)}")
    return list(opts.backends)
