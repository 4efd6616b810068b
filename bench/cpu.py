"""``trifuse bench cpu``: an encoder on the CPU at every precision, trifuse beside every peer, in one run.

Rows (BERT-base by default; ``--quick``: BERT-small), batch x 128 tokens, each checked against
Hugging Face in float64 before it is timed:

* trifuse ``fp32`` / ``bf16`` / ``int8`` (``quantize="int8"``), on the native CPU path;
* Hugging Face eager and SDPA in fp32, SDPA in bf16, and its usual int8 (``torch.ao``'s
  ``quantize_dynamic``: per-tensor activations);
* ONNX Runtime fp32 and int8 (``onnxruntime.quantization.quantize_dynamic``) on trifuse's own
  export, intra-op threads matched and spinning off;
* OpenVINO fp32 and bf16 on the same ONNX file (``pip install openvino``; an optional peer:
  its rows are skipped with a note where it is missing).

Every timed row reports its throughput against the measured matmul ceiling of its precision on
the same threads (a large GEMM through the best of PyTorch's and oneDNN's kernels), so a row at
80% is close to what the CPU can do at that precision.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from trifuse import kernels

from .suite import Options, SuiteResult, build_hf_named, error_status, kind_sizes, onnx_export, pick_backends, step
from .timing import cpu_threads, measure

BACKENDS = ("trifuse-fp32", "trifuse-bf16", "trifuse-int8", "hf-eager-fp32", "hf-sdpa-fp32", "hf-sdpa-bf16",
            "hf-int8", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-bf16")
# Accuracy a row must reach against float64 before it is timed: (max relative error, min cosine).
BUDGET = {"fp32": (1e-4, 0.99999), "bf16": (0.1, 0.995), "int8": (0.5, 0.99)}


def precision(backend: str) -> str:
    return backend.rsplit("-", 1)[1]


# ----------------------------------------------------------------------------
# Ceilings: a large GEMM per precision.


def matmul_ceilings(threads: int, n: int = 1024) -> dict:
    """GFLOP/s (GOP/s for int8) of an ``n``-cubed GEMM, per precision, the best of the kernels here."""
    from trifuse.engine.quantize import ONEDNN

    a, b = torch.randn(n, n), torch.randn(n, n)
    cases = {"fp32": [lambda: a @ b], "bf16": [lambda: a16 @ b16]}
    a16, b16 = a.bfloat16(), b.bfloat16()
    if torch.backends.mkldnn.is_available():
        cases["fp32"].append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            packed = torch.ops.mkldnn._reorder_linear_weight(b16, n)
            cases["bf16"].append(lambda: torch.ops.mkldnn._linear_pointwise(a16, packed, None, "none", [], ""))
    ai8, bi8 = torch.randint(-127, 128, (n, n), dtype=torch.int8), torch.randint(-127, 128, (n, n), dtype=torch.int8)
    cases["int8"] = [lambda: torch._int_mm(ai8, bi8.t())]
    if ONEDNN:
        au8, pq = ai8.to(torch.int32).add(128).to(torch.uint8), torch.ops.onednn.qlinear_prepack(bi8, None)
        ws, zp = torch.ones(n), torch.zeros(n, dtype=torch.int32)
        cases["int8"].append(lambda: torch.ops.onednn.qlinear_pointwise(au8, 1.0, 128, pq, ws, zp, None, 1.0, 0,
                                                                        torch.float32, "none", [], ""))
    out = {}
    for prec, fns in cases.items():
        best = min(measure(fn, "cpu", warmup=2, min_time_s=0.1, min_iters=3, max_iters=50, flush_l2=False,
                           threads=threads).median for fn in fns)
        out[f"matmul_{prec}_gflops"] = 2 * n**3 / (best * 1e-3) / 1e9
    return out


def model_flops(hf_model, lengths: list) -> float:
    """The useful work of a batch of sequences of ``lengths`` real tokens: multiply-adds x 2 of the
    linears (every real token) and of attention's two products (each sequence over its own tokens).
    Padding is not work: a path that skips it is not charged for it, one that computes it gets no
    credit (so every row's fraction of the ceiling compares the same work)."""
    linear = sum(m.weight.numel() for m in hf_model.modules() if isinstance(m, torch.nn.Linear))
    c = hf_model.config
    attn = 4 * sum(n * n for n in lengths) * c.hidden_size * c.num_hidden_layers
    return 2 * linear * sum(lengths) + attn


# ----------------------------------------------------------------------------
# Peers.


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting against the others
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _ort_int8(path: Path, folder: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = folder / "model-int8.onnx"
    if not out.exists():
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return out


def _feed(names, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    arrays = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": np.zeros_like(ids.numpy())}
    return {n: arrays[n] for n in names}


def _openvino(path: Path, threads: int, prec: str):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "bf16" if prec == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
    return compiled, compiled.create_infer_request()


def _backend_fn(backend: str, hf, ids, mask, onnx: Callable[[], Path], threads: int) -> Callable[[], torch.Tensor]:
    """A zero-argument callable returning ``last_hidden_state`` (fp32 on the CPU) for ``backend``."""
    from trifuse import engine

    prec = precision(backend)
    if backend.startswith("trifuse"):
        model = engine.from_pretrained(hf, dtype=torch.bfloat16 if prec == "bf16" else torch.float32,
                                       quantize="int8" if prec == "int8" else None)

        def run():
            with kernels.use_backend("native"), torch.inference_mode():
                return model(ids, attention_mask=mask).last_hidden_state.float()
        return run
    if backend.startswith("hf"):
        model = copy.deepcopy(hf)
        model.config._attn_implementation = "eager" if "eager" in backend else "sdpa"
        if prec == "int8":
            with warnings.catch_warnings():  # deprecated in torch, still what most users run
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        else:
            model = model.to(torch.bfloat16 if prec == "bf16" else torch.float32)

        def run():
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return run
    path = onnx()
    if backend.startswith("onnxruntime"):
        sess = _ort_session(_ort_int8(path, path.parent) if prec == "int8" else path, threads)
        feed = _feed([i.name for i in sess.get_inputs()], ids, mask)
        return lambda: torch.from_numpy(sess.run(["last_hidden_state"], feed)[0])
    compiled, request = _openvino(path, threads, prec)
    feed = _feed([p.get_any_name() for p in compiled.inputs], ids, mask)
    out = compiled.output("last_hidden_state")
    return lambda: torch.from_numpy(np.array(request.infer(feed)[out]))


# ----------------------------------------------------------------------------
# The suite.


def run(opts: Options, names: Optional[list] = None) -> SuiteResult:
    if opts.on_gpu:
        return SuiteResult("trifuse on the CPU (skipped: this run is on a GPU)", [],
                           notes=["The CPU suite runs with --device cpu."])
    backends = pick_backends(opts, BACKENDS, BACKENDS)
    threads = opts.cpu_threads
    name = (names or ["bert-small" if opts.quick else "bert-base"])[0]
    batches = opts.batch or ([1] if opts.quick else [1, 8])
    seq = (opts.seq or [128])[0]
    notes = [f"Every row on {threads} intra-op thread(s); ONNX Runtime with spinning off. The trifuse rows run "
             "the native CPU path (backend 'native'), the hf-int8 row torch.ao's quantize_dynamic "
             "(per-tensor activations; deprecated in torch, what Hugging Face users reach for)."]
    try:
        import openvino  # noqa: F401
    except ImportError:
        backends = [b for b in backends if not b.startswith("openvino")]
        notes.append("OpenVINO is not installed (pip install openvino, or the bench extra): its rows are skipped.")
    step(opts, "matmul ceilings")
    ceilings = matmul_ceilings(threads)
    hf = build_hf_named(name, kind_sizes("encoder"), torch.float32, torch.device("cpu"), "sdpa")
    hf64 = copy.deepcopy(hf).double()
    hf64.config._attn_implementation = "eager"
    exported: list = []

    def onnx() -> Path:
        if not exported:
            exported.append(onnx_export(hf, "feature-extraction")[0][0])
        return exported[0]

    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(min(1000, hf.config.vocab_size // 2), hf.config.vocab_size, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if batch > 1:
            mask[1:, seq // 2:] = 0  # mixed lengths, as a batch of real requests
        with torch.no_grad():
            ref = hf64(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.sum(1).tolist()
        flops = model_flops(hf, lengths)
        for backend in backends:
            prec = precision(backend)
            step(opts, f"{name} {batch}x{seq} {backend}")
            shape = f"{batch}x{seq}" if sum(lengths) == batch * seq else f"{batch}x{seq} ({sum(lengths)} real)"
            row = {"suite": "cpu", "op": name, "shape": shape, "batch": batch, "seq": seq,
                   "dtype": prec, "backend": backend}
            try:
                with cpu_threads(threads):
                    fn = _backend_fn(backend, hf, ids, mask, onnx, threads)
                    out = fn()
            except Exception as e:  # noqa: BLE001 - a backend that fails is a result
                rows.append({**row, "status": error_status(e)})
                continue
            keep = mask.bool()[..., None].expand_as(ref)  # padded positions are not compared
            rel = ((out.double() - ref)[keep].abs().max() / ref[keep].abs().max()).item()
            cos = F.cosine_similarity(out.double()[mask.bool()], ref[mask.bool()], dim=-1).min().item()
            row.update(rel_err=rel, cosine=cos)
            max_rel, min_cos = BUDGET[prec]
            if not (rel <= max_rel and cos >= min_cos):
                rows.append({**row, "status": "mismatch"})
                continue
            t = measure(fn, "cpu", warmup=1 if opts.quick else 3, min_time_s=0.3 if opts.quick else 2.0,
                        min_iters=3 if opts.quick else 10, threads=threads)
            row.update(status=t.status(), **t.summary())
            row["tflops"] = flops / (t.median * 1e-3) / 1e12
            row["frac_of_peak"] = flops / (t.median * 1e-3) / 1e9 / ceilings[f"matmul_{prec}_gflops"]
            rows.append(row)
    _speedups(rows)
    title = f"trifuse on the CPU: {name}, fp32/bf16/int8 against Hugging Face, ONNX Runtime and OpenVINO"
    return SuiteResult(title, rows, ceilings, notes)


def _speedups(rows: list) -> None:
    """``speedup_vs_hf_eager``: against Hugging Face eager fp32; ``vs_hf_same_precision``: against
    Hugging Face at the row's own precision (SDPA; its quantize_dynamic for int8)."""
    hf_of = {"fp32": "hf-sdpa-fp32", "bf16": "hf-sdpa-bf16", "int8": "hf-int8"}
    by = {(r["shape"], r["backend"]): r for r in rows if r.get("median_ms")}
    for r in rows:
        if not r.get("median_ms"):
            continue
        eager = by.get((r["shape"], "hf-eager-fp32"))
        if eager:
            r["speedup_vs_hf_eager"] = eager["median_ms"] / r["median_ms"]
        same = by.get((r["shape"], hf_of[r["dtype"]]))
        if same:
            r["vs_hf_same_precision"] = same["median_ms"] / r["median_ms"]


def headline_lines(rows: list) -> list:
    """Where trifuse stands on this CPU, one line per shape: each precision against its Hugging Face peer
    and the fastest other peer, with the fraction of the ceiling."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        here = {r["backend"]: r for r in rows if r["shape"] == shape and r.get("median_ms")}
        parts = []
        for prec in ("fp32", "bf16", "int8"):
            ours = here.get(f"trifuse-{prec}")
            if not ours:
                continue
            text = f"{prec} {ours['median_ms']:.0f} ms ({ours['frac_of_peak']:.0%} of the {prec} matmul ceiling"
            if ours.get("vs_hf_same_precision"):
                text += f", {ours['vs_hf_same_precision']:.2f}x Hugging Face"
            others = [r for b, r in here.items() if r["dtype"] == prec and not b.startswith(("trifuse", "hf"))]
            if others:
                best = min(others, key=lambda r: r["median_ms"])
                text += f", {best['median_ms'] / ours['median_ms']:.2f}x {best['backend']}"
            parts.append(text + ")")
        if parts:
            op = next(r["op"] for r in rows if r["shape"] == shape)
            lines.append(f"On this CPU, {op} {shape}: " + "; ".join(parts) + ".")
    return lines
