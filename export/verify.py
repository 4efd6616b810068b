"""ONNX Runtime against PyTorch on the same inputs: ``verify(onnx_path, model)``.

Inputs are generated to fit the model unless given: another batch size and
sequence length (image size) than the export's example, with padding (right
padding for encoders, left padding for GPT-2's prompt). GPT-2 is checked in two
stages: a prefill from an empty past, then a step of two new tokens whose past is
ONNX Runtime's own ``present.*`` from the prefill (the PyTorch side gets the same
past in a :class:`~engine.models.gpt2.KVCache`).

For every output the report gives the max absolute error, the max error relative
to the largest reference value (``max|ort - torch| / max|torch|``; element-wise
relative error is meaningless next to zeros) and the number of elements whose
error exceeds the budget times that largest value. Budgets per dtype:
:data:`BUDGETS`. With ``layerwise=True`` (a file exported with
``layer_outputs=True``) the block outputs are compared too and the report names
the first one over budget.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import onnx as ox
from .runtime import empty_past

#: Max error relative to the largest reference value, per exported dtype.
BUDGETS = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


@dataclass
class Row:
    stage: str  # "forward", or GPT-2's "prefill" / "step"
    output: str
    shape: Tuple[int, ...]
    max_abs: float
    max_rel: float
    mismatches: int  # elements with |ort - torch| > budget * max|torch| (NaN counts)
    budget: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.max_rel <= self.budget


@dataclass
class VerifyReport:
    onnx_path: str
    family: str
    dtype: str
    providers: List[str]
    rows: List[Row]  # the graph's real outputs
    layers: List[Row] = field(default_factory=list)  # hidden_states.{i} (layerwise)
    inputs: Dict[str, Dict[str, Tuple[int, ...]]] = field(default_factory=dict)  # stage -> name -> shape

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows) and all(r.ok for r in self.layers)

    @property
    def first_bad_layer(self) -> Optional[Tuple[str, int, float]]:
        """``(stage, index, rel err)`` of the first hidden state over budget (0: the embeddings)."""
        for r in self.layers:
            if not r.ok:
                return r.stage, int(r.output.rsplit(".", 1)[1]), r.max_rel
        return None

    def __str__(self) -> str:
        lines = [f"{self.onnx_path} ({self.family}, {self.dtype}) on {', '.join(self.providers)}"]
        for r in self.rows + self.layers:
            lines.append(f"  {r.stage:8s} {r.output:28s} max abs {r.max_abs:.2e}  rel {r.max_rel:.2e}  "
                         f"mismatches {r.mismatches}/{r.numel}  budget {r.budget:.0e}  {'ok' if r.ok else 'OVER'}")
        bad = self.first_bad_layer
        if bad is not None:
            lines.append(f"  first block over budget: {_layer_name(bad[1])} ({bad[0]}, rel err {bad[2]:.2e})")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def _layer_name(i: int) -> str:
    return "embeddings" if i == 0 else f"layer {i}"


def compare(stage: str, name: str, ort_out: Tensor, ref: Tensor, budget: float) -> Row:
    if tuple(ort_out.shape) != tuple(ref.shape):
        raise ValueError(f"{stage} output {name}: ONNX Runtime gave shape {tuple(ort_out.shape)}, PyTorch "
                         f"{tuple(ref.shape)}: the file does not match this model")
    a, b = ort_out.detach().double().cpu(), ref.detach().double().cpu()
    diff = (a - b).abs()
    diff = torch.where(torch.isnan(diff) & ~(torch.isnan(a) & torch.isnan(b)), torch.full_like(diff, math.inf),
                       torch.nan_to_num(diff, nan=0.0))
    scale = max(b.abs().nan_to_num(0.0).max().item() if b.numel() else 0.0, 1e-30)
    max_abs = diff.max().item() if diff.numel() else 0.0
    mismatches = int((diff > budget * scale).sum().item())
    return Row(stage, name, tuple(ref.shape), max_abs, max_abs / scale, mismatches, budget)


# ----------------------------------------------------------------------------
# Inputs.


def _other(n: int, avoid: int, lo: int = 1, hi: Optional[int] = None) -> int:
    """``n``, moved off ``avoid`` (the export's example) within ``[lo, hi]``."""
    hi = n if hi is None else hi
    n = max(lo, min(n, hi))
    if n == avoid:
        n = n - 1 if n - 1 >= lo else n + 1
    return max(lo, min(n, hi))


def make_inputs(model, meta: dict, *, batch: int = 3, seq: int = 11, seed: int = 0) -> Dict[str, Tensor]:
    """Inputs for one forward of an encoder / ViT graph, off the export's example shapes, padded."""
    from trifuse.engine.inputs import token_batch

    family, kind = ox.model_kind(model)
    example = json.loads(meta.get("trifuse.example_shapes", "{}"))
    dynamic = meta.get("trifuse.dynamic", "true") == "true"
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    if kind == "encoder":
        c = model.config
        eb, en = example.get("input_ids", (0, 0))
        if seq > c.max_length:
            raise ValueError(f"seq={seq} exceeds the model's {c.max_length} positions")
        b, n = (_other(batch, eb), _other(seq, en, 1, c.max_length)) if dynamic else (eb, en)
        ids, mask = token_batch(c.vocab_size, c.pad_token_id, b, n, device, seed)
        feed = {"input_ids": ids, "attention_mask": mask}
        if model.uses_token_type_ids:
            types = torch.zeros_like(ids)
            types[:, n // 2:] = min(1, c.type_vocab_size - 1)
            feed["token_type_ids"] = types
        return feed
    if kind == "vision":
        c = model.config
        eb, ch, eh, ew = example.get("pixel_values", (0, 0, 0, 0))
        b = _other(batch, eb) if dynamic else eb
        h, w = (c.image_size if (dynamic or not eh) else (eh, ew))
        return {"pixel_values": torch.randn(b, c.num_channels, h, w, generator=g).to(device)}
    raise ValueError(f"make_inputs covers encoders and vision models; {family} ({kind}) is checked in stages by "
                     "verify()")


def _decoder_stages(model, meta: dict, batch: int, seq: int, seed: int):
    """A decoder-only model: a left-padded prompt from an empty past, then 2 new tokens on top of it."""
    c = model.config
    limit = model.max_decoder_positions
    example = json.loads(meta.get("trifuse.example_shapes", "{}"))
    eb, en = example.get("input_ids", (0, 0))
    dynamic = meta.get("trifuse.dynamic", "true") == "true"
    if not dynamic:
        raise ValueError(f"a {model.model_type} exported with dynamic=False only runs its example shapes; "
                         "pass inputs=")
    if seq > limit - 2:
        raise ValueError(f"seq={seq} leaves no room for the 2 decoding steps verify adds within the model's "
                         f"{limit} positions (at most {limit - 2})")
    b = _other(batch, eb)
    n = _other(seq, en, 1, limit - 2)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c.vocab_size, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for i in range(1, b):  # left padding, the longest row first
        mask[i, : min(n - 1, 2 * i)] = 0
    pad = c.pad_token_id if c.pad_token_id is not None else 0
    ids = ids.masked_fill(mask == 0, pad)
    step_ids = torch.randint(0, c.vocab_size, (b, 2), generator=g)
    return ids, mask, step_ids


# ----------------------------------------------------------------------------
# PyTorch's side.


def _torch_forward(model, kind: str, feed: Dict[str, Tensor], meta: dict, hidden: bool) -> Dict[str, Tensor]:
    device = next(model.parameters()).device
    feed = {k: v.to(device) for k, v in feed.items()}
    with torch.no_grad():
        if kind == "encoder":
            out = model(feed["input_ids"], attention_mask=feed.get("attention_mask"),
                        token_type_ids=feed.get("token_type_ids"), output_hidden_states=hidden)
        elif kind == "vision":
            out = model(feed["pixel_values"], interpolate_pos_encoding=meta.get("trifuse.dynamic") == "true",
                        output_hidden_states=hidden)
        else:
            return _torch_decoder(model, feed, hidden)
    res = {k: out[k] for k in out.keys() if k not in ("hidden_states", "attentions")}
    if hidden:
        res.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
    return res


def _torch_decoder(model, feed: Dict[str, Tensor], hidden: bool) -> Dict[str, Tensor]:
    """A decoder-only model on explicit past tensors: they go into a fresh cache, then the model's forward runs."""
    layers = model.cache_shape()[0]
    ids, mask = feed["input_ids"], feed["attention_mask"]
    b, n = ids.shape
    past_k = [feed.get(f"past_key_values.{i}.key") for i in range(layers)]
    past_v = [feed.get(f"past_key_values.{i}.value") for i in range(layers)]
    p = 0 if past_k[0] is None else past_k[0].shape[2]
    if tuple(mask.shape) != (b, p + n):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; with {p} past positions and {n} new "
                         f"tokens it must be {(b, p + n)}")
    cache = model.new_cache(b, p + n)
    if p:
        for i in range(layers):
            cache.keys[i, :, :, :p] = past_k[i].to(cache.keys.dtype)
            cache.values[i, :, :, :p] = past_v[i].to(cache.values.dtype)
        cache.mask[:, :p] = mask[:, :p].ne(0)
        cache.length = p
        cache.padded = not bool(cache.mask[:, :p].all())
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache, output_hidden_states=hidden)
    res = {"logits" if model.has_lm_head else "last_hidden_state":
           out.logits if model.has_lm_head else out.last_hidden_state}
    for i in range(layers):
        res[f"present.{i}.key"] = cache.keys[i, :, :, : p + n]
        res[f"present.{i}.value"] = cache.values[i, :, :, : p + n]
    if hidden:
        res.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
    return res


