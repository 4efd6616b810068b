"""trifuse models -> ONNX, with every fused op translated to ops ONNX Runtime runs fast.

``to_onnx(model, path)`` traces a trifuse model with ``torch.onnx.export(...,
dynamo=True)``. Our ``torch.library`` custom ops reach the exporter as single
nodes; :func:`translation_table` turns each into standard ONNX:

* ``layer_norm`` / ``add_layer_norm``: ``LayerNormalization`` (after an ``Add``
  for the residual; the sum ``h`` is the op's second output);
* ``rms_norm`` / ``add_rms_norm``: ``RMSNormalization`` from opset 23, below it
  the ``Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul`` pattern ONNX Runtime
  fuses into its ``SimplifiedLayerNormalization``;
* ``gelu``: ``Add`` (bias) -> ``Gelu`` (opset 20, ``approximate`` kept) -> ``Mul`` (gate);
* ``attention``: ``MatMul -> Mul(scale) -> Add(bias) -> Where(masks) -> Softmax ->
  MatMul`` (fp16/bf16 scores in fp32); padding and bottom-right causal masks
  are built in the graph from the runtime shapes; query rows that see no key are
  zeroed (``Where`` on the row max) exactly like the kernel; T5's relative bias
  keeps its ``[num_buckets, H]`` table and computes the buckets in the graph.

The graphs (axes ``batch``, ``sequence``, ``past_sequence``, ... are symbolic unless
``dynamic=False``), named as users know them:

* BERT family: ``input_ids``, ``attention_mask``[, ``token_type_ids``] ->
  ``last_hidden_state``[, ``pooler_output``] | ``logits`` | ``start_logits``, ``end_logits``;
* ViT / DeiT: ``pixel_values`` (any height/width multiple of the patch: positions are
  interpolated in the graph) -> ``last_hidden_state``[, ``pooler_output``] | ``logits``
  [, ``cls_logits``, ``distillation_logits``];
* GPT-2: ``input_ids`` ``[B, n]``, ``attention_mask`` ``[B, P + n]`` (positions follow it,
  ``cumsum - 1``, as in the model), ``past_key_values.{i}.key/value`` ``[B, H, P, D]``
  (``P = 0`` on the first call) -> ``logits``, ``present.{i}.key/value`` ``[B, H, P + n, D]``
  (past and new concatenated in the graph);
* T5: ``OUT.encoder.onnx``: ``input_ids``, ``attention_mask`` -> ``last_hidden_state``,
  ``cross_key_values`` ``[B, L_enc, layers*2*H*D]`` (every decoder layer's cross-attention
  keys/values, computed once); ``OUT.decoder.onnx``: ``decoder_input_ids``,
  ``decoder_attention_mask`` ``[B, P + n]``, ``encoder_attention_mask``,
  ``cross_key_values``, ``past_key_values.{i}.key/value`` -> ``logits``, ``present.{i}.key/value``.

``layer_outputs=True`` adds every block's output as ``hidden_states.{i}`` (0: the
embeddings). Each file records ``trifuse.family``, ``trifuse.dtype``,
``trifuse.opset``, ``trifuse.version`` and the rest of :data:`METADATA_KEYS` in its
``metadata_props``; :mod:`export.verify` reads them to refuse a file that does not
belong to the model it is checked against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from trifuse import kernels  # noqa: F401  (registers the torch.ops.trifuse ops translated below)
from trifuse.engine.extras import require

#: The default ONNX opset (``Gelu`` and ``LayerNormalization`` need >= 20 and >= 17).
DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 20, 23
BERT_FAMILIES = ("bert", "roberta", "distilbert", "albert", "electra")
#: Output fields of the engine's output objects, in graph order.
FIELDS = ("last_hidden_state", "pooler_output", "logits", "start_logits", "end_logits", "cls_logits",
          "distillation_logits")
METADATA_KEYS = ("trifuse.version", "trifuse.family", "trifuse.kind", "trifuse.graph", "trifuse.task",
                 "trifuse.dtype", "trifuse.opset", "trifuse.config", "trifuse.inputs", "trifuse.outputs",
                 "trifuse.dynamic", "trifuse.layer_outputs", "trifuse.example_shapes")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class ExportError(ValueError):
    """A model or option the exporter cannot handle."""


# ----------------------------------------------------------------------------
# Translations of the trifuse custom ops (ONNX Script, traced by the exporter).

_FLOAT, _FLOAT16, _BFLOAT16, _BOOL, _INT64 = 1, 10, 16, 9, 7


def _is_low(value) -> bool:
    dt = getattr(value, "dtype", None)
    return dt is not None and int(dt) in (_FLOAT16, _BFLOAT16)


def translation_table(opset: int = DEFAULT_OPSET) -> dict:
    """``{torch.ops.trifuse.<op>.default: onnxscript function}`` for ``custom_translation_table``."""
    from onnxscript import opset20 as op

    rms_op = None
    if opset >= 23:
        from onnxscript import opset23

        rms_op = opset23.RMSNormalization

    def _ones_like_last(x):
        return op.Expand(op.CastLike(op.Constant(value_float=1.0), x), op.Shape(x, start=-1))

    def _layer_norm(h, weight, bias, eps):
        w = _ones_like_last(h) if weight is None else op.CastLike(weight, h)
        b = None if bias is None else op.CastLike(bias, h)
        y = op.LayerNormalization(h, w, b, axis=-1, epsilon=eps)
        # Exporters of this era hand back all three outputs (Y, Mean, InvStdDev); older ones only Y.
        return y[0] if isinstance(y, (tuple, list)) else y

    def layer_norm(x, weight=None, bias=None, eps=1e-5):
        return _layer_norm(x, weight, bias, eps)

    def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
        h = op.Add(x, residual)
        return _layer_norm(h, weight, bias, eps), h

    def _rms_norm(h, weight, eps):
        if rms_op is not None:
            w = _ones_like_last(h) if weight is None else op.CastLike(weight, h)
            return rms_op(h, w, axis=-1, epsilon=eps)
        low = _is_low(h)
        hf = op.Cast(h, to=_FLOAT) if low else h
        var = op.ReduceMean(op.Pow(hf, op.Constant(value_float=2.0)), op.Constant(value_ints=[-1]), keepdims=1)
        y = op.Div(hf, op.Sqrt(op.Add(var, op.Constant(value_float=float(eps)))))
        if weight is not None:
            y = op.Mul(y, op.CastLike(weight, y))
        return op.CastLike(y, h) if low else y

    def rms_norm(x, weight=None, eps=1e-6):
        return _rms_norm(x, weight, eps)

    def add_rms_norm(x, residual, weight=None, eps=1e-6):
        h = op.Add(x, residual)
        return _rms_norm(h, weight, eps), h

    def gelu(x, bias=None, gate=None, approximate="none"):
        h = x if bias is None else op.Add(x, op.CastLike(bias, x))
        y = op.Gelu(h, approximate=approximate)
        return y if gate is None else op.Mul(y, gate)

    def attention(q, k, v, attention_mask=None, bias=None, rel_table=None, rel_bidirectional=True,
                  rel_num_buckets=32, rel_max_distance=128, rel_query_offset=0, causal=False, scale=1.0,
                  num_splits=0):
        low = _is_low(q)
        if low:
            qc, kc, vc = op.Cast(q, to=_FLOAT), op.Cast(k, to=_FLOAT), op.Cast(v, to=_FLOAT)
        else:
            qc, kc, vc = q, k, v
        s = op.MatMul(qc, op.Transpose(kc, perm=[0, 1, 3, 2]))  # [B, H, Lq, Lk]
        s = op.Mul(s, op.CastLike(op.Constant(value_float=float(scale)), s))
        if bias is not None:
            s = op.Add(s, op.CastLike(bias, s))
        lq = op.Shape(q, start=2, end=3)
        lk = op.Shape(k, start=2, end=3)
        if rel_table is not None or causal:
            zero = op.Constant(value_int=0)
            one = op.Constant(value_int=1)
            qpos = op.Range(zero, op.Squeeze(lq, op.Constant(value_ints=[0])), one)  # [Lq]
            kpos = op.Range(zero, op.Squeeze(lk, op.Constant(value_ints=[0])), one)  # [Lk]
            qcol = op.Unsqueeze(qpos, op.Constant(value_ints=[1]))  # [Lq, 1]
            krow = op.Unsqueeze(kpos, op.Constant(value_ints=[0]))  # [1, Lk]
        if rel_table is not None:
            if isinstance(rel_query_offset, int):
                offset = op.Constant(value_int=rel_query_offset)
            else:  # a symbolic size (e.g. Lk - Lq) computed in the graph; broadcasts either way
                offset = op.Cast(rel_query_offset, to=_INT64)
            rp = op.Sub(krow, op.Add(qcol, offset))  # [Lq, Lk] key - query
            buckets = _relative_bucket(op, rp, bool(rel_bidirectional), int(rel_num_buckets),
                                       int(rel_max_distance))
            table = op.CastLike(rel_table, s)  # [num_buckets, H]
            rel = op.Transpose(op.Gather(table, buckets, axis=0), perm=[2, 0, 1])  # [H, Lq, Lk]
            s = op.Add(s, op.Unsqueeze(rel, op.Constant(value_ints=[0])))
        keep = None
        if causal:
            keep = op.LessOrEqual(krow, op.Add(qcol, op.Sub(lk, lq)))  # [Lq, Lk] bottom-right aligned
        if attention_mask is not None:
            m = op.Unsqueeze(op.Cast(attention_mask, to=_BOOL), op.Constant(value_ints=[1, 2]))  # [B, 1, 1, Lk]
            keep = m if keep is None else op.And(m, keep)
        if keep is not None:
            s = op.Where(keep, s, op.CastLike(op.Constant(value_float=-math.inf), s))
        p = op.Softmax(s, axis=-1)
        out = op.MatMul(p, vc)
        if keep is not None or bias is not None:
            # A row that sees no key: the kernel returns zeros (Softmax alone gives NaN).
            row_max = op.ReduceMax(s, op.Constant(value_ints=[-1]), keepdims=1)
            seen = op.Not(op.IsInf(row_max, detect_positive=0, detect_negative=1))
            out = op.Where(seen, out, op.CastLike(op.Constant(value_float=0.0), out))
        return op.CastLike(out, q) if low else out

    t = torch.ops.trifuse
    return {
        t.layer_norm.default: layer_norm, t.add_layer_norm.default: add_layer_norm,
        t.rms_norm.default: rms_norm, t.add_rms_norm.default: add_rms_norm,
        t.gelu.default: gelu, t.attention.default: attention,
    }


def _relative_bucket(op, rp, bidirectional: bool, num_buckets: int, max_distance: int):
    """``kernels.relative_position_bucket`` in ONNX: int64 ``rp`` (key - query) -> int64 buckets."""
    zero = op.Constant(value_int=0)
    if bidirectional:
        num_buckets //= 2
        buckets = op.Mul(op.Cast(op.Greater(rp, zero), to=_INT64), op.Constant(value_int=num_buckets))
        distance = op.Abs(rp)
    else:
        buckets = None
        distance = op.Neg(op.Min(rp, zero))
    max_exact = num_buckets // 2
    is_small = op.Less(distance, op.Constant(value_int=max_exact))
    # HF's float32 expression; distances below max_exact are replaced by the Where, so clamp them
    # up first to keep log(0) = -inf out of the integer cast.
    d = op.Cast(op.Max(distance, op.Constant(value_int=max_exact)), to=_FLOAT)
    large = op.Mul(op.Div(op.Log(op.Div(d, op.Constant(value_float=float(max_exact)))),
                          op.Constant(value_float=math.log(max_distance / max_exact))),
                   op.Constant(value_float=float(num_buckets - max_exact)))
    if_large = op.Add(op.Constant(value_int=max_exact), op.Cast(large, to=_INT64))  # Cast truncates toward 0
    if_large = op.Min(if_large, op.Constant(value_int=num_buckets - 1))
    b = op.Where(is_small, distance, if_large)
    return b if buckets is None else op.Add(buckets, b)


# ----------------------------------------------------------------------------
# Export-friendly forwards: plain tensors in, a flat tuple out.


def _model_kind(model) -> Tuple[str, str]:
    """``(model_type, kind)`` of a trifuse model, from its family's contract (:mod:`engine.family`);
    kind is encoder, vision, decoder or seq2seq."""
    from trifuse.engine.registry import family_of

    try:
        fam = family_of(model)
    except TypeError as e:
        raise ExportError(f"cannot export: {e}") from None
    return model.model_type, fam.kind


def _config_json(model) -> str:
    c = model.config
    d = dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(vars(c))
    return json.dumps(d, sort_keys=True, default=str)


class _ConcatCache:
    """Stands in for a KV cache inside an export: ``past + new`` by concatenation, presents recorded."""

    def __init__(self, past: Sequence[Tensor]):
        self.past = past
        self.present: List[Tensor] = []

    def update(self, layer: int, start, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        k = torch.cat([self.past[2 * layer], k], dim=2)
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present += [k, v]
        return k, v


class _EncoderGraph(nn.Module):
    """BERT family: ``(input_ids, attention_mask[, token_type_ids]) -> outputs[, hidden_states...]``."""

    def __init__(self, model, outputs: Sequence[str], layer_outputs: bool):
        super().__init__()
        self.model, self.outputs, self.layer_outputs = model, tuple(outputs), layer_outputs

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.model(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                         output_hidden_states=self.layer_outputs)
        return tuple(out[k] for k in self.outputs) + (tuple(out.hidden_states) if self.layer_outputs else ())


class _VisionGraph(nn.Module):
    """ViT / DeiT: ``pixel_values -> outputs[, hidden_states...]``; any image size with ``interpolate``."""

    def __init__(self, model, outputs: Sequence[str], layer_outputs: bool, interpolate: bool):
        super().__init__()
        self.model, self.outputs, self.layer_outputs = model, tuple(outputs), layer_outputs
        self.interpolate = interpolate

    def forward(self, pixel_values):
        out = self.model(pixel_values, interpolate_pos_encoding=self.interpolate,
                         output_hidden_states=self.layer_outputs)
        return tuple(out[k] for k in self.outputs) + (tuple(out.hidden_states) if self.layer_outputs else ())


class _DecoderGraph(nn.Module):
    """A decoder-only model with past: ``(input_ids [B, n], attention_mask [B, P + n], past [B, H, P, D] x 2L)``
    -> ``(logits or last_hidden_state, present x 2L[, hidden_states...])``.

    The model's own ``export_forward`` runs on a :class:`_ConcatCache`, so the keys and values
    of a step are the past's concatenated with the new ones (the preallocated
    :class:`~engine.cache.KVCache` is a PyTorch-side optimization).
    """

    def __init__(self, model, outputs: Sequence[str], layer_outputs: bool):
        super().__init__()
        self.model, self.outputs, self.layer_outputs = model, tuple(outputs), layer_outputs

    def forward(self, input_ids, attention_mask, past_key_values):
        n, p = input_ids.shape[1], past_key_values[0].shape[2]
        # The mask covers past and new tokens: saying so lets the trace size everything by P + n.
        torch._check(attention_mask.shape[1] == p + n)
        cache = _ConcatCache(past_key_values)
        first, hidden = self.model.export_forward(input_ids, attention_mask, cache, p, self.layer_outputs)
        return (first, *cache.present) + (tuple(hidden) if hidden is not None else ())


class _Seq2SeqEncoderGraph(nn.Module):
    """An encoder-decoder's encoder: ``(input_ids, attention_mask) -> last_hidden_state[, cross_key_values]
    [, hidden_states...]``.

    ``cross_key_values`` ``[B, L_enc, cross_width]`` is every decoder layer's cross-attention
    keys/values, one projection of the encoder output (the model's ``export_encode``),
    computed once per input and fed to every decoder step.
    """

    def __init__(self, model, layer_outputs: bool):
        super().__init__()
        self.model, self.layer_outputs = model, layer_outputs

    def forward(self, input_ids, attention_mask):
        x, cross, hidden = self.model.export_encode(input_ids, attention_mask, self.layer_outputs)
        return (x, *(() if cross is None else (cross,))) + (tuple(hidden) if hidden is not None else ())


class _Seq2SeqDecoderGraph(nn.Module):
    """An encoder-decoder's decoder with past: ``(decoder_input_ids [B, n], decoder_attention_mask
    [B, P + n], encoder_attention_mask [B, L_enc], cross_key_values, past [B, H, P, D] x 2L)`` ->
    ``(logits or last_hidden_state, present x 2L[, hidden_states...])``, the model's ``export_decode``
    on a :class:`_ConcatCache`.
    """

    def __init__(self, model, outputs: Sequence[str], layer_outputs: bool):
        super().__init__()
        self.model, self.outputs, self.layer_outputs = model, tuple(outputs), layer_outputs

    def forward(self, decoder_input_ids, decoder_attention_mask, encoder_attention_mask, cross_key_values,
                past_key_values):
        p = past_key_values[0].shape[2]
        torch._check(decoder_attention_mask.shape[1] == p + decoder_input_ids.shape[1])
        cache = _ConcatCache(past_key_values)
        first, hidden = self.model.export_decode(decoder_input_ids, decoder_attention_mask, encoder_attention_mask,
                                                 cross_key_values, cache, p, self.layer_outputs)
        return (first, *cache.present) + (tuple(hidden) if hidden is not None else ())


@dataclasses.dataclass
class _Graph:
    """One ONNX graph to export: its forward, names, example inputs, dynamic axes."""

    name: str  # "model", "encoder" or "decoder"
    module: nn.Module
    inputs: List[str]
    outputs: List[str]
    example: Tuple[Any, ...]  # positional args of module.forward
    dynamic: Tuple[Any, ...]  # dynamic_shapes, positional
    dims: Dict[str, List[Any]]  # graph value -> axis labels (str: symbolic; None: keep the exporter's)


def _encoder_outputs(model) -> List[str]:
    task = model.task
    if task == "feature-extraction":
        return ["last_hidden_state"] + (["pooler_output"] if model.pooler is not None else [])
    if task == "question-answering":
        return ["start_logits", "end_logits"]
    return ["logits"]


def _vision_outputs(model) -> List[str]:
    if model.head is None:
        return ["last_hidden_state"] + (["pooler_output"] if model.pooler is not None else [])
    if model.head.distillation is not None:
        return ["logits", "cls_logits", "distillation_logits"]
    return ["logits"]


def _example(spec_inputs: Sequence[str], given: Optional[dict], make) -> Tuple[Any, ...]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(spec_inputs))
    if unknown:
        raise ExportError(f"example_inputs has {unknown}, which are not inputs of this graph "
                          f"({', '.join(spec_inputs)})")
    return tuple(given[name] if name in given else make(name) for name in spec_inputs)


def _dim(name: str, **kw):
    return torch.export.Dim(name, **kw)


def graphs_for(model, *, dynamic: bool = True, example_inputs=None, layer_outputs: bool = False) -> List[_Graph]:
    """The graph(s) ``to_onnx`` exports for ``model`` (one, or T5's encoder and decoder)."""
    family, kind = _model_kind(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if example_inputs is not None and not isinstance(example_inputs, dict):
        if isinstance(example_inputs, Tensor) and kind == "vision":
            example_inputs = {"pixel_values": example_inputs}
        elif isinstance(example_inputs, Tensor) and kind == "encoder":
            example_inputs = {"input_ids": example_inputs}
        else:
            raise ExportError("example_inputs must be a dict of graph input name -> tensor")
    g = torch.Generator().manual_seed(0)
    hidden = [f"hidden_states.{i}" for i in range(model.num_hidden_states())] if layer_outputs else []
    batch = _dim("batch") if dynamic else None

    if kind == "encoder":
        c = model.config
        inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if model.uses_token_type_ids else [])
        b, n = 2, max(2, min(7, c.max_length))

        def make(name):
            if name == "input_ids":
                return torch.randint(3, c.vocab_size, (b, n), generator=g).to(device)
            if name == "attention_mask":
                mask = torch.ones(b, n, dtype=torch.long)
                mask[1, n - 2:] = 0
                return mask.to(device)
            return torch.zeros(b, n, dtype=torch.long, device=device)

        example = _example(inputs, example_inputs, make)
        seq = _dim("sequence", max=c.max_length) if dynamic else None
        axes = {0: batch, 1: seq} if dynamic else None
        outputs = _encoder_outputs(model)
        dims = {name: ["batch", "sequence"] for name in inputs}
        for name in outputs + hidden:
            dims[name] = ["batch"] if name == "pooler_output" or (
                name == "logits" and model.task == "sequence-classification") else ["batch", "sequence"]
        return [_Graph("model", _EncoderGraph(model, outputs, layer_outputs), inputs, outputs + hidden, example,
                       tuple(axes for _ in inputs), dims)]

    if kind == "vision":
        c = model.config
        (ph, pw), (gh, gw) = c.patch_size, c.grid
        # Dynamic image sizes go through the position interpolation; its example must be off
        # the checkpoint's grid (at the grid itself the model skips it and the trace would pin it).
        eh, ew = ((gh + 1) * ph, (gw + 1) * pw) if dynamic else tuple(c.image_size)

        def make(name):
            return torch.randn(2, c.num_channels, eh, ew, generator=g).to(device=device, dtype=dtype)

        example = _example(["pixel_values"], example_inputs, make)
        dyn = None
        if dynamic:
            dyn = ({0: batch, 2: ph * _dim("patch_rows", min=1, max=4096),
                    3: pw * _dim("patch_cols", min=1, max=4096)},)
        outputs = _vision_outputs(model)
        dims = {"pixel_values": ["batch", None, "height", "width"]}
        for name in outputs + hidden:
            dims[name] = ["batch"] if name != "last_hidden_state" and not name.startswith("hidden") else [
                "batch", "tokens"]
        return [_Graph("model", _VisionGraph(model, outputs, layer_outputs, interpolate=dynamic), ["pixel_values"],
                       outputs + hidden, example, dyn, dims)]

    if kind == "decoder":
        c = model.config
        L, heads, head_dim = model.cache_shape()
        past_names = [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
        present_names = [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
        inputs = ["input_ids", "attention_mask"] + past_names
        b, p, n = 2, 3, 5

        def make(name):
            if name == "input_ids":
                return torch.randint(0, c.vocab_size, (b, n), generator=g).to(device)
            if name == "attention_mask":
                pp = given_past_len()
                mask = torch.ones(b, pp + n, dtype=torch.long)
                mask[1, :2] = 0
                return mask.to(device)
            return torch.randn(b, heads, p, head_dim, generator=g).to(device=device, dtype=dtype)

        def given_past_len():
            k = (example_inputs or {}).get("past_key_values.0.key")
            return p if k is None else k.shape[2]

        flat = _example(inputs, example_inputs, make)
        example = (flat[0], flat[1], list(flat[2:]))
        dyn = None
        if dynamic:
            seq, past = _dim("sequence"), _dim("past_sequence")
            kv = {0: batch, 2: past}
            dyn = ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO}, [kv] * (2 * L))
        first = "logits" if model.has_lm_head else "last_hidden_state"
        dims = {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "past_sequence + sequence"],
                first: ["batch", "sequence"]}
        for name in past_names:
            dims[name] = ["batch", None, "past_sequence", None]
        for name in present_names:
            dims[name] = ["batch", None, "past_sequence + sequence", None]
        for name in hidden:
            dims[name] = ["batch", "sequence"]
        return [_Graph("model", _DecoderGraph(model, [first], layer_outputs), inputs, [first] + present_names + hidden,
                       example, dyn, dims)]

    # seq2seq: the encoder, then (with a decoder) the decoder with past.
    c = model.config
    L, heads, head_dim = model.cache_shape()
    seq, dseq, past = (_dim("encoder_sequence"), _dim("sequence"), _dim("past_sequence")) if dynamic else (None,) * 3
    b, le, p, n = 2, 7, 3, 5
    given = dict(example_inputs or {})
    enc_inputs = ["input_ids", "attention_mask"]

    def make_enc(name):
        if name == "input_ids":
            return torch.randint(2, c.vocab_size, (b, le), generator=g).to(device)
        mask = torch.ones(b, le, dtype=torch.long)
        mask[1, le - 2:] = 0
        return mask.to(device)

    enc_example = _example(enc_inputs, {k: v for k, v in given.items() if k in enc_inputs}, make_enc)
    enc_hidden = [f"hidden_states.{i}" for i in range(model.num_hidden_states("encoder"))] if layer_outputs else []
    enc_outputs = ["last_hidden_state"] + (["cross_key_values"] if model.has_decoder else [])
    enc_dims = {"input_ids": ["batch", "encoder_sequence"], "attention_mask": ["batch", "encoder_sequence"],
                "last_hidden_state": ["batch", "encoder_sequence"], "cross_key_values": ["batch", "encoder_sequence"]}
    enc_dims.update({name: ["batch", "encoder_sequence"] for name in enc_hidden})
    graphs = [_Graph("encoder", _Seq2SeqEncoderGraph(model, layer_outputs), enc_inputs, enc_outputs + enc_hidden,
                     enc_example, ({0: batch, 1: seq}, {0: batch, 1: seq}) if dynamic else None, enc_dims)]
    if not model.has_decoder:
        return graphs
    past_names = [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    dec_inputs = ["decoder_input_ids", "decoder_attention_mask", "encoder_attention_mask", "cross_key_values"]
    dec_inputs += past_names

    def make_dec(name):
        if name == "decoder_input_ids":
            return torch.randint(0, c.vocab_size, (b, n), generator=g).to(device)
        if name == "decoder_attention_mask":
            k = given.get("past_key_values.0.key")
            return torch.ones(b, (p if k is None else k.shape[2]) + n, dtype=torch.long, device=device)
        if name == "encoder_attention_mask":
            return enc_example[1]
        if name == "cross_key_values":
            return torch.randn(b, enc_example[0].shape[1], model.cross_width, generator=g).to(device=device,
                                                                                                 dtype=dtype)
        return torch.randn(b, heads, p, head_dim, generator=g).to(device=device, dtype=dtype)

    flat = _example(dec_inputs, {k: v for k, v in given.items() if k in dec_inputs}, make_dec)
    unknown = sorted(set(given) - set(enc_inputs) - set(dec_inputs))
    if unknown:
        raise ExportError(f"example_inputs has {unknown}, which are not inputs of {model.model_type}'s graphs")
    first = "logits" if model.has_lm_head else "last_hidden_state"
    dec_hidden = [f"hidden_states.{i}" for i in range(model.num_hidden_states("decoder"))] if layer_outputs else []
    dyn = None
    if dynamic:
        kv = {0: batch, 2: past}
        dyn = ({0: batch, 1: dseq}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: seq}, {0: batch, 1: seq},
               [kv] * (2 * L))
    dims = {"decoder_input_ids": ["batch", "sequence"], "decoder_attention_mask": ["batch", "past_sequence + sequence"],
            "encoder_attention_mask": ["batch", "encoder_sequence"], "cross_key_values": ["batch", "encoder_sequence"],
            first: ["batch", "sequence"]}
    dims.update({name: ["batch", None, "past_sequence", None] for name in past_names})
    dims.update({name: ["batch", None, "past_sequence + sequence", None] for name in present_names})
    dims.update({name: ["batch", "sequence"] for name in dec_hidden})
    graphs.append(_Graph("decoder", _Seq2SeqDecoderGraph(model, [first], layer_outputs), dec_inputs,
                         [first] + present_names + dec_hidden, tuple(flat[:4]) + (list(flat[4:]),), dyn, dims))
    return graphs


