"""``trifuse bench MODEL``: whole-model latency against Hugging Face and torch.compile.

A model is a named size built from a config with random weights (no hub at run
time) or a local checkpoint directory. Every backend runs the same batch of
token ids; its output is checked against Hugging Face eager (fp32 for the fp32
run, the same dtype otherwise, to the dtype's budget) before it is timed.

Backends: ``trifuse`` (our kernels), ``reference`` (our graph on the PyTorch
reference ops), ``hf-eager``, ``hf-sdpa``, ``torch-compile`` and
``torch-compile-max-autotune`` (Hugging Face's SDPA model under ``torch.compile``),
``trifuse-graphs`` (ours under a CUDA graph; GPU only).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from trifuse import engine
from trifuse.engine.family import ENCODER

from .suite import (
    DTYPE_NAMES,
    ENCODER_BACKENDS,
    ENCODER_CPU_DEFAULT,
    Options,
    SuiteResult,
    build_hf_named,
    cpu_notes,
    encoder_backend_fns,
    kind_sizes,
    model_backends,
    pick_backends,
    step,
    time_model_backends,
)

#: Named sizes: every text-encoder family's (engine.family contracts), e.g. bert-base, roberta-small.
NAMED = kind_sizes(ENCODER)
BACKENDS = ENCODER_BACKENDS


def build_hf(name: str, dtype: torch.dtype, device: torch.device, attn: str):
    """Hugging Face's model for a named size (seeded random weights) or a checkpoint directory."""
    return build_hf_named(name, NAMED, dtype, device, attn)


def is_model(name: str) -> bool:
    """A named text-encoder size, or a checkpoint directory (the other suites claim theirs first)."""
    return name in NAMED or os.path.isdir(name)


def _bench_one(name: str, opts: Options, backends: list[str], batch: int, seq: int) -> list[dict]:
    dev, dtype = opts.device, opts.dtype
    hf_eager = build_hf(name, dtype, dev, "eager")
    cfg = hf_eager.config
    backends = model_backends(opts, backends, hf_eager)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g).to(dev)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = hf_eager(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = engine.from_pretrained(hf_eager, task="feature-extraction", dtype=dtype, device=dev, quantize=opts.quantize)

    def build_sdpa():
        model = build_hf(name, dtype, dev, "sdpa")
        model.load_state_dict(hf_eager.state_dict())
        return model

    fns = encoder_backend_fns(ours, hf_eager, build_sdpa, {"input_ids": ids, "attention_mask": mask}, backends,
                              batch=batch, seq=seq, threads=opts.threads)
    base = {"suite": "models", "op": name, "shape": f"{batch}x{seq}", "batch": batch, "seq": seq,
            "dtype": DTYPE_NAMES[dtype]}
    return time_model_backends(fns, ref, backends, opts, base, items=batch, tokens=batch * seq)


def run(opts: Options, models: Optional[list[str]] = None) -> SuiteResult:
    gpu = opts.on_gpu
    backends = pick_backends(opts, BACKENDS, BACKENDS if gpu else ENCODER_CPU_DEFAULT)
    models = models or ["bert-base"]
    # On the CPU the trifuse check runs interpreted Triton, whose attention cost grows with seq^2.
    # Sizes given on the command line are run as given; --quick shortens only the defaults.
    if opts.quick:
        default_batches, default_seqs = [1], [128 if gpu else 32]
    else:
        default_batches, default_seqs = ([1, 8, 32], [128, 384]) if gpu else ([1], [64])
    batches, seqs = opts.batch or default_batches, opts.seq or default_seqs
    notes = []
    notes += cpu_notes(opts)
    rows = []
    for name in models:
        for b in batches:
            for n in seqs:
                step(opts, f"{name} {b}x{n}")
                rows += _bench_one(name, opts, backends, b, n)
    title = f"trifuse models on {opts.device.type} ({DTYPE_NAMES[opts.dtype]})"
    return SuiteResult(title, rows, {}, notes)