# ----------------------------------------------------------------------------
# The check.


def _check_match(meta: dict, model, path) -> Tuple[str, str]:
    family, kind = ox.model_kind(model)
    problems = []
    if meta.get("trifuse.family") != family:
        problems.append(f"the file holds a {meta.get('trifuse.family')} model, the model is {family}")
    else:
        theirs, ours = json.loads(meta.get("trifuse.config", "{}")), json.loads(ox.config_json(model))
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        if diff:
            problems.append("configs differ in " + ", ".join(f"{k} ({theirs.get(k)!r} in the file, "
                                                             f"{ours.get(k)!r} in the model)" for k in diff[:6]))
        if meta.get("trifuse.task") != str(getattr(model, "task", "")):
            problems.append(f"the file has the {meta.get('trifuse.task')} head, the model {model.task}")
    dtype = ox.DTYPE_NAMES.get(next(model.parameters()).dtype)
    if not problems and meta.get("trifuse.dtype") != dtype:
        problems.append(f"the file is {meta.get('trifuse.dtype')}, the model {dtype}")
    if problems:
        raise ValueError(f"{path} does not match the model: " + "; ".join(problems))
    return family, kind


def _resolve(model, meta: dict, path):
    """A checkpoint directory or ``transformers`` model -> the trifuse model, in the file's dtype and task."""
    if isinstance(model, (str, Path)):
        cfg = Path(model) / "config.json"
        model_type = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    elif hasattr(model, "config") and hasattr(model.config, "to_dict"):
        model_type = getattr(model.config, "model_type", None)
    else:
        return model
    if model_type is not None and model_type != meta.get("trifuse.family"):
        raise ValueError(f"{path} does not match the model: the file holds a {meta.get('trifuse.family')} model, "
                         f"the checkpoint is {model_type}")
    from trifuse import engine

    return engine.from_pretrained(model, dtype=meta.get("trifuse.dtype"), task=meta.get("trifuse.task") or None)