# ----------------------------------------------------------------------------
# Export.


def _set_dims(value, labels: Sequence[Any]) -> None:
    shape = value.shape
    if shape is None:
        return
    dims = list(shape)
    for i, label in enumerate(labels):
        if label is not None and i < len(dims) and not isinstance(dims[i], int):
            dims[i] = label
    value.shape = type(shape)(dims)


def _check_opset(opset: Optional[int]) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be an int in {MIN_OPSET}..{MAX_OPSET} (Gelu needs opset 20), got {opset!r}")
    return opset


def _resolve_model(model):
    if isinstance(model, (str, os.PathLike)) or (hasattr(model, "config") and hasattr(model.config, "to_dict")):
        from trifuse import engine

        return engine.from_pretrained(model)
    return model


def to_onnx(model, path, *, opset: Optional[int] = None, dynamic: bool = True, example_inputs=None,
            layer_outputs: bool = False):
    """Export ``model`` to ONNX at ``path``; returns the written path (T5: ``(encoder, decoder)`` paths).

    ``model``: a trifuse model (``engine.from_pretrained(...)``; a checkpoint directory or a
    ``transformers`` model is loaded first). ``opset``: 20..23 (default 20; 23 uses
    ``RMSNormalization``). ``dynamic``: batch and sequence (image height/width, past length)
    axes are symbolic; ``False`` pins the example's shapes. ``example_inputs``: ``{graph input
    name: tensor}`` to trace with (default: generated, padded, batch 2). ``layer_outputs``:
    add every block's output as ``hidden_states.{i}`` graph outputs (for ``verify(...,
    layerwise=True)``).
    """
    require("ONNX export", "onnx", "onnx", "onnxscript")
    model = _resolve_model(model)
    family, kind = _model_kind(model)
    opset = _check_opset(opset)
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"{path}: the output file must end in .onnx")
    graphs = graphs_for(model, dynamic=dynamic, example_inputs=example_inputs, layer_outputs=layer_outputs)
    dtype = next(model.parameters()).dtype
    path.parent.mkdir(parents=True, exist_ok=True)
    outs = [path if len(graphs) == 1 else path.with_name(f"{path.stem}.{graph.name}.onnx") for graph in graphs]
    # All or nothing: every graph is written into a scratch folder beside the output and moved into
    # place (under its final name, so external-data references stay valid) only once all succeeded;
    # a failed T5 export leaves no encoder file without its decoder.
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for graph, out in zip(graphs, outs):
            _export_graph(model, graph, scratch / out.name, family, kind, dtype, opset, dynamic, layer_outputs)
        for f in sorted(scratch.iterdir()):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return outs[0] if len(outs) == 1 else tuple(outs)


