"""``trifuse bench MODEL``: whole-model latency against Hugging Face and torch.compile.

A model is a named size built from a config with random weights (no hub at run
time) or a local checkpoint directory. Every backend runs the same batch of
token ids; its output is checked against Hugging Face eager (fp32 for the fp32
run, the same dtype otherwise, to the dtype's budget) before it is timed.

Backends: ``trifuse`` (our kernels), ``reference`` (our graph on the PyTorch
reference ops), ``hf-eager``, ``hf-sdpa``, ``torch-compile`` (Hugging Face's
SDPA model under ``torch.compile``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

import engine
import kernels
from kernels import _dispatch

from .suite import DTYPE_NAMES, Options, SuiteResult, pick_backends
from .timing import measure

BERT_BASE = dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu")
NAMED = {
    "bert-base": BERT_BASE,
    "bert-large": {**BERT_BASE, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "intermediate_size": 4096},
    "roberta-base": {**BERT_BASE, "model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514,
                     "type_vocab_size": 1, "pad_token_id": 1},
    "distilbert-base": dict(model_type="distilbert", vocab_size=30522, dim=768, n_layers=6, n_heads=12,
                            hidden_dim=3072, max_position_embeddings=512),
    "albert-base": {**BERT_BASE, "model_type": "albert", "vocab_size": 30000, "embedding_size": 128,
                    "hidden_act": "gelu_new"},
    "electra-base": {**BERT_BASE, "model_type": "electra", "embedding_size": 768},
}
BACKENDS = ("trifuse", "reference", "hf-eager", "hf-sdpa", "torch-compile")
# Largest |out - ref| / max|ref| a backend may show against Hugging Face eager.
MODEL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def is_model(name: str) -> bool:
    return name in NAMED or os.path.isdir(name)


def build_hf(name: str, dtype: torch.dtype, device: torch.device, attn: str):
    import transformers

    if os.path.isdir(name):
        model = transformers.AutoModel.from_pretrained(name, dtype=dtype, attn_implementation=attn)
    else:
        cfg = dict(NAMED[name])
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        config._attn_implementation = attn
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(config, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


def _bench_one(name: str, opts: Options, backends: list[str], batch: int, seq: int) -> list[dict]:
    dev, dtype = opts.device, opts.dtype
    hf_eager = build_hf(name, dtype, dev, "eager")
    cfg = hf_eager.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g).to(dev)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = hf_eager(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = engine.from_pretrained(hf_eager, task="feature-extraction", dtype=dtype, device=dev)

    def run_ours():
        return ours(ids, attention_mask=mask).last_hidden_state

    def run_reference():
        with kernels.use_backend("reference"):
            return run_ours()

    fns = {"trifuse": run_ours, "reference": run_reference,
           "hf-eager": lambda: hf_eager(input_ids=ids, attention_mask=mask).last_hidden_state}
    if "hf-sdpa" in backends or "torch-compile" in backends:
        hf_sdpa = build_hf(name, dtype, dev, "sdpa")
        hf_sdpa.load_state_dict(hf_eager.state_dict())
        fns["hf-sdpa"] = lambda: hf_sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
        if "torch-compile" in backends:
            compiled = torch.compile(hf_sdpa)
            fns["torch-compile"] = lambda: compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    interpreted = dev.type == "cpu" and _dispatch.triton_runnable(dev)
    rows = []
    for backend in backends:
        row = {"suite": "models", "op": name, "shape": f"{batch}x{seq}", "batch": batch, "seq": seq,
               "dtype": DTYPE_NAMES[dtype], "backend": backend}
        fn = fns[backend]
        try:
            with torch.no_grad():
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                out = fn()
                row["max_abs_err"] = (out.float() - ref.float()).abs().max().item()
                row["rel_err"] = _rel(out, ref)
                if row["rel_err"] > MODEL_TOL[dtype]:
                    rows.append({**row, "status": "mismatch"})
                    continue
                if backend == "trifuse" and interpreted:
                    # Interpreted Triton on the CPU: checked, but its time says nothing about a GPU.
                    rows.append({**row, "status": "checked"})
                    continue
                t = measure(fn, dev, warmup=2 if opts.quick else opts.warmup,
                            min_time_s=0.05 if opts.quick else opts.min_time_s, min_iters=5, flush_l2=False)
        except Exception as e:  # noqa: BLE001 - a failing backend is a result
            rows.append({**row, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:100]}"})
            continue
        s = t.summary()
        row.update(status="ok", **s, seq_per_s=batch / (s["median_ms"] * 1e-3),
                   tokens_per_s=batch * seq / (s["median_ms"] * 1e-3))
        if dev.type == "cuda":
            row["peak_mem_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        rows.append(row)
    base = {r["backend"]: r.get("median_ms") for r in rows}
    for r in rows:
        if r.get("median_ms") and base.get("hf-eager"):
            r["speedup_vs_hf_eager"] = base["hf-eager"] / r["median_ms"]
    return rows


def run(opts: Options, models: Optional[list[str]] = None) -> SuiteResult:
    gpu = opts.on_gpu
    backends = pick_backends(opts, BACKENDS, BACKENDS if gpu else ("trifuse", "reference", "hf-eager", "hf-sdpa"))
    models = models or ["bert-base"]
    batches = opts.batch or ([1, 8, 32] if gpu else [1])
    seqs = opts.seq or ([128, 384] if gpu else [128])
    if opts.quick:
        batches, seqs = batches[:1], [min(seqs[0], 32)]
    notes = []
    if not gpu:
        notes.append("No GPU: the trifuse backend's Triton kernels are checked under the interpreter, "
                     "not timed; CPU latencies of the PyTorch paths are shown for reference only.")
    rows = []
    for name in models:
        for b in batches:
            for n in seqs:
                rows += _bench_one(name, opts, backends, b, n)
    title = f"trifuse models on {opts.device.type} ({DTYPE_NAMES[opts.dtype]})"
    return SuiteResult(title, rows, {}, notes)