def _available_providers() -> List[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def _runner(path: Path, meta: dict, providers) -> "ox.OrtRunner":
    runner = ox.OrtRunner(path, providers)
    active = runner.session.get_providers()
    absent = [p for p in providers if p not in active]
    if absent:  # ONNX Runtime falls back to the CPU with a warning; a check on the wrong device is no check
        raise ValueError(f"{path}: ONNX Runtime did not load {', '.join(absent)} (running on {', '.join(active)}; "
                         f"this onnxruntime build offers {', '.join(_available_providers())})")
    expected = meta["trifuse.inputs"].split(",")
    if runner.input_names != expected:
        raise ValueError(f"{path}: graph inputs {runner.input_names} are not the {expected} its metadata records")
    return runner


def verify(onnx_path, model, inputs: Optional[Dict[str, Tensor]] = None, providers=None, *,
           layerwise: bool = False, batch: int = 3, seq: int = 11, seed: int = 0,
           budget: Optional[float] = None) -> VerifyReport:
    """Run ``onnx_path`` in ONNX Runtime and ``model`` in PyTorch on the same inputs; compare.

    ``onnx_path``: what :func:`~export.onnx.to_onnx` wrote (for T5 the path given to it, or
    ``(encoder, decoder)``). ``model``: the trifuse model it was exported from (or its
    checkpoint directory / ``transformers`` model, loaded in the file's dtype and task).
    ``inputs``: ``{graph input name: tensor}`` (default: generated, see the module doc;
    T5 takes ``input_ids``, ``attention_mask`` and optionally ``decoder_input_ids``).
    ``providers``: ORT providers (default CPU); each must load (ONNX Runtime's silent
    fallback to the CPU is an error). ``layerwise``: require block outputs (export with
    ``layer_outputs=True``); a file that has them always has them compared. ``batch`` and
    ``seq`` (>= 1, within the position table) size the generated inputs. ``budget``: override
    :data:`BUDGETS`. Raises ``FileNotFoundError`` / ``ValueError`` for a missing file, a file
    that is not a trifuse export, one that does not belong to ``model``, or a provider that
    does not load.
    """
    from trifuse.engine import use_packing

    with use_packing(False):  # the graph keeps the padded interface: compare with PyTorch's padded path
        return _verify(onnx_path, model, inputs, providers, layerwise, batch, seq, seed, budget)


def _verify(onnx_path, model, inputs, providers, layerwise, batch, seq, seed, budget) -> VerifyReport:
    paths = ox.onnx_paths(onnx_path)
    metas = [ox.read_metadata(p) for p in paths]
    meta = metas[0]
    model = _resolve(model, meta, paths[0])
    for p, m in zip(paths, metas):
        family, kind = _check_match(m, model, p)
    has_layers = [m.get("trifuse.layer_outputs", "0") != "0" for m in metas]
    if layerwise and not all(has_layers):
        raise ValueError(f"{paths[0]} has no block outputs: export it with layer_outputs=True "
                         "(trifuse export --layer-outputs) to verify layer by layer")
    layerwise = all(has_layers)  # a file with block outputs has them checked too
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(f"seq must be an int >= 1, got {seq!r}")
    providers = list(providers or ["CPUExecutionProvider"])
    budget = BUDGETS.get(meta.get("trifuse.dtype"), 1e-4) if budget is None else budget
    if kind == "seq2seq":
        return _verify_seq2seq(paths, metas, model, inputs, providers, layerwise, batch, seq, seed, budget)
    path = paths[0]
    runner = _runner(path, meta, providers)
    expected = runner.input_names
    report = VerifyReport(str(path), family, meta.get("trifuse.dtype", "?"), runner.session.get_providers(), [])

    def run_stage(stage: str, feed: Dict[str, Tensor]) -> Dict[str, Tensor]:
        got = runner(**feed)
        ref = _torch_forward(model, kind, feed, meta, hidden=layerwise)
        _compare_all(report, stage, runner, got, ref, budget, feed, path)
        return got

    if inputs is not None:
        feed = dict(inputs)
        if kind == "encoder" and "token_type_ids" in expected and "token_type_ids" not in feed:
            feed["token_type_ids"] = torch.zeros_like(feed["input_ids"])
        if kind == "decoder" and "past_key_values.0.key" not in feed and "input_ids" in feed:
            feed.update(empty_past(runner, feed["input_ids"].shape[0]))
        unknown = sorted(set(feed) - set(expected))
        if unknown:
            raise ValueError(f"inputs {unknown} are not inputs of {path} ({', '.join(expected)})")
        run_stage("forward", feed)
    elif kind == "decoder":
        c = model.config
        ids, mask, step_ids = _decoder_stages(model, meta, batch, seq, seed)
        feed = {"input_ids": ids, "attention_mask": mask, **empty_past(runner, ids.shape[0])}
        got = run_stage("prefill", feed)
        feed = {"input_ids": step_ids, "attention_mask": torch.cat([mask, torch.ones_like(step_ids)], dim=1)}
        feed.update({f"past_key_values.{i}.{kv}": got[f"present.{i}.{kv}"]
                     for i in range(c.n_layer) for kv in ("key", "value")})
        run_stage("step", feed)
    else:
        run_stage("forward", make_inputs(model, meta, batch=batch, seq=seq, seed=seed))
    return report


def _compare_all(report: VerifyReport, stage: str, runner, got: Dict[str, Tensor], ref: Dict[str, Tensor],
                 budget: float, feed: Dict[str, Tensor], path) -> None:
    report.inputs[stage] = {k: tuple(v.shape) for k, v in feed.items()}
    for name in runner.output_names:
        if name not in ref:
            raise ValueError(f"{path}: graph output {name} has no counterpart in the model's outputs")
        row = compare(stage, name, got[name], ref[name], budget)
        (report.layers if name.startswith("hidden_states.") else report.rows).append(row)


# ----------------------------------------------------------------------------
# Encoder-decoders: the encoder, then the decoder from an empty past, then a step on ONNX Runtime's presents.


def _seq2seq_cache(model, feed: Dict[str, Tensor], n: int):
    layers = model.cache_shape()[0]
    b = feed["decoder_input_ids"].shape[0]
    k0 = feed.get("past_key_values.0.key")
    p = 0 if k0 is None else k0.shape[2]
    cache = model.new_cache(b, p + n)
    if p:
        for i in range(layers):
            cache.keys[i, :, :, :p] = feed[f"past_key_values.{i}.key"].to(cache.keys.dtype)
            cache.values[i, :, :, :p] = feed[f"past_key_values.{i}.value"].to(cache.values.dtype)
        cache.mask[:, :p] = feed["decoder_attention_mask"][:, :p].ne(0)
        cache.length = p
        cache.padded = not bool(cache.mask[:, :p].all())
    return cache, p


def _torch_seq2seq_decoder(model, feed: Dict[str, Tensor], encoder_hidden: Tensor,
                           hidden: bool) -> Dict[str, Tensor]:
    """The model's own forward on explicit past tensors (a fresh cache) and the given encoder output."""
    ids = feed["decoder_input_ids"]
    n = ids.shape[1]
    cache, p = _seq2seq_cache(model, feed, n)
    with torch.no_grad():
        out = model(attention_mask=feed["encoder_attention_mask"], decoder_input_ids=ids,
                    decoder_attention_mask=feed["decoder_attention_mask"], encoder_outputs=encoder_hidden,
                    past_key_values=cache, output_hidden_states=hidden)
    res = {"logits": out.logits} if out.logits is not None else {"last_hidden_state": out.last_hidden_state}
    for i in range(model.cache_shape()[0]):
        res[f"present.{i}.key"] = cache.keys[i, :, :, : p + n]
        res[f"present.{i}.value"] = cache.values[i, :, :, : p + n]
    if hidden:
        res.update({f"hidden_states.{i}": h for i, h in enumerate(out.decoder_hidden_states)})
    return res


def _verify_seq2seq(paths, metas, model, inputs, providers, layerwise, batch, seq, seed,
                    budget) -> VerifyReport:
    from trifuse.engine.inputs import token_batch

    c = model.config
    name = model.model_type
    graphs = [m.get("trifuse.graph") for m in metas]
    want = ["encoder"] + (["decoder"] if model.has_decoder else [])
    if graphs != want:
        raise ValueError(f"{', '.join(map(str, paths))}: {name} ({model.task}) needs the {' and '.join(want)} graphs, "
                         f"found {graphs}; pass the path given to to_onnx or (encoder, decoder)")
    enc_runner = _runner(paths[0], metas[0], providers)
    report = VerifyReport(" + ".join(map(str, paths)), name, metas[0].get("trifuse.dtype", "?"),
                          enc_runner.session.get_providers(), [])
    inputs = dict(inputs or {})
    unknown = sorted(set(inputs) - {"input_ids", "attention_mask", "decoder_input_ids"})
    if unknown:
        raise ValueError(f"inputs {unknown} are not inputs of {name}'s graphs (input_ids, attention_mask, "
                         "decoder_input_ids)")
    device = next(model.parameters()).device
    if "input_ids" in inputs:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
    else:
        example = json.loads(metas[0].get("trifuse.example_shapes", "{}")).get("input_ids", (0, 0))
        ids, mask = token_batch(c.vocab_size, c.pad_token_id or 0, _other(batch, example[0]),
                               _other(seq, example[1], 1), "cpu", seed)
    feed = {"input_ids": ids, "attention_mask": mask}
    got = enc_runner(**feed)
    with torch.no_grad():
        enc = model.encode(ids.to(device), mask.to(device), output_hidden_states=layerwise)
        ref = {"last_hidden_state": enc.last_hidden_state}
        if model.has_decoder:
            ref["cross_key_values"] = model.cross_key_values(enc.last_hidden_state)
        if layerwise:
            ref.update({f"hidden_states.{i}": h for i, h in enumerate(enc.hidden_states)})
    _compare_all(report, "encoder", enc_runner, got, ref, budget, feed, paths[0])
    if not model.has_decoder:
        return report

    dec_runner = _runner(paths[1], metas[1], providers)
    b = ids.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    dec_ids = inputs.get("decoder_input_ids")
    if dec_ids is None:
        dec_ids = torch.randint(0, c.vocab_size, (b, 3), generator=g)
        dec_ids[:, 0] = c.decoder_start_token_id or 0
    enc_hidden = got["last_hidden_state"].to(device)  # ONNX Runtime's encoder output feeds both decoders
    fixed = {"encoder_attention_mask": mask, "cross_key_values": got["cross_key_values"]}
    dec_feed = {"decoder_input_ids": dec_ids, "decoder_attention_mask": torch.ones_like(dec_ids), **fixed,
                **empty_past(dec_runner, b)}
    for stage in ("prefill", "step"):
        out = dec_runner(**dec_feed)
        torch_feed = {k: v.to(device) for k, v in dec_feed.items()}
        ref = _torch_seq2seq_decoder(model, torch_feed, enc_hidden, layerwise)
        _compare_all(report, stage, dec_runner, out, ref, budget, dec_feed, paths[1])
        step_ids = torch.randint(0, c.vocab_size, (b, 2), generator=g)
        dec_feed = {"decoder_input_ids": step_ids,
                    "decoder_attention_mask": torch.ones(b, dec_feed["decoder_attention_mask"].shape[1] + 2,
                                                         dtype=torch.long), **fixed}
        dec_feed.update({f"past_key_values.{name}": out[f"present.{name}"]
                         for name in (f"{i}.{kv}" for i in range(model.cache_shape()[0])
                                      for kv in ("key", "value"))})
    return report


# ----------------------------------------------------------------------------
# Printing.


def print_report(report: VerifyReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    table = Table(title=f"ONNX Runtime vs PyTorch: {report.onnx_path} ({report.family}, {report.dtype}, "
                        f"{', '.join(report.providers)})", title_justify="left")
    for col in ("stage", "output", "shape", "max abs err", "max rel err", "mismatches", "budget", ""):
        table.add_column(col, justify="left" if col in ("stage", "output", "shape") else "right")
    for r in report.rows + report.layers:
        table.add_row(r.stage, r.output, "x".join(map(str, r.shape)), f"{r.max_abs:.2e}", f"{r.max_rel:.2e}",
                      f"{r.mismatches}/{r.numel}", f"{r.budget:.0e}", "[green]ok[/]" if r.ok else "[red]OVER[/]")
    console.print(table)
    for stage, shapes in report.inputs.items():
        console.print(f"{stage} inputs: " + ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in shapes.items()
                                                      if not k.startswith("past_key_values.") or k.endswith(".0.key")))
    if report.layers:
        bad = report.first_bad_layer
        console.print("every block output within budget" if bad is None else
                      f"first block output over budget: {_layer_name(bad[1])} ({bad[0]}, rel err {bad[2]:.2e})")
    console.print("[green]PASS[/]" if report.ok else "[red]FAIL: out of budget[/]")
