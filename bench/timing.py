"""Timing done right: warm-up, many samples, robust statistics, noise flagged, measured ceilings.

On CUDA every sample is bracketed by CUDA events and the L2 cache is flushed
before it (as ``triton.testing.do_bench`` does), so a memory-bound kernel is not
credited with bandwidth it got from the cache. On the CPU samples come from the
monotonic ``perf_counter_ns`` with torch's intra-op threads pinned (1 by default):
on a shared machine more threads than free cores turn a timing into a measure of
the scheduler. The iteration count adapts to the op's cost so each measurement
takes about ``min_time_s``.

A measurement is *noisy*, and says why (:meth:`Timing.noise`), when its p10..p90
band is wide against its median, when the consecutive repeats its samples fall
into disagree, or (CPU) when the load average before or after it says other work
wanted more cores than there are. A noisy row is reported as such, never as a result.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

_L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any current GPU's L2 (H100: 50 MB)

DEFAULT_CPU_THREADS = 1  # torch intra-op threads while timing on the CPU (and ONNX Runtime's)
SPREAD_MAX = 0.5  # (p90 - p10) / median above this: noisy
REPEATS = 3  # consecutive runs the samples are split into (when there are at least 2 samples each)
REPEAT_MAX = 1.25  # slowest / fastest repeat median above this: noisy


@dataclass
class Timing:
    """Samples of one measurement, in milliseconds, and their summary."""

    samples_ms: np.ndarray
    cold_ms: Optional[float] = None  # the first call: compilation, autotuning, capture
    threads: Optional[int] = None  # CPU: torch intra-op threads while timing
    load: Optional[tuple[float, float]] = None  # CPU: 1-minute load average before and after
    cpus: Optional[int] = None  # CPU: logical CPUs of the machine (what the load average counts against)

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

    @property
    def spread(self) -> float:
        """The p10..p90 band relative to the median."""
        return (self.percentile(90) - self.percentile(10)) / self.median if self.median > 0 else 0.0

    def repeat_medians(self) -> list[float]:
        """Medians of the :data:`REPEATS` consecutive runs the samples fall into (none if too few)."""
        if len(self.samples_ms) < 2 * REPEATS:
            return []
        return [float(np.median(c)) for c in np.array_split(self.samples_ms, REPEATS)]

    def noise(self) -> Optional[str]:
        """Why this measurement cannot be trusted, or None."""
        why = []
        if self.spread > SPREAD_MAX:
            why.append(f"p10-p90 spread {self.spread:.0%} of the median")
        reps = self.repeat_medians()
        if reps and min(reps) > 0 and max(reps) / min(reps) > REPEAT_MAX:
            why.append("repeats disagree (" + " / ".join(f"{m:.3g}" for m in reps) + " ms)")
        if self.load and self.cpus and max(self.load) > self.cpus:
            why.append(f"load average {self.load[0]:.1f} -> {self.load[1]:.1f} on {self.cpus} CPUs")
        return "; ".join(why) or None

    def status(self) -> str:
        """A row's status: ``ok``, or ``noisy: <why>``."""
        why = self.noise()
        return f"noisy: {why}" if why else "ok"

    def summary(self) -> dict:
        out = {
            "median_ms": self.median,
            "p10_ms": self.percentile(10),
            "p90_ms": self.percentile(90),
            "p99_ms": self.percentile(99),
            "mean_ms": self.mean,
            "std_ms": self.std,
            "cv": self.cv,
            "spread": self.spread,
            "iters": int(len(self.samples_ms)),
            "cold_ms": self.cold_ms,
        }
        if self.threads is not None:
            out["threads"] = self.threads
        if self.load is not None:
            out["load_before"], out["load_after"] = self.load
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:  # not on this platform
        return None


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's intra-op threads set to ``n`` for the block."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 10,
            min_time_s: float = 0.25, min_iters: int = 10, max_iters: int = 1000,
            flush_l2: bool = True, threads: Optional[int] = None, max_time_s: float = 30.0) -> Timing:
    """Time ``fn()`` on ``device``; the first call is reported apart as ``cold_ms``.

    ``max_time_s`` bounds a slow call's measurement (a padded batch of a base-size model on one CPU
    thread takes seconds a call): warm-up stops after a quarter of it, and the samples are cut to fit
    it, never below :data:`MIN_SLOW_SAMPLES`. Calls fast enough for ``min_iters`` within it are
    measured as before.

    On the CPU torch runs ``threads`` intra-op threads (default :data:`DEFAULT_CPU_THREADS`)
    for the whole measurement, and the load average is read before and after it.
    """
    device = torch.device(device)
    if device.type == "cpu":
        n = threads or DEFAULT_CPU_THREADS
        before = _loadavg()
        with cpu_threads(n):
            t = _measure(fn, device, warmup, min_time_s, min_iters, max_iters, flush_l2, max_time_s)
        after = _loadavg()
        t.threads, t.cpus = n, os.cpu_count()
        if before is not None and after is not None:
            t.load = (before, after)
        return t
    return _measure(fn, device, warmup, min_time_s, min_iters, max_iters, flush_l2, max_time_s)


#: The fewest samples a slow call gets under ``max_time_s`` (a median and a spread).
MIN_SLOW_SAMPLES = 3


def _measure(fn, device, warmup, min_time_s, min_iters, max_iters, flush_l2, max_time_s=30.0) -> Timing:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    cold_ms = (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    done = 0
    while done < warmup and (done == 0 or time.perf_counter() - t0 < max_time_s / 4):
        fn()
        done += 1
    _sync(device)
    # Without warm-up calls the cold call is the only estimate of the cost (an overestimate).
    per_call = max((time.perf_counter() - t0) / done if done else cold_ms * 1e-3, 1e-7)
    iters = int(min(max_iters, max(min_iters, min_time_s / per_call)))
    if iters * per_call > max_time_s:
        iters = max(min(iters, MIN_SLOW_SAMPLES), int(max_time_s / per_call))

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
