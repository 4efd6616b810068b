"""BART on trifuse's kernels: a post-LN encoder-decoder with learned positions.

Covers ``BartForConditionalGeneration`` (task ``text2text-generation``), ``BartModel``
(``feature-extraction``: the decoder's last hidden state), ``BartForSequenceClassification``
(``sequence-classification``: the decoder state at the last EOS of each row through
``dense`` + tanh + ``out_proj``) and ``BartForQuestionAnswering`` (``question-answering``:
start/end logits over the decoder states).

Layout of the graph:

* embeddings: ``shared(ids) * embed_scale`` (``sqrt(d_model)`` with ``scale_embedding``)
  plus learned positions read at ``position + 2`` (BART's offset: the position of a
  decoder token counts the cached ones), then ``layernorm_embedding``;
* post-LN blocks in both stacks (attention, add & LayerNorm, feed-forward, add &
  LayerNorm; the decoder adds cross-attention and its add & LayerNorm in between), every
  residual add fused into its LayerNorm (``kernels.layer_norm(x, w, b, eps, residual=h)``),
  the first feed-forward bias inside the fused GELU; no final norm;
* attention scaled by ``1/sqrt(head_dim)``, q/k/v/out with biases; self-attention's q, k
  and v fused into one ``[3*d_model, d_model]`` projection read through strided views;
* cross-attention: the keys/values of *every* decoder layer come from one GEMM over the
  encoder output (all layers' ``k_proj``/``v_proj`` weights and biases stacked), computed
  once per generation and kept in the cache; beams of one input share them;
* the LM head tied to ``shared`` plus ``final_logits_bias``; with ``tie_word_embeddings``
  false (transformers 5.x) the encoder's, the decoder's and the head's tables are three.

Without ``decoder_input_ids`` the decoder reads ``input_ids`` shifted right behind
``decoder_start_token_id``, as Hugging Face's BART does (what its classification and QA heads
run on). Reference semantics: Hugging Face transformers' ``modeling_bart.py``; the
checkpoint names below are theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trifuse import kernels

from .. import generation as gen
from .. import inputs
from ..cache import EncoderDecoderCache, encoder_state, self_attention_mask
from ..decoding import CACHE_CHUNK, EncoderDecoderDecoding
from ..family import SEQ2SEQ, Family
from ..layers import Attention, FeedForward, LayerNorm, PostLNBlock, check_activation, kernel_mask, lm_head
from ..loading import assemble_state, load_into, module_keys
from ..outputs import EncoderOutput, ModelOutput
from ..packing import Packed, plan, plan_decoder

TASKS = ("text2text-generation", "feature-extraction", "sequence-classification", "question-answering")
_ARCH_TASKS = {"BartForConditionalGeneration": "text2text-generation", "BartModel": "feature-extraction",
               "BartForSequenceClassification": "sequence-classification",
               "BartForQuestionAnswering": "question-answering"}
_HEADS = ("classification_head.", "qa_outputs.", "lm_head.", "final_logits_bias")
_OFFSET = 2  # BartLearnedPositionalEmbedding: position p reads row p + 2


@dataclass(frozen=True)
class BartConfig:
    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_position_embeddings: int
    activation_function: str = "gelu"
    scale_embedding: bool = False
    eps: float = 1e-5  # nn.LayerNorm's default: Hugging Face's BART does not configure it
    tie_word_embeddings: bool = True
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 0
    eos_token_id: Tuple[int, ...] = (2,)
    decoder_start_token_id: Optional[int] = 2
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: Union[int, Tuple[int, ...], None] = 2
    num_labels: int = 3
    id2label: dict = field(default_factory=dict, compare=False)

    @property
    def hidden_size(self) -> int:  # Hugging Face's attribute_map
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.encoder_attention_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.encoder_layers

    @property
    def max_length(self) -> int:
        """The longest input (and decoder sequence) the position tables take."""
        return self.max_position_embeddings

    @property
    def decoder_head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0

    @classmethod
    def from_hf(cls, cfg: dict) -> "BartConfig":
        if cfg.get("model_type") != "bart":
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not bart")
        act = check_activation(cfg.get("activation_function", "gelu"))
        if cfg.get("id2label"):
            id2label = {int(k): v for k, v in cfg["id2label"].items()}
        else:
            id2label = {i: f"LABEL_{i}" for i in range(cfg.get("num_labels", 3))}
        forced_eos = cfg.get("forced_eos_token_id")
        if isinstance(forced_eos, list):
            forced_eos = tuple(forced_eos)
        c = cls(vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], encoder_layers=cfg["encoder_layers"],
                decoder_layers=cfg["decoder_layers"], encoder_attention_heads=cfg["encoder_attention_heads"],
                decoder_attention_heads=cfg["decoder_attention_heads"], encoder_ffn_dim=cfg["encoder_ffn_dim"],
                decoder_ffn_dim=cfg["decoder_ffn_dim"], max_position_embeddings=cfg["max_position_embeddings"],
                activation_function=act, scale_embedding=bool(cfg.get("scale_embedding", False)),
                tie_word_embeddings=cfg.get("tie_word_embeddings", True) is not False,
                pad_token_id=cfg.get("pad_token_id"), bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=gen._eos_tuple(cfg.get("eos_token_id")),
                decoder_start_token_id=cfg.get("decoder_start_token_id"),
                forced_bos_token_id=cfg.get("forced_bos_token_id"), forced_eos_token_id=forced_eos,
                num_labels=len(id2label), id2label=id2label)
        for stack in ("encoder", "decoder"):
            heads = getattr(c, f"{stack}_attention_heads")
            if heads < 1 or c.d_model % heads:
                raise ValueError(f"d_model={c.d_model} is not divisible by {stack}_attention_heads={heads}")
            hd = c.d_model // heads
            if not kernels.MIN_HEAD_DIM <= hd <= kernels.MAX_HEAD_DIM:
                raise ValueError(f"{stack} head dim {hd} (d_model / {stack}_attention_heads) is unsupported; the "
                                 f"attention kernel takes head dims {kernels.MIN_HEAD_DIM}..{kernels.MAX_HEAD_DIM}")
        if c.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be >= 1, got {c.max_position_embeddings}")
        return c


@dataclass
class Seq2SeqOutput(ModelOutput):
    """BART outputs, with Hugging Face's field names.

    ``logits``: the LM head's (text2text-generation) or the classifier's
    (sequence-classification); ``start_logits`` / ``end_logits`` (question-answering);
    ``last_hidden_state``: the decoder's last layer output; ``encoder_last_hidden_state``;
    ``past_key_values``: the :class:`BartCache` (with ``use_cache`` or a cache passed in).
    Hidden states (``output_hidden_states=True``): the embeddings after
    ``layernorm_embedding``, then each layer's output, as in Hugging Face.
    """

    logits: Optional[Tensor] = None
    start_logits: Optional[Tensor] = None
    end_logits: Optional[Tensor] = None
    past_key_values: Optional["BartCache"] = None
    last_hidden_state: Optional[Tensor] = None
    encoder_last_hidden_state: Optional[Tensor] = None
    decoder_hidden_states: Optional[Tuple[Tensor, ...]] = None
    encoder_hidden_states: Optional[Tuple[Tensor, ...]] = None


Seq2SeqLMOutput = Seq2SeqOutput


#: The decoder's cache: :class:`engine.cache.EncoderDecoderCache`.
BartCache = EncoderDecoderCache


# ----------------------------------------------------------------------------
# The model.


class DecoderBlock(nn.Module):
    """Self-attention (causal, cached), add & norm; cross-attention, add & norm; feed-forward, add & norm."""

    def __init__(self, c: BartConfig, layer: int):
        super().__init__()
        d, h = c.d_model, c.decoder_attention_heads
        self.attn = Attention(d, h, causal=True, layer=layer)
        self.norm1 = LayerNorm(d, c.eps)
        self.cross = Attention(d, h, cross=True, layer=layer)
        self.norm2 = LayerNorm(d, c.eps)
        self.ffn = FeedForward(d, c.decoder_ffn_dim, c.activation_function)
        self.norm3 = LayerNorm(d, c.eps)


class Encoder(nn.Module):
    def __init__(self, c: BartConfig):
        super().__init__()
        self.embed_positions = nn.Parameter(torch.empty(c.max_position_embeddings + _OFFSET, c.d_model))
        self.layernorm_embedding = LayerNorm(c.d_model, c.eps)
        self.layers = nn.ModuleList(PostLNBlock(c.d_model, c.encoder_attention_heads, c.encoder_ffn_dim,
                                                c.activation_function, c.eps) for _ in range(c.encoder_layers))

    def forward(self, emb: Tensor, mask: Union[Tensor, Packed, None], hidden: Optional[list] = None) -> Tensor:
        """``emb`` ``[B, L, d]`` with the kernel's mask, or ``[T, d]`` with a :class:`Packed` (padding-free)."""
        if isinstance(mask, Packed):
            pos = self.embed_positions[_OFFSET + mask.positions]
        else:
            pos = self.embed_positions[_OFFSET:_OFFSET + emb.shape[1]]
        x = self.layernorm_embedding(emb + pos)
        if hidden is not None:
            hidden.append(x)
        for block in self.layers:
            x, _ = block(x, mask)
            if hidden is not None:
                hidden.append(x)
        return x


