"""``trifuse bench attention``: the fused attention kernel against PyTorch's attention backends.

Workloads (``op`` in the rows):

* ``attn`` / ``attn-causal``: prefill, ``Lq == Lk`` swept 128..16k for head dims
  64 and 128, at a fixed token budget (``B * L = 16k``, ``H = 2048 / D``), the
  FlashAttention benchmark convention. Figure of merit: forward TFLOP/s with
  FLOPs = ``4 * B * H * Lq * Lk * D`` (halved for causal), and its fraction of the
  dense fp16/bf16 matmul throughput measured in the same run.
* ``attn-t5`` / ``attn-t5-causal``: the same with T5's relative position bias
  (scale 1.0, 32 buckets, max distance 128), computed in-kernel by trifuse,
  through a ``score_mod`` by FlexAttention, and as a materialized
  ``[1, H, L, L]`` bias by SDPA (the bias is built once outside the timed call,
  as Hugging Face builds it once per forward).
* ``decode``: one query token against a cache of 512..16k keys at batch 1,
  reported as GB/s of K/V read against the measured copy bandwidth. ``trifuse``
  picks split-K itself; ``trifuse-nosplit`` forces one program per (batch, head).

``trifuse-notma`` (not in the defaults) is the same kernel reading K/V with pointer
loads instead of Hopper's tensor-memory accelerator, to time the two side by side.

Backends: ``trifuse``, ``reference`` (our PyTorch specification; only where the
scores fit), ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn`` (SDPA pinned to
one backend with ``torch.nn.attention.sdpa_kernel``), ``sdpa-dense-bias`` (T5
rows), ``flex`` (``torch.compile``'d FlexAttention). Every backend's output is
checked against the float64 reference before it is timed; a mismatch is
reported, not timed. Large problems are checked on the last 64 query rows,
which keeps the reference small and is exact for bottom-right causal masks and
T5's default query offset.

On a machine without a GPU the Triton kernel is checked under Triton's
interpreter on small shapes but not timed; only the PyTorch paths are timed.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from trifuse import kernels
from trifuse.kernels import RelativeBias, triton_runnable

from .suite import DTYPE_NAMES, Options, SuiteResult, check_and_time, pick_backends, step
from .timing import copy_bandwidth, matmul_peak

BACKENDS = ("trifuse", "trifuse-nosplit", "trifuse-notma", "reference", "sdpa", "sdpa-flash",
            "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "sdpa-dense-bias", "flex")
GPU_DEFAULT = ("trifuse", "trifuse-nosplit", "reference", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
               "sdpa-dense-bias", "flex")
CPU_DEFAULT = ("trifuse", "reference", "sdpa", "sdpa-dense-bias")

TOKENS = 16384  # B * L of a prefill row (FlashAttention's benchmark convention)
HIDDEN = 2048  # H * D
T5_BUCKETS, T5_MAX_DISTANCE = 32, 128
CHECK_ROWS = 64  # query rows checked against float64 when the full reference is too big
FULL_CHECK_SCORES = 1 << 24  # B*H*Lq*Lk up to which the whole output is checked
REFERENCE_MAX_BYTES = 8 << 30  # the 'reference' backend materializes fp32 scores (and a few temporaries)
DENSE_BIAS_MAX_BYTES = 24 << 30


def _sdpa_backends() -> dict:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return {}
    named = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
             "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in named.items() if hasattr(SDPBackend, v)}


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, create_block_mask


@contextlib.contextmanager
def _recompile_budget(n: int = 512):
    """Every shape of the sweep is one more compile of FlexAttention: raise dynamo's limit."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    old = getattr(cfg, name)
    setattr(cfg, name, max(old, n))
    try:
        yield
    finally:
        setattr(cfg, name, old)


def _t5_lut(table: torch.Tensor, bidirectional: bool) -> torch.Tensor:
    """[H, 2R+1] bias by signed distance -R..R (R = max distance, where buckets saturate)."""
    R = T5_MAX_DISTANCE
    buckets = kernels.relative_position_bucket(torch.arange(-R, R + 1, device=table.device),
                                               bidirectional, T5_BUCKETS, R)
    return table[buckets].t().contiguous()


def _dense_t5_bias(table: torch.Tensor, bidirectional: bool, Lq: int, Lk: int) -> torch.Tensor:
    """[1, H, Lq, Lk]: what Hugging Face's T5 materializes (default query offset Lk - Lq)."""
    rp = torch.arange(Lk, device=table.device)[None, :] - (torch.arange(Lq, device=table.device)[:, None] + Lk - Lq)
    buckets = kernels.relative_position_bucket(rp, bidirectional, T5_BUCKETS, T5_MAX_DISTANCE)
    return table[buckets].permute(2, 0, 1)[None]


