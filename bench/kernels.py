"""``trifuse bench kernels``: the norm and GELU kernels against PyTorch eager and torch.compile.

Each op runs over a sweep of rows x width; every backend is checked against the
float64 reference and then timed. These ops are memory-bound, so the figure of
merit is GB/s of compulsory traffic (each input read once, each output written
once) as a fraction of the device-to-device copy bandwidth measured in the same
run.

On a machine without a GPU the Triton kernels are checked under Triton's
interpreter but not timed (interpreted timings say nothing about a GPU); the
PyTorch paths are timed on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trifuse import kernels

from .suite import DTYPE_NAMES, Options, SuiteResult, check_and_time, pick_backends, step
from .timing import copy_bandwidth

BACKENDS = ("trifuse", "reference", "eager", "torch-compile")


def _rms_norm_eager(x, w, eps):
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype) * w


@dataclass(frozen=True)
class Op:
    """One benchmarked op: its inputs, our kernel, the PyTorch a user writes today."""

    inputs: tuple[str, ...]  # "x", "r" (residual), "g" (gate): [rows, width]; "w", "b": [width]
    ours: Callable
    eager: Callable
    reference: Callable


OPS = {
    "layer_norm": Op(("x", "w", "b"),
                     lambda x, w, b: kernels.layer_norm(x, w, b),
                     lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b),
                     lambda x, w, b: kernels.layer_norm_reference(x, w, b)),
    "add_layer_norm": Op(("x", "r", "w", "b"),
                         lambda x, r, w, b: kernels.layer_norm(x, w, b, residual=r),
                         lambda x, r, w, b: (F.layer_norm(x + r, (x.shape[-1],), w, b), x + r),
                         lambda x, r, w, b: kernels.layer_norm_reference(x, w, b, residual=r)),
    "add_rms_norm": Op(("x", "r", "w"),
                       lambda x, r, w: kernels.rms_norm(x, w, residual=r),
                       lambda x, r, w: (_rms_norm_eager(x + r, w, 1e-6), x + r),
                       lambda x, r, w: kernels.rms_norm_reference(x, w, residual=r)),
    "bias_gelu": Op(("x", "b"),
                    lambda x, b: kernels.gelu(x, b),
                    lambda x, b: F.gelu(x + b),
                    lambda x, b: kernels.gelu_reference(x, b)),
    "bias_gelu_tanh": Op(("x", "b"),
                         lambda x, b: kernels.gelu(x, b, approximate="tanh"),
                         lambda x, b: F.gelu(x + b, approximate="tanh"),
                         lambda x, b: kernels.gelu_reference(x, b, approximate="tanh")),
    "gated_gelu": Op(("x", "g"),
                     lambda x, g: kernels.gelu(x, gate=g),
                     lambda x, g: F.gelu(x) * g,
                     lambda x, g: kernels.gelu_reference(x, gate=g)),
}


def _make_inputs(op: Op, rows: int, width: int, opts: Options) -> list[torch.Tensor]:
    out = []
    for name in op.inputs:
        shape = (rows, width) if name in ("x", "r", "g") else (width,)
        out.append(torch.randn(shape, device=opts.device, dtype=opts.dtype))
    return out


def _traffic_bytes(args: list[torch.Tensor], ref) -> int:
    """Compulsory traffic: every input read once, every output written once (in the input dtype)."""
    outs = ref if isinstance(ref, tuple) else (ref,)
    return sum(a.numel() * a.element_size() for a in args) + sum(o.numel() for o in outs) * args[0].element_size()


def run(opts: Options) -> SuiteResult:
    gpu = opts.on_gpu
    # Inductor compiles every op at every shape: on a CPU that is minutes, so a quick CPU run leaves it out.
    quick_cpu = opts.quick and not gpu
    backends = pick_backends(opts, BACKENDS, BACKENDS[:-1] if quick_cpu else BACKENDS)
    # Sizes given on the command line are run as given; --quick shortens only the defaults.
    rows_sweep = opts.rows or ([2048, 16384] if gpu else [512])[:1 if opts.quick else None]
    widths = opts.widths or [768, 1024, 4096, 8192][:2 if opts.quick else None]

    notes = []
    if quick_cpu and opts.backends is None:
        notes.append("torch-compile is left out of a quick CPU run (Inductor compiles each op at each shape, "
                     "minutes on 2 cores); --full or --backends ... torch-compile runs it.")
    triton_here = kernels.triton_runnable(opts.device)
    if not gpu:
        notes.append("No GPU: Triton kernels are checked for correctness under Triton's interpreter "
                     "but not timed; Triton timings need a GPU. PyTorch paths are timed on the CPU, "
                     "where small shapes sit in cache and can beat the copy ceiling."
                     if triton_here else
                     "No GPU and no Triton interpreter: the 'trifuse' backend is the PyTorch reference path.")
    ceilings = {"copy_gbps": copy_bandwidth(opts.device)}
    compiled = {}
    rows_out = []
    for op_name, op in OPS.items():
        for n_rows in rows_sweep:
            for width in widths:
                args = _make_inputs(op, n_rows, width, opts)
                ref = op.reference(*[a.double() for a in args])
                base = {"suite": "kernels", "op": op_name, "shape": f"{n_rows}x{width}",
                        "numel": n_rows * width, "dtype": DTYPE_NAMES[opts.dtype]}
                for backend in backends:
                    step(opts, f"{op_name} {n_rows}x{width} {backend}")
                    if backend == "trifuse":
                        fn = lambda: op.ours(*args)  # noqa: E731
                        res = check_and_time(fn, ref, opts, time_it=gpu or not triton_here)
                    elif backend == "reference":
                        def fn():
                            with kernels.use_backend("reference"):
                                return op.ours(*args)
                        res = check_and_time(fn, ref, opts)
                    elif backend == "eager":
                        fn = lambda: op.eager(*args)  # noqa: E731
                        res = check_and_time(fn, ref, opts)
                    else:  # torch-compile: one compiled function per op, recompiled per shape
                        if op_name not in compiled:
                            compiled[op_name] = torch.compile(op.eager, dynamic=False)
                        fn = lambda: compiled[op_name](*args)  # noqa: E731
                        res = check_and_time(fn, ref, opts)
                    row = {**base, "backend": backend, **res}
                    if "median_ms" in res:
                        nbytes = _traffic_bytes(args, ref)
                        row["gbps"] = nbytes / (res["median_ms"] * 1e-3) / 1e9
                        row["frac_of_peak"] = row["gbps"] / ceilings["copy_gbps"]
                    rows_out.append(row)
    title = f"trifuse kernels on {opts.device.type} ({DTYPE_NAMES[opts.dtype]})"
    return SuiteResult(title, rows_out, ceilings, notes)
