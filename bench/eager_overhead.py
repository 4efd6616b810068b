"""Per-call overhead of trifuse's ops on the CPU's native path, and tiny models against Hugging Face eager.

``python -m trifuse.bench.eager_overhead [ops|models|all] [fp32|bf16]``: one intra-op thread, under
``torch.inference_mode`` (ops) or ``torch.no_grad`` (models, as the main job times them), medians
of many calls with the variants alternated so load drifts hit both alike.

* ``ops``: each public op (the eager fast path) against its ``torch.ops.trifuse`` op (the
  ``torch.library`` dispatch) and against the plain PyTorch it replaces, at tiny widths and at
  1x128x768;
* ``models``: the main job's ``--quick`` CPU sizes (batch 1, 32 tokens; :data:`bench.default.PLAN`'s
  ``quick`` column), trifuse's native path with the eager fast path off (every op through
  ``torch.ops.trifuse``) and on, against Hugging Face eager in one dtype (fp32 by default): encoders
  and ViT whole, GPT-2's prefill, T5's and BART's encoder.

Not a suite of the main job: a tool for checking where per-call time goes.
"""

from __future__ import annotations

import contextlib
import importlib
import statistics
import sys
import time
from typing import Callable, Dict, Iterator

import torch
import torch.nn.functional as F


