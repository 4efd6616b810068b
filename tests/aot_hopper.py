"""Compile trifuse's Triton kernels ahead of time for Hopper (sm_90), through ptxas.

Run as a script with ``TRITON_INTERPRET`` unset (tests/test_compile_hopper.py does),
so ``import kernels`` yields compiled ``JITFunction``s. No GPU is needed. Prints one
JSON line per specialization: ``{"kernel", "variant", "ok", "error" | "cubin_bytes"}``.
"""

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with the interpreter off"

import importlib  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Module objects (``kernels.gelu`` and ``kernels.attention`` are also the ops' names).
norm, gelu, attention = (importlib.import_module(f"kernels.{m}") for m in ("norm", "gelu", "attention"))

HOPPER = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, pointers: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    """Arguments in ``pointers`` are pointers, in ``constexprs`` compile-time values, the rest i32
    (``qk_scale``/``eps``: fp32); strides named in ``constexprs`` as 1 specialize unit strides."""
    if isinstance(fn, triton.runtime.Autotuner):
        fn = fn.fn  # the JITFunction it tunes
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in pointers:
            sig[n] = pointers[n]
        elif n in constexprs:
            sig[n] = "constexpr"
        else:
            sig[n] = "fp32" if n in ("qk_scale", "eps") else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=HOPPER, options=dict(num_warps=num_warps, num_stages=num_stages))


def norm_variants():
    for dt in ("fp16", "bf16", "fp32"):
        ptr = {n: f"*{dt}" for n in ("X", "R", "Y", "H")} | {"W": "*fp32", "B": "*fp32"}
        for rms, res in ((False, True), (True, True), (False, False)):
            flags = dict(IS_RMS=rms, HAS_RESIDUAL=res, HAS_WEIGHT=True, HAS_BIAS=not rms)
            yield "norm", f"{dt} rms={rms} residual={res} 4x1024", norm._norm_fwd, ptr, \
                {**flags, "BLOCK_M": 4, "BLOCK_N": 1024}, 8
            yield "norm", f"{dt} rms={rms} residual={res} 1x16384", norm._norm_fwd, ptr, \
                {**flags, "BLOCK_M": 1, "BLOCK_N": 16384}, 16
        yield "norm_looped", f"{dt}", norm._norm_fwd_looped, ptr, \
            dict(IS_RMS=False, HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_N=4096), 16


def gelu_variants():
    for dt in ("fp16", "bf16", "fp32"):
        ptr = {"X": f"*{dt}", "B": "*fp32", "G": f"*{dt}", "Y": f"*{dt}"}
        for tanh, gate in ((False, False), (True, False), (True, True)):
            yield "gelu", f"{dt} tanh={tanh} gate={gate}", gelu._gelu_fwd, ptr, \
                dict(HAS_BIAS=True, HAS_GATE=gate, TANH=tanh, BLOCK_M=4, BLOCK_N=1024), 8


def attention_variants():
    fn = attention._attn_fwd
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    const_names = [n for n in fn.arg_names if n.isupper() and n not in (
        "Q", "K", "V", "OUT", "MASK", "BIAS", "REL", "O_PART", "LSE", "H", "D", "LQ_KEY", "LK_KEY")]
    for dt, causal, mask, bias, rel, split, bm, bn, bd in (
            ("fp16", False, False, False, False, False, 128, 64, 128),
            ("bf16", True, True, False, True, False, 128, 64, 64),
            ("fp16", True, True, True, False, True, 16, 128, 128),
            ("fp32", False, True, False, True, False, 64, 32, 128)):
        ptr = {n: f"*{dt}" for n in ("Q", "K", "V", "OUT", "BIAS")} | \
              {"MASK": "*i64", "REL": "*fp32", "O_PART": "*fp32", "LSE": "*fp32"}
        values = dict(CAUSAL=causal, HAS_MASK=mask, HAS_BIAS=bias, HAS_REL=rel, SPLIT=split,
                      DOT_PREC="ieee" if dt == "fp32" else None, EVEN_D=True,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        missing = [n for n in const_names if n not in values]
        if missing:  # a constexpr this list does not know: report rather than guess
            raise KeyError(f"attention kernel has constexprs {missing} not covered here")
        yield "attention", f"{dt} causal={causal} mask={mask} bias={bias} rel={rel} split={split} " \
            f"{bm}x{bn}x{bd}", attention._attn_fwd, ptr, values, 8 if bm >= 128 else 4
    yield "attention_combine", "fp16", attention._attn_combine, \
        {"O_PART": "*fp32", "LSE": "*fp32", "OUT": "*fp16"}, dict(BLOCK_S=64, BLOCK_D=128), 4


def main() -> int:
    failed = 0
    for gen in (norm_variants, gelu_variants, attention_variants):
        for kernel, variant, fn, ptr, consts, warps in gen():
            row = {"kernel": kernel, "variant": variant}
            try:
                k = compile_kernel(fn, ptr, consts, num_warps=warps)
                row.update(ok=True, cubin_bytes=len(k.asm.get("cubin", b"")))  # ptxas ran: machine code exists
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failed += 1
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-1500:]}")
            print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
