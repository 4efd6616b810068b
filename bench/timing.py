"""Timing done right: warm-up, many samples, robust statistics, measured ceilings.

On CUDA every sample is bracketed by CUDA events and the L2 cache is flushed
before it (as ``triton.testing.do_bench`` does), so a memory-bound kernel is not
credited with bandwidth it got from the cache. On the CPU samples come from the
monotonic ``perf_counter_ns``. The iteration count adapts to the op's cost so
each measurement takes about ``min_time_s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

_L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2 (H100: 50 MB)


@dataclass
class Timing:
    """Samples of one measurement, in milliseconds, and their summary."""

    samples_ms: np.ndarray
    cold_ms: Optional[float] = None  # the first call: compilation, autotuning, capture

    @property
    def median(self) -> float:
        return float(np.median(self.samples_ms))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples_ms))

    @property
    def std(self) -> float:
        return float(np.std(self.samples_ms, ddof=1)) if len(self.samples_ms) > 1 else 0.0

    @property
    def cv(self) -> float:
        """Coefficient of variation: the spread relative to the mean."""
        return self.std / self.mean if self.mean > 0 else 0.0

    def summary(self) -> dict:
        return {
            "median_ms": self.median,
            "p10_ms": self.percentile(10),
            "p90_ms": self.percentile(90),
            "p99_ms": self.percentile(99),
            "mean_ms": self.mean,
            "std_ms": self.std,
            "cv": self.cv,
            "iters": int(len(self.samples_ms)),
            "cold_ms": self.cold_ms,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 10,
            min_time_s: float = 0.25, min_iters: int = 10, max_iters: int = 1000,
            flush_l2: bool = True) -> Timing:
    """Time ``fn()`` on ``device``; the first call is reported apart as ``cold_ms``."""
    device = torch.device(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    cold_ms = (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    per_call = max((time.perf_counter() - t0) / max(warmup, 1), 1e-7)
    iters = int(min(max_iters, max(min_iters, min_time_s / per_call)))

    if device.type == "cuda":
        samples = _cuda_samples(fn, device, iters, flush_l2)
    else:
        samples = np.empty(iters)
        for i in range(iters):
            t = time.perf_counter_ns()
            fn()
            samples[i] = (time.perf_counter_ns() - t) / 1e6
    return Timing(samples, cold_ms)


def _cuda_samples(fn, device, iters, flush_l2) -> np.ndarray:
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return np.array([s.elapsed_time(e) for s, e in zip(starts, ends)])


# ----------------------------------------------------------------------------
# Ceilings measured in the same run, so "fraction of peak" is against this
# device as it behaves now (clocks, power cap), not a datasheet.


def copy_bandwidth(device: torch.device | str, nbytes: Optional[int] = None) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=5, min_iters=20, max_iters=200, flush_l2=False)
    return 2 * nbytes / (t.median * 1e-3) / 1e9


def matmul_peak(device: torch.device | str, dtype: torch.dtype = torch.float16, n: Optional[int] = None) -> float:
    """Dense matmul throughput in TFLOP/s on a large square problem."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, warmup=5, min_iters=20, max_iters=200, flush_l2=False)
    return 2 * n**3 / (t.median * 1e-3) / 1e12
