"""What every benchmark suite shares: its options, its result, and the
check-then-time step each backend goes through.

A suite is a module with ``run(opts: Options) -> SuiteResult``. A backend's
output is compared with the float64 reference before it is timed; one that does
not match is reported as a mismatch and not timed, so a fast wrong answer never
shows up as a speed-up. A timing that :mod:`.timing` finds noisy is reported as
``noisy: <why>`` and never enters a speedup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .timing import DEFAULT_CPU_THREADS, Timing, measure

# Largest |out - ref| <= atol + rtol * |ref| a backend may show against the float64
# reference; loose enough for any correct kernel in that dtype, tight enough to
# catch a wrong one.
CHECK_TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 6e-2),
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Options:
    device: torch.device
    dtype: torch.dtype
    backends: Optional[list[str]] = None  # None: the suite's defaults for this device
    quick: bool = False  # fewer shapes and shorter timings, for a smoke run
    warmup: int = 10
    min_time_s: float = 0.25
    # Sweep axes; None: the suite's defaults for this device.
    rows: Optional[list[int]] = None
    widths: Optional[list[int]] = None
    batch: Optional[list[int]] = None
    seq: Optional[list[int]] = None
    head_dims: Optional[list[int]] = None
    threads: Optional[int] = None  # CPU: torch (and ONNX Runtime) intra-op threads while timing
    quantize: Optional[str] = None  # "int8": trifuse's rows quantized (engine.quantize)
    # Told what runs now ("bert-small 1x64 hf-eager"), for a progress display; None: silent.
    progress: Optional[Callable[[str], None]] = None

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def cpu_threads(self) -> int:
        return self.threads or DEFAULT_CPU_THREADS


def step(opts: Options, what: str) -> None:
    """Tell the progress display (if any) what runs now."""
    if opts.progress is not None:
        opts.progress(what)


@dataclass
class SuiteResult:
    title: str
    rows: list[dict]
    ceilings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def max_abs_error(out, ref) -> float:
    return max((o.double() - r.double()).abs().max().item() if o.numel() else 0.0
               for o, r in zip(_as_tuple(out), _as_tuple(ref)))


def matches(out, ref, dtype: torch.dtype) -> bool:
    atol, rtol = CHECK_TOL[dtype]
    outs, refs = _as_tuple(out), _as_tuple(ref)
    return len(outs) == len(refs) and all(
        o.shape == r.shape and torch.allclose(o.double(), r.double().to(o.device), atol=atol, rtol=rtol)
        for o, r in zip(outs, refs))


def check_and_time(fn: Callable[[], object], ref, opts: Options, *, time_it: bool = True,
                   device: Optional[torch.device] = None) -> dict:
    """Run ``fn`` once and compare with ``ref``; time it only if it matches.

    Returns the row fields: ``status``, ``max_abs_err`` and the timing summary.
    """
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - a backend that fails is a result, not a crash
        return {"status": error_status(e)}
    err = max_abs_error(out, ref)
    if not matches(out, ref, opts.dtype):
        return {"status": "mismatch", "max_abs_err": err}
    if not time_it:
        return {"status": "checked", "max_abs_err": err}
    t = measure(fn, device or opts.device, warmup=2 if opts.quick else opts.warmup,
                min_time_s=0.02 if opts.quick else opts.min_time_s, threads=opts.threads)
    return {"status": t.status(), "max_abs_err": err, **t.summary()}


def error_status(e: BaseException, limit: int = 120) -> str:
    """A row's status for an exception: ``error: Type: first line of the message``."""
    first = (str(e).splitlines() or [""])[0]
    return f"error: {type(e).__name__}: {first[:limit]}"


def is_timed_result(row: dict) -> bool:
    """A timing that may be shown as a result: timed and not flagged noisy."""
    return row.get("status") == "ok" and bool(row.get("median_ms"))


def pick_backends(opts: Options, available: Sequence[str], default: Sequence[str]) -> list[str]:
    if opts.backends is None:
        return list(default)
    unknown = [b for b in opts.backends if b not in available]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; this suite has {list(available)}")
    return list(opts.backends)


# ----------------------------------------------------------------------------
# Whole models: outputs compared with Hugging Face eager relative to the largest
# reference value (element-wise relative error means nothing next to zeros).

