"""``trifuse bench packed``: a batch of mixed-length sentences, padded against padding-free.

The workload (issue 27): 32 sentences whose lengths are log-normal with a median of 24
tokens and sigma 1.0, rounded and clipped to 1..256 -- short text with a long tail, as
sentence-length statistics of English corpora show (median 20-30 tokens) -- drawn once
from a fixed seed, right-padded to the longest, as ``tokenizer(texts, padding=True)`` gives
them. The ideal speedup of skipping padding is ``padded tokens / real tokens``.

Backends, each on the same padded batch and checked at the real tokens against Hugging
Face eager (fp32 within 1e-4) before it is timed:

* ``trifuse-packed``: ``model(input_ids, attention_mask)`` as a user calls it (engine.packing
  unpads once, runs every layer on real tokens only, pads back);
* ``trifuse-padded``: the same model with packing off (:func:`engine.use_packing`);
* ``hf-eager``, ``hf-sdpa``; ``onnxruntime-cpu``/``onnxruntime-cuda`` (our export, padded:
  ONNX Runtime has no varlen attention on the CPU).

A decoder-only size (``gpt2``, ``gpt2-tiny``, ...) runs the same lengths as a prompt batch: left-padded,
as decoder-only prompts are, positions counted from each prompt's first real token (what ``generate``
gives), the prefill's hidden states compared at the real tokens; its shape reads ``(... real, left)``,
and it has no ONNX Runtime row (GPT-2's export takes past key/values; ``bench/decoder.py`` times it).

Rows carry tokens/s of real tokens, ``speedup_vs_hf_sdpa``, the ideal ratio, and for
trifuse-packed ``frac_of_ideal``: (padded time / packed time) / ideal ratio.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from trifuse import engine, kernels
from trifuse.engine.family import DECODER, ENCODER
from trifuse.engine.registry import family_for

from .suite import (
    DTYPE_NAMES,
    Options,
    SuiteResult,
    build_hf_named,
    cpu_notes,
    encoder_backend_fns,
    is_timed_result,
    kind_sizes,
    model_backends,
    pick_backends,
    step,
    time_model_backends,
)

#: issue 27's batch: log-normal lengths, median 24, sigma 1.0, clipped to 1..256, batch 32.
WORKLOAD = dict(batch=32, median=24, sigma=1.0, max_len=256, seed=0)
BACKENDS = ("trifuse-packed", "trifuse-padded", "hf-eager", "hf-sdpa", "onnxruntime-cpu", "onnxruntime-cuda")
CPU_DEFAULT = ("trifuse-packed", "trifuse-padded", "hf-eager", "hf-sdpa", "onnxruntime-cpu")
GPU_DEFAULT = ("trifuse-packed", "trifuse-padded", "hf-eager", "hf-sdpa")


def build_hf(name: str, dtype: torch.dtype, device: torch.device, attn: str):
    """Hugging Face's text encoder (or decoder-only model, without its LM head) for a named size (seeded
    random weights) or a checkpoint directory."""
    return build_hf_named(name, _sizes(name), dtype, device, attn)


def _sizes(name: str) -> dict:
    decoders = kind_sizes(DECODER)
    return decoders if name in decoders else kind_sizes(ENCODER)


def lengths(batch: int, median: float, sigma: float, max_len: int, seed: int) -> list[int]:
    """``batch`` sentence lengths ~ LogNormal(ln median, sigma), rounded, clipped to 1..max_len."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, generator=g, dtype=torch.float64)
    return [int(min(max_len, max(1, round(math.exp(math.log(median) + sigma * float(x)))))) for x in z]


def padded_batch(vocab: int, lens: list[int], seed: int = 0, left: bool = False):
    g = torch.Generator().manual_seed(seed)
    n = max(lens)
    ids = torch.randint(3, vocab, (len(lens), n), generator=g)
    mask = (torch.arange(n)[None, :] < torch.tensor(lens)[:, None]).long()
    if left:
        mask = mask.flip(1)
    return ids.masked_fill(mask == 0, 0), mask


