"""One decoding front-end for every trifuse decoder: ``generate`` and ``stream``.

A decoder family (decoder-only or encoder-decoder) mixes in :class:`Decoding` and
implements four things; everything else — option checking, Hugging Face's length
rules and generation-config defaults, greedy and sampled decoding, beam search,
the logits processors, streaming — is shared, so every decoder gets every feature:

* ``is_encoder_decoder``: whether the lengths count from the decoder start token
  (encoder-decoder) or from the prompt (decoder-only), as in Hugging Face.
* ``_check_generation(input_ids, attention_mask)``: raise ``ValueError`` for a model
  that cannot generate (no LM head) or ids / a mask it cannot take.
* ``max_decoder_positions``: the decoder's position limit (``None``: none).
* ``start_decoding(input_ids, mask, *, num_beams, max_new_tokens, start_token, cache=None)``:
  run the prompt (a decoder-only model's prefill; an encoder-decoder's encoder and its
  first decoder step) and return a :class:`Prefill`. ``mask`` is the prompt's bool
  mask; ``num_beams`` > 1 asks for each input's rows repeated that many times
  (``repeat_interleave``). ``cache`` (static decoding, :mod:`engine.graphs`) is a
  fixed-capacity cache from ``new_cache(rows, max_len, static=True, ...)`` to fill
  instead of allocating one.

plus ``decode_step(tokens, positions, slot, cache, kv_len)``, the host-sync-free step
:class:`engine.graphs.StaticDecoder` and :class:`~engine.graphs.CUDAGraphDecoder`
replay.

An encoder-decoder mixes in :class:`EncoderDecoderDecoding` instead, which implements
``start_decoding`` and ``new_static_cache`` once on top of the model's ``encode``,
``decoder.project_encoder``, ``new_cache``, ``_decode`` and ``_logits``.

The options are Hugging Face's ``generate`` keyword names (see :data:`OPTIONS`).
Semantics and references: :mod:`engine.generation` (processors, the greedy/sampling
loop) and :mod:`engine.beam_search`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor

from . import beam_search as bs
from . import generation as gen


@dataclasses.dataclass(frozen=True)
class Options:
    """``generate`` / ``stream`` keyword options, with Hugging Face's names and defaults."""

    max_new_tokens: Optional[int] = None
    max_length: Optional[int] = None
    min_length: Optional[int] = None
    min_new_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    num_return_sequences: int = 1
    eos_token_id: gen.TokenIds = None
    pad_token_id: Optional[int] = None
    decoder_start_token_id: Optional[int] = None  # encoder-decoders; ignored by decoder-only models, as in HF
    forced_bos_token_id: Optional[int] = None  # default: the config's (BART's checkpoints set them)
    forced_eos_token_id: gen.TokenIds = None
    generator: Optional[torch.Generator] = None


