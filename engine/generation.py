"""Token-by-token decoding with Hugging Face's semantics: greedy and sampling.

The pieces are model-agnostic, so any decoder (GPT-2 now, T5's decoder later)
plugs in with two callables: the logits of the prompt's last position, and a
``step(tokens) -> logits`` that feeds one new token per row through its cache.

* :class:`GenerationConfig` holds and validates the options (``ValueError`` on bad ones).
* The logits processors are plain functions, each equal to its Hugging Face
  counterpart: :func:`repetition_penalty` (``RepetitionPenaltyLogitsProcessor``),
  :func:`no_repeat_ngram` (``NoRepeatNGramLogitsProcessor``), :func:`min_length_filter`
  (``MinLengthLogitsProcessor``; ``min_new_tokens`` becomes a ``min_length`` as in
  Hugging Face's ``_prepare_generated_length``), :func:`temperature`
  (``TemperatureLogitsWarper``), :func:`top_k_filter` (``TopKLogitsWarper``),
  :func:`top_p_filter` (``TopPLogitsWarper``). :func:`process_logits` applies them in
  Hugging Face's order: repetition penalty, no-repeat n-grams, minimum length (greedy
  too), then, only when sampling, temperature, top-k, top-p.
* :func:`resolve_lengths` turns ``max_new_tokens`` / ``max_length`` / ``min_length`` /
  ``min_new_tokens`` into the two numbers the loop uses, with Hugging Face's
  precedence; :func:`expand_for_return` checks ``num_return_sequences`` and repeats
  the prompt rows for it.
* :func:`decode_stream` is the loop: it yields each step's tokens ``[B]``; rows
  stop independently at an EOS token and are filled with ``pad_token_id``
  after it; the loop ends once every row has finished or after
  ``max_new_tokens``, as Hugging Face's ``generate`` does. The sequences so far
  live in one preallocated buffer (no concatenation per step).

Reference semantics: ``transformers/generation/{utils,logits_process}.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

TokenIds = Union[None, int, Sequence[int]]


def _eos_tuple(eos: TokenIds) -> Tuple[int, ...]:
    if eos is None:
        return ()
    if isinstance(eos, Tensor):
        eos = eos.tolist()
    ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ValueError(f"eos_token_id must be a non-negative int or a list of them, got {eos!r}")
    return ids


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options, validated on construction.

    ``top_k=0`` and ``top_p=1.0`` disable those filters; ``temperature``,
    ``top_k`` and ``top_p`` only act when ``do_sample``. ``eos_token_id``: one
    id or several (``()`` never stops early); ``pad_token_id`` fills finished
    rows and defaults to the first EOS id, as in Hugging Face.
    """

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: Tuple[int, ...] = ()
    pad_token_id: Optional[int] = None
    #: EOS is banned while the sequence the processors see (a decoder-only model's prompt
    #: included; for T5 the decoder ids from the start token) is shorter than this.
    min_length: int = 0
    #: No n-gram of this size occurs twice in that sequence (0: off).
    no_repeat_ngram_size: int = 0
    #: The first generated token of an encoder-decoder (the sequence is one start token long) is this
    #: one (``ForcedBOSTokenLogitsProcessor``; ``None``: off).
    forced_bos_token_id: Optional[int] = None
    #: The token (or one of these) the sequence ends with when it reaches ``max_length``
    #: (``ForcedEOSTokenLogitsProcessor``; ``()``: off).
    forced_eos_token_id: Tuple[int, ...] = ()
    #: The sequence's total length limit (prompt or start token included): ``forced_eos_token_id``'s step.
    max_length: Optional[int] = None

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "eos_token_id", _eos_tuple(self.eos_token_id))
        set_(self, "forced_eos_token_id", _eos_tuple(self.forced_eos_token_id))
        bos = self.forced_bos_token_id
        if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or bos < 0):
            raise ValueError(f"forced_bos_token_id must be a non-negative int, got {bos!r}")
        if self.pad_token_id is None and self.eos_token_id:
            set_(self, "pad_token_id", self.eos_token_id[0])
        if self.pad_token_id is not None and (isinstance(self.pad_token_id, bool) or int(self.pad_token_id) < 0):
            raise ValueError(f"pad_token_id must be a non-negative int, got {self.pad_token_id!r}")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {n!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or math.isnan(t) or t < 0:
            raise ValueError(f"temperature must be a non-negative number, got {t!r}")
        if self.do_sample and t == 0:
            raise ValueError("temperature=0 is not valid for sampling; use do_sample=False for greedy decoding")
        if math.isinf(t):
            raise ValueError(f"temperature must be finite, got {t!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {k!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 disables it), got {p!r}")
        r = self.repetition_penalty
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not r > 0 or math.isinf(r):
            raise ValueError(f"repetition_penalty must be a positive number (1 disables it), got {r!r}")
        for name in ("min_length", "no_repeat_ngram_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 disables it), got {v!r}")


def _check_count(name: str, v, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")


def resolve_lengths(input_len: int, max_new_tokens: Optional[int] = None, max_length: Optional[int] = None,
                    min_length: Optional[int] = None, min_new_tokens: Optional[int] = None,
                    default_new_tokens: int = 20) -> Tuple[int, int]:
    """``(max_new_tokens, min_length)`` from Hugging Face's four length options.

    ``input_len``: the length of the ids the decoder starts from (a decoder-only
    model's prompt; 1 for T5, the decoder start token). ``max_new_tokens`` wins over
    ``max_length`` (the total length, ``input_len`` included); with neither,
    ``default_new_tokens`` (Hugging Face: ``max_length=20`` counted from the input).
    ``min_new_tokens`` wins over ``min_length`` and becomes ``min_new_tokens + input_len``.
    """
    if max_new_tokens is None:
        if max_length is None:
            max_new_tokens = default_new_tokens
        else:
            _check_count("max_length", max_length, 1)
            max_new_tokens = max_length - input_len
            if max_new_tokens < 1:
                raise ValueError(f"max_length={max_length} leaves no room for a new token after the "
                                 f"{input_len} input ids; raise max_length or pass max_new_tokens")
    if min_new_tokens is not None:
        _check_count("min_new_tokens", min_new_tokens, 0)
        min_length = min_new_tokens + input_len
    elif min_length is None:
        min_length = 0
    _check_count("min_length", min_length, 0)
    return max_new_tokens, min_length


def expand_for_return(num_return_sequences: int, num_beams: int, do_sample: bool,
                      *rows: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """Check ``num_return_sequences`` as Hugging Face does, and repeat each tensor's rows
    that many times (``repeat_interleave``) for greedy/sampled decoding; beam search
    keeps its rows (it returns its best hypotheses instead)."""
    _check_count("num_return_sequences", num_return_sequences, 1)
    if num_return_sequences == 1:
        return rows
    if num_beams == 1 and not do_sample:
        raise ValueError(f"greedy decoding (do_sample=False, num_beams=1) returns one sequence per input, "
                         f"not num_return_sequences={num_return_sequences}; sample or use beam search")
    if num_beams > 1:
        if num_return_sequences > num_beams:
            raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")
        return rows
    return tuple(None if t is None else t.repeat_interleave(num_return_sequences, dim=0) for t in rows)


# ----------------------------------------------------------------------------
# Logits processors. ``scores``: [B, V] (fp32 in the decoding loop).


def _seen_tokens(input_ids: Tensor, vocab: int, ignore_before: Optional[Tensor] = None) -> Tensor:
    """``[B, V + 1]`` bool: which ids occur in each row (ids >= V land in the spare column).

    ``ignore_before`` ``[B]``: per row, how many leading positions not to count (left padding).
    """
    ids = input_ids.clamp(max=vocab)
    if ignore_before is not None:
        pos = torch.arange(ids.shape[1], device=ids.device)
        ids = ids.masked_fill(pos[None, :] < ignore_before.to(ids.device)[:, None], vocab)
    seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids, True)


def _penalize(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, : scores.shape[-1]], penalized, scores)


def repetition_penalty(scores: Tensor, input_ids: Tensor, penalty: float,
                       prompt_ignore_length: Optional[Tensor] = None) -> Tensor:
    """CTRL's penalty on every id already in ``input_ids`` (once per id): negative
    scores times ``penalty``, others divided by it. ``prompt_ignore_length`` ``[B]``
    skips each row's leading positions (Hugging Face passes the left-padding length).
    """
    return _penalize(scores, _seen_tokens(input_ids, scores.shape[-1], prompt_ignore_length), penalty)


def no_repeat_ngram(scores: Tensor, input_ids: Tensor, n: int) -> Tensor:
    """Ban every token that would complete an ``n``-gram already in ``input_ids`` ``[B, L]``
    (the whole row: Hugging Face counts a decoder-only prompt and its padding too)."""
    cur = input_ids.shape[-1]
    if cur < n:
        return scores
    prefix = input_ids[:, cur + 1 - n:]  # [B, n - 1]: what the next token would complete
    windows = input_ids.unfold(1, n, 1)  # [B, cur - n + 1, n]
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
    vocab = scores.shape[-1]
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
    return scores.masked_fill(banned[:, :vocab], -float("inf"))


def min_length_filter(scores: Tensor, cur_len: int, min_length: int, eos_token_id: Sequence[int]) -> Tensor:
    """EOS gets ``-inf`` while the sequence so far (``cur_len`` ids) is shorter than ``min_length``."""
    if cur_len >= min_length or not eos_token_id:
        return scores
    eos = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    eos[[t for t in eos_token_id if t < scores.shape[-1]]] = True
    return scores.masked_fill(eos, -float("inf"))


def forced_token(scores: Tensor, ids: Sequence[int]) -> Tensor:
    """Every score ``-inf`` but those of ``ids``, which become 0: the next token is forced."""
    forced = torch.full_like(scores, -float("inf"))
    forced[:, [t for t in ids if t < scores.shape[-1]]] = 0
    return forced


def constrain(scores: Tensor, input_ids: Optional[Tensor], cur_len: int, cfg: GenerationConfig) -> Tensor:
    """The n-gram, minimum-length and forced-token processors, in Hugging Face's order (after the
    repetition penalty, before the sampling warpers). ``input_ids`` ``[B, cur_len]`` is needed only
    for ``no_repeat_ngram_size``."""
    if cfg.no_repeat_ngram_size:
        scores = no_repeat_ngram(scores, input_ids, cfg.no_repeat_ngram_size)
    if cfg.min_length:
        scores = min_length_filter(scores, cur_len, cfg.min_length, cfg.eos_token_id)
    if cfg.forced_bos_token_id is not None and cur_len == 1:
        scores = forced_token(scores, [cfg.forced_bos_token_id])
    if cfg.forced_eos_token_id and cfg.max_length is not None and cur_len == cfg.max_length - 1:
        scores = forced_token(scores, cfg.forced_eos_token_id)
    return scores


def temperature(scores: Tensor, t: float) -> Tensor:
    return scores / t


def top_k_filter(scores: Tensor, k: int, min_tokens_to_keep: int = 1,
                 filter_value: float = -float("inf")) -> Tensor:
    """Keep the ``k`` highest scores per row (and every tie of the k-th); the rest get ``filter_value``."""
    k = min(max(k, min_tokens_to_keep), scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth, filter_value)


def top_p_filter(scores: Tensor, p: float, min_tokens_to_keep: int = 1,
                 filter_value: float = -float("inf")) -> Tensor:
    """Nucleus filtering: drop the least likely tokens whose cumulative probability
    stays ``<= 1 - p``, always keeping the ``min_tokens_to_keep`` most likely."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - p)
    drop[..., -min_tokens_to_keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), filter_value)


def warp(scores: Tensor, cfg: GenerationConfig) -> Tensor:
    """The sampling-only processors, in Hugging Face's order: temperature, top-k, top-p."""
    if cfg.temperature != 1.0:
        scores = temperature(scores, cfg.temperature)
    if cfg.top_k != 0:
        scores = top_k_filter(scores, cfg.top_k)
    if cfg.top_p < 1.0:
        scores = top_p_filter(scores, cfg.top_p)
    return scores


def process_logits(scores: Tensor, input_ids: Tensor, cfg: GenerationConfig,
                   prompt_ignore_length: Optional[Tensor] = None) -> Tensor:
    """Every processor ``cfg`` asks for, in Hugging Face's order."""
    if cfg.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, input_ids, cfg.repetition_penalty, prompt_ignore_length)
    scores = constrain(scores, input_ids, input_ids.shape[-1], cfg)
    return warp(scores, cfg) if cfg.do_sample else scores