def _bench(name: str, opts: Options, backends: list[str], workload: dict) -> list[dict]:
    dev, dtype = opts.device, opts.dtype
    hf_eager = build_hf(name, dtype, dev, "eager")
    backends = model_backends(opts, backends, hf_eager)
    cfg = hf_eager.config
    # Clipped to the position table (RoBERTa's starts after the padding index); 256 for the named sizes.
    workload = {**workload, "max_len": min(workload["max_len"], cfg.max_position_embeddings - 2)}
    lens = lengths(**workload)
    fam = family_for(cfg.model_type)
    decoder = fam is not None and fam.kind == DECODER  # a decoder-only checkpoint too
    ids, mask = padded_batch(cfg.vocab_size, lens, left=decoder)
    ids, mask = ids.to(dev), mask.to(dev)
    keep = mask.bool()
    real, padded = int(keep.sum()), keep.numel()
    inputs = {"input_ids": ids, "attention_mask": mask}
    if decoder:  # each prompt's positions from its first real token, as generate counts them
        inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf_eager(**inputs).last_hidden_state[keep]  # [real tokens, hidden]
    ours = engine.from_pretrained(hf_eager, task="feature-extraction", dtype=dtype, device=dev)

    def build_sdpa():
        model = build_hf(name, dtype, dev, "sdpa")
        model.load_state_dict(hf_eager.state_dict())
        return model

    if decoder:  # its export takes past key/values: bench/decoder.py times ONNX Runtime's prefill
        backends = [b for b in backends if not b.startswith("onnxruntime")]
    peers = [b for b in backends if not b.startswith("trifuse")]
    fns = {b: (lambda f=f: f()[keep]) for b, f in encoder_backend_fns(
        ours, hf_eager, build_sdpa, inputs, peers, batch=len(lens), threads=opts.threads).items()}

    # On the CPU trifuse's rows run the native path, as a user's process does: `trifuse bench` turns
    # Triton's interpreter on to check the kernels, and interpreted times say nothing.
    backend = "native" if dev.type == "cpu" else kernels.get_backend()

    def run_packed():
        with kernels.use_backend(backend):
            return ours(**inputs).last_hidden_state[keep]

    def run_padded():
        with engine.use_packing(False), kernels.use_backend(backend):
            return ours(**inputs).last_hidden_state[keep]

    fns["trifuse-packed"] = run_packed
    fns["trifuse-padded"] = run_padded
    shape = f"{len(lens)}x{max(lens)} ({real} real{', left' if decoder else ''})"
    base = {"suite": "packed", "op": name, "shape": shape, "batch": len(lens),
            "seq": max(lens), "dtype": DTYPE_NAMES[dtype], "real_tokens": real, "padded_tokens": padded,
            "ideal_ratio": padded / real}
    rows = time_model_backends(fns, ref, backends, opts, base, items=len(lens), tokens=real,
                               native=("trifuse-packed", "trifuse-padded") if backend == "native" else ())
    by = {r["backend"]: r for r in rows if is_timed_result(r)}
    for r in rows:
        if "hf-sdpa" in by and r["backend"] in by:
            r["speedup_vs_hf_sdpa"] = by["hf-sdpa"]["median_ms"] / r["median_ms"]
    if "trifuse-packed" in by and "trifuse-padded" in by:
        gain = by["trifuse-padded"]["median_ms"] / by["trifuse-packed"]["median_ms"]
        by["trifuse-packed"].update(packed_vs_padded=gain, frac_of_ideal=gain / (padded / real))
    return rows


def run(opts: Options, models: Optional[list[str]] = None) -> SuiteResult:
    """``models``: named text-encoder or decoder-only sizes, or checkpoint directories (the main job passes
    the BERT row's size and a GPT-2 size); by default bert-base and gpt2, or bert-small and gpt2-tiny for
    a quick CPU run (a base size on the padded batch takes seconds a call there). ``opts.batch[0]`` replaces the workload's batch of 32."""
    gpu = opts.on_gpu
    backends = pick_backends(opts, BACKENDS, GPU_DEFAULT if gpu else CPU_DEFAULT)
    models = models or (["bert-small", "gpt2-tiny"] if opts.quick and not gpu else ["bert-base", "gpt2"])
    workload = dict(WORKLOAD)
    if opts.batch:
        workload["batch"] = opts.batch[0]
    lens = lengths(**workload)
    notes = [f"Workload (before clipping to a model's position table): {workload['batch']} sentences, lengths log-normal (median {workload['median']}, sigma "
             f"{workload['sigma']}, clipped to 1..{workload['max_len']}; issue 27), seed {workload['seed']}: "
             f"{sum(lens)} real tokens padded to {len(lens)} x {max(lens)} = {len(lens) * max(lens)} "
             f"({sum(lens) / (len(lens) * max(lens)):.0%} real). tokens_per_s counts real tokens."]
    notes += cpu_notes(opts)
    rows = []
    for name in models:
        step(opts, f"packed {name}")
        rows += _bench(name, opts, backends, workload)
    return SuiteResult(f"Mixed-length batch, padded vs packed, on {opts.device.type} ({DTYPE_NAMES[opts.dtype]})",
                       rows, {}, notes)


def headline_figure(rows: list[dict]) -> Optional[str]:
    """The main job's line: packed vs Hugging Face SDPA and vs the ideal, from clean timings only."""
    packed = next((r for r in rows if r.get("backend") == "trifuse-packed" and is_timed_result(r)), None)
    if packed is None or "speedup_vs_hf_sdpa" not in packed:
        return None
    text = (f"Mixed-length batch ({packed['shape']}, {packed['ideal_ratio']:.1f}x padding): trifuse packed "
            f"{packed['tokens_per_s']:,.0f} tokens/s, {packed['speedup_vs_hf_sdpa']:.2f}x Hugging Face SDPA")
    if "frac_of_ideal" in packed:
        text += (f", {packed['packed_vs_padded']:.2f}x trifuse padded ({packed['frac_of_ideal']:.0%} of the "
                 f"ideal {packed['ideal_ratio']:.1f}x)")
    return text + "."