def _export_graph(model, graph: "_Graph", out: Path, family: str, kind: str, dtype, opset: int, dynamic: bool,
                  layer_outputs: bool) -> None:
    import trifuse

    with warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            graph.module.eval(), graph.example, dynamo=True, opset_version=opset,
            custom_translation_table=translation_table(opset), dynamic_shapes=graph.dynamic,
            input_names=graph.inputs, output_names=graph.outputs, verbose=False)
    ir_model = prog.model
    for value in list(ir_model.graph.inputs) + list(ir_model.graph.outputs):
        if value.name in graph.dims:
            _set_dims(value, graph.dims[value.name])
    meta = {
        "trifuse.version": trifuse.__version__, "trifuse.family": family, "trifuse.kind": kind,
        "trifuse.graph": graph.name, "trifuse.task": str(getattr(model, "task", "")),
        "trifuse.dtype": _DTYPE_NAMES.get(dtype, str(dtype)), "trifuse.opset": str(opset),
        "trifuse.config": _config_json(model), "trifuse.inputs": ",".join(graph.inputs),
        "trifuse.outputs": ",".join(graph.outputs), "trifuse.dynamic": str(bool(dynamic)).lower(),
        "trifuse.layer_outputs": str(model.num_hidden_states(graph.name) if layer_outputs else 0),
        "trifuse.example_shapes": json.dumps({name: list(t.shape) for name, t in _flat_example(graph)}),
    }
    ir_model.metadata_props.update(meta)
    ir_model.producer_name = "trifuse"
    ir_model.producer_version = trifuse.__version__
    prog.save(str(out))