class Decoder(nn.Module):
    def __init__(self, c: BartConfig):
        super().__init__()
        self.config = c
        self.embed_positions = nn.Parameter(torch.empty(c.max_position_embeddings + _OFFSET, c.d_model))
        self.layernorm_embedding = LayerNorm(c.d_model, c.eps)
        self.layers = nn.ModuleList(DecoderBlock(c, i) for i in range(c.decoder_layers))
        # Every layer's cross-attention k and v (weights and biases), stacked: one GEMM over the encoder output.
        self.cross_kv = nn.Linear(c.d_model, c.decoder_layers * 2 * c.d_model)

    def positions(self, start: Union[int, Tensor], n: int) -> Tensor:
        """The learned positions of ``n`` tokens from ``start`` (an int, or a one-element device tensor)."""
        if isinstance(start, Tensor):
            return F.embedding(start + _OFFSET, self.embed_positions)  # [1, d]: no host read
        return self.embed_positions[start + _OFFSET:start + _OFFSET + n]

    def project_encoder(self, enc: Tensor) -> Tensor:
        """``[B_enc, L_enc, layers*2*d_model]``: the cross-attention keys/values of every layer."""
        return self.cross_kv(enc)

    def cross_views(self, kv: Tensor, layer: int) -> Tuple[Tensor, Tensor]:
        c = self.config
        be, le, _ = kv.shape
        kv = kv.view(be, le, c.decoder_layers, 2, c.decoder_attention_heads, c.decoder_head_dim)[:, :, layer]
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [B_enc, H, L_enc, D] views

    def forward(self, emb: Tensor, pos: Tensor, self_mask: Optional[Tensor], cross_kv: Tensor,
                enc_mask: Optional[Tensor], cache, start, hidden: Optional[list] = None) -> Tensor:
        x = self.layernorm_embedding(emb + pos)
        if hidden is not None:
            hidden.append(x)
        for i, block in enumerate(self.layers):
            a, _ = block.attn(x, self_mask, cache=cache, start=start)
            x, _ = block.norm1(a, residual=x)
            kv = None if cross_kv is None else self.cross_views(cross_kv, i)  # None: a packed step's own
            a, _ = block.cross(x, enc_mask, kv=kv, cache=cache)
            x, _ = block.norm2(a, residual=x)
            x, _ = block.norm3(block.ffn(x), residual=x)
            if hidden is not None:
                hidden.append(x)
        return x


