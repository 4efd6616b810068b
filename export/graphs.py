"""The graphs ``to_onnx`` exports: one spec class per kind of model, as optimum's ``OnnxConfig``.

Each :class:`GraphSpec` declares its graph's inputs and outputs, the label of every axis
(``batch``, ``sequence``, ``past_sequence``, ...: symbolic unless ``dynamic=False``), the
dynamic shapes to trace with and example inputs, and wraps the model in an export-friendly
forward (plain tensors in, a flat tuple out). :data:`SPECS` maps a family's kind
(:mod:`engine.family`) to its spec(s); nothing branches on a family's name. The graphs,
named as users know them:

* encoder (BERT family): ``input_ids``, ``attention_mask``[, ``token_type_ids``] ->
  ``last_hidden_state``[, ``pooler_output``] | ``logits`` | ``start_logits``, ``end_logits``;
* vision (ViT / DeiT): ``pixel_values`` (any height/width multiple of the patch: positions are
  interpolated in the graph) -> ``last_hidden_state``[, ``pooler_output``] | ``logits``
  [, ``cls_logits``, ``distillation_logits``];
* decoder with past (GPT-2): ``input_ids`` ``[B, n]``, ``attention_mask`` ``[B, P + n]`` (positions
  follow it, ``cumsum - 1``, as in the model), ``past_key_values.{i}.key/value`` ``[B, H, P, D]``
  (``P = 0`` on the first call) -> ``logits``, ``present.{i}.key/value`` ``[B, H, P + n, D]``
  (past and new concatenated in the graph);
* seq2seq (T5, BART): ``OUT.encoder.onnx``: ``input_ids``, ``attention_mask`` -> ``last_hidden_state``,
  ``cross_key_values`` ``[B, L_enc, layers*2*H*D]`` (every decoder layer's cross-attention
  keys/values, computed once); ``OUT.decoder.onnx``: ``decoder_input_ids``,
  ``decoder_attention_mask`` ``[B, P + n]``, ``encoder_attention_mask``,
  ``cross_key_values``, ``past_key_values.{i}.key/value`` -> ``logits``, ``present.{i}.key/value``.

``layer_outputs=True`` adds every block's output as ``hidden_states.{i}`` (0: the embeddings).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


class ExportError(ValueError):
    """A model or option the exporter cannot handle."""


def model_kind(model) -> Tuple[str, str]:
    """``(model_type, kind)`` of a trifuse model, from its family's contract (:mod:`engine.family`);
    kind is encoder, vision, decoder or seq2seq."""
    from trifuse.engine.registry import family_of

    try:
        fam = family_of(model)
    except TypeError as e:
        raise ExportError(f"cannot export: {e}") from None
    return model.model_type, fam.kind


# ----------------------------------------------------------------------------
# Export-friendly forwards: plain tensors in, a flat tuple out.


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
@dataclasses.dataclass
class Graph:
    """One ONNX graph to export: its forward, names, example inputs, dynamic axes."""

    name: str  # "model", "encoder" or "decoder"
    module: nn.Module
    inputs: List[str]
    outputs: List[str]
    example: Tuple[Any, ...]  # positional args of module.forward
    dynamic: Optional[Tuple[Any, ...]]  # dynamic_shapes, positional
    dims: Dict[str, List[Any]]  # graph value -> axis labels (str: symbolic; None: keep the exporter's)


def _dim(name: str, **kw):
    return torch.export.Dim(name, **kw)


def _padded_mask(b: int, n: int, device, pad: slice) -> Tensor:
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, pad] = 0  # the second row padded: the example exercises the mask
    return mask.to(device)


def _base_outputs(model) -> List[str]:
    return ["last_hidden_state"] + (["pooler_output"] if model.pooler is not None else [])


# ----------------------------------------------------------------------------
# One spec per kind of graph.


class GraphSpec:
    """One graph of an export: declares its inputs, outputs, axis labels, dynamic shapes and
    example inputs, and wraps the model in its export forward. Subclasses fill in the kind."""

    name = "model"  # the graph's name: its metadata, and OUT.<name>.onnx when a kind has several
    tensor_input: Optional[str] = None  # the input a bare tensor given as example_inputs stands for

    def __init__(self, model, *, dynamic: bool, layer_outputs: bool, generator: torch.Generator):
        self.model, self.dynamic, self.layer_outputs, self.g = model, dynamic, layer_outputs, generator
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.batch = _dim("batch") if dynamic else None
        self.given: Dict[str, Tensor] = {}
        self.previous: List[Graph] = []

    @classmethod
    def applies(cls, model) -> bool:
        """Whether ``model`` has this graph (an encoder-only T5 has no decoder graph)."""
        return True

    def inputs(self) -> List[str]:
        raise NotImplementedError

    def outputs(self) -> List[str]:
        """The declared outputs, without ``hidden_states.{i}``."""
        raise NotImplementedError

    def hidden(self) -> List[str]:
        return [f"hidden_states.{i}" for i in range(self.model.num_hidden_states(self.name))] \
            if self.layer_outputs else []

    def make(self, name: str) -> Tensor:
        """A generated example for input ``name`` (one not given by the caller)."""
        raise NotImplementedError

    def example(self) -> Tuple[Any, ...]:
        """Positional arguments of :meth:`module`'s forward: the given inputs, the rest generated."""
        inputs = self.inputs()
        unknown = sorted(set(self.given) - set(inputs))
        if unknown:
            raise ExportError(f"example_inputs has {unknown}, which are not inputs of this graph "
                              f"({', '.join(inputs)})")
        return tuple(self.given[name] if name in self.given else self.make(name) for name in inputs)

    def dynamic_shapes(self) -> Optional[Tuple[Any, ...]]:
        raise NotImplementedError

    def dims(self) -> Dict[str, List[Any]]:
        raise NotImplementedError

    def module(self) -> nn.Module:
        raise NotImplementedError

    def graph(self, given: Dict[str, Tensor], previous: Sequence[Graph] = ()) -> Graph:
        """The graph, traced with ``given`` examples; ``previous``: the export's graphs built before it."""
        self.given, self.previous = dict(given), list(previous)
        example = self.example()
        return Graph(self.name, self.module(), self.inputs(), self.outputs() + self.hidden(), example,
                     self.dynamic_shapes(), self.dims())


