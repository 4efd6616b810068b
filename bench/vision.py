"""``trifuse bench vit-base-patch16-224``: ViT latency and images/s against Hugging Face and torch.compile.

A model is a named size built from a config with random weights (no hub at run
time) or a local ViT / DeiT checkpoint directory. Every backend runs the same
batch of random ``pixel_values`` at the checkpoint's image size; its
``last_hidden_state`` is checked against Hugging Face eager (same dtype, to the
dtype's budget) before it is timed. Rows carry ``batch`` and ``seq`` (patches
plus the special tokens) for the latency plot; ``images_per_s`` (also shown as
``seq/s``: one image is one sequence) and ``tokens_per_s``.

Backends: ``trifuse`` (our kernels), ``reference`` (our graph on the PyTorch
reference ops), ``hf-eager``, ``hf-sdpa``, ``torch-compile`` and
``torch-compile-max-autotune`` (Hugging Face's SDPA model under ``torch.compile``),
``trifuse-graphs`` (ours under a CUDA graph; GPU only). Entry point: ``run(opts, models)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from trifuse import engine
from trifuse.engine.family import VISION

from .suite import (
    DTYPE_NAMES,
    ENCODER_BACKENDS,
    ENCODER_CPU_DEFAULT,
    Options,
    SuiteResult,
    build_hf_named,
    cpu_notes,
    encoder_backend_fns,
    is_kind_model,
    kind_model_types,
    kind_sizes,
    model_backends,
    pick_backends,
    step,
    time_model_backends,
)

#: Named sizes: every vision family's (engine.family contracts), e.g. vit-base-patch16-224, vit-tiny.
NAMED = kind_sizes(VISION)
BACKENDS = ENCODER_BACKENDS


def build_hf(name: str, dtype: torch.dtype, device: torch.device, attn: str):
    """Hugging Face's model for a named size (seeded random weights) or a checkpoint directory."""
    return build_hf_named(name, NAMED, dtype, device, attn)


def is_model(name: str) -> bool:
    """A named vision size, or a checkpoint directory of a vision family (``vit``, ``deit``, ...)."""
    return is_kind_model(name, VISION)


def _image_shape(cfg) -> tuple[int, int, int]:
    size = cfg.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return cfg.num_channels, h, w


def _bench_one(name: str, opts: Options, backends: list[str], batch: int) -> list[dict]:
    dev, dtype = opts.device, opts.dtype
    hf_eager = build_hf(name, dtype, dev, "eager")
    c, h, w = _image_shape(hf_eager.config)
    backends = model_backends(opts, backends, hf_eager)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, c, h, w, generator=g).to(device=dev, dtype=dtype)
    with torch.no_grad():
        ref = hf_eager(pixel_values=pixels).last_hidden_state
    seq = ref.shape[1]  # patches + CLS (+ DeiT's distillation token)
    ours = engine.from_pretrained(hf_eager, task="feature-extraction", dtype=dtype, device=dev, quantize=opts.quantize)

    def build_sdpa():
        model = build_hf(name, dtype, dev, "sdpa")
        model.load_state_dict(hf_eager.state_dict())
        return model

    fns = encoder_backend_fns(ours, hf_eager, build_sdpa, {"pixel_values": pixels}, backends, batch=batch,
                              threads=opts.threads)
    base = {"suite": "vision", "op": name, "shape": f"{batch}x{c}x{h}x{w}", "batch": batch, "seq": seq,
            "image_size": f"{h}x{w}", "dtype": DTYPE_NAMES[dtype]}
    return time_model_backends(fns, ref, backends, opts, base, items=batch, tokens=batch * seq,
                               item_name="images")


def run(opts: Options, models: Optional[list[str]] = None) -> SuiteResult:
    """Benchmark ViT ``models`` (named sizes or checkpoint directories) at ``opts.batch`` sizes.

    The image size is the checkpoint's (``opts.seq`` does not apply); batches default
    to 1, 8, 32 on a GPU and 1 on the CPU.
    """
    gpu = opts.on_gpu
    backends = pick_backends(opts, BACKENDS, BACKENDS if gpu else ENCODER_CPU_DEFAULT)
    models = models or ["vit-base-patch16-224"]
    unknown = [m for m in models if not is_model(m)]
    if unknown:
        raise SystemExit(f"unknown vision model(s) {unknown}; choose from {list(NAMED)} or a checkpoint "
                         f"directory of one ({', '.join(kind_model_types(VISION))})")
    batches = opts.batch or ([1, 8, 32] if gpu else [1])[:1 if opts.quick else None]  # given sizes run as given
    notes = ["Images at the checkpoint's size; seq = patches + special tokens; seq/s = images/s."]
    notes += cpu_notes(opts)
    rows = []
    for name in models:
        for b in batches:
            step(opts, f"{name} batch {b}")
            rows += _bench_one(name, opts, backends, b)
    title = f"trifuse ViT on {opts.device.type} ({DTYPE_NAMES[opts.dtype]})"
    return SuiteResult(title, rows, {}, notes)