@contextlib.contextmanager
def _quiet_loggers():
    """The exporter logs warnings about optional packages (torchvision) on every call; mute them."""
    names = ("torch.onnx._internal.exporter._registration", "torch.onnx")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _flat_example(graph: _Graph):
    flat = []
    for a in graph.example:
        flat += list(a) if isinstance(a, (list, tuple)) else [a]
    return list(zip(graph.inputs, flat))


# ----------------------------------------------------------------------------
# Reading files back; ONNX Runtime.


def read_metadata(path) -> Dict[str, str]:
    """The ``metadata_props`` of an ONNX file (weights not loaded). Clear errors for a missing
    file, a file that is not ONNX, or one trifuse did not write."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError and friends
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    if "trifuse.family" not in meta:
        raise ValueError(f"{path}: not exported by trifuse (no trifuse.* metadata); export it with "
                         "`trifuse export` or export.to_onnx")
    return meta


def default_providers() -> List[str]:
    """CUDA when this ONNX Runtime build has it, then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def ort_session(onnx_path, providers=None, *, threads: Optional[int] = None):
    """An ``onnxruntime.InferenceSession`` on ``onnx_path`` with full graph optimization.

    ``providers``: ORT provider names (default :func:`default_providers`); ``threads``:
    intra-op threads (default: ORT's choice).
    """
    require("ONNX Runtime", "onnx", "onnxruntime")
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=so, providers=list(providers or default_providers()))


