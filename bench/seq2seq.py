"""``trifuse bench t5-small``: encoder-decoder encoder and per-token decode latency against Hugging Face.

A model is a named size of an encoder-decoder family (T5's: ``t5-small``, ``t5-base``, ...,
``t5-tiny``; :mod:`engine.family`) built from a config with random weights (no hub at run
time) or a local checkpoint directory of one (``AutoModelForSeq2SeqLM``). For
each batch size and source length every backend is checked before it is timed,
in two phases:

* ``encoder``: one encoder forward over a ``[B, seq]`` source, its
  ``last_hidden_state`` checked against Hugging Face eager (fp32 for the fp32
  run, the run's dtype otherwise) to the dtype's budget;
* ``decode``: greedy generation of ``G`` tokens (no EOS stop) from the same
  source; per-token latency ``(t(G) - t(1)) / (G - 1)``, i.e. the encoder and the
  first step removed. Checked by teacher forcing: Hugging Face eager re-reads the
  generated tokens, and each must be its argmax up to the dtype's budget.

Backends: ``trifuse`` (our kernels: ``model.encode`` / ``model.generate``),
``trifuse-native`` (the same model on the native CPU path, ``kernels.use_backend("native")``:
oneDNN/BLAS linears laid out for decoding, SDPA attention; docs/cpu.md),
``reference`` (our graph on the PyTorch reference ops), ``hf-eager``,
``hf-sdpa`` (``T5ForConditionalGeneration``: its encoder, its ``generate``),
``torch-compile`` (Hugging Face's SDPA model: the encoder under
``torch.compile``; ``generate`` with ``cache_implementation="static"``, which
compiles the decode step), ``onnxruntime-cpu`` and ``onnxruntime-cuda`` (our model
exported to ONNX in fp32 once per process, as an encoder file, whose run also
projects every decoder layer's cross-attention keys/values, and a decoder file
with past: the encoder phase runs the encoder file; decode is
``export.ort_generate_greedy``, every step in ONNX Runtime; torch tensors in and
out of each timed call, as a user's; the sessions are opened once), and, on a
GPU, ``trifuse-graphs`` (decode only: ``engine.graphs.CUDAGraphDecoder``, each
step one CUDA graph replay; its encoder is ``trifuse``'s). Without a GPU the trifuse backend runs Triton's interpreter:
checked, not timed (trifuse-native is the CPU's timed row); and the default backends run onnxruntime-cpu only on models
under 100M parameters (``suite.ORT_CPU_DEFAULT_MAX_PARAMS``; t5-base takes about
40 s to export on 2 cores), so ``t5-small`` but not ``t5-base``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from trifuse import engine
from trifuse.engine.family import SEQ2SEQ

from .suite import (
    DECODER_BACKENDS,
    DECODER_CPU_DEFAULT,
    DTYPE_NAMES,
    Options,
    SuiteResult,
    build_hf_generator,
    cpu_notes,
    graph_decoder,
    is_kind_model,
    kind_model_types,
    kind_sizes,
    model_backends,
    on_backend,
    ort_models,
    pick_backends,
    step,
    time_decoder_backends,
)

#: Named sizes: every encoder-decoder family's (engine.family contracts), e.g. t5-small, t5-base, t5-tiny.
NAMED = kind_sizes(SEQ2SEQ)
BACKENDS = DECODER_BACKENDS
CPU_DEFAULT = DECODER_CPU_DEFAULT


def is_model(name: str) -> bool:
    return is_kind_model(name, SEQ2SEQ)


def build_hf(name: str, dtype: torch.dtype, device: torch.device, attn: str):
    return build_hf_generator(name, NAMED, dtype, device, attn, auto_class="AutoModelForSeq2SeqLM")


def _argmax_gap(hf_eager, ids, mask, seq: torch.Tensor) -> float:
    """Teacher forcing: the largest (max logit - logit of the chosen token) over the generated
    tokens of ``seq`` (decoder start token first), relative to max|logit|, under Hugging Face eager."""
    with torch.no_grad():
        logits = hf_eager(input_ids=ids, attention_mask=mask, decoder_input_ids=seq[:, :-1]).logits.float()
    chosen = logits.gather(-1, seq[:, 1:, None].to(logits.device)).squeeze(-1)
    gap = logits.amax(-1) - chosen
    # A token the config forces (forced_bos_token_id first, forced_eos_token_id last, as BART's
    # checkpoints set them) is nobody's argmax: those steps are not checked.
    cfg = hf_eager.config
    if getattr(cfg, "forced_bos_token_id", None) is not None:
        gap[:, 0] = 0
    if getattr(cfg, "forced_eos_token_id", None) is not None:
        gap[:, -1] = 0
    return (gap.max() / logits.abs().max().clamp(min=1e-30)).item()


def _bench_one(name: str, opts: Options, backends: list[str], batch: int, seq: int, new: int,
               hf_eager, hf_sdpa, ours, compiled_encoder, ort: dict | None = None,
               graphed: Callable | None = None) -> list[dict]:
    dev, dtype = opts.device, opts.dtype
    vocab = hf_eager.config.vocab_size
    g = torch.Generator().manual_seed(batch * 10007 + seq)
    ids = torch.randint(2, vocab, (batch, seq), generator=g).to(dev)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = hf_eager.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state

    def ours_encoder():
        return ours.encode(ids, mask).last_hidden_state

    def ours_generate(n):
        return lambda: ours.generate(ids, mask, max_new_tokens=n, eos_token_id=[], pad_token_id=0)

    def hf_encoder(model):
        return lambda: model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state

    def hf_generate(model, n, **kw):
        return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, num_beams=1, **kw)

    encoder = {"trifuse": ours_encoder, "trifuse-native": on_backend("native", ours_encoder),
               "reference": on_backend("reference", ours_encoder), "hf-eager": hf_encoder(hf_eager)}
    generate = {"trifuse": ours_generate, "trifuse-native": lambda n: on_backend("native", ours_generate(n)),
                "reference": lambda n: on_backend("reference", ours_generate(n)),
                "hf-eager": lambda n: hf_generate(hf_eager, n)}
    if hf_sdpa is not None:
        encoder["hf-sdpa"] = hf_encoder(hf_sdpa)
        generate["hf-sdpa"] = lambda n: hf_generate(hf_sdpa, n)
    if graphed is not None:
        generate["trifuse-graphs"] = lambda n: lambda: graphed(ids, mask, max_new_tokens=n, eos_token_id=[],
                                                               pad_token_id=0)
    if compiled_encoder is not None:
        encoder["torch-compile"] = lambda: compiled_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        generate["torch-compile"] = lambda n: hf_generate(hf_sdpa, n, cache_implementation="static")

    def ort_encoder(m):
        return lambda: m.runners()[0](input_ids=ids, attention_mask=mask)["last_hidden_state"]

    def ort_generate(m, n):
        from trifuse.export import ort_generate_greedy

        return lambda: ort_generate_greedy(m.runners(), ids, mask, max_new_tokens=n, eos_token_id=[],
                                           pad_token_id=0)

    for backend, m in (ort or {}).items():
        encoder[backend] = ort_encoder(m)
        generate[backend] = lambda n, m=m: ort_generate(m, n)

    def check_generated(out):
        if out.shape != (batch, 1 + new):
            raise RuntimeError(f"generated shape {tuple(out.shape)}, expected {(batch, 1 + new)}")
        return _argmax_gap(hf_eager, ids, mask, out)

    base = {"suite": "seq2seq", "op": name, "shape": f"{batch}x{seq}", "batch": batch, "seq": seq,
            "dtype": DTYPE_NAMES[dtype]}
    return time_decoder_backends(encoder, generate, ref, check_generated, backends, opts, base,
                                 first_phase="encoder", new=new, batch=batch, tokens=batch * seq)


def run(opts: Options, models: Optional[list[str]] = None) -> SuiteResult:
    """The encoder-decoder suite: ``run(opts, ["t5-small", "flan-t5-base", ...])``; default ``["t5-small"]``."""
    gpu = opts.on_gpu
    backends = pick_backends(opts, BACKENDS, BACKENDS if gpu else CPU_DEFAULT)
    models = models or ["t5-small"]
    unknown = [m for m in models if not is_model(m)]
    if unknown:
        raise SystemExit(f"unknown encoder-decoder model(s) {unknown}; choose from {list(NAMED)} or a checkpoint "
                         f"directory of one ({', '.join(kind_model_types(SEQ2SEQ))})")
    # Sizes given on the command line are run as given; --quick shortens only the defaults.
    if opts.quick:
        default_batches, default_seqs = [1], [128 if gpu else 32]
    else:
        default_batches, default_seqs = ([1, 8], [128, 512]) if gpu else ([1], [32])
    batches, seqs = opts.batch or default_batches, opts.seq or default_seqs
    new = 4 if (opts.quick or not gpu) else 32
    notes = ["encoder: one encoder forward over a [batch, seq] source; tok/s = batch * seq / latency.",
             f"decode: greedy generate of {new} tokens (no EOS stop) from that source; per-token latency "
             f"= (t({new}) - t(1)) / {new - 1}; tok/s = batch / per-token latency."]
    notes += cpu_notes(opts)
    rows = []
    for name in models:
        dtype, dev = opts.dtype, opts.device
        step(opts, f"{name}: building the models")
        hf_eager = build_hf(name, dtype, dev, "eager")
        mine = model_backends(opts, backends, hf_eager)
        hf_sdpa = compiled_encoder = None
        if "hf-sdpa" in mine or "torch-compile" in mine:
            hf_sdpa = build_hf(name, dtype, dev, "sdpa")
            hf_sdpa.load_state_dict(hf_eager.state_dict())
            if "torch-compile" in mine:
                compiled_encoder = torch.compile(hf_sdpa.get_encoder())
        ours = engine.from_pretrained(hf_eager, task="text2text-generation", dtype=dtype, device=dev,
                                      quantize=opts.quantize)
        ort = ort_models(hf_eager, "text2text-generation", mine, opts.threads)
        graphed = graph_decoder(ours, max_len=1 + new) if "trifuse-graphs" in mine else None
        for b in batches:
            for n in seqs:
                rows += _bench_one(name, opts, mine, b, n, new, hf_eager, hf_sdpa, ours, compiled_encoder, ort,
                                   graphed)
        del hf_eager, hf_sdpa, ours, compiled_encoder, ort, graphed
        if opts.device.type == "cuda":
            torch.cuda.empty_cache()
    title = f"trifuse encoder-decoder models on {opts.device.type} ({DTYPE_NAMES[opts.dtype]})"
    return SuiteResult(title, rows, {}, notes)