class EncoderSpec(GraphSpec):
    """BERT family: ``(input_ids, attention_mask[, token_type_ids]) -> outputs[, hidden_states...]``."""

    tensor_input = "input_ids"

    def inputs(self):
        return ["input_ids", "attention_mask"] + (["token_type_ids"] if self.model.uses_token_type_ids else [])

    def outputs(self):
        task = self.model.task
        if task == "feature-extraction":
            return _base_outputs(self.model)
        if task == "question-answering":
            return ["start_logits", "end_logits"]
        return ["logits"]

    def make(self, name):
        b, n = 2, max(2, min(7, self.config.max_length))
        if name == "input_ids":
            return torch.randint(3, self.config.vocab_size, (b, n), generator=self.g).to(self.device)
        if name == "attention_mask":
            return _padded_mask(b, n, self.device, slice(n - 2, None))
        return torch.zeros(b, n, dtype=torch.long, device=self.device)

    def dynamic_shapes(self):
        axes = {0: self.batch, 1: _dim("sequence", max=self.config.max_length)} if self.dynamic else None
        return tuple(axes for _ in self.inputs())

    def dims(self):
        dims = {name: ["batch", "sequence"] for name in self.inputs()}
        per_sequence = self.model.task != "sequence-classification"
        for name in self.outputs() + self.hidden():
            pooled = name == "pooler_output" or (name == "logits" and not per_sequence)
            dims[name] = ["batch"] if pooled else ["batch", "sequence"]
        return dims

    def module(self):
        return _EncoderGraph(self.model, self.outputs(), self.layer_outputs)