def _ab(fns: Dict[str, Callable[[], object]], rounds: int = 30, calls: int = 50) -> Dict[str, float]:
    """Median microseconds per call of each function, the functions alternated round by round."""
    for fn in fns.values():
        for _ in range(20):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def ops() -> None:
    from trifuse import kernels

    g = torch.Generator().manual_seed(0)
    t = torch.ops.trifuse
    with kernels.use_backend("native"), torch.inference_mode():
        for b, n, h in ((1, 8, 32), (2, 16, 64), (1, 128, 768)):
            x, r = torch.randn(b, n, h, generator=g), torch.randn(b, n, h, generator=g)
            w, bias = torch.randn(h, generator=g), torch.randn(h, generator=g)
            heads = max(1, h // 64)
            q, k, v = (torch.randn(b, heads, n, h // heads, generator=g) for _ in range(3))
            mask = torch.ones(b, n, dtype=torch.bool)
            mask[-1, n // 2:] = False
            rows = {
                "layer_norm+res": {
                    "wrapper": lambda: kernels.layer_norm(x, w, bias, 1e-5, residual=r),
                    "torch.ops": lambda: t.add_layer_norm(x, r, w, bias, 1e-5),
                    "pytorch": lambda: F.layer_norm(x + r, (h,), w, bias, 1e-5)},
                "rms_norm": {
                    "wrapper": lambda: kernels.rms_norm(x, w, 1e-6),
                    "torch.ops": lambda: t.rms_norm(x, w, 1e-6),
                    "pytorch": lambda: F.rms_norm(x, (h,), w, 1e-6)},
                "gelu+bias": {
                    "wrapper": lambda: kernels.gelu(x, bias),
                    "torch.ops": lambda: t.gelu(x, bias, None, "none"),
                    "pytorch": lambda: F.gelu(x + bias)},
                "attention+mask": {
                    "wrapper": lambda: kernels.attention(q, k, v, attention_mask=mask),
                    "torch.ops": lambda: t.attention(q, k, v, mask, None, None, True, 32, 128, 0, False,
                                                     (h // heads) ** -0.5, 0),
                    "pytorch": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])},
                "attention causal": {
                    "wrapper": lambda: kernels.attention(q, k, v, causal=True),
                    "torch.ops": lambda: t.attention(q, k, v, None, None, None, True, 32, 128, 0, True,
                                                     (h // heads) ** -0.5, 0),
                    "pytorch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)},
            }
            for op, fns in rows.items():
                us = _ab(fns)
                print(f"{op:17s} {b}x{n}x{h:<4d} " + "  ".join(f"{k} {v:7.1f} us" for k, v in us.items()),
                      flush=True)


def _families(dtype: torch.dtype = torch.float32):
    """``(label, our callable, Hugging Face eager's callable)`` per row of the main job's quick CPU plan."""
    from trifuse import engine
    from trifuse.bench import decoder, models, seq2seq, vision
    from trifuse.bench.default import PLAN

    g = torch.Generator().manual_seed(0)
    for row in PLAN:
        name = row.quick
        if vision.is_model(name):
            hf = vision.build_hf(name, dtype, torch.device("cpu"), "eager")
            c, hh, ww = vision._image_shape(hf.config)
            px = torch.randn(1, c, hh, ww, generator=g).to(dtype)
            ours = engine.from_pretrained(hf, task="feature-extraction", dtype=dtype, device="cpu")
            yield row.label, lambda ours=ours, px=px: ours(pixel_values=px), lambda hf=hf, px=px: hf(pixel_values=px)
        elif decoder.is_model(name):
            hf = decoder.build_hf(name, dtype, torch.device("cpu"), "eager")
            ids = torch.randint(0, hf.config.vocab_size - 1, (1, 32), generator=g)
            mask = torch.ones_like(ids)
            ours = engine.from_pretrained(hf, task="causal-lm", dtype=dtype, device="cpu")
            cache = ours.new_cache(1, 32)
            yield (row.label + " prefill",
                   lambda ours=ours, ids=ids, mask=mask, cache=cache: ours.start_decoding(
                       ids, mask.ne(0), num_beams=1, max_new_tokens=0, cache=cache),
                   lambda hf=hf, ids=ids, mask=mask: hf(input_ids=ids, attention_mask=mask, use_cache=True,
                                                        logits_to_keep=1))
        elif seq2seq.is_model(name):
            hf = seq2seq.build_hf(name, dtype, torch.device("cpu"), "eager")
            ids = torch.randint(2, hf.config.vocab_size, (1, 32), generator=g)
            mask = torch.ones_like(ids)
            ours = engine.from_pretrained(hf, task="text2text-generation", dtype=dtype, device="cpu")
            yield (row.label + " encoder", lambda ours=ours, ids=ids, mask=mask: ours.encode(ids, mask),
                   lambda hf=hf, ids=ids, mask=mask: hf.get_encoder()(input_ids=ids, attention_mask=mask))
        else:
            hf = models.build_hf(name, dtype, torch.device("cpu"), "eager")
            ids = torch.randint(3, hf.config.vocab_size, (1, 32), generator=g)
            mask = torch.ones_like(ids)
            ours = engine.from_pretrained(hf, task="feature-extraction", dtype=dtype, device="cpu")
            yield (row.label, lambda ours=ours, ids=ids, mask=mask: ours(input_ids=ids, attention_mask=mask),
                   lambda hf=hf, ids=ids, mask=mask: hf(input_ids=ids, attention_mask=mask))


_OPS = ("norm", "gelu", "attention", "varlen", "paged_attention")


@contextlib.contextmanager
def _fast_path(on: bool) -> Iterator[None]:
    """``on=False``: the ops' wrappers see :func:`kernels._dispatch.eager_native` answer False, so every call
    goes through ``torch.ops.trifuse`` as it did before the eager fast path (for an A/B in one process)."""
    mods = [importlib.import_module(f"trifuse.kernels.{m}") for m in _OPS]
    saved = [m.eager_native for m in mods]
    if not on:
        for m in mods:
            m.eager_native = lambda *args: False
    try:
        yield
    finally:
        for m, fn in zip(mods, saved):
            m.eager_native = fn


def model_ratios(dtype: torch.dtype = torch.float32) -> None:
    from trifuse import kernels

    ratios = {"op path": [], "fast path": []}
    with torch.no_grad():
        for label, ours, hf in _families(dtype):
            def native(on: bool, ours=ours):
                with kernels.use_backend("native"), _fast_path(on):
                    return ours()

            us = _ab({"op path": lambda: native(False), "fast path": lambda: native(True), "hf-eager": hf},
                     rounds=15, calls=10)
            for k in ratios:
                ratios[k].append(us["hf-eager"] / us[k])
            print(f"{label:15s} " + "  ".join(f"{k} {v:7.0f} us" for k, v in us.items())
                  + "   vs hf-eager: " + ", ".join(f"{k} {r[-1]:.2f}x" for k, r in ratios.items()), flush=True)
    for k, r in ratios.items():
        print(f"trifuse native, {k}: geometric mean {statistics.geometric_mean(r):.2f}x Hugging Face eager "
              f"(from {min(r):.2f}x to {max(r):.2f}x)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2] if len(sys.argv) > 2 else "fp32"]
    if what in ("ops", "all"):
        ops()
    if what in ("models", "all"):
        model_ratios(dtype)
