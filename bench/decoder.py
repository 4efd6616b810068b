"""``trifuse bench gpt2``: decoder-only prefill and decode latency against Hugging Face ``generate``.

A model is a named size of a decoder-only family (GPT-2's: ``gpt2``, ``gpt2-medium``, ...,
``gpt2-tiny``; :mod:`engine.family`) built from a config with random weights (no hub at run
time) or a local checkpoint directory of one. For each batch size and context
length every backend is checked before it is timed, in two phases:

* ``prefill``: one forward over a ``[B, ctx]`` prompt that fills a KV cache and
  returns the last position's logits, checked against Hugging Face eager (fp32
  for the fp32 run, the run's dtype otherwise) to the dtype's budget;
* ``decode``: greedy generation of ``G`` tokens after a ``ctx - G`` token prompt
  (so the last step attends over ``ctx`` positions, within GPT-2's 1024);
  per-token latency ``(t(G) - t(1)) / (G - 1)``, i.e. prefill removed. Checked by
  teacher forcing: Hugging Face eager re-reads the generated sequence, and every
  generated token must be its argmax up to the dtype's budget (greedy ties may
  legitimately break differently in low precision).

Backends: ``trifuse`` (our kernels: ``model.generate`` and the forward it runs),
``trifuse-native`` (the same model on the native CPU path, ``kernels.use_backend("native")``:
oneDNN/BLAS linears laid out for decoding, SDPA attention; docs/cpu.md),
``reference`` (our graph on the PyTorch reference ops), ``hf-eager``,
``hf-sdpa`` (``GPT2LMHeadModel.generate``), ``torch-compile`` (Hugging Face's
SDPA model: its forward under ``torch.compile`` for prefill, and ``generate``
with ``cache_implementation="static"``, which compiles the decode step, for
decode), ``onnxruntime-cpu`` and ``onnxruntime-cuda`` (our model exported to ONNX
in fp32 once per process, with past key/values in and presents out: prefill is one
run with an empty past, whose graph computes every position's logits; decode is
``export.ort_generate_greedy``, every step in ONNX Runtime; torch tensors in and out
of each timed call, as a user's), and, on a GPU, ``trifuse-graphs`` (decode only:
``engine.graphs.CUDAGraphDecoder``, each step one CUDA graph replay; its prefill is
``trifuse``'s). Without a GPU the trifuse backend runs Triton's
interpreter: checked, not timed (trifuse-native is the
CPU's timed row); and the default backends run onnxruntime-cpu only
on models under 100M parameters (``suite.ORT_CPU_DEFAULT_MAX_PARAMS``; GPT-2 base
takes about 20 s to export on 2 cores), so ``gpt2-tiny`` but not ``gpt2``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from trifuse import engine
from trifuse.engine.family import DECODER

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

#: Named sizes: every decoder-only family's (engine.family contracts), e.g. gpt2, gpt2-medium, gpt2-tiny.
NAMED = kind_sizes(DECODER)
BACKENDS = DECODER_BACKENDS
CPU_DEFAULT = DECODER_CPU_DEFAULT


def is_model(name: str) -> bool:
    return is_kind_model(name, DECODER)


def build_hf(name: str, dtype: torch.dtype, device: torch.device, attn: str):
    return build_hf_generator(name, NAMED, dtype, device, attn, auto_class="AutoModelForCausalLM")


def _argmax_gap(hf_eager, seq: torch.Tensor, new: int) -> float:
    """Teacher forcing: the largest (max logit - logit of the chosen token) over the
    ``new`` generated tokens of ``seq``, relative to max|logit|, under Hugging Face eager."""
    with torch.no_grad():
        logits = hf_eager(input_ids=seq[:, :-1], logits_to_keep=new).logits.float()  # predicts the last `new`
    chosen = logits.gather(-1, seq[:, -new:, None].to(logits.device)).squeeze(-1)
    return ((logits.amax(-1) - chosen).max() / logits.abs().max().clamp(min=1e-30)).item()


def _bench_one(name: str, opts: Options, backends: list[str], batch: int, ctx: int, new: int,
               hf_eager, hf_sdpa, ours, compiled, ort: dict | None = None,
               graphed: Callable | None = None) -> list[dict]:
    dev, dtype = opts.device, opts.dtype
    vocab = hf_eager.config.vocab_size
    g = torch.Generator().manual_seed(batch * 10007 + ctx)
    ids = torch.randint(0, vocab - 1, (batch, ctx), generator=g).to(dev)
    mask = torch.ones_like(ids)
    prompt, pmask = ids[:, : ctx - new].contiguous(), mask[:, : ctx - new]
    with torch.no_grad():
        ref = hf_eager(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
    cache = ours.new_cache(batch, ctx)

    def ours_prefill():
        # generate's own prefill, into the one cache
        return ours.start_decoding(ids, mask.ne(0), num_beams=1, max_new_tokens=0, cache=cache).logits

    def ours_generate(n):
        return lambda: ours.generate(prompt, pmask, max_new_tokens=n, eos_token_id=[], pad_token_id=0)

    def hf_prefill(model):
        return lambda: model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits[:, -1]

    def hf_generate(model, n, **kw):
        return lambda: model.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, **kw)

    prefill = {"trifuse": ours_prefill, "trifuse-native": on_backend("native", ours_prefill),
               "reference": on_backend("reference", ours_prefill), "hf-eager": hf_prefill(hf_eager)}
    generate = {"trifuse": ours_generate, "trifuse-native": lambda n: on_backend("native", ours_generate(n)),
                "reference": lambda n: on_backend("reference", ours_generate(n)),
                "hf-eager": lambda n: hf_generate(hf_eager, n)}
    if hf_sdpa is not None:
        prefill["hf-sdpa"] = hf_prefill(hf_sdpa)
        generate["hf-sdpa"] = lambda n: hf_generate(hf_sdpa, n)
    if graphed is not None:
        generate["trifuse-graphs"] = lambda n: lambda: graphed(prompt, pmask, max_new_tokens=n, eos_token_id=[],
                                                               pad_token_id=0)
    if compiled is not None:
        prefill["torch-compile"] = lambda: compiled(input_ids=ids, attention_mask=mask, use_cache=False,
                                                    logits_to_keep=1).logits[:, -1]
        generate["torch-compile"] = lambda n: hf_generate(hf_sdpa, n, cache_implementation="static")
    _, heads, head_dim = ours.cache_shape()

    def ort_prefill(m):
        def run():
            (runner,) = m.runners()
            past = {n: torch.zeros(batch, heads, 0, head_dim) for n in runner.input_names
                    if n.startswith("past_key_values.")}  # the first call's empty past
            return runner(input_ids=ids, attention_mask=mask, **past)["logits"][:, -1]
        return run

    def ort_generate(m, n):
        from trifuse.export import ort_generate_greedy

        return lambda: ort_generate_greedy(m.runners()[0], prompt, pmask, max_new_tokens=n, eos_token_id=[],
                                           pad_token_id=0)

    for backend, m in (ort or {}).items():
        prefill[backend] = ort_prefill(m)
        generate[backend] = lambda n, m=m: ort_generate(m, n)

    def check_generated(out):
        if out.shape != (batch, ctx):
            raise RuntimeError(f"generated shape {tuple(out.shape)}, expected {(batch, ctx)}")
        return _argmax_gap(hf_eager, out, new)

    base = {"suite": "decoder", "op": name, "shape": f"{batch}x{ctx}", "batch": batch, "seq": ctx,
            "dtype": DTYPE_NAMES[dtype]}
    return time_decoder_backends(prefill, generate, ref, check_generated, backends, opts, base,
                                 first_phase="prefill", new=new, batch=batch, tokens=batch * ctx)


def run(opts: Options, models: Optional[list[str]] = None) -> SuiteResult:
    """The decoder-only suite: ``run(opts, ["gpt2", "gpt2-medium", ...])``; default ``["gpt2"]``."""
    gpu = opts.on_gpu
    backends = pick_backends(opts, BACKENDS, BACKENDS if gpu else CPU_DEFAULT)
    models = models or ["gpt2"]
    unknown = [m for m in models if not is_model(m)]
    if unknown:
        raise SystemExit(f"unknown decoder-only model(s) {unknown}; choose from {list(NAMED)} or a checkpoint "
                         f"directory of one ({', '.join(kind_model_types(DECODER))})")
    # Sizes given on the command line are run as given; --quick shortens only the defaults.
    if opts.quick:
        default_batches, default_contexts = [1], [128 if gpu else 32]
    else:
        default_batches, default_contexts = ([1, 8], [128, 256, 512, 1024]) if gpu else ([1], [32])
    batches, contexts = opts.batch or default_batches, opts.seq or default_contexts
    new = 4 if (opts.quick or not gpu) else 32
    notes = [f"decode: greedy generate of {new} tokens after a (ctx - {new}) token prompt; per-token latency "
             f"= (t({new}) - t(1)) / {new - 1}; tok/s = batch / per-token latency.",
             "prefill: one forward over the whole context into a KV cache, last-position logits."]
    notes += cpu_notes(opts)
    rows = []
    for name in models:
        dtype, dev = opts.dtype, opts.device
        step(opts, f"{name}: building the models")
        hf_eager = build_hf(name, dtype, dev, "eager")
        mine = model_backends(opts, backends, hf_eager)
        hf_sdpa = compiled = None
        if "hf-sdpa" in mine or "torch-compile" in mine:
            hf_sdpa = build_hf(name, dtype, dev, "sdpa")
            hf_sdpa.load_state_dict(hf_eager.state_dict())
            if "torch-compile" in mine:
                compiled = torch.compile(hf_sdpa)
        ours = engine.from_pretrained(hf_eager, task="causal-lm", dtype=dtype, device=dev, quantize=opts.quantize)
        n_pos = ours.max_decoder_positions
        ort = ort_models(hf_eager, "causal-lm", mine, opts.threads)
        graphed = graph_decoder(ours, max_len=min(n_pos, max(contexts))) if "trifuse-graphs" in mine else None
        for b in batches:
            for ctx in contexts:
                if ctx > n_pos or ctx <= new:
                    rows.append({"suite": "decoder", "op": name, "shape": f"{b}x{ctx}", "batch": b, "seq": ctx,
                                 "dtype": DTYPE_NAMES[dtype], "backend": "-",
                                 "status": f"skipped: context must lie in ({new}, {n_pos}]"})
                    continue
                rows += _bench_one(name, opts, mine, b, ctx, new, hf_eager, hf_sdpa, ours, compiled, ort, graphed)
        del hf_eager, hf_sdpa, ours, compiled, ort, graphed
        if opts.device.type == "cuda":
            torch.cuda.empty_cache()
    title = f"trifuse decoder-only models on {opts.device.type} ({DTYPE_NAMES[opts.dtype]})"
    return SuiteResult(title, rows, {}, notes)