class VisionSpec(GraphSpec):
    """ViT / DeiT: ``pixel_values -> outputs[, hidden_states...]``; any image size when dynamic."""

    tensor_input = "pixel_values"

    def inputs(self):
        return ["pixel_values"]

    def outputs(self):
        head = self.model.head
        if head is None:
            return _base_outputs(self.model)
        if head.distillation is not None:
            return ["logits", "cls_logits", "distillation_logits"]
        return ["logits"]

    def make(self, name):
        c = self.config
        (ph, pw), (gh, gw) = c.patch_size, c.grid
        # Dynamic image sizes go through the position interpolation; its example must be off
        # the checkpoint's grid (at the grid itself the model skips it and the trace would pin it).
        eh, ew = ((gh + 1) * ph, (gw + 1) * pw) if self.dynamic else tuple(c.image_size)
        return torch.randn(2, c.num_channels, eh, ew, generator=self.g).to(device=self.device, dtype=self.dtype)

    def dynamic_shapes(self):
        if not self.dynamic:
            return None
        ph, pw = self.config.patch_size
        return ({0: self.batch, 2: ph * _dim("patch_rows", min=1, max=4096),
                 3: pw * _dim("patch_cols", min=1, max=4096)},)

    def dims(self):
        dims = {"pixel_values": ["batch", None, "height", "width"]}
        for name in self.outputs() + self.hidden():
            per_token = name == "last_hidden_state" or name.startswith("hidden")
            dims[name] = ["batch", "tokens"] if per_token else ["batch"]
        return dims

    def module(self):
        return _VisionGraph(self.model, self.outputs(), self.layer_outputs, interpolate=self.dynamic)