_ORT_NUMPY = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
              "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(bool)": "bool"}


def _to_numpy(t, ort_type: str):
    import numpy as np

    if isinstance(t, Tensor):
        if t.dtype == torch.bfloat16:
            raise ValueError("bf16 tensors cannot cross into ONNX Runtime through numpy; export in fp32 or fp16")
        t = t.detach().cpu().numpy()
    want = _ORT_NUMPY.get(ort_type)
    a = np.asarray(t)
    return a.astype(want, copy=False) if want is not None and a.dtype != want else np.ascontiguousarray(a)


class OrtRunner:
    """Runs an ONNX file (or session) on torch tensors and returns torch tensors.

    ``runner = OrtRunner("bert.onnx")``; ``runner(input_ids=..., attention_mask=...)`` or
    ``runner(ids, mask)`` (positional in graph order) -> ``{output name: Tensor}``, outputs on
    the device of the first input. Integer/bool inputs are cast to the graph's input types.
    """

    def __init__(self, onnx_or_session, providers=None, *, threads: Optional[int] = None):
        self.session = (onnx_or_session if hasattr(onnx_or_session, "run")
                        else ort_session(onnx_or_session, providers, threads=threads))
        self._inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def feed(self, *args, **inputs) -> dict:
        if len(args) > len(self.input_names):
            raise ValueError(f"{len(args)} positional inputs, but the graph takes {len(self.input_names)}")
        for name, a in zip(self.input_names, args):
            if name in inputs:
                raise ValueError(f"input {name} given twice")
            inputs[name] = a
        missing = [n for n in self.input_names if n not in inputs]
        extra = sorted(set(inputs) - set(self.input_names))
        if missing or extra:
            raise ValueError(f"graph inputs are {', '.join(self.input_names)}; missing {missing}, unknown {extra}")
        return {name: _to_numpy(inputs[name], self._inputs[name]) for name in self.input_names}

    def __call__(self, *args, **inputs) -> Dict[str, Tensor]:
        first = next((t for t in list(args) + list(inputs.values()) if isinstance(t, Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
        outs = self.session.run(self.output_names, self.feed(*args, **inputs))
        return {name: torch.from_numpy(o).to(device) for name, o in zip(self.output_names, outs)}


def onnx_paths(onnx) -> Tuple[Path, ...]:
    """The file(s) of one export: ``(path,)``, or T5's ``(encoder, decoder)`` from the path given to
    :func:`to_onnx` (``OUT.onnx`` -> ``OUT.encoder.onnx``, ``OUT.decoder.onnx``) or from either file."""
    if isinstance(onnx, (tuple, list)):
        return tuple(Path(p) for p in onnx)
    path = Path(onnx)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    for suffix in (".encoder", ".decoder"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    enc, dec = path.with_name(f"{stem}.encoder.onnx"), path.with_name(f"{stem}.decoder.onnx")
    if path.is_file() and path not in (enc, dec):
        return (path,)
    if enc.is_file():
        return (enc, dec) if dec.is_file() else (enc,)
    return (path,)


def _metadata(runner: OrtRunner) -> Dict[str, str]:
    meta = dict(runner.session.get_modelmeta().custom_metadata_map)
    if "trifuse.family" not in meta:
        raise ValueError("not a graph exported by trifuse (no trifuse.* metadata)")
    return meta


def _empty_past(runner: OrtRunner, batch: int) -> Dict[str, Tensor]:
    """Zero-length ``past_key_values.*`` for a decoder's first call, shaped from the graph's inputs."""
    past = {}
    for i in runner.session.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, head_dim = i.shape
            dt = torch.float16 if i.type == "tensor(float16)" else torch.float32
            past[i.name] = torch.zeros(batch, heads, 0, head_dim, dtype=dt)
    return past


def ort_generate_greedy(onnx, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                        max_new_tokens: int = 20, eos_token_id=None, pad_token_id: Optional[int] = None,
                        decoder_start_token_id: Optional[int] = None, providers=None) -> Tensor:
    """Greedy decoding run entirely in ONNX Runtime, returning what ``model.generate`` returns.

    ``onnx``: GPT-2's file (or an :class:`OrtRunner` on it) -> ``[B, L + n]``, the prompt
    (left padding allowed, pass its mask) then the new tokens; or T5's two files (the path
    given to :func:`to_onnx`, or ``(encoder, decoder)`` paths or runners) -> ``[B, 1 + n]``, the decoder
    start token then the new tokens. Each step feeds the graph's ``present.*`` back as
    ``past_key_values.*``; rows stop at EOS and are padded as in ``model.generate``, whose
    defaults (EOS, pad, decoder start) come from the config recorded in the file.
    """
    from trifuse.engine import generation as gen

    if isinstance(onnx, OrtRunner):
        runners = (onnx,)
    elif isinstance(onnx, (tuple, list)) and onnx and all(isinstance(r, OrtRunner) for r in onnx):
        runners = tuple(onnx)  # T5's (encoder, decoder) sessions, opened once by the caller
    else:
        runners = tuple(OrtRunner(p, providers) for p in onnx_paths(onnx))
    meta = _metadata(runners[-1])
    family = meta.get("trifuse.family")
    if meta.get("trifuse.kind") not in ("decoder", "seq2seq") or meta.get("trifuse.graph") == "encoder":
        raise ValueError(f"ort_generate_greedy needs a decoder (GPT-2, or T5's encoder and decoder); got "
                         f"{family!r} ({meta.get('trifuse.kind')}, {meta.get('trifuse.graph')} graph)")
    dec = runners[-1]
    if "logits" not in dec.output_names:
        raise ValueError("this decoder was exported without its LM head (task feature-extraction): no logits")
    cj = json.loads(meta["trifuse.config"])
    seq2seq = meta.get("trifuse.kind") == "seq2seq"
    cfg = gen.GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=(cj.get("eos_token_id") or ()) if eos_token_id is None else eos_token_id,
        pad_token_id=cj.get("pad_token_id") if pad_token_id is None else pad_token_id,
        # the config's forced first/last tokens, as model.generate applies them (BART's checkpoints set them)
        forced_bos_token_id=cj.get("forced_bos_token_id"), forced_eos_token_id=cj.get("forced_eos_token_id"),
        max_length=(1 if seq2seq else input_ids.shape[1]) + max_new_tokens)
    if attention_mask is None:
        attention_mask = gen.default_attention_mask(input_ids, cfg)
    mask = attention_mask.ne(0).long().cpu()
    ids = input_ids.cpu()
    b = ids.shape[0]
    state = {"past": _empty_past(dec, b)}
    if seq2seq:
        if len(runners) != 2:
            raise ValueError(f"{family} greedy decoding needs the encoder and the decoder files")
        enc = runners[0](input_ids=ids, attention_mask=mask)
        start_token = cj.get("decoder_start_token_id") if decoder_start_token_id is None else decoder_start_token_id
        if start_token is None:
            raise ValueError("decoder_start_token_id is not set in the config: pass decoder_start_token_id=")
        prompt = torch.full((b, 1), int(start_token), dtype=torch.long)
        state["mask"] = torch.ones(b, 1, dtype=torch.long)
        fixed = {"encoder_attention_mask": mask, "cross_key_values": enc["cross_key_values"]}
        names = ("decoder_input_ids", "decoder_attention_mask")
    else:
        prompt = ids
        state["mask"] = mask
        fixed = {}
        names = ("input_ids", "attention_mask")

    def run(step_ids: Tensor) -> Tensor:
        out = dec(**{names[0]: step_ids, names[1]: state["mask"]}, **fixed, **state["past"])
        state["past"] = {name: out["present." + name[len("past_key_values."):]] for name in state["past"]}
        return out["logits"][:, -1]

    first = run(prompt)

    def step(tokens: Tensor) -> Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones(b, 1, dtype=torch.long)], dim=1)
        return run(tokens[:, None].cpu())

    return gen.generate(first, step, prompt, cfg).to(input_ids.device)