def _reference(q, k, v, causal, rel, rows: Optional[int]):
    """float64 reference of the whole output, or of its last ``rows`` query rows."""
    if rows is not None:
        q = q[:, :, -rows:]  # bottom-right causal and T5's default offset stay exact on the last rows
    if rel is not None:
        rel = RelativeBias(rel.table.double(), rel.bidirectional, rel.num_buckets, rel.max_distance)
    return kernels.attention_reference(q.double(), k.double(), v.double(), causal=causal,
                                       relative_bias=rel, scale=1.0 if rel is not None else None)


def _problem_row(op: str, B: int, H: int, Lq: int, Lk: int, D: int, opts: Options) -> dict:
    return {"suite": "attention", "op": op, "shape": f"{B}x{H}x{Lq}x{Lk}x{D}", "numel": B * H * Lk * D,
            "dtype": DTYPE_NAMES[opts.dtype], "b": B, "h": H, "lq": Lq, "lk": Lk, "d": D}


def _backend_fns(op: str, q, k, v, causal: bool, rel: Optional[RelativeBias], backends: list[str],
                 on_gpu: bool, compiled_flex) -> dict[str, Callable | str]:
    """Backend name -> a zero-argument callable, or a string saying why it does not run here."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 if rel is not None else None
    decode = op == "decode"
    fns: dict = {}
    for name in backends:
        if name == "trifuse":
            fns[name] = lambda: kernels.attention(q, k, v, causal=causal, relative_bias=rel, scale=scale)
        elif name == "trifuse-notma":
            def notma_fn():
                with kernels.attention_tma(False):
                    return kernels.attention(q, k, v, causal=causal, relative_bias=rel, scale=scale)
            fns[name] = notma_fn
        elif name == "trifuse-nosplit":
            if decode:
                fns[name] = lambda: kernels.attention(q, k, v, causal=causal, _num_splits=1)
        elif name == "reference":
            if B * H * Lq * Lk * 4 * 3 > REFERENCE_MAX_BYTES:
                fns[name] = "skipped: materialized scores too large"
            else:
                def ref_fn():
                    with kernels.use_backend("reference"):
                        return kernels.attention(q, k, v, causal=causal, relative_bias=rel, scale=scale)
                fns[name] = ref_fn
        elif name.startswith("sdpa") and name != "sdpa-dense-bias":
            if rel is not None:
                continue  # T5 rows: SDPA appears as sdpa-dense-bias
            # SDPA's is_causal is top-left aligned; it agrees with ours when Lq == Lk, and
            # a single decode query sees every key either way.
            is_causal = causal and not decode
            if name == "sdpa":
                fns[name] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
            else:
                backend = _sdpa_backends().get(name)
                if backend is None:
                    fns[name] = "skipped: not in this torch"
                    continue
                from torch.nn.attention import sdpa_kernel

                def sdpa_fn(backend=backend, is_causal=is_causal):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
                fns[name] = sdpa_fn
        elif name == "sdpa-dense-bias":
            if rel is None:
                continue
            if H * Lq * Lk * q.element_size() > DENSE_BIAS_MAX_BYTES:
                fns[name] = "skipped: dense bias too large"
                continue
            bias = _dense_t5_bias(rel.table, rel.bidirectional, Lq, Lk).to(q.dtype)  # built once, untimed
            if causal:
                keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
                bias = bias.masked_fill(~keep, float("-inf"))
            fns[name] = lambda bias=bias: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        elif name == "flex":
            if not on_gpu:
                fns[name] = "skipped: FlexAttention is timed compiled, on a GPU"
                continue
            flex = _flex()
            if flex is None or compiled_flex is None:
                fns[name] = "skipped: FlexAttention not in this torch"
                continue
            fns[name] = _flex_fn(compiled_flex, flex[1], q, k, v, causal and not decode, rel)
    return fns


def _flex_fn(compiled, create_block_mask, q, k, v, causal: bool, rel: Optional[RelativeBias]):
    Lq, Lk = q.shape[2], k.shape[2]
    off = Lk - Lq
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi + off, None, None, Lq, Lk, device=q.device)
    score_mod = None
    if rel is not None:
        lut = _t5_lut(rel.table.float(), rel.bidirectional)
        R = T5_MAX_DISTANCE

        def score_mod(score, b, h, qi, ki):
            return score + lut[h, torch.clamp(ki - qi - off, -R, R) + R]
    scale = 1.0 if rel is not None else None
    return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def _measure_problem(op: str, B: int, H: int, Lq: int, Lk: int, D: int, causal: bool, t5: bool,
                     opts: Options, backends: list[str], ceilings: dict, compiled_flex) -> list[dict]:
    gpu = opts.on_gpu
    dev, dt = opts.device, opts.dtype
    q = torch.randn(B, H, Lq, D, device=dev, dtype=dt)
    k = torch.randn(B, H, Lk, D, device=dev, dtype=dt)
    v = torch.randn(B, H, Lk, D, device=dev, dtype=dt)
    rel = None
    if t5:
        q = q * D ** -0.5  # T5 runs unscaled (scale 1.0); keep the logits in a realistic range
        rel = RelativeBias(torch.randn(T5_BUCKETS, H, device=dev, dtype=dt), not causal,
                           T5_BUCKETS, T5_MAX_DISTANCE)
    rows = None if B * H * Lq * Lk <= FULL_CHECK_SCORES else min(CHECK_ROWS, Lq)
    ref = _reference(q, k, v, causal, rel, rows)
    triton_here = triton_runnable(dev)
    base = _problem_row(op, B, H, Lq, Lk, D, opts)
    flops = 4 * B * H * Lq * Lk * D / (2 if causal and Lq > 1 else 1)
    kv_bytes = 2 * B * H * Lk * D * q.element_size()
    out_rows = []
    for name, fn in _backend_fns(op, q, k, v, causal, rel, backends, gpu, compiled_flex).items():
        step(opts, f"{op} {base['shape']} {name}")
        if isinstance(fn, str):
            out_rows.append({**base, "backend": name, "status": fn})
            continue
        check = fn if rows is None else (lambda fn=fn: fn()[:, :, -rows:])
        ours = name.startswith("trifuse")
        res = check_and_time(check, ref, opts, time_it=gpu or not ours or not triton_here)
        row = {**base, "backend": name, **res}
        if "median_ms" in res:
            secs = res["median_ms"] * 1e-3
            if op == "decode":
                row["gbps"] = kv_bytes / secs / 1e9
                row["frac_of_peak"] = row["gbps"] / ceilings["copy_gbps"]
            else:
                row["tflops"] = flops / secs / 1e12
                if ceilings.get("matmul_tflops"):
                    row["frac_of_peak"] = row["tflops"] / ceilings["matmul_tflops"]
        out_rows.append(row)
    return out_rows


def run(opts: Options) -> SuiteResult:
    gpu = opts.on_gpu
    backends = pick_backends(opts, BACKENDS, GPU_DEFAULT if gpu else CPU_DEFAULT)
    # Sizes given on the command line are run as given; --quick shortens only the defaults.
    head_dims = opts.head_dims or ([64, 128] if gpu else [64])[-1 if opts.quick else 0:]
    if gpu:
        seqs = opts.seq or ([1024, 4096] if opts.quick else [128, 256, 512, 1024, 2048, 4096, 8192, 16384])
        decode_lens = [512, 1024, 2048, 4096, 8192, 16384]
    else:  # the interpreter runs the kernel one program at a time: tiny shapes only
        seqs = opts.seq or [128, 256]
        decode_lens = [512, 1024]
    if opts.quick:
        decode_lens = decode_lens[-1:]

    notes = []
    triton_here = triton_runnable(opts.device)
    if not gpu:
        notes.append("No GPU: the Triton attention kernel is checked for correctness under Triton's "
                     "interpreter on small shapes but not timed; Triton timings need a GPU. Only the "
                     "PyTorch paths (reference, SDPA) are timed, on the CPU, where small shapes sit in "
                     "cache and can beat the copy ceiling."
                     if triton_here else
                     "No GPU and no Triton interpreter: the 'trifuse' backend is the PyTorch reference path.")
    else:
        notes.append("TFLOP/s count 4*B*H*Lq*Lk*D (halved for causal); frac_of_peak is against the dense "
                     "matmul throughput measured in this run (decode: GB/s of K/V read against copy bandwidth).")
    if gpu and opts.dtype == torch.float32:
        notes.append("fp32 runs exact-fp32 dots (no TF32): expect a fraction of the fp16 figures.")
    ceilings = {"copy_gbps": copy_bandwidth(opts.device)}
    if gpu:
        ceilings["matmul_tflops"] = matmul_peak(opts.device, opts.dtype)

    compiled_flex = None
    flex = _flex()
    if gpu and flex is not None and "flex" in backends:
        compiled_flex = torch.compile(flex[0], dynamic=False)

    rows_out = []
    with _recompile_budget() if compiled_flex is not None else contextlib.nullcontext():
        for D in head_dims:
            H = max(1, HIDDEN // D) if gpu else 2
            for L in seqs:
                B = opts.batch[0] if opts.batch else (max(1, TOKENS // L) if gpu else 1)
                for op, causal, t5 in (("attn", False, False), ("attn-causal", True, False),
                                       ("attn-t5", False, True), ("attn-t5-causal", True, True)):
                    rows_out += _measure_problem(op, B, H, L, L, D, causal, t5, opts, backends, ceilings,
                                                 compiled_flex)
                    if gpu:
                        torch.cuda.empty_cache()
        D = 128 if 128 in head_dims or gpu else head_dims[-1]
        H = 32 if gpu else 2
        for Lk in decode_lens:
            B = opts.batch[0] if opts.batch else 1
            rows_out += _measure_problem("decode", B, H, 1, Lk, D, True, False, opts, backends, ceilings,
                                         compiled_flex)
    title = f"trifuse attention on {opts.device.type} ({DTYPE_NAMES[opts.dtype]})"
    return SuiteResult(title, rows_out, ceilings, notes)
