"""T5 on trifuse's kernels: encoder-decoder with the relative position bias computed in-kernel.

Covers ``T5ForConditionalGeneration`` (task ``text2text-generation``), ``T5Model``
(``feature-extraction``: the decoder's last hidden state) and ``T5EncoderModel``
(``encoder``), in both flavours:

- original T5: ReLU feed-forward (``DenseReluDense.wi/wo``), LM head tied to the
  shared embeddings and fed ``d_model**-0.5``-scaled decoder outputs;
- T5 v1.1 / FLAN-T5 / mT5: gated GELU (``gelu_new(wi_0 x) * (wi_1 x)``, one fused
  ``[2*d_ff, d_model]`` projection feeding ``kernels.gelu(..., gate=)``), untied
  ``lm_head``, no output scaling.

Layout of the graph:

* pre-norm blocks whose residual adds all ride in the next RMSNorm
  (``kernels.rms_norm(x, w, eps, residual=h)``); no biases; attention unscaled
  (``scale=1.0``);
* self-attention: one fused ``[3*inner, d_model]`` QKV projection, read by
  ``kernels.attention`` through strided views;
* the relative position bias: each stack's table (its first block's
  ``relative_attention_bias``) goes to the kernel as a :class:`kernels.RelativeBias`
  (bidirectional in the encoder; ``bidirectional=False`` plus ``causal=True`` in the
  decoder, with ``query_offset`` = the number of cached positions), so no
  ``[H, Lq, Lk]`` bias is ever built;
* cross-attention: the keys/values of *every* decoder layer come from one GEMM over
  the encoder output (all layers' ``k``/``v`` weights fused into one
  ``[layers*2*inner, d_model]`` matrix), computed once per generation and kept in the
  cache; no position bias, the encoder's padding mask. A decoder batch that is
  ``g`` times the encoder batch (beams) reads each encoder row's keys once: the
  ``g`` rows of a group are presented to the kernel as ``g*n`` query rows of one
  batch item, so the cross keys/values are never expanded per beam;
* :class:`T5Cache` preallocates the decoder's self-attention keys/values
  (``[layers, B, H, max_len, D]``): each step writes in place, attends over a view,
  and beam search reorders it with one ``index_select`` over the filled part.

fp16: T5 is known to overflow in fp16 (the feed-forward output of the larger
checkpoints passes 65504). Hugging Face keeps ``wo`` in fp32 and clamps hidden
states; here an fp16 model keeps ``wo`` in fp32 *and* carries the residual stream
in fp32 (matmuls and attention still run in fp16), which never overflows. bf16 has
fp32's range: it is the dtype to pick for T5 on a GPU.

Reference semantics: Hugging Face transformers' ``modeling_t5.py`` and
``generation/utils.py``; the checkpoint names below are theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trifuse import kernels

from .. import generation as gen
from .. import inputs
from ..cache import EncoderDecoderCache, encoder_state, self_attention_mask
from ..decoding import EncoderDecoderDecoding
from ..family import SEQ2SEQ, Family
from ..layers import Attention, RMSNorm, bias_act, check_activation, kernel_mask, lm_head
from ..loading import assemble_state, load_into
from ..outputs import EncoderOutput, ModelOutput
from ..packing import plan, plan_decoder

TASKS = ("text2text-generation", "feature-extraction", "encoder")
_ARCH_TASKS = {"T5ForConditionalGeneration": "text2text-generation", "T5Model": "feature-extraction",
               "T5EncoderModel": "encoder"}
# Heads of T5 classes we do not build (their backbone sits under "transformer.").
_OTHER_HEADS = ("classification_head.", "qa_outputs.", "classifier.")
_GELU_APPROX = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    act: str = "relu"  # Hugging Face's dense_act_fn
    gated: bool = False  # T5 v1.1: act(wi_0 x) * (wi_1 x)
    scale_decoder_outputs: bool = True  # original T5: decoder output * d_model**-0.5 before the LM head
    pad_token_id: Optional[int] = 0
    eos_token_id: Tuple[int, ...] = (1,)
    decoder_start_token_id: Optional[int] = 0

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, cfg: dict) -> "T5Config":
        if cfg.get("model_type") != "t5":
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not t5")
        proj = cfg.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if (len(parts) > 1 and parts[0] != "gated") or len(parts) > 2:
            raise ValueError(f"feed_forward_proj={proj!r} is not 'ACT' or 'gated-ACT' (e.g. 'relu', 'gated-gelu')")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # Hugging Face's backward-compatible rule
        check_activation(act)
        # transformers 5.x saves scale_decoder_outputs (and always tie_word_embeddings=True);
        # older configs say it with tie_word_embeddings. Whether the head is tied is decided
        # from the tensors (see from_checkpoint), never from the flag.
        scale = cfg.get("scale_decoder_outputs")
        if scale is None:
            scale = cfg.get("tie_word_embeddings", True) is not False
        eos = cfg.get("eos_token_id")
        start = cfg.get("decoder_start_token_id")
        if start is None:
            start = cfg.get("bos_token_id")
        num_layers = cfg.get("num_layers", 6)
        c = cls(vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], d_kv=cfg["d_kv"], d_ff=cfg["d_ff"],
                num_layers=num_layers, num_decoder_layers=cfg.get("num_decoder_layers") or num_layers,
                num_heads=cfg["num_heads"], num_buckets=cfg.get("relative_attention_num_buckets", 32),
                max_distance=cfg.get("relative_attention_max_distance", 128),
                eps=cfg.get("layer_norm_epsilon", 1e-6), act=act, gated=parts[0] == "gated" and len(parts) == 2,
                scale_decoder_outputs=bool(scale), pad_token_id=cfg.get("pad_token_id"),
                eos_token_id=gen._eos_tuple(eos), decoder_start_token_id=start)
        if not kernels.MIN_HEAD_DIM <= c.d_kv <= kernels.MAX_HEAD_DIM:
            raise ValueError(f"d_kv={c.d_kv} is unsupported; the attention kernel takes head dims "
                             f"{kernels.MIN_HEAD_DIM}..{kernels.MAX_HEAD_DIM}")
        if c.num_buckets < 4 or c.max_distance <= c.num_buckets // 2:
            raise ValueError(f"relative_attention_num_buckets={c.num_buckets} / relative_attention_max_distance="
                             f"{c.max_distance} unsupported: need num_buckets >= 4 and max_distance > num_buckets // 2")
        return c


@dataclass
class Seq2SeqOutput(ModelOutput):
    """``T5ForConditionalGeneration`` / ``T5Model`` outputs, with Hugging Face's field names.

    ``logits`` (text2text-generation only), ``last_hidden_state``: the decoder's final
    normed output; ``encoder_last_hidden_state``; ``past_key_values``: the
    :class:`T5Cache` (with ``use_cache`` or a cache passed in). Hidden states
    (``output_hidden_states=True``): the embeddings, then each block's output, the last
    one after the final norm, as in Hugging Face.
    """

    logits: Optional[Tensor] = None
    past_key_values: Optional["T5Cache"] = None
    last_hidden_state: Optional[Tensor] = None
    encoder_last_hidden_state: Optional[Tensor] = None
    decoder_hidden_states: Optional[Tuple[Tensor, ...]] = None
    encoder_hidden_states: Optional[Tuple[Tensor, ...]] = None


Seq2SeqLMOutput = Seq2SeqOutput  # Hugging Face's name for the generation head's output


# ----------------------------------------------------------------------------
# The cache.



#: The decoder's cache: :class:`engine.cache.EncoderDecoderCache` (T5's name for it).
T5Cache = EncoderDecoderCache


# ----------------------------------------------------------------------------
# The model.


class FeedForward(nn.Module):
    """``wo(act(wi x))`` or, gated, ``wo(act(wi_0 x) * (wi_1 x))`` with ``wi_0``/``wi_1`` fused."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.gated, self.act, self.d_ff = c.gated, c.act, c.d_ff
        self.wi = nn.Linear(c.d_model, (2 if c.gated else 1) * c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    quantizable = ("wi", "wo")  # for engine.quantize

    def forward(self, x: Tensor) -> Tensor:
        h = self.wi(x)
        if self.gated:
            a, gate = h[..., : self.d_ff], h[..., self.d_ff:]  # views; the kernel reads them strided
            if self.act in _GELU_APPROX:
                h = kernels.gelu(a, approximate=_GELU_APPROX[self.act], gate=gate)
            else:
                h = bias_act(a, None, self.act) * gate
        else:
            h = bias_act(h, None, self.act)
        if isinstance(self.wo, nn.Linear):  # fp32 in an fp16 model (see the module docstring)
            h = _as(h, self.wo.weight.dtype)
        return self.wo(h)


def _attention(c: T5Config, **kw) -> Attention:
    """T5's attention: unscaled (the scale is folded into its weights), no biases."""
    return Attention(c.d_model, c.num_heads, c.d_kv, qkv_bias=False, out_bias=False, scale=1.0, **kw)


class EncoderBlock(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(c.d_model, c.eps)
        self.attn = _attention(c)
        self.norm2 = RMSNorm(c.d_model, c.eps)
        self.ffn = FeedForward(c)


class DecoderBlock(nn.Module):
    def __init__(self, c: T5Config, layer: int):
        super().__init__()
        self.norm1 = RMSNorm(c.d_model, c.eps)
        self.attn = _attention(c, causal=True, layer=layer)
        self.norm2 = RMSNorm(c.d_model, c.eps)
        self.cross = _attention(c, cross=True, layer=layer)
        self.norm3 = RMSNorm(c.d_model, c.eps)
        self.ffn = FeedForward(c)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when ``t`` is in ``dtype`` already (the common case: one stream
    dtype); a no-op ``.to`` still costs about a microsecond, a dozen times a forward."""
    return t if t.dtype is dtype else t.to(dtype)


def _norm_in(norm: RMSNorm, h: Tensor, pending: Optional[Tensor], compute: torch.dtype):
    """``norm(h + pending)`` (the pending residual add fused in), in the compute dtype, and the new ``h``."""
    if pending is None:
        x = norm(h)
    else:
        x, h = norm(_as(pending, h.dtype), residual=h)
    return _as(x, compute), h


class Encoder(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.config = c
        self.relative_bias = nn.Parameter(torch.empty(c.num_buckets, c.num_heads))  # [buckets, H]
        self.layers = nn.ModuleList(EncoderBlock(c) for _ in range(c.num_layers))
        self.final_norm = RMSNorm(c.d_model, c.eps)

    def rel(self) -> kernels.RelativeBias:
        c = self.config
        return kernels.RelativeBias(self.relative_bias, True, c.num_buckets, c.max_distance, query_offset=0)

    def forward(self, emb: Tensor, mask: Optional[Tensor], stream: torch.dtype,
                hidden: Optional[list] = None) -> Tensor:
        compute = emb.dtype
        h, pending, rel = _as(emb, stream), None, self.rel()
        for block in self.layers:
            x, h = _norm_in(block.norm1, h, pending, compute)
            a, _ = block.attn(x, mask, relative_bias=rel)
            x, h = _norm_in(block.norm2, h, a, compute)
            pending = block.ffn(x)
            if hidden is not None:
                hidden.append((h + pending.to(h.dtype)).to(compute))
        x, _ = _norm_in(self.final_norm, h, pending, compute)
        return x


class Decoder(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.config = c
        self.relative_bias = nn.Parameter(torch.empty(c.num_buckets, c.num_heads))
        self.layers = nn.ModuleList(DecoderBlock(c, i) for i in range(c.num_decoder_layers))
        # Every layer's cross-attention k and v, stacked: one GEMM over the encoder output.
        self.cross_kv = nn.Linear(c.d_model, c.num_decoder_layers * 2 * c.inner, bias=False)
        self.final_norm = RMSNorm(c.d_model, c.eps)

    def rel(self, start: Union[int, Tensor], kv_len: int = 0) -> Union[kernels.RelativeBias, Tensor]:
        """The self-attention bias for queries from ``start`` on: in-kernel, or dense ``[1, H, 1, kv_len]``
        when ``start`` is a device tensor (static decoding of one token; no host read)."""
        c = self.config
        if not isinstance(start, Tensor):
            return kernels.RelativeBias(self.relative_bias, False, c.num_buckets, c.max_distance,
                                        query_offset=start)
        rp = torch.arange(kv_len, device=start.device) - start
        buckets = kernels.relative_position_bucket(rp, False, c.num_buckets, c.max_distance)
        return self.relative_bias.float()[buckets].t()[None, :, None, :]

    def project_encoder(self, enc: Tensor) -> Tensor:
        """``[B_enc, L_enc, layers*2*inner]``: the cross-attention keys/values of every layer."""
        return F.linear(enc, self.cross_kv.weight)

    def cross_views(self, kv: Tensor, layer: int) -> Tuple[Tensor, Tensor]:
        c = self.config
        be, le, _ = kv.shape
        kv = kv.view(be, le, c.num_decoder_layers, 2, c.num_heads, c.d_kv)[:, :, layer]
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [B_enc, H, L_enc, D] views

    def forward(self, emb: Tensor, self_mask: Optional[Tensor], cross_kv: Tensor, enc_mask: Optional[Tensor],
                cache: Optional[T5Cache], start: Union[int, Tensor], stream: torch.dtype,
                hidden: Optional[list] = None) -> Tensor:
        compute = emb.dtype
        kv_len = self_mask.shape[1] if isinstance(self_mask, Tensor) else 0
        h, pending, rel = _as(emb, stream), None, self.rel(start, kv_len)
        # In-kernel relative bias, or (static decoding) a dense [1, H, 1, Lk] one.
        bias, rel = (rel, None) if isinstance(rel, Tensor) else (None, rel)
        for i, block in enumerate(self.layers):
            x, h = _norm_in(block.norm1, h, pending, compute)
            a, _ = block.attn(x, self_mask, cache=cache, start=start, bias=bias, relative_bias=rel)
            x, h = _norm_in(block.norm2, h, a, compute)
            kv = None if cross_kv is None else self.cross_views(cross_kv, i)  # None: a packed step's own
            a, _ = block.cross(x, enc_mask, kv=kv, cache=cache)
            x, h = _norm_in(block.norm3, h, a, compute)
            pending = block.ffn(x)
            if hidden is not None:
                hidden.append((h + pending.to(h.dtype)).to(compute))
        x, _ = _norm_in(self.final_norm, h, pending, compute)
        return x


EncoderOutputs = Union[Tensor, EncoderOutput, Seq2SeqOutput, Sequence[Tensor]]


class T5Model(EncoderDecoderDecoding, nn.Module):
    """T5 (``T5ForConditionalGeneration`` / ``T5Model`` / ``T5EncoderModel``); call it like Hugging Face's."""

    def __init__(self, c: T5Config, task: str = "text2text-generation", untied_head: bool = False):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} for t5; choose from {', '.join(TASKS)}")
        self.config, self.task = c, task
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c) if task != "encoder" else None
        self.lm_head = (nn.Linear(c.d_model, c.vocab_size, bias=False)
                        if task == "text2text-generation" and untied_head else None)

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    @property
    def stream_dtype(self) -> torch.dtype:
        """The residual stream's dtype: fp32 for an fp16 model (T5 overflows fp16), else the model's."""
        return torch.float32 if self.dtype == torch.float16 else self.dtype

    model_type = "t5"

    @property
    def has_lm_head(self) -> bool:
        return self.task == "text2text-generation"

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def num_hidden_states(self, stack: str = "model") -> int:
        c = self.config
        return (c.num_decoder_layers if stack == "decoder" else c.num_layers) + 1

    def cache_shape(self) -> Tuple[int, int, int]:
        """``(layers, heads, head_dim)`` of the decoder's self-attention cache."""
        c = self.config
        return c.num_decoder_layers, c.num_heads, c.d_kv

    @property
    def cross_width(self) -> int:
        """The last dimension of ``cross_key_values``: every decoder layer's cross keys and values."""
        c = self.config
        return c.num_decoder_layers * 2 * c.num_heads * c.d_kv

    def cross_key_values(self, encoder_hidden_state: Tensor) -> Tensor:
        """``[B, L_enc, cross_width]``: every decoder layer's cross-attention keys/values, one projection."""
        return self.decoder.project_encoder(encoder_hidden_state)

    def export_encode(self, input_ids: Tensor, attention_mask: Tensor, output_hidden_states: bool = False):
        """The ONNX encoder graph's forward (:mod:`export.onnx`): ``(last hidden state, cross_key_values
        [B, L_enc, cross_width] or None without a decoder, hidden states or None)``. The cross keys/values
        are one projection of the encoder output, computed once per input and fed to every decoder step."""
        emb = self.shared(input_ids)
        hidden = [emb] if output_hidden_states else None
        x = self.encoder(emb, attention_mask.ne(0), self.stream_dtype, hidden)
        if hidden is not None:
            hidden[-1] = x  # as encode()
        return x, (self.decoder.project_encoder(x) if self.decoder is not None else None), hidden

    def export_decode(self, decoder_input_ids: Tensor, decoder_attention_mask: Tensor,
                      encoder_attention_mask: Tensor, cross_key_values: Tensor, cache, past_length,
                      output_hidden_states: bool = False):
        """The ONNX decoder graph's forward: ``decoder_attention_mask`` ``[B, P + n]`` covers the
        ``P = past_length`` positions in ``cache`` (any object with ``update(layer, start, k, v)``) and
        the new ids; T5's relative bias leaves the query offset to the attention op (``Lk - Lq``,
        symbolic in a trace), so it does not read ``past_length``.
        Returns ``(logits, or the last hidden state without an LM head; hidden states or None)``."""
        emb = self.shared(decoder_input_ids)
        hidden = [emb] if output_hidden_states else None
        x = self.decoder(emb, decoder_attention_mask.ne(0), cross_key_values, encoder_attention_mask.ne(0), cache,
                         None, self.stream_dtype, hidden)
        if hidden is not None:
            hidden[-1] = x
        return (self._logits(x) if self.has_lm_head else x), hidden

    def new_cache(self, batch: int, max_len: int) -> T5Cache:
        """An empty decoder cache for ``batch`` rows and up to ``max_len`` decoder positions."""
        if self.decoder is None:
            raise ValueError("a T5 encoder (task='encoder') has no decoder cache")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        c = self.config
        return T5Cache(batch, c.num_decoder_layers, c.num_heads, max_len, c.d_kv, self.dtype, self.device)

    # -- checks ---------------------------------------------------------------

    def _check_ids(self, name: str, ids) -> None:
        inputs.check_token_ids(name, ids, self.config.vocab_size)

    _check_mask = staticmethod(inputs.check_mask)

    # -- the encoder ----------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               output_hidden_states: bool = False) -> EncoderOutput:
        """The encoder alone: ``last_hidden_state`` ``[B, L, d_model]`` (and ``hidden_states``)."""
        self._check_ids("input_ids", input_ids)
        self._check_mask("attention_mask", attention_mask, [tuple(input_ids.shape)])
        # Padding-free when it pays (engine.packing): [T, d_model] inside; relative positions need each
        # row's real tokens side by side.
        packed = plan(attention_mask, relative=True)
        emb = self.shared(input_ids if packed is None else packed.unpad(input_ids))
        hidden = [emb] if output_hidden_states else None
        x = self.encoder(emb, kernel_mask(attention_mask) if packed is None else packed, self.stream_dtype, hidden)
        if hidden is not None:
            hidden[-1] = x  # Hugging Face's last hidden state is after the final norm
        if packed is not None:  # zeros at padded positions
            x, hidden = packed.pad(x), None if hidden is None else [packed.pad(h) for h in hidden]
        return EncoderOutput(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None)

    # -- forward --------------------------------------------------------------

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                decoder_input_ids: Optional[Tensor] = None, decoder_attention_mask: Optional[Tensor] = None,
                encoder_outputs: Optional[EncoderOutputs] = None, past_key_values: Optional[T5Cache] = None,
                use_cache: bool = False, output_hidden_states: bool = False):
        """Hugging Face's call.

        ``encoder`` task: ``model(input_ids, attention_mask)`` -> ``last_hidden_state``.
        Otherwise the encoder runs on ``input_ids`` unless ``encoder_outputs`` (its
        ``last_hidden_state``, a tuple whose first item is it, or the tensor) is given or
        ``past_key_values`` already holds its keys/values; then the decoder runs on
        ``decoder_input_ids`` ``[B, n]`` (``decoder_attention_mask`` ``[B, n]`` or
        ``[B, cached + n]``). ``past_key_values``: a :class:`T5Cache` to continue (updated
        in place and returned); ``use_cache=True`` without one starts a cache.
        ``attention_mask`` is the encoder's padding mask; with a cache it may be left out.
        """
        if self.decoder is None:
            if input_ids is None:
                raise ValueError("input_ids is required")
            if decoder_input_ids is not None or past_key_values is not None or use_cache:
                raise ValueError("this T5 was loaded as an encoder (task='encoder'): it takes no decoder inputs "
                                 "and keeps no cache")
            return self.encode(input_ids, attention_mask, output_hidden_states)
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (T5 starts decoding from decoder_start_token_id="
                             f"{self.config.decoder_start_token_id}); use generate() to decode from scratch")
        self._check_ids("decoder_input_ids", decoder_input_ids)
        b, n = decoder_input_ids.shape
        cache = past_key_values
        start = 0
        if cache is not None:
            if not isinstance(cache, T5Cache):
                raise TypeError(f"past_key_values must be a trifuse T5Cache (model.new_cache(...) or a previous "
                                f"output's past_key_values), got {type(cache).__name__}")
            if cache.batch_size != b:
                raise ValueError(f"past_key_values holds {cache.batch_size} rows but decoder_input_ids has {b}")
            start = cache.length
            cache.ensure_capacity(start + n)
        elif use_cache:
            cache = self.new_cache(b, max(n, 64))
            cache.growable = True
        self._check_mask("decoder_attention_mask", decoder_attention_mask,
                         [(b, n), (b, start + n)] if start else [(b, n)])

        enc_hidden, enc_states, cross_kv, enc_mask = encoder_state(self, cache, input_ids, attention_mask,
                                                                   encoder_outputs, output_hidden_states, b)

        # A padded decoder batch with nothing cached runs padding-free when it pays (engine.packing).
        packed = plan_decoder(decoder_attention_mask, start, enc_mask, cross_kv, relative=True)
        x, hidden = self._decode(decoder_input_ids, decoder_attention_mask, cross_kv, enc_mask, cache, start,
                                 output_hidden_states, packed)
        logits = self._logits(x) if self.task == "text2text-generation" else None
        if packed is not None:  # back to [B, n, ...], zeros at padded positions
            pad = packed[0].queries.pad
            x, logits = pad(x), None if logits is None else pad(logits)
            hidden = None if hidden is None else tuple(pad(t) for t in hidden)
        return Seq2SeqOutput(logits=logits,
                             past_key_values=cache, last_hidden_state=x, encoder_last_hidden_state=enc_hidden,
                             decoder_hidden_states=hidden, encoder_hidden_states=enc_states)

    def _decode(self, ids: Tensor, decoder_attention_mask: Optional[Tensor], cross_kv: Tensor,
                enc_mask: Optional[Tensor], cache: Optional[T5Cache], start: int,
                output_hidden_states: bool = False, packed: Optional[tuple] = None) -> Tuple[Tensor, Optional[tuple]]:
        """The decoder's final states ``[B, n, d_model]``; with ``packed`` (:func:`engine.packing.plan_decoder`)
        the real tokens' ``[T, d_model]`` (hidden states likewise)."""
        n = ids.shape[1]
        mask = self_attention_mask(decoder_attention_mask, cache, start, n)
        if packed is not None:
            (enc_mask, cross_kv), mask, ids = packed, packed[0].queries, packed[0].queries.unpad(ids)
        emb = self.shared(ids)
        hidden = [emb] if output_hidden_states else None
        x = self.decoder(emb, mask, cross_kv, enc_mask, cache, start, self.stream_dtype, hidden)
        if cache is not None:
            cache.length = start + n
        if hidden is not None:
            hidden[-1] = x
        return x, tuple(hidden) if hidden is not None else None

    def packed_logits(self, ids: Tensor, positions: Tensor, step, rows: Tensor) -> Tensor:
        """One continuous-batching step (:mod:`engine.continuous`): ``ids`` ``[T]`` are many sequences'
        decoder tokens in one row (``positions`` unused: T5's are relative, and the step knows them);
        ``step`` (:class:`engine.paged.PackedStep`) runs their self- and cross-attention over its paged
        cache; the logits ``[len(rows), V]`` at the token indices ``rows``."""
        x = self.decoder(self.shared(ids[None]), None, None, None, step, 0, self.stream_dtype)
        return self._logits(x[0, rows])

    @property
    def tied_lm_embedding(self) -> Optional[nn.Embedding]:
        """The embedding table that is also the LM head (laid out for it on the CPU: ``pack_linears``)."""
        return self.shared if self.has_lm_head and self.lm_head is None else None

    def _logits(self, x: Tensor) -> Tensor:
        if self.config.scale_decoder_outputs:
            x = x * (self.config.d_model ** -0.5)
        return lm_head(x, self.shared if self.lm_head is None else self.lm_head)

    # -- decoding (engine.decoding.EncoderDecoderDecoding: generate, stream) -----

    def _check_generation(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> None:
        if self.task != "text2text-generation":
            raise ValueError(f"this T5 was loaded for {self.task!r}; load T5ForConditionalGeneration "
                             f"(task='text2text-generation') to generate")
        self._check_ids("input_ids", input_ids)
        self._check_mask("attention_mask", attention_mask, [tuple(input_ids.shape)])

    def decode_step(self, tokens: Tensor, positions: Optional[Tensor], slot: Tensor, cache: T5Cache,
                    kv_len: int) -> Tensor:
        """One decoding step with no host reads, for CUDA graphs: the next-token logits ``[B, V]``.

        ``tokens``: ``[B, 1]`` long; ``positions``: unused (T5's positions are relative: the
        ``slot``); ``slot``: one-element long tensor, the cache position written (also the
        query's position for the relative bias). Self-attention covers the first ``kv_len``
        slots through ``cache.mask`` (slots from ``slot`` on must be False on entry);
        cross-attention reads ``cache.cross_kv`` / ``cache.encoder_mask`` (a mask tensor
        here, padding included). Sets the mask at ``slot`` and advances ``slot`` in place;
        ``cache.length`` is the caller's to keep. Driven by :class:`engine.graphs.StaticDecoder`.
        """
        mask = cache.step_mask(slot, kv_len)
        x = self.decoder(self.shared(tokens), mask, cache.cross_kv, cache.encoder_mask, cache, slot,
                         self.stream_dtype)
        slot.add_(1)
        return self._logits(x[:, -1])


# ----------------------------------------------------------------------------
# Checkpoint names.

_SELF = "layer.0.SelfAttention"
_FF = {False: ["DenseReluDense.wi"], True: ["DenseReluDense.wi_0", "DenseReluDense.wi_1"]}


def key_map(model: T5Model, prefix: str) -> dict:
    """Our parameter name -> the checkpoint's (lists are concatenated along dim 0)."""
    c, p = model.config, prefix
    spec = {"shared.weight": [(f"{p}shared.weight", f"{p}encoder.embed_tokens.weight",
                               f"{p}decoder.embed_tokens.weight")]}
    stacks = [("encoder", model.encoder, 1)]
    if model.decoder is not None:
        stacks.append(("decoder", model.decoder, 2))
    for name, stack, ff in stacks:
        spec[f"{name}.relative_bias"] = [f"{p}{name}.block.0.{_SELF}.relative_attention_bias.weight"]
        spec[f"{name}.final_norm.weight"] = [f"{p}{name}.final_layer_norm.weight"]
        for i in range(len(stack.layers)):
            b, ours = f"{p}{name}.block.{i}.", f"{name}.layers.{i}."
            spec[ours + "norm1.weight"] = [b + "layer.0.layer_norm.weight"]
            spec[ours + "attn.qkv.weight"] = [f"{b}{_SELF}.{w}.weight" for w in "qkv"]
            spec[ours + "attn.out.weight"] = [f"{b}{_SELF}.o.weight"]
            spec[ours + "norm2.weight"] = [b + "layer.1.layer_norm.weight"]
            if name == "decoder":
                spec[ours + "cross.q.weight"] = [b + "layer.1.EncDecAttention.q.weight"]
                spec[ours + "cross.out.weight"] = [b + "layer.1.EncDecAttention.o.weight"]
                spec[ours + "norm3.weight"] = [b + "layer.2.layer_norm.weight"]
            spec[ours + "ffn.wi.weight"] = [f"{b}layer.{ff}.{w}.weight" for w in _FF[c.gated]]
            spec[ours + "ffn.wo.weight"] = [f"{b}layer.{ff}.DenseReluDense.wo.weight"]
    if model.decoder is not None:
        spec["decoder.cross_kv.weight"] = [f"{p}decoder.block.{i}.layer.1.EncDecAttention.{w}.weight"
                                           for i in range(c.num_decoder_layers) for w in "kv"]
    if model.lm_head is not None:
        spec["lm_head.weight"] = ["lm_head.weight"]
    return spec


def _task_from_architectures(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in _ARCH_TASKS:
            return _ARCH_TASKS[arch]
    if archs:
        raise ValueError(f"T5 head {archs[0]} is not supported; pass task='feature-extraction' or task='encoder' "
                         f"to load its backbone")
    return "text2text-generation"


def _separate_head(state: dict, prefix: str) -> bool:
    """Whether the checkpoint stores its own LM head: an ``lm_head.weight`` that is not a copy of the
    embeddings. transformers 5.x forces ``tie_word_embeddings=True`` into every T5 config, so the
    tensors decide, not the flag (as Hugging Face's loader does: both present and different = untied)."""
    head = state.get("lm_head.weight")
    if head is None:
        return False
    shared = next((state[k] for k in (f"{prefix}shared.weight", f"{prefix}decoder.embed_tokens.weight",
                                      f"{prefix}encoder.embed_tokens.weight") if k in state), None)
    if shared is None or shared.shape != head.shape:
        return True
    return not (shared.data_ptr() == head.data_ptr() or torch.equal(shared, head))


def from_checkpoint(cfg: dict, state: dict, *, task: Optional[str] = None, dtype=None, device=None) -> T5Model:
    c = T5Config.from_hf(cfg)
    task = task or _task_from_architectures(cfg)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} for t5; choose from {', '.join(TASKS)}")
    prefix = "transformer." if any(k.startswith("transformer.") for k in state) else ""
    untied = task == "text2text-generation" and _separate_head(state, prefix)
    with torch.device("meta"):
        model = T5Model(c, task, untied_head=untied)

    def skip(name: str) -> bool:
        bare = name[len(prefix):] if name.startswith(prefix) else name
        return (bare in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")  # copies of shared
                or name == "lm_head.weight"  # tied (a copy), or a head this task does not use
                or bare.endswith("EncDecAttention.relative_attention_bias.weight")  # unused by Hugging Face too
                or (task == "encoder" and bare.startswith("decoder."))
                or name.startswith(_OTHER_HEADS))

    weights = assemble_state(model, state, key_map(model, prefix), skip=skip, dtype=dtype, device=device,
                             what=f"t5 checkpoint for {task}")
    if weights["shared.weight"].dtype == torch.float16:
        # Hugging Face's _keep_in_fp32_modules: T5's feed-forward output overflows fp16.
        for k in weights:
            if k.endswith("ffn.wo.weight"):
                weights[k] = weights[k].float()
    return load_into(model, weights)


# ----------------------------------------------------------------------------
# The family's contract (engine.family).


def example_inputs(model: T5Model, batch: int, seq: int, seed: int = 0) -> dict:
    """Encoder ids (mixed lengths, padded) and, with a decoder, decoder ids from the start token."""
    c = model.config
    ids, mask = inputs.token_batch(c.vocab_size, c.pad_token_id, batch, seq, model.device, seed)
    out = {"input_ids": ids, "attention_mask": mask}
    if model.decoder is not None:
        g = torch.Generator().manual_seed(seed + 1)
        dec = torch.randint(3, c.vocab_size, (batch, max(2, seq // 2)), generator=g).to(model.device)
        dec[:, 0] = c.decoder_start_token_id or 0
        out["decoder_input_ids"] = dec
    return out


_SMALL = dict(model_type="t5", vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="relu",
              tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

FAMILY = Family(
    name="t5", kind=SEQ2SEQ, model_types=("t5",), model_classes=(T5Model,), from_checkpoint=from_checkpoint,
    hf_classes={"text2text-generation": "AutoModelForSeq2SeqLM", "feature-extraction": "AutoModel",
                "encoder": "T5EncoderModel"},
    # Hugging Face's config-class defaults (transformers 5.24) and attribute_map.
    config_defaults={"t5": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                layer_norm_epsilon=1e-6, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
                                tie_word_embeddings=True)},
    config_aliases={"t5": {"d_model": "hidden_size", "num_heads": "num_attention_heads",
                           "num_layers": "num_hidden_layers"}},
    example_inputs=example_inputs,
    hidden_streams=("encoder_hidden_states", "decoder_hidden_states"),
    named_sizes={
        "t5-small": _SMALL,
        "t5-base": {**_SMALL, "d_model": 768, "d_ff": 3072, "num_layers": 12, "num_heads": 12},
        "t5-large": {**_SMALL, "d_model": 1024, "d_ff": 4096, "num_layers": 24, "num_heads": 16},
        "flan-t5-base": {**_SMALL, "d_model": 768, "d_ff": 2048, "num_layers": 12, "num_heads": 12,
                         "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
        # For smoke runs and tests: the real vocabulary, a toy body.
        "t5-tiny": {**_SMALL, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4},
    },
)