MODEL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
QUANTIZED_TOL = 0.5  # int8 rows: max error relative to the largest output (cosine is in bench/cpu.py)


def kind_sizes(kind: str) -> dict:
    """Every named size of the families of ``kind`` (their contracts, ``engine.family``): name -> config dict."""
    from trifuse.engine.registry import families

    return {name: cfg for fam in families() if fam.kind == kind for name, cfg in fam.named_sizes.items()}


def kind_model_types(kind: str) -> tuple:
    from trifuse.engine.registry import families

    return tuple(t for fam in families() if fam.kind == kind for t in fam.model_types)


def is_kind_model(name: str, kind: str) -> bool:
    """A named size of a family of ``kind``, or a checkpoint directory of one."""
    return name in kind_sizes(kind) or checkpoint_model_type(name) in kind_model_types(kind)


def checkpoint_model_type(path: str) -> Optional[str]:
    """``model_type`` of a checkpoint directory's config.json, or None if it is not one."""
    import json

    cfg = Path(path) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    except (OSError, ValueError):
        return None


def build_hf_named(name: str, named: dict, dtype: torch.dtype, device: torch.device, attn: str,
             auto_class: str = "AutoModel"):
    """A Hugging Face model: a checkpoint directory, or a named size from ``named``
    (a config dict with ``model_type``) with seeded random weights."""
    import os

    import transformers

    auto = getattr(transformers, auto_class)
    if os.path.isdir(name):
        model = auto.from_pretrained(name, dtype=torch.float32, attn_implementation=attn)
    else:
        cfg = dict(named[name])
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        config._attn_implementation = attn
        torch.manual_seed(0)
        with torch.device(device):  # random init on the device: seconds, not minutes, for large sizes
            model = auto.from_config(config, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


def _untimed_status(row: dict, backend: str, opts: Options, interpreted: bool) -> Optional[str]:
    """Why a checked backend is not timed: a wrong answer, or interpreted Triton on the CPU
    (checked, but its time says nothing about a GPU). None: time it."""
    ours = backend.startswith("trifuse") or backend == "reference"  # both run the (quantized) trifuse model
    tol = QUANTIZED_TOL if opts.quantize and ours else MODEL_TOL[opts.dtype]
    if row["rel_err"] > tol:
        return "mismatch"
    if backend.startswith("trifuse") and backend != "trifuse-native" and interpreted:
        return "checked"
    return None


def time_model_backends(fns: dict, ref: torch.Tensor, backends: Sequence[str], opts: Options, base_row: dict,
                        *, items: int, tokens: int, item_name: str = "seq", native: Sequence[str] = ()) -> list[dict]:
    """Check each backend's output against ``ref``, then time the ones that match.

    ``items`` sequences (or images) of ``tokens`` tokens in all go through one call;
    rows get ``{item_name}_per_s`` and ``tokens_per_s``. On the CPU the trifuse
    backend runs interpreted Triton: it is checked, not timed (except the ``native`` backends,
    which the caller runs on the native CPU path).
    """
    from trifuse import kernels
    dev = opts.device
    interpreted = dev.type == "cpu" and kernels.triton_runnable(dev)
    rows = []
    for backend in backends:
        row = {**base_row, "backend": backend}
        step(opts, f"{base_row['op']} {base_row['shape']} {backend}")
        try:
            with torch.no_grad():
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                out = fns[backend]()
                row["max_abs_err"] = (out.float() - ref.float()).abs().max().item()
                row["rel_err"] = rel_error(out, ref)
                untimed = _untimed_status(row, backend, opts, interpreted and backend not in native)
                if untimed:
                    rows.append({**row, "status": untimed})
                    continue
                t = measure(fns[backend], dev, warmup=2 if opts.quick else opts.warmup,
                            min_time_s=0.05 if opts.quick else opts.min_time_s, min_iters=6, flush_l2=False,
                            threads=opts.threads)
        except Exception as e:  # noqa: BLE001 - a failing backend is a result
            rows.append({**row, "status": error_status(e, 100)})
            continue
        s = t.summary()
        seconds = s["median_ms"] * 1e-3
        row.update(status=t.status(), **s, **{f"{item_name}_per_s": items / seconds}, tokens_per_s=tokens / seconds)
        if dev.type == "cuda":
            row["peak_mem_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        rows.append(row)
    return add_speedups(rows)


def add_speedups(rows: list[dict], baseline: str = "hf-eager") -> list[dict]:
    """``speedup_vs_hf_eager`` for every timed row of one shape; never from a noisy row or against
    a noisy baseline (a ratio of two noises is not a speedup)."""
    base = next((r["median_ms"] for r in rows if r["backend"] == baseline and is_timed_result(r)), None)
    for r in rows:
        if base and is_timed_result(r):
            r[f"speedup_vs_{baseline.replace('-', '_')}"] = base / r["median_ms"]
    return rows


# ----------------------------------------------------------------------------
# ONNX Runtime backends: our model exported to ONNX (fp32, from the CPU) and run by
# ONNX Runtime; the timed call is what a user pays: torch inputs in, ONNX Runtime's
# run, torch outputs back on the inputs' device.

ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

# Exporting a base-size decoder takes 20-40 s on the CPU (2 cores: GPT-2 base 19 s, t5-base
# 39 s), so without a GPU the decoder suites' default set runs onnxruntime-cpu only on models
# under this size: the small sizes, which the main job exports anyway (t5-small: 21 s), once.
ORT_CPU_DEFAULT_MAX_PARAMS = 100_000_000

# One export per model per process, shared by every shape, backend and suite (and the main
# job's export step): fingerprint -> (temporary folder, paths, export seconds), or the
# exception the export raised, so a failing export fails each row without running again.
_EXPORTS: dict = {}


def _fingerprint(hf_model, task: str) -> tuple:
    """What an export depends on: the class, the task, the config and every weight (a checksum)."""
    sums = tuple(t.sum(dtype=torch.float64).item() for t in hf_model.state_dict().values())
    return type(hf_model).__name__, task, hf_model.config.to_json_string(), sums


def onnx_export(hf_model, task: str, model=None) -> tuple[tuple[Path, ...], float]:
    """Our model of ``hf_model`` for ``task``, exported to ONNX in fp32 from the CPU once per
    process: ``(paths, export seconds)``; T5's paths are its encoder and decoder files.
    ``model``: that trifuse model already built (fp32, CPU), used when no export exists yet."""
    key = _fingerprint(hf_model, task)
    if key not in _EXPORTS:
        import tempfile
        import time

        try:
            from trifuse import engine
            from trifuse.export import to_onnx

            if model is None:
                model = engine.from_pretrained(hf_model, task=task, dtype=torch.float32, device="cpu")
            folder = tempfile.TemporaryDirectory(prefix="trifuse-ort-")
            t0 = time.perf_counter()
            paths = to_onnx(model, Path(folder.name) / "model.onnx")
            _EXPORTS[key] = (folder, paths if isinstance(paths, tuple) else (paths,), time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - remembered, raised to every caller
            _EXPORTS[key] = e
    entry = _EXPORTS[key]
    if isinstance(entry, Exception):
        raise entry
    return entry[1], entry[2]


def release_exports() -> None:
    """Delete every export :func:`onnx_export` holds (its temporary files); later calls export again."""
    for entry in _EXPORTS.values():
        if not isinstance(entry, Exception):
            entry[0].cleanup()
    _EXPORTS.clear()


class OrtModel:
    """Our export of a Hugging Face model (:func:`onnx_export`) in ONNX Runtime on one provider
    (``"cpu"`` or ``"cuda"``). Exported and loaded on first use, so that a failure is the
    row's error, not a crash; the sessions are then reused by every shape."""

    def __init__(self, hf_model, task: str, provider: str, threads: Optional[int] = None):
        self.hf_model, self.task, self.provider = hf_model, task, ORT_PROVIDERS[provider]
        # On the CPU, ONNX Runtime's intra-op pool gets the threads torch times with: a fair race.
        self.threads = (threads or DEFAULT_CPU_THREADS) if provider == "cpu" else None
        self._paths: tuple[Path, ...] | None = None
        self._runners: tuple | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        if self._paths is None:  # the export's key sums every weight: once, not in a timed call
            self._paths = onnx_export(self.hf_model, self.task)[0]
        return self._paths

    def runners(self) -> tuple:
        """One ``export.OrtRunner`` per file (T5: encoder, decoder)."""
        if self._runners is None:
            import onnxruntime

            from trifuse.export import OrtRunner

            if self.provider not in onnxruntime.get_available_providers():
                raise RuntimeError(f"this onnxruntime build has no {self.provider}")
            runners = tuple(OrtRunner(p, providers=[self.provider], threads=self.threads) for p in self.paths)
            loaded = runners[0].session.get_providers()
            if self.provider not in loaded:  # ONNX Runtime falls back to the CPU with only a log line
                raise RuntimeError(f"{self.provider} did not load; the session runs on {loaded}")
            self._runners = runners
        return self._runners


def ort_models(hf_model, task: str, backends: Sequence[str], threads: Optional[int] = None) -> dict[str, OrtModel]:
    """An :class:`OrtModel` for each ``onnxruntime-<provider>`` backend in ``backends``."""
    return {b: OrtModel(hf_model, task, b.removeprefix("onnxruntime-"), threads)
            for b in backends if b.startswith("onnxruntime-")}


def model_backends(opts: Options, backends: Sequence[str], hf_model) -> list[str]:
    """``backends`` for one model: without a GPU the default set runs onnxruntime-cpu only on
    models under ``ORT_CPU_DEFAULT_MAX_PARAMS`` parameters; ``--backends`` overrides."""
    if opts.backends is None and not opts.on_gpu and (
            sum(p.numel() for p in hf_model.parameters()) >= ORT_CPU_DEFAULT_MAX_PARAMS):
        return [b for b in backends if b != "onnxruntime-cpu"]
    return list(backends)


ORT_CPU_DEFAULT_NOTE = (f"onnxruntime-cpu: without a GPU, in the default backends only for models under "
                        f"{ORT_CPU_DEFAULT_MAX_PARAMS // 10**6}M parameters (exporting a larger one takes 20 s "
                        "and more on the CPU); name it in --backends to run it on any size.")


def cpu_notes(opts: Options) -> list[str]:
    """The notes every suite's CPU run carries: what its trifuse rows mean, and (default backends)
    why onnxruntime-cpu is missing for large models. Empty on a GPU."""
    if opts.on_gpu:
        return []
    notes = [cpu_note(opts.device)] + ([ORT_CPU_DEFAULT_NOTE] if opts.backends is None else [])
    if opts.quantize:
        notes.append(f"--quantize {opts.quantize}: the trifuse rows (trifuse, trifuse-native, reference) load with "
                     f"quantize={opts.quantize!r} (int8 linears, {DTYPE_NAMES[opts.dtype]} elsewhere) and are checked "
                     f"within the int8 budget ({QUANTIZED_TOL} of the largest output); every other row runs "
                     f"{DTYPE_NAMES[opts.dtype]}.")
    return notes


# Encoders (BERT family, ViT): the backends side by side.
ENCODER_BACKENDS = ("trifuse", "trifuse-graphs", "trifuse-native", "reference", "hf-eager", "hf-sdpa",
                    "torch-compile", "torch-compile-max-autotune", "onnxruntime-cpu", "onnxruntime-cuda")
ENCODER_CPU_DEFAULT = ("trifuse", "trifuse-native", "reference", "hf-eager", "hf-sdpa", "onnxruntime-cpu")


def cpu_note(device: torch.device) -> str:
    """What a CPU run's ``trifuse`` rows mean, which depends on whether Triton can run here."""
    from trifuse import kernels
    if kernels.triton_runnable(device):
        return ("No GPU: the trifuse backend's Triton kernels are checked under Triton's interpreter, not timed; "
                "trifuse-native is trifuse's native CPU path (kernels/cpu.py, oneDNN linears), timed.")
    return ("No GPU and no Triton interpreter (TRITON_INTERPRET=1 was not set before trifuse was imported): "
            "the trifuse backend ran the native CPU path (kernels/cpu.py); its timings are not the Triton kernels'.")


def _ort_backend(ort: OrtModel, inputs: dict) -> Callable:
    """An encoder's ``last_hidden_state`` from ONNX Runtime."""
    feed = dict(inputs)

    def run():
        (runner,) = ort.runners()
        if "token_type_ids" in runner.input_names and "token_type_ids" not in feed:
            feed["token_type_ids"] = torch.zeros_like(inputs["input_ids"])  # what PyTorch assumes
        return runner(**feed)["last_hidden_state"]

    return run


def encoder_backend_fns(ours, hf_eager, build_sdpa: Callable[[], object], inputs: dict, backends: Sequence[str],
                        *, batch: int, seq: int = 0, threads: Optional[int] = None) -> dict:
    """Zero-argument callables returning ``last_hidden_state``, one per backend.

    ``inputs`` are keyword inputs both models take (``input_ids``/``attention_mask``
    or ``pixel_values``); ``build_sdpa()`` makes Hugging Face's SDPA model, the one
    ``torch.compile`` compiles. ``trifuse-graphs`` captures one CUDA graph for
    this exact ``batch`` x ``seq`` bucket and runs it as a latency-minded user would:
    no token-id range check (a host sync) and outputs left in the graph's buffers.
    """
    from trifuse import kernels

    def run_ours():
        return ours(**inputs).last_hidden_state

    def run_reference():
        with kernels.use_backend("reference"):
            return run_ours()

    def run_native():  # the CPU's fast path (kernels/cpu.py), whatever auto picks here
        with kernels.use_backend("native"):
            return run_ours()

    fns = {"trifuse": run_ours, "reference": run_reference, "trifuse-native": run_native,
           "hf-eager": lambda: hf_eager(**inputs).last_hidden_state}
    if "trifuse-graphs" in backends:
        graphed = []

        def run_graphed():  # built on first call, so a CPU run reports the error in its row
            from trifuse.engine.graphs import CUDAGraphModel

            if not graphed:
                graphed.append(CUDAGraphModel(ours, batch_sizes=(batch,), seq_lengths=(seq,) if seq else (1,),
                                              copy_outputs=False, validate=False))
            return graphed[0](**inputs).last_hidden_state

        fns["trifuse-graphs"] = run_graphed
    for backend, ort in ort_models(hf_eager, "feature-extraction", backends, threads).items():
        fns[backend] = _ort_backend(ort, inputs)
    if {"hf-sdpa", "torch-compile", "torch-compile-max-autotune"} & set(backends):
        hf_sdpa = build_sdpa()
        fns["hf-sdpa"] = lambda: hf_sdpa(**inputs).last_hidden_state
        for name, mode in (("torch-compile", None), ("torch-compile-max-autotune", "max-autotune")):
            if name in backends:
                compiled = torch.compile(hf_sdpa, mode=mode)
                fns[name] = lambda compiled=compiled: compiled(**inputs).last_hidden_state
    return fns


# ----------------------------------------------------------------------------
# Decoders (GPT-2, T5): a first pass, then per-token decoding.


def _time_decoder(fn: Callable[[], object], opts: Options, *, slow: bool = False) -> Timing:
    """Median and spread of ``fn``; ``slow``: a whole generate call, so fewer samples."""
    warmup = 1 if (opts.quick or slow) else opts.warmup
    return measure(fn, opts.device, warmup=warmup, min_time_s=0.05 if opts.quick else opts.min_time_s,
                   min_iters=6, max_iters=50 if slow else 1000, flush_l2=False, threads=opts.threads)


def _decode_noise(one: Timing, full: Timing) -> Optional[str]:
    """Why ``(t(G) - t(1)) / (G - 1)`` is not a per-token latency, or None."""
    if full.median <= one.median:  # timing noise swamped the steps (tiny models, CPU)
        return "t(G) <= t(1)"
    why = [f"t({n}) {w}" for n, w in (("1", one.noise()), ("G", full.noise())) if w]
    if full.median - one.median < full.percentile(90) - full.percentile(10):
        why.append("the G-1 steps take less time than t(G)'s p10-p90 spread")
    return "; ".join(why) or None


# Decoders (GPT-2, T5): the backends side by side.
DECODER_BACKENDS = ("trifuse", "trifuse-graphs", "trifuse-native", "reference", "hf-eager", "hf-sdpa", "torch-compile",
                    "onnxruntime-cpu", "onnxruntime-cuda")
DECODER_CPU_DEFAULT = ("trifuse", "trifuse-native", "reference", "hf-eager", "hf-sdpa", "onnxruntime-cpu")


def on_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``kernels.use_backend(backend)``: ``"native"`` is trifuse's CPU path whatever ``auto``
    picks here (a ``trifuse-native`` row), ``"reference"`` the PyTorch reference ops."""
    def run():
        from trifuse import kernels

        with kernels.use_backend(backend):
            return fn()
    return run


def build_hf_generator(name: str, named: dict, dtype: torch.dtype, device: torch.device, attn: str,
                       auto_class: str):
    """``build_hf_named`` for a generating model, set to decode greedily for exactly the requested
    number of tokens (no EOS stop), as the suites ask our models to."""
    model = build_hf_named(name, named, dtype, device, attn, auto_class=auto_class)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def graph_decoder(ours, max_len: Optional[int] = None) -> Callable:
    """``generate`` of the ``trifuse-graphs`` decoder backend: ``engine.graphs.CUDAGraphDecoder(ours)``,
    built on the first call (so a run without a GPU reports the error in its row) and kept
    for every shape after it (its graphs are per batch size and cache bucket)."""
    held = []

    def generate(*args, **kwargs):
        if not held:
            from trifuse.engine.graphs import CUDAGraphDecoder

            held.append(CUDAGraphDecoder(ours, max_len=max_len))
        return held[0].generate(*args, **kwargs)

    return generate


def time_decoder_backends(first: dict, generate: dict, ref_first: torch.Tensor, check_generated: Callable,
                          backends: Sequence[str], opts: Options, base_row: dict, *, first_phase: str,
                          new: int, batch: int, tokens: int) -> list[dict]:
    """Each backend in two phases, each checked before it is timed.

    ``first[b]()``: the pass over the prompt (GPT-2's prefill, T5's encoder), compared
    with ``ref_first``; a backend without one (``trifuse-graphs``) has only a decode row.
    ``generate[b](n)``: a callable generating ``n`` tokens greedily; ``check_generated(out)``
    returns its relative gap to Hugging Face eager (and raises on a wrong shape). Per-token
    latency is ``(t(new) - t(1)) / (new - 1)``, so the first pass cancels out; when noise
    swamps the steps the row says so.
    """
    from trifuse import kernels
    dev = opts.device
    interpreted = dev.type == "cpu" and kernels.triton_runnable(dev)
    rows = []
    for phase in (first_phase, "decode"):
        for backend in backends:
            if phase == first_phase and backend not in first:
                continue
            row = {**base_row, "op": f"{base_row['op']} {phase}", "phase": phase, "backend": backend}
            step(opts, f"{row['op']} {base_row['shape']} {backend}")
            if phase == "decode":
                row["new_tokens"] = new
            try:
                with torch.no_grad():
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    fn = first[backend] if phase == first_phase else generate[backend](new)
                    row["rel_err"] = rel_error(fn(), ref_first) if phase == first_phase else check_generated(fn())
                    untimed = _untimed_status(row, backend, opts, interpreted)
                    if untimed:
                        rows.append({**row, "status": untimed})
                        continue
                    if phase == first_phase:
                        t = _time_decoder(fn, opts)
                        s = t.summary()
                        row.update(s, status=t.status(), tokens_per_s=tokens / (s["median_ms"] * 1e-3),
                                   seq_per_s=batch / (s["median_ms"] * 1e-3))
                    else:
                        one = _time_decoder(generate[backend](1), opts, slow=True)
                        full = _time_decoder(fn, opts, slow=True)
                        noise = _decode_noise(one, full)
                        if noise and full.median <= one.median:
                            rows.append({**row, "status": f"noisy: {noise}", "generate_ms": full.median,
                                         "first_token_ms": one.median})
                            continue
                        per_token = (full.median - one.median) / (new - 1)
                        row.update(full.summary(), generate_ms=full.median, first_token_ms=one.median,
                                   median_ms=per_token, tokens_per_s=batch / (per_token * 1e-3),
                                   status=f"noisy: {noise}" if noise else "ok")
                        for k in ("p10_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "spread"):
                            row.pop(k)  # the spread is of the whole generate call, not of one step
            except Exception as e:  # noqa: BLE001 - a failing backend is a result
                rows.append({**row, "status": error_status(e, 100)})
                continue
            if dev.type == "cuda":
                row["peak_mem_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
            rows.append(row)
    for phase in (first_phase, "decode"):
        add_speedups([r for r in rows if r["phase"] == phase])
    return rows