def select_tokens(scores: Tensor, do_sample: bool, generator: Optional[torch.Generator] = None) -> Tensor:
    """``[B]`` next tokens: the argmax (first on ties), or a draw from ``softmax(scores)``."""
    if do_sample:
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)
    return scores.argmax(dim=-1)


def default_attention_mask(input_ids: Tensor, cfg: GenerationConfig) -> Tensor:
    """Hugging Face's mask when none is given: ``input_ids != pad`` if the pad token
    occurs in the prompt and is not an EOS token, else all ones."""
    pad = cfg.pad_token_id
    if pad is not None and pad not in cfg.eos_token_id and bool((input_ids == pad).any()):
        return input_ids.ne(pad).long()
    return torch.ones_like(input_ids)


# ----------------------------------------------------------------------------
# The loop.


def decode_stream(first_logits: Tensor, step: Callable[[Tensor], Tensor], prompt: Tensor, cfg: GenerationConfig,
                  *, generator: Optional[torch.Generator] = None,
                  prompt_ignore_length: Optional[Tensor] = None) -> Iterator[Tensor]:
    """Yield the ``[B]`` tokens chosen at each step.

    ``first_logits`` ``[B, V]``: the next-token logits after the prompt.
    ``step(tokens [B]) -> [B, V]``: feed one token per row, return the next logits
    (called only while another token is wanted). ``prompt`` ``[B, L]``: the ids the
    repetition penalty counts (a decoder's own prompt), ``prompt_ignore_length``
    ``[B]`` the leading positions of it that it skips (left padding).
    """
    b = prompt.shape[0]
    device = prompt.device
    vocab = first_logits.shape[-1]
    eos = torch.tensor(cfg.eos_token_id, dtype=torch.long, device=device) if cfg.eos_token_id else None
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    seen = None
    if cfg.repetition_penalty != 1.0:
        # Which ids each row holds so far, updated per step rather than rebuilt from the sequence.
        seen = _seen_tokens(prompt, vocab, prompt_ignore_length)
    rows = torch.arange(b, device=device)
    n0 = prompt.shape[1]
    seq = None
    if cfg.no_repeat_ngram_size:  # the n-gram ban reads the whole sequence: one buffer, filled in place
        seq = torch.empty(b, n0 + min(cfg.max_new_tokens, 64), dtype=torch.long, device=device)  # grows below
        seq[:, :n0] = prompt
    logits = first_logits
    for i in range(cfg.max_new_tokens):
        scores = logits.to(torch.float32)
        if seen is not None:
            scores = _penalize(scores, seen, cfg.repetition_penalty)
        scores = constrain(scores, None if seq is None else seq[:, : n0 + i], n0 + i, cfg)
        if cfg.do_sample:
            scores = warp(scores, cfg)
        tokens = select_tokens(scores, cfg.do_sample, generator)
        if eos is not None:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, cfg.pad_token_id))
        if seen is not None:
            seen[rows, tokens.clamp(max=vocab)] = True
        if seq is not None:
            if n0 + i >= seq.shape[1]:  # double it: memory follows the tokens decoded
                extra = min(seq.shape[1], n0 + cfg.max_new_tokens - seq.shape[1])
                seq = torch.cat((seq, seq.new_empty(b, extra)), dim=1)
            seq[:, n0 + i] = tokens
        yield tokens
        if eos is not None:
            unfinished &= ~torch.isin(tokens, eos)
            if not bool(unfinished.any()):
                return
        if i + 1 < cfg.max_new_tokens:
            logits = step(tokens)


def generate(first_logits: Tensor, step: Callable[[Tensor], Tensor], prompt: Tensor, cfg: GenerationConfig,
             **kwargs) -> Tensor:
    """``[B, L + n]``: ``prompt`` followed by the ``n <= max_new_tokens`` generated steps."""
    new = list(decode_stream(first_logits, step, prompt, cfg, **kwargs))
    if not new:
        return prompt
    return torch.cat([prompt, torch.stack(new, dim=1).to(prompt.dtype)], dim=1)