class DecoderSpec(GraphSpec):
    """A decoder with past (GPT-2): ``(input_ids [B, n], attention_mask [B, P + n], past [B, H, P, D] x 2L)``
    -> ``(logits or last_hidden_state, present x 2L[, hidden_states...])``."""

    ids, mask = "input_ids", "attention_mask"  # the step's tokens and the mask over past and new
    b, p, n = 2, 3, 5  # example batch, past length, new tokens

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.layers, self.heads, self.head_dim = model.cache_shape()
        self.first = "logits" if model.has_lm_head else "last_hidden_state"

    def past_names(self) -> List[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def present_names(self) -> List[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def fixed_inputs(self) -> List[str]:
        """Inputs between the mask and the past (the encoder's, for a seq2seq decoder)."""
        return []

    def inputs(self):
        return [self.ids, self.mask] + self.fixed_inputs() + self.past_names()

    def outputs(self):
        return [self.first] + self.present_names()

    def past_length(self) -> int:
        k = self.given.get("past_key_values.0.key")
        return self.p if k is None else k.shape[2]

    def make(self, name):
        if name == self.ids:
            return torch.randint(0, self.config.vocab_size, (self.b, self.n), generator=self.g).to(self.device)
        if name == self.mask:
            return _padded_mask(self.b, self.past_length() + self.n, self.device, slice(None, 2))
        return self.randn(self.b, self.heads, self.p, self.head_dim)

    def randn(self, *shape) -> Tensor:
        return torch.randn(*shape, generator=self.g).to(device=self.device, dtype=self.dtype)

    def example(self):
        flat = super().example()
        k = 2 + len(self.fixed_inputs())
        return tuple(flat[:k]) + (list(flat[k:]),)  # the past as one list argument

    def fixed_shapes(self) -> Tuple[Any, ...]:
        return ()

    def dynamic_shapes(self):
        if not self.dynamic:
            return None
        kv = {0: self.batch, 2: _dim("past_sequence")}
        return ({0: self.batch, 1: _dim("sequence")}, {0: self.batch, 1: torch.export.Dim.AUTO},
                *self.fixed_shapes(), [kv] * (2 * self.layers))

    def dims(self):
        dims = {self.ids: ["batch", "sequence"], self.mask: ["batch", "past_sequence + sequence"],
                self.first: ["batch", "sequence"]}
        dims.update({name: ["batch", "encoder_sequence"] for name in self.fixed_inputs()})
        dims.update({name: ["batch", None, "past_sequence", None] for name in self.past_names()})
        dims.update({name: ["batch", None, "past_sequence + sequence", None] for name in self.present_names()})
        dims.update({name: ["batch", "sequence"] for name in self.hidden()})
        return dims

    def module(self):
        return _DecoderGraph(self.model, [self.first], self.layer_outputs)


class Seq2SeqEncoderSpec(GraphSpec):
    """An encoder-decoder's encoder: ``(input_ids, attention_mask) -> last_hidden_state[, cross_key_values]
    [, hidden_states...]``."""

    name = "encoder"
    b, n = 2, 7

    def inputs(self):
        return ["input_ids", "attention_mask"]

    def outputs(self):
        return ["last_hidden_state"] + (["cross_key_values"] if self.model.has_decoder else [])

    def make(self, name):
        if name == "input_ids":
            return torch.randint(2, self.config.vocab_size, (self.b, self.n), generator=self.g).to(self.device)
        return _padded_mask(self.b, self.n, self.device, slice(self.n - 2, None))

    def dynamic_shapes(self):
        if not self.dynamic:
            return None
        seq = _dim("encoder_sequence")
        return ({0: self.batch, 1: seq}, {0: self.batch, 1: seq})

    def dims(self):
        names = ["input_ids", "attention_mask", "last_hidden_state", "cross_key_values"] + self.hidden()
        return {name: ["batch", "encoder_sequence"] for name in names}

    def module(self):
        return _Seq2SeqEncoderGraph(self.model, self.layer_outputs)


class Seq2SeqDecoderSpec(DecoderSpec):
    """An encoder-decoder's decoder with past: a :class:`DecoderSpec` that also takes the encoder's
    mask and ``cross_key_values``; its examples follow the encoder graph's."""

    name = "decoder"
    ids, mask = "decoder_input_ids", "decoder_attention_mask"

    @classmethod
    def applies(cls, model) -> bool:
        return bool(model.has_decoder)

    def fixed_inputs(self):
        return ["encoder_attention_mask", "cross_key_values"]

    def make(self, name):
        encoder_ids, encoder_mask = self.previous[0].example
        if name == self.mask:  # no padding among the decoder's own tokens
            return torch.ones(self.b, self.past_length() + self.n, dtype=torch.long, device=self.device)
        if name == "encoder_attention_mask":
            return encoder_mask
        if name == "cross_key_values":
            return self.randn(self.b, encoder_ids.shape[1], self.model.cross_width)
        return super().make(name)

    def fixed_shapes(self):
        seq = _dim("encoder_sequence")
        return ({0: self.batch, 1: seq}, {0: self.batch, 1: seq})

    def module(self):
        return _Seq2SeqDecoderGraph(self.model, [self.first], self.layer_outputs)


#: A family's kind (:mod:`engine.family`) -> the specs of its graphs, in export order.
SPECS: Dict[str, Tuple[type, ...]] = {
    "encoder": (EncoderSpec,),
    "vision": (VisionSpec,),
    "decoder": (DecoderSpec,),
    "seq2seq": (Seq2SeqEncoderSpec, Seq2SeqDecoderSpec),
}


def graphs_for(model, *, dynamic: bool = True, example_inputs=None, layer_outputs: bool = False) -> List[Graph]:
    """The graph(s) ``to_onnx`` exports for ``model`` (one, or an encoder-decoder's encoder and decoder)."""
    _, kind = model_kind(model)
    g = torch.Generator().manual_seed(0)
    specs = [cls(model, dynamic=dynamic, layer_outputs=layer_outputs, generator=g)
             for cls in SPECS[kind] if cls.applies(model)]
    given = example_inputs
    if given is not None and not isinstance(given, dict):
        if not (isinstance(given, Tensor) and specs[0].tensor_input):
            raise ExportError("example_inputs must be a dict of graph input name -> tensor")
        given = {specs[0].tensor_input: given}
    given = dict(given or {})
    graphs: List[Graph] = []
    for spec in specs:
        # One graph checks the names itself; several share the dict, each taking its own inputs.
        own = given if len(SPECS[kind]) == 1 else {k: v for k, v in given.items() if k in spec.inputs()}
        graphs.append(spec.graph(own, graphs))
    unknown = sorted(set(given) - {name for spec in specs for name in spec.inputs()})
    if unknown:
        raise ExportError(f"example_inputs has {unknown}, which are not inputs of {model.model_type}'s graphs")
    return graphs