#: Every keyword ``generate`` and ``stream`` take (after ``input_ids`` and ``attention_mask``). The one list:
#: the pipelines take these options too, and ``generation_config.json`` may set all but the generator.
OPTIONS = tuple(f.name for f in dataclasses.fields(Options))
#: ``generation_config.json`` keys that become ``generate``'s defaults (:func:`generation_defaults`).
GENERATION_KEYS = tuple(k for k in OPTIONS if k != "generator")
#: ... and keys that do not change which tokens come out.
_INERT_GENERATION_KEYS = {"transformers_version", "_from_model_config", "bos_token_id", "use_cache",
                          "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                          "return_dict_in_generate", "num_assistant_tokens", "num_assistant_tokens_schedule"}
#: Length options that go in pairs: an explicit one replaces both of the file's.
_LENGTH_PAIRS = ({"max_new_tokens", "max_length"}, {"min_new_tokens", "min_length"})

# The type each option takes (its range is checked where it is used: engine.generation, engine.beam_search).
_NUMBERS = {"max_new_tokens", "max_length", "min_length", "min_new_tokens", "top_k", "no_repeat_ngram_size",
            "num_beams", "num_return_sequences", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id",
            "temperature", "top_p", "repetition_penalty", "length_penalty"}
_TOKEN_LISTS = {"eos_token_id", "forced_eos_token_id"}


def generation_defaults(gen_cfg: dict, what: str = "generation_config.json") -> dict:
    """The part of ``gen_cfg`` (a checkpoint's ``generation_config.json``, read by
    :func:`engine.loading.read_generation_config`) trifuse's generate takes; a value that would change
    the tokens but that trifuse does not implement is a warning (the tokens would differ from Hugging Face's)."""
    unsupported = sorted(k for k, v in gen_cfg.items()
                         if k not in GENERATION_KEYS and k not in _INERT_GENERATION_KEYS and v not in (None, [], {}))
    if unsupported:
        warnings.warn(f"{what} sets {', '.join(unsupported)}, which trifuse's generate does not implement; "
                      "ignored (Hugging Face's generate would apply them)", stacklevel=3)
    return {k: gen_cfg[k] for k in GENERATION_KEYS if gen_cfg.get(k) is not None}


def _check_types(o: "Options") -> None:
    """A ``TypeError`` naming the option whose value is of the wrong kind (``"3"`` for a count, ``"false"``
    for ``do_sample``): caught before any arithmetic on it."""
    for name in OPTIONS:
        v = getattr(o, name)
        if v is None:
            continue
        if name in _NUMBERS:
            ok, what = isinstance(v, (int, float)), "a number"
        elif name in _TOKEN_LISTS:
            ok = isinstance(v, int) or (isinstance(v, (list, tuple, Tensor))
                                        and all(isinstance(t, int) for t in (v.tolist() if isinstance(v, Tensor)
                                                                             else v)))
            what = "a token id or a list of them"
        elif name == "do_sample":
            ok, what = isinstance(v, bool), "True or False"
        elif name == "early_stopping":
            ok, what = isinstance(v, (bool, str)), "True, False or 'never'"
        else:  # generator
            ok, what = isinstance(v, torch.Generator), "a torch.Generator"
        if not ok:
            raise TypeError(f"{name} must be {what}, got {type(v).__name__} {v!r}")


@dataclasses.dataclass
class Prefill:
    """What a model's ``start_decoding`` returns: the decoding state after the prompt."""

    #: ``[rows, L0]`` the ids the processors see so far and the output starts with: a
    #: decoder-only model's prompt, an encoder-decoder's decoder start ids.
    ids: Tensor
    #: ``[rows, V]`` the next-token logits after ``ids``.
    logits: Tensor
    #: ``step(tokens [rows], beam_idx [rows] or None) -> [rows, V]``: reorder the cache rows
    #: by ``beam_idx`` (beam search), feed one token per row, return the next logits.
    step: Callable[[Tensor, Optional[Tensor]], Tensor]
    #: The cache the prompt was written to.
    cache: object = None
    #: ``[rows, 1]`` the position id the next token takes (learned positions); ``None`` when
    #: the model's step does not need it.
    positions: Optional[Tensor] = None


Session = Callable[..., Prefill]


def options(model, given: dict, what: str = "generate") -> Options:
    """``given`` keyword options over the model's generation config (``generation_config.json``),
    as Hugging Face merges them: an explicit length option replaces the file's pair."""
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise TypeError(f"{what}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                        f"it takes {', '.join(OPTIONS)}")
    merged = dict(getattr(model, "generation_config", None) or {})
    for pair in _LENGTH_PAIRS:
        if pair & set(given):
            for k in pair:
                merged.pop(k, None)
    merged = {k: v for k, v in merged.items() if k in OPTIONS}
    merged.update(given)
    defaults = {f.name: f.default for f in dataclasses.fields(Options)}
    # None asks for the default (as a JSON null does): only the token ids' None means "the config's".
    o = Options(**{k: defaults[k] if v is None else v for k, v in merged.items()})
    _check_types(o)
    return o


class Decoding:
    """``generate`` and ``stream`` for a decoder model; see the module docstring for what it implements."""

    is_encoder_decoder: bool = False
    max_decoder_positions: Optional[int] = None
    #: ``model_type``'s name in messages.
    generation_name: str = "this model"

    # -- the public calls ----------------------------------------------------

    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        """Token ids ``[B * num_return_sequences, L0 + n]``, as Hugging Face's ``generate`` returns them:
        a decoder-only model's prompt (an encoder-decoder's decoder start token) and ``n`` new tokens.

        Keyword options are Hugging Face's (:data:`OPTIONS`); the checkpoint's
        ``generation_config.json`` supplies the ones not passed. Lengths: ``max_new_tokens``
        (default 20) or ``max_length`` (counting the prompt, or the decoder start token);
        EOS is banned before ``min_new_tokens`` new tokens or a total of ``min_length``.
        ``num_beams == 1``: greedy, or with ``do_sample`` sampling after ``temperature`` /
        ``top_k`` / ``top_p``; rows stop at ``eos_token_id`` (one id or a list; default the
        config's; ``[]`` never stops) and are padded with ``pad_token_id``.
        ``num_beams > 1``: beam search (beam sampling with ``do_sample``) with
        ``length_penalty`` and ``early_stopping`` (``True``, ``False`` or ``"never"``).
        ``repetition_penalty`` and ``no_repeat_ngram_size`` act on the sequence so far
        (the prompt's left padding excepted); ``num_return_sequences`` rows per input
        (sampling: draws; beams: the best hypotheses, best first). ``generator`` seeds sampling.
        """
        return self.generate_with(self.start_decoding, input_ids, attention_mask, **kwargs)

    def stream(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Iterator[Tensor]:
        """Like :meth:`generate` (greedy or sampling), as an iterator over each step's new tokens
        ``[B * num_return_sequences]``. Arguments are checked and the prompt run before it is returned."""
        return self.stream_with(self.start_decoding, input_ids, attention_mask, **kwargs)

    # -- over any session (eager here; static buffers / CUDA graphs in engine.graphs) --

    def generate_with(self, session: Session, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      **kwargs) -> Tensor:
        """:meth:`generate` with the prompt run and the steps taken by ``session`` (a ``start_decoding``)."""
        o = options(self, kwargs)
        if o.num_beams == 1 and not isinstance(o.num_beams, bool):
            prompt, tokens = self._greedy_or_sampled(session, input_ids, attention_mask, o)
            tokens = list(tokens)
            if not tokens:
                return prompt
            return torch.cat([prompt, torch.stack(tokens, dim=1).to(prompt.dtype)], dim=1)
        cfg, bcfg, mask, ignore, start = self._setup(input_ids, attention_mask, o)
        with torch.no_grad():
            pre = session(input_ids, mask, num_beams=bcfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                          start_token=start)
            if ignore is not None:
                ignore = ignore.repeat_interleave(bcfg.num_beams)
            out = bs.beam_search(pre.logits, pre.step, pre.ids, cfg, bcfg, generator=o.generator,
                                 prompt_ignore_length=ignore)
        return out.to(input_ids.dtype) if not self.is_encoder_decoder else out

    def stream_with(self, session: Session, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                    **kwargs) -> Iterator[Tensor]:
        """:meth:`stream` over ``session``."""
        o = options(self, kwargs, "stream")
        if o.num_beams != 1:
            # Hugging Face's streamers refuse beam search too: its beams are not final until the end.
            raise ValueError(f"stream() decodes greedily or by sampling (num_beams=1), not num_beams={o.num_beams}; "
                             "use generate() for beam search")
        return self._greedy_or_sampled(session, input_ids, attention_mask, o)[1]

    def prepare(self, input_ids: Tensor, **kwargs):
        """Check one request's ids and options as :meth:`generate` does, before any work:
        ``(Options, GenerationConfig, decoder start token or None)``. For callers that run the
        decoding loop themselves (:mod:`engine.continuous`)."""
        o = options(self, kwargs)
        cfg, _, _, _, start = self._setup(input_ids, None, o)
        return o, cfg, start

    # -- shared setup ---------------------------------------------------------

    def _setup(self, input_ids, attention_mask, o: Options):
        """Check everything before any work: ``(GenerationConfig, BeamConfig, bool mask, repetition-penalty
        skip lengths or None, decoder start token or None)``."""
        self._check_generation(input_ids, attention_mask)
        bcfg = bs.BeamConfig(num_beams=o.num_beams, length_penalty=o.length_penalty,
                             early_stopping=o.early_stopping,
                             num_return_sequences=o.num_return_sequences if o.num_beams != 1 else 1)
        gen.expand_for_return(o.num_return_sequences, bcfg.num_beams, o.do_sample)  # the checks alone
        n = input_ids.shape[1]
        # Hugging Face's lengths count a decoder-only prompt, or an encoder-decoder's start token.
        counted = 1 if self.is_encoder_decoder else n
        max_new_tokens, min_length = gen.resolve_lengths(counted, o.max_new_tokens, o.max_length, o.min_length,
                                                         o.min_new_tokens)
        c = self.config
        cfg = gen.GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=o.do_sample, temperature=o.temperature, top_k=o.top_k,
            top_p=o.top_p, repetition_penalty=o.repetition_penalty,
            eos_token_id=c.eos_token_id if o.eos_token_id is None else o.eos_token_id,
            pad_token_id=c.pad_token_id if o.pad_token_id is None else o.pad_token_id,
            min_length=min_length, no_repeat_ngram_size=o.no_repeat_ngram_size,
            forced_bos_token_id=getattr(c, "forced_bos_token_id", None) if o.forced_bos_token_id is None
            else o.forced_bos_token_id,
            forced_eos_token_id=getattr(c, "forced_eos_token_id", None) if o.forced_eos_token_id is None
            else o.forced_eos_token_id,
            max_length=counted + max_new_tokens)
        vocab = c.vocab_size
        for name in ("eos_token_id", "forced_bos_token_id", "forced_eos_token_id"):
            ids = getattr(cfg, name)
            if any(not 0 <= t < vocab for t in (() if ids is None else (ids,) if isinstance(ids, int) else ids)):
                raise ValueError(f"{name}={ids!r} is outside the vocabulary [0, {vocab})")
        if cfg.eos_token_id and not 0 <= cfg.pad_token_id < vocab:  # checked here, not mid-loop
            raise ValueError(f"pad_token_id={cfg.pad_token_id} is outside the vocabulary [0, {vocab}); "
                             "it fills finished rows and is fed back to the model")
        limit = self.max_decoder_positions
        if limit is not None and counted + max_new_tokens > limit:
            what = f"prompt length {n}" if not self.is_encoder_decoder else "the decoder start token"
            raise ValueError(f"{what} + max_new_tokens {max_new_tokens} exceeds the position table "
                             f"({limit} positions)")
        start = self._start_token(o.decoder_start_token_id) if self.is_encoder_decoder else None
        if attention_mask is None:
            attention_mask = gen.default_attention_mask(input_ids, cfg)
        mask = attention_mask.ne(0)
        ignore = None
        if not self.is_encoder_decoder:
            if not torch.compiler.is_compiling() and not bool(mask[:, -1].all()):
                # Hugging Face warns too: the next token would be predicted from a padding position.
                warnings.warn("right-padding detected in a decoder-only prompt (attention_mask ends in 0): the rows "
                              "continue from their padding and the tokens differ from the unpadded prompt's; pad on "
                              "the left (tokenizer.padding_side = 'left')", stacklevel=4)
            if cfg.repetition_penalty != 1.0:
                # Hugging Face's repetition penalty skips the prompt's left padding.
                ignore = mask.int().argmax(dim=1)
        return cfg, bcfg, mask, ignore, start

    def _start_token(self, decoder_start_token_id: Optional[int]) -> int:
        c = self.config
        start = getattr(c, "decoder_start_token_id", None) if decoder_start_token_id is None \
            else decoder_start_token_id
        if start is None:
            raise ValueError("decoder_start_token_id is not set: pass decoder_start_token_id= or use a checkpoint "
                             "whose config sets it")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < c.vocab_size:
            raise ValueError(f"decoder_start_token_id must be a token id in [0, {c.vocab_size}), got {start!r}")
        return start

    def _greedy_or_sampled(self, session: Session, input_ids, attention_mask, o: Options):
        """``(the ids the output starts with, an iterator over each step's tokens)``."""
        input_ids, attention_mask = gen.expand_for_return(o.num_return_sequences, 1, o.do_sample, input_ids,
                                                          attention_mask)
        o = dataclasses.replace(o, num_return_sequences=1)
        cfg, _, mask, ignore, start = self._setup(input_ids, attention_mask, o)
        with torch.no_grad():
            pre = session(input_ids, mask, num_beams=1, max_new_tokens=cfg.max_new_tokens, start_token=start)
        step = torch.no_grad()(lambda t: pre.step(t, None))  # the loop runs outside this call's no_grad
        tokens = gen.decode_stream(pre.logits, step, pre.ids, cfg, generator=o.generator,
                                   prompt_ignore_length=ignore)
        return pre.ids, tokens


#: Decoder positions a generation cache starts with; it doubles from there as decoding goes.
CACHE_CHUNK = 64


class EncoderDecoderDecoding(Decoding):
    """:class:`Decoding` for an encoder-decoder: the encoder runs once, its keys/values are projected
    once and shared by every beam, and the decoder feeds one token at a time through an
    :class:`engine.cache.EncoderDecoderCache`.

    The model provides ``encode(ids, mask)`` (``.last_hidden_state``),
    ``decoder.project_encoder(hidden)``, ``new_cache(rows, max_len)``,
    ``_decode(ids, mask, cross_kv, encoder_mask, cache, start)`` (hidden states, extras) and
    ``_logits(hidden)``; ``max_decoder_positions`` bounds the decoder where it has a position table.
    """

    is_encoder_decoder = True

    def _check_decoder_length(self, what: str, n: int) -> None:
        limit = self.max_decoder_positions
        if limit is not None and n > limit:
            raise ValueError(f"{what} reaches {n} positions but {self.generation_name}'s position table holds "
                             f"{limit} (max_position_embeddings)")

    def start_decoding(self, input_ids: Tensor, mask: Tensor, *, num_beams: int, max_new_tokens: int,
                       start_token: int, cache=None) -> Prefill:
        """Run the encoder once and feed the decoder start token (``num_beams`` rows per input, sharing the
        encoder's keys/values). A static ``cache`` (:meth:`new_static_cache`) gets the encoder state copied
        into its fixed buffers, padded to its encoder length."""
        enc = self.encode(input_ids, mask).last_hidden_state
        kv = self.decoder.project_encoder(enc)  # once; beams share it (layers.Attention, cross=True)
        b = input_ids.shape[0]
        if cache is None:
            # Memory follows the work done: the cache starts at most CACHE_CHUNK positions long and
            # doubles as decoding goes (_step_logits), so max_new_tokens=10**8 with an early EOS costs
            # what the tokens actually decoded cost. (Static decoding preallocates on purpose.)
            cache = self.new_cache(b * num_beams, 1 + min(max_new_tokens, CACHE_CHUNK - 1))
            cache.growable = True
        else:
            cache.reset()
        cache.attach_encoder(kv, mask, enc)
        start = torch.full((cache.batch_size, 1), start_token, dtype=torch.long, device=cache.keys.device)
        first = self._step_logits(start, cache)

        def step(tokens: Tensor, beam_idx: Optional[Tensor]) -> Tensor:
            if beam_idx is not None:
                cache.reorder(beam_idx)
            return self._step_logits(tokens[:, None], cache)

        return Prefill(start, first, step, cache)

    def cross_attention_kv(self, input_ids: Tensor) -> list:
        """Encode one input ``[1, L]`` and project every decoder layer's cross-attention keys and values
        once: a list over layers of ``(k, v)``, each ``[L, H, D]`` (views). For :mod:`engine.continuous`."""
        enc = self.encode(input_ids).last_hidden_state
        kv = self.decoder.project_encoder(enc)
        views = (self.decoder.cross_views(kv, i) for i in range(self.cache_shape()[0]))
        return [(k[0].transpose(0, 1), v[0].transpose(0, 1)) for k, v in views]

    def new_static_cache(self, rows: int, max_len: int, *, encoder_length: int):
        """A fixed-capacity cache for static decoding (:mod:`engine.graphs`): ``max_len`` decoder positions,
        zero-filled (masked slots still meet the kernel's dot products: 0 * NaN = NaN), and encoder
        buffers padded to ``encoder_length`` (allocated by the first prefill), which keep their addresses."""
        self._check_decoder_length("the static decoder", max_len)
        return self.new_cache(rows, max_len).make_static(encoder_length)

    def _step_logits(self, ids: Tensor, cache) -> Tensor:
        """Feed ``ids`` ``[B, n]`` through the cache; the last position's logits ``[B, V]``."""
        end = cache.length + ids.shape[1]
        self._check_decoder_length("the decoder", end)
        cache.ensure_capacity(end, self.max_decoder_positions)
        x, _ = self._decode(ids, None, cache.cross_kv, cache.encoder_mask, cache, cache.length)
        return self._logits(x[:, -1])