EncoderOutputs = Union[Tensor, EncoderOutput, Seq2SeqOutput, Sequence[Tensor]]


class BartModel(EncoderDecoderDecoding, nn.Module):
    """BART (``BartForConditionalGeneration`` / ``BartModel`` / ``BartForSequenceClassification`` /
    ``BartForQuestionAnswering``); call it like Hugging Face's."""

    def __init__(self, c: BartConfig, task: str = "text2text-generation"):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} for bart; choose from {', '.join(TASKS)}")
        self.config, self.task = c, task
        untied = not c.tie_word_embeddings
        # The encoder's token embeddings; the decoder's are the same table unless the config unties them
        # (Hugging Face then keeps encoder, decoder and LM head tables apart).
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.decoder_embed = nn.Embedding(c.vocab_size, c.d_model) if untied else None
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.lm_head = (nn.Linear(c.d_model, c.vocab_size, bias=False)
                        if task == "text2text-generation" and untied else None)
        if task == "text2text-generation":
            self.register_buffer("final_logits_bias", torch.empty(1, c.vocab_size))
        else:
            self.final_logits_bias = None
        self.cls_dense = nn.Linear(c.d_model, c.d_model) if task == "sequence-classification" else None
        self.cls_out = nn.Linear(c.d_model, c.num_labels) if task == "sequence-classification" else None
        self.qa_outputs = nn.Linear(c.d_model, 2) if task == "question-answering" else None

    model_type = "bart"
    generation_name = "BART"

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    @property
    def id2label(self) -> Optional[dict]:
        return dict(self.config.id2label) if self.task == "sequence-classification" else None

    @property
    def max_decoder_positions(self) -> int:
        return self.config.max_position_embeddings

    @property
    def has_lm_head(self) -> bool:
        return self.task == "text2text-generation"

    @property
    def has_decoder(self) -> bool:
        return True

    def num_hidden_states(self, stack: str = "model") -> int:
        c = self.config
        return (c.decoder_layers if stack == "decoder" else c.encoder_layers) + 1

    def cache_shape(self) -> Tuple[int, int, int]:
        """``(layers, heads, head_dim)`` of the decoder's self-attention cache."""
        c = self.config
        return c.decoder_layers, c.decoder_attention_heads, c.decoder_head_dim

    @property
    def cross_width(self) -> int:
        """The last dimension of ``cross_key_values``: every decoder layer's cross keys and values."""
        c = self.config
        return c.decoder_layers * 2 * c.d_model

    def cross_key_values(self, encoder_hidden_state: Tensor) -> Tensor:
        """``[B, L_enc, cross_width]``: every decoder layer's cross-attention keys/values, one projection."""
        return self.decoder.project_encoder(encoder_hidden_state)

    def _embed(self, ids: Tensor, decoder: bool = True) -> Tensor:
        table = self.decoder_embed if decoder and self.decoder_embed is not None else self.shared
        emb = table(ids)
        scale = self.config.embed_scale
        return emb if scale == 1.0 else emb * scale

    def export_encode(self, input_ids: Tensor, attention_mask: Tensor, output_hidden_states: bool = False):
        """The ONNX encoder graph's forward (:mod:`export.onnx`): ``(last hidden state, cross_key_values
        [B, L_enc, cross_width], hidden states or None)``."""
        hidden = [] if output_hidden_states else None
        x = self.encoder(self._embed(input_ids, decoder=False), attention_mask.ne(0), hidden)
        return x, self.decoder.project_encoder(x), hidden

    def export_decode(self, decoder_input_ids: Tensor, decoder_attention_mask: Tensor,
                      encoder_attention_mask: Tensor, cross_key_values: Tensor, cache, past_length,
                      output_hidden_states: bool = False):
        """The ONNX decoder graph's forward: ``decoder_attention_mask`` ``[B, P + n]`` covers the
        ``P = past_length`` positions in ``cache`` (any object with ``update(layer, start, k, v)``) and
        the new ids, whose learned positions are ``P .. P + n - 1``. Returns ``(logits, or the last
        hidden state without an LM head; hidden states or None)``."""
        n = decoder_input_ids.shape[1]
        pos = F.embedding(torch.arange(n, device=decoder_input_ids.device) + (past_length + _OFFSET),
                          self.decoder.embed_positions)
        hidden = [] if output_hidden_states else None
        x = self.decoder(self._embed(decoder_input_ids), pos, decoder_attention_mask.ne(0), cross_key_values,
                         encoder_attention_mask.ne(0), cache, past_length, hidden)
        return (self._logits(x) if self.has_lm_head else x), hidden

    def new_cache(self, batch: int, max_len: int) -> BartCache:
        """An empty decoder cache for ``batch`` rows and up to ``max_len`` decoder positions."""
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        layers, heads, head_dim = self.cache_shape()
        return BartCache(batch, layers, heads, max_len, head_dim, self.dtype, self.device)

    # -- checks ---------------------------------------------------------------

    def _check_ids(self, name: str, ids) -> None:
        inputs.check_token_ids(name, ids, self.config.vocab_size)

    _check_mask = staticmethod(inputs.check_mask)

    # The encoder and the decoder have position tables of the same size.
    _check_length = EncoderDecoderDecoding._check_decoder_length

    def _eos_mask(self, input_ids: Tensor) -> Tensor:
        """Where each row's EOS tokens are (sequence classification reads the last one); every row
        must hold the same number, at least one, as Hugging Face requires."""
        eos = self.config.eos_token_id
        if len(eos) != 1:
            raise ValueError(f"sequence classification needs one eos_token_id in the config, got {list(eos)}")
        mask = input_ids.eq(eos[0])
        counts = mask.sum(1)
        if int(counts.min()) < 1:
            raise ValueError(f"sequence classification reads each row's last EOS token (id {eos[0]}); "
                             f"row(s) {torch.nonzero(counts == 0).flatten().tolist()} have none")
        if int(counts.max()) != int(counts.min()):
            raise ValueError(f"all examples must have the same number of <eos> tokens (id {eos[0]}); got "
                             f"{counts.tolist()}")
        return mask

    # -- the encoder ----------------------------------------------------------

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               output_hidden_states: bool = False) -> EncoderOutput:
        """The encoder alone: ``last_hidden_state`` ``[B, L, d_model]`` (and ``hidden_states``)."""
        self._check_ids("input_ids", input_ids)
        self._check_mask("attention_mask", attention_mask, [tuple(input_ids.shape)])
        self._check_length("input_ids", input_ids.shape[1])
        hidden = [] if output_hidden_states else None
        packed = plan(attention_mask)  # padding-free when it pays (engine.packing): [T, d_model] inside
        if packed is None:
            x = self.encoder(self._embed(input_ids, decoder=False), kernel_mask(attention_mask), hidden)
        else:  # zeros at padded positions
            x = packed.pad(self.encoder(self._embed(packed.unpad(input_ids), decoder=False), packed, hidden))
            hidden = None if hidden is None else [packed.pad(h) for h in hidden]
        return EncoderOutput(last_hidden_state=x, hidden_states=tuple(hidden) if hidden is not None else None)

    # -- forward --------------------------------------------------------------

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                decoder_input_ids: Optional[Tensor] = None, decoder_attention_mask: Optional[Tensor] = None,
                encoder_outputs: Optional[EncoderOutputs] = None, past_key_values: Optional[BartCache] = None,
                use_cache: bool = False, output_hidden_states: bool = False):
        """Hugging Face's call.

        The encoder runs on ``input_ids`` unless ``encoder_outputs`` (its ``last_hidden_state``,
        a tuple whose first item is it, or the tensor) is given or ``past_key_values`` already
        holds its keys/values; then the decoder runs on ``decoder_input_ids`` ``[B, n]``
        (``decoder_attention_mask`` ``[B, n]`` or ``[B, cached + n]``), by default
        ``input_ids`` shifted right behind ``decoder_start_token_id`` as in Hugging Face.
        ``past_key_values``: a :class:`BartCache` to continue (updated in place and returned);
        ``use_cache=True`` without one starts a cache. ``attention_mask`` is the encoder's
        padding mask; with a cache it may be left out. Sequence classification reads the
        decoder state at each row's last EOS of ``input_ids``.
        """
        if self.task == "sequence-classification":
            if input_ids is None:
                raise ValueError("sequence classification needs input_ids (it reads the state at their last EOS)")
            self._check_ids("input_ids", input_ids)
            eos_mask = self._eos_mask(input_ids)
        if decoder_input_ids is None:
            if input_ids is None or past_key_values is not None:
                raise ValueError("decoder_input_ids is required (without it BART decodes input_ids shifted right, "
                                 "which needs input_ids and no cache); use generate() to decode from scratch")
            self._check_ids("input_ids", input_ids)
            decoder_input_ids = _shift_right(input_ids, self._start_token(None))
        self._check_ids("decoder_input_ids", decoder_input_ids)
        b, n = decoder_input_ids.shape
        cache = past_key_values
        start = 0
        if cache is not None:
            if not isinstance(cache, BartCache):
                raise TypeError(f"past_key_values must be a trifuse BartCache (model.new_cache(...) or a previous "
                                f"output's past_key_values), got {type(cache).__name__}")
            if cache.batch_size != b:
                raise ValueError(f"past_key_values holds {cache.batch_size} rows but decoder_input_ids has {b}")
            start = cache.length
        self._check_length("the decoder (cached + new tokens)", start + n)
        self._check_mask("decoder_attention_mask", decoder_attention_mask,
                         [(b, n), (b, start + n)] if start else [(b, n)])
        if cache is not None:
            cache.ensure_capacity(start + n, self.config.max_position_embeddings)
        elif use_cache:
            cache = self.new_cache(b, max(n, min(CACHE_CHUNK, self.config.max_position_embeddings)))
            cache.growable = True

        enc_hidden, enc_states, cross_kv, enc_mask = encoder_state(self, cache, input_ids, attention_mask,
                                                                   encoder_outputs, output_hidden_states, b)

        # A padded decoder batch with nothing cached runs padding-free when it pays (engine.packing).
        packed = plan_decoder(decoder_attention_mask, start, enc_mask, cross_kv)
        x, hidden = self._decode(decoder_input_ids, decoder_attention_mask, cross_kv, enc_mask, cache, start,
                                 output_hidden_states, packed)
        # Per-token outputs: on the real tokens only, then back to [B, n, ...] with zeros at padded positions.
        per_token = (lambda t: t) if packed is None else packed[0].queries.pad
        logits = self._logits(x) if self.task == "text2text-generation" else None
        qa = self.qa_outputs(x) if self.task == "question-answering" else None
        x, hidden = per_token(x), None if hidden is None else tuple(per_token(t) for t in hidden)
        out = Seq2SeqOutput(past_key_values=cache, last_hidden_state=x, encoder_last_hidden_state=enc_hidden,
                            decoder_hidden_states=hidden, encoder_hidden_states=enc_states)
        if self.task == "text2text-generation":
            out.logits = per_token(logits)
        elif self.task == "sequence-classification":
            if x.shape[:2] != input_ids.shape:
                raise ValueError(f"sequence classification reads the decoder states at input_ids' EOS positions: "
                                 f"decoder_input_ids must have input_ids' shape {tuple(input_ids.shape)}")
            rep = x[eos_mask].view(b, -1, x.shape[-1])[:, -1]
            out.logits = self.cls_out(torch.tanh(self.cls_dense(rep)))
        elif self.task == "question-answering":
            start_logits, end_logits = per_token(qa).split(1, dim=-1)
            out.start_logits, out.end_logits = start_logits.squeeze(-1), end_logits.squeeze(-1)
        return out

    def _decode(self, ids: Tensor, decoder_attention_mask: Optional[Tensor], cross_kv: Tensor,
                enc_mask: Optional[Tensor], cache: Optional[BartCache], start: int,
                output_hidden_states: bool = False, packed: Optional[tuple] = None) -> Tuple[Tensor, Optional[tuple]]:
        """The decoder's final states ``[B, n, d_model]``; with ``packed`` (:func:`engine.packing.plan_decoder`)
        the real tokens' ``[T, d_model]`` (hidden states likewise)."""
        n = ids.shape[1]
        mask = self_attention_mask(decoder_attention_mask, cache, start, n)
        pos = self.decoder.positions(start, n)
        if packed is not None:  # learned positions as the padded batch numbers them (start is 0)
            (enc_mask, cross_kv), mask = packed, packed[0].queries
            ids, pos = mask.unpad(ids), self.decoder.embed_positions[_OFFSET + mask.positions]
        hidden = [] if output_hidden_states else None
        x = self.decoder(self._embed(ids), pos, mask, cross_kv, enc_mask, cache, start, hidden)
        if cache is not None:
            cache.length = start + n
        return x, tuple(hidden) if hidden is not None else None

    def packed_logits(self, ids: Tensor, positions: Tensor, step, rows: Tensor) -> Tensor:
        """One continuous-batching step (:mod:`engine.continuous`): ``ids`` / ``positions`` ``[T]`` are
        many sequences' decoder tokens in one row; ``step`` (:class:`engine.paged.PackedStep`) runs their
        self- and cross-attention over its paged cache; the logits ``[len(rows), V]`` at the token
        indices ``rows``."""
        pos = F.embedding(positions[None] + _OFFSET, self.decoder.embed_positions)
        x = self.decoder(self._embed(ids[None]), pos, None, None, None, step, 0)
        return self._logits(x[0, rows])

    @property
    def tied_lm_embedding(self) -> Optional[nn.Embedding]:
        """The embedding table that is also the LM head (laid out for it on the CPU: ``pack_linears``)."""
        return self.shared if self.has_lm_head and self.lm_head is None else None

    def _logits(self, x: Tensor) -> Tensor:
        head = self.shared if self.lm_head is None else self.lm_head
        return lm_head(x, head) + self.final_logits_bias

    # -- decoding (engine.decoding.EncoderDecoderDecoding: generate, stream) -----

    def _check_generation(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> None:
        if self.task != "text2text-generation":
            raise ValueError(f"this BART was loaded for {self.task!r}, which has no LM head; load "
                             f"BartForConditionalGeneration (task='text2text-generation') to generate")
        self._check_ids("input_ids", input_ids)
        self._check_mask("attention_mask", attention_mask, [tuple(input_ids.shape)])
        self._check_length("input_ids", input_ids.shape[1])

    def decode_step(self, tokens: Tensor, positions: Optional[Tensor], slot: Tensor, cache: BartCache,
                    kv_len: int) -> Tensor:
        """One decoding step with no host reads, for CUDA graphs: the next-token logits ``[B, V]``.

        ``tokens``: ``[B, 1]`` long; ``positions``: unused (a decoder token's position is its
        cache ``slot``, the same for every row); ``slot``: one-element long tensor, the cache
        position written. Self-attention covers the first ``kv_len`` slots through ``cache.mask``
        (slots from ``slot`` on must be False on entry); cross-attention reads ``cache.cross_kv`` /
        ``cache.encoder_mask``. Sets the mask at ``slot`` and advances ``slot`` in place;
        ``cache.length`` is the caller's to keep. Driven by :class:`engine.graphs.StaticDecoder`.
        """
        mask = cache.step_mask(slot, kv_len)
        x = self.decoder(self._embed(tokens), self.decoder.positions(slot, 1), mask, cache.cross_kv,
                         cache.encoder_mask, cache, slot)
        slot.add_(1)
        return self._logits(x[:, -1])



def _shift_right(input_ids: Tensor, start_token: int) -> Tensor:
    """Hugging Face's ``shift_tokens_right``: the decoder start token, then ``input_ids[:, :-1]``."""
    out = input_ids.new_empty(input_ids.shape)
    out[:, 1:] = input_ids[:, :-1]
    out[:, 0] = start_token
    return out


# ----------------------------------------------------------------------------
# Checkpoint names.


def key_map(model: BartModel, prefix: str) -> dict:
    """Our parameter name -> the checkpoint's (lists are concatenated along dim 0)."""
    c, p = model.config, prefix
    if model.decoder_embed is None:  # tied: one table, under any of its names
        spec = {"shared.weight": [(f"{p}shared.weight", f"{p}encoder.embed_tokens.weight",
                                   f"{p}decoder.embed_tokens.weight")]}
    else:  # untied: each stack's own table (shared.weight where a checkpoint stores only that)
        spec = {"shared.weight": [(f"{p}encoder.embed_tokens.weight", f"{p}shared.weight")],
                "decoder_embed.weight": [(f"{p}decoder.embed_tokens.weight", f"{p}shared.weight")]}
    for name in ("encoder", "decoder"):
        spec[f"{name}.embed_positions"] = [f"{p}{name}.embed_positions.weight"]
        module_keys(spec, f"{name}.layernorm_embedding", f"{p}{name}.layernorm_embedding")
        for i in range(c.encoder_layers if name == "encoder" else c.decoder_layers):
            b, ours = f"{p}{name}.layers.{i}.", f"{name}.layers.{i}."
            module_keys(spec, ours + "attn.qkv", [f"{b}self_attn.{w}_proj" for w in "qkv"])
            module_keys(spec, ours + "attn.out", b + "self_attn.out_proj")
            module_keys(spec, ours + "norm1", b + "self_attn_layer_norm")
            module_keys(spec, ours + "ffn.up", b + "fc1")
            module_keys(spec, ours + "ffn.down", b + "fc2")
            if name == "encoder":
                module_keys(spec, ours + "norm2", b + "final_layer_norm")
            else:
                module_keys(spec, ours + "cross.q", b + "encoder_attn.q_proj")
                module_keys(spec, ours + "cross.out", b + "encoder_attn.out_proj")
                module_keys(spec, ours + "norm2", b + "encoder_attn_layer_norm")
                module_keys(spec, ours + "norm3", b + "final_layer_norm")
    module_keys(spec, "decoder.cross_kv", [f"{p}decoder.layers.{i}.encoder_attn.{w}_proj"
                                           for i in range(c.decoder_layers) for w in "kv"])
    if model.final_logits_bias is not None:
        spec["final_logits_bias"] = ["final_logits_bias"]
    if model.lm_head is not None:
        spec["lm_head.weight"] = ["lm_head.weight"]
    if model.cls_dense is not None:
        module_keys(spec, "cls_dense", "classification_head.dense")
        module_keys(spec, "cls_out", "classification_head.out_proj")
    if model.qa_outputs is not None:
        module_keys(spec, "qa_outputs", "qa_outputs")
    return spec


def _task_from_architectures(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in _ARCH_TASKS:
            return _ARCH_TASKS[arch]
    if archs:
        raise ValueError(f"BART head {archs[0]} is not supported; pass task= one of {', '.join(TASKS)} "
                         f"to load its backbone")
    return "text2text-generation"


def from_checkpoint(cfg: dict, state: dict, *, task: Optional[str] = None, dtype=None, device=None) -> BartModel:
    c = BartConfig.from_hf(cfg)
    task = task or _task_from_architectures(cfg)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} for bart; choose from {', '.join(TASKS)}")
    prefix = "model." if any(k.startswith("model.") for k in state) else ""
    if task == "text2text-generation" and "final_logits_bias" not in state:
        # Hugging Face's _keys_to_ignore_on_load_missing: a checkpoint without it means zeros.
        shared = next((state[k] for k in (f"{prefix}shared.weight", f"{prefix}encoder.embed_tokens.weight")
                       if k in state), None)
        state = {**state, "final_logits_bias": torch.zeros(1, c.vocab_size,
                                                           dtype=shared.dtype if shared is not None else None)}
    with torch.device("meta"):
        model = BartModel(c, task)

    def skip(name: str) -> bool:
        bare = name[len(prefix):] if name.startswith(prefix) else name
        return (bare in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")  # copies of shared
                or name.startswith(_HEADS))  # a tied head (a copy), or a head this task does not use

    weights = assemble_state(model, state, key_map(model, prefix), skip=skip, dtype=dtype, device=device,
                             what=f"bart checkpoint for {task}")
    return load_into(model, weights)


# ----------------------------------------------------------------------------
# The family's contract (engine.family).


def example_inputs(model: BartModel, batch: int, seq: int, seed: int = 0) -> dict:
    """Encoder ids (mixed lengths, right-padded); decoder ids from the start token for the generation and
    feature-extraction heads; the classifier's rows end in one EOS each (the token it reads)."""
    c = model.config
    inputs.check_length(seq, c.max_position_embeddings)
    ids, mask = inputs.token_batch(c.vocab_size, c.pad_token_id, batch, seq, model.device, seed)
    if model.task == "sequence-classification":
        last = mask.sum(1) - 1
        ids[torch.arange(batch, device=ids.device), last] = c.eos_token_id[0]
    out = {"input_ids": ids, "attention_mask": mask}
    if model.task in ("text2text-generation", "feature-extraction"):
        g = torch.Generator().manual_seed(seed + 1)
        dec = torch.randint(3, c.vocab_size, (batch, max(2, seq // 2)), generator=g).to(model.device)
        dec[:, 0] = c.decoder_start_token_id if c.decoder_start_token_id is not None else 2
        out["decoder_input_ids"] = dec
    return out


# Benchmark sizes: random weights, so no forced EOS (the suites check each generated token is the
# argmax under Hugging Face eager; a forced last token is not).
_BASE = dict(model_type="bart", vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
             encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
             max_position_embeddings=1024, activation_function="gelu", scale_embedding=False, pad_token_id=1,
             bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
             tie_word_embeddings=True)

FAMILY = Family(
    name="bart", kind=SEQ2SEQ, model_types=("bart",), model_classes=(BartModel,), from_checkpoint=from_checkpoint,
    hf_classes={"text2text-generation": "AutoModelForSeq2SeqLM", "feature-extraction": "AutoModel",
                "sequence-classification": "AutoModelForSequenceClassification",
                "question-answering": "AutoModelForQuestionAnswering"},
    # Hugging Face's config-class defaults (transformers 5.24) and attribute_map.
    config_defaults={"bart": dict(vocab_size=50265, max_position_embeddings=1024, encoder_layers=12,
                                  encoder_ffn_dim=4096, encoder_attention_heads=16, decoder_layers=12,
                                  decoder_ffn_dim=4096, decoder_attention_heads=16, activation_function="gelu",
                                  d_model=1024, scale_embedding=False, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  decoder_start_token_id=2, forced_eos_token_id=2, tie_word_embeddings=True)},
    config_aliases={"bart": {"d_model": "hidden_size", "encoder_attention_heads": "num_attention_heads",
                             "encoder_layers": "num_hidden_layers"}},
    example_inputs=example_inputs,
    hidden_streams=("encoder_hidden_states", "decoder_hidden_states"),
    named_sizes={
        "bart-base": _BASE,
        "bart-large": {**_BASE, "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12,
                       "encoder_attention_heads": 16, "decoder_attention_heads": 16, "encoder_ffn_dim": 4096,
                       "decoder_ffn_dim": 4096},
        # For smoke runs and tests: the real vocabulary, a toy body.
        "bart-tiny": {**_BASE, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
                      "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128},
    },
)
