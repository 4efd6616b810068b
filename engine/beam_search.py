"""Beam search (and beam sampling) with Hugging Face's semantics, model-agnostic.

A model plugs in with the logits after its prompt and a ``step(tokens, beam_idx)``
that first reorders its cache rows by ``beam_idx`` (row ``i`` takes row
``beam_idx[i]``'s state), then feeds one token per row and returns the next
logits. Rows are ``batch * num_beams``, beam-major within a batch item (Hugging
Face's ``repeat_interleave`` order); ``beam_idx`` never leaves a batch item.

The algorithm is the vectorized one of transformers 5.x
(``GenerationMixin._beam_search``), step for step:

* each step takes the top ``K = max(2, 1 + #eos) * num_beams`` continuations of all
  beams by accumulated log-probability (or samples ``K`` without replacement from
  their softmax when ``do_sample``, after temperature / top-k / top-p, which keep at
  least ``#eos + 1`` tokens, then ranked by score as transformers 5.24 does);
* continuations ending in EOS (or reaching ``max_new_tokens``) among the top
  ``num_beams`` become finished hypotheses scored ``sum logprob / len ** length_penalty``
  (``len`` counts generated tokens, EOS included); the best ``num_beams``
  unfinished continuations keep running;
* ``early_stopping=True`` stops a batch item once it has ``num_beams`` finished
  hypotheses; ``False`` once the best running beam, scored at the current length,
  cannot beat the worst finished one; ``"never"`` scores it at ``max_length`` when
  ``length_penalty > 0`` (the canonical bound);
* the logits processors (repetition penalty, no-repeat n-grams over each beam's
  sequence, minimum length) act on the log-probabilities before the running scores are added, then
  the sampling warpers, as in Hugging Face;
* the output is each item's best ``num_return_sequences`` hypotheses (best first),
  right-padded to the longest with
  Hugging Face's fill value: ``pad_token_id`` if it is set and nonzero, else the
  first EOS id (a quirk of transformers' ``pad_token_id or eos_token_id[0]`` on a
  tensor: with ``pad_token_id=0``, as in T5, beam outputs are padded with EOS).

Reference: ``transformers/generation/utils.py`` (``_beam_search`` and helpers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import generation as gen

_NEG = -1.0e9  # Hugging Face's "impossible" score


@dataclass(frozen=True)
class BeamConfig:
    """Beam options, validated on construction (``ValueError`` on bad ones)."""

    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    num_return_sequences: int = 1

    def __post_init__(self):
        n = self.num_beams
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {n!r}")
        r = self.num_return_sequences
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= n:
            raise ValueError(f"num_return_sequences ({r!r}) must be an int in [1, num_beams={n}]")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


def fill_value(cfg: gen.GenerationConfig) -> int:
    """What Hugging Face's beam search pads its output with (see the module docstring)."""
    if not cfg.eos_token_id:
        return -1
    return cfg.pad_token_id if cfg.pad_token_id else cfg.eos_token_id[0]


def _warp(log_probs: Tensor, cfg: gen.GenerationConfig, min_keep: int) -> Tensor:
    """The sampling warpers of beam sampling, in Hugging Face's order, keeping ``min_keep`` tokens."""
    if cfg.temperature != 1.0:
        log_probs = gen.temperature(log_probs, cfg.temperature)
    if cfg.top_k != 0:
        log_probs = gen.top_k_filter(log_probs, cfg.top_k, min_tokens_to_keep=min_keep)
    if cfg.top_p < 1.0:
        log_probs = gen.top_p_filter(log_probs, cfg.top_p, min_tokens_to_keep=min_keep)
    return log_probs


_FIRST_CHUNK = 64  # positions the sequence buffers start with before they double


def _grow(t: Tensor, width: int, fill: int) -> Tensor:
    """``t`` ``[B, k, w]`` padded with ``fill`` to ``[B, k, width]``."""
    return torch.cat((t, t.new_full((*t.shape[:2], width - t.shape[2]), fill)), dim=2)


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    """``t[b, idx[b, j], ...]``: beams of each batch item picked by ``idx`` ``[B, k]``."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def beam_search(first_logits: Tensor, step: Callable[[Tensor, Tensor], Tensor], prompt: Tensor,
                cfg: gen.GenerationConfig, beams: BeamConfig,
                generator: Optional[torch.Generator] = None, prompt_ignore_length: Optional[Tensor] = None) -> Tensor:
    """``[B * num_return_sequences, L0 + n]``: each batch item's best hypotheses (best
    first) after its ``L0``-token prompt.

    ``first_logits`` ``[B*nb, V]``: the logits after ``prompt`` ``[B*nb, L0]`` (each
    item's prompt repeated ``nb`` times). ``step(tokens [B*nb], beam_idx [B*nb])``:
    reorder the cache rows by ``beam_idx``, feed ``tokens``, return ``[B*nb, V]``.
    ``cfg`` gives ``max_new_tokens``, EOS, pad and the sampling options.
    ``prompt_ignore_length`` ``[B*nb]``: leading prompt positions the repetition penalty skips.
    """
    nb = beams.num_beams
    rows, prompt_len = prompt.shape
    if rows % nb:
        raise ValueError(f"prompt has {rows} rows, not a multiple of num_beams={nb}")
    b = rows // nb
    device = prompt.device
    vocab = first_logits.shape[-1]
    max_length = prompt_len + cfg.max_new_tokens
    eos = torch.tensor(cfg.eos_token_id, dtype=torch.long, device=device) if cfg.eos_token_id else None
    n_eos = len(cfg.eos_token_id)
    keep = max(2, 1 + n_eos) * nb
    if keep > nb * vocab:
        raise ValueError(f"beam search keeps {keep} candidates per step but there are only {nb * vocab}")
    min_tokens = n_eos + 1 if n_eos else 2
    top_nb = torch.zeros(keep, dtype=torch.bool, device=device)
    top_nb[:nb] = True
    lp, early = beams.length_penalty, beams.early_stopping

    # The sequence buffers start at a few dozen positions and double as decoding goes, so
    # memory follows the tokens decoded, not max_new_tokens (which may be huge with EOS).
    cap = min(max_length, prompt_len + _FIRST_CHUNK)
    running = torch.full((b, nb, cap), fill_value(cfg), dtype=torch.long, device=device)
    running[:, :, :prompt_len] = prompt.view(b, nb, prompt_len)
    finished_seqs = running.clone()
    running_scores = torch.zeros(b, nb, dtype=torch.float32, device=device)
    running_scores[:, 1:] = _NEG  # the beams start identical: only the first one may expand
    finished_scores = torch.full((b, nb), _NEG, dtype=torch.float32, device=device)
    is_finished = torch.zeros(b, nb, dtype=torch.bool, device=device)
    can_improve = torch.ones(b, 1, dtype=torch.bool, device=device)
    running_src = torch.full((b, nb, cap - prompt_len), -1, dtype=torch.long, device=device)
    finished_src = running_src.clone()
    offsets = torch.arange(b, device=device)[:, None] * nb

    cur = prompt_len
    logits = first_logits
    while True:
        if cur >= cap:
            cap = min(max_length, 2 * cap)
            running, finished_seqs = _grow(running, cap, fill_value(cfg)), _grow(finished_seqs, cap, fill_value(cfg))
            running_src = _grow(running_src, cap - prompt_len, -1)
            finished_src = _grow(finished_src, cap - prompt_len, -1)
        log_probs = torch.log_softmax(logits.to(torch.float32), dim=-1)
        if cfg.repetition_penalty != 1.0:
            log_probs = gen.repetition_penalty(log_probs, running[:, :, :cur].reshape(rows, cur),
                                               cfg.repetition_penalty, prompt_ignore_length)
        log_probs = gen.constrain(log_probs, running[:, :, :cur].reshape(rows, cur) if cfg.no_repeat_ngram_size
                                  else None, cur, cfg)
        if cfg.do_sample:
            log_probs = _warp(log_probs, cfg, min_tokens)
        acc = (log_probs.view(b, nb, vocab) + running_scores[:, :, None]).reshape(b, nb * vocab)

        # The top `keep` continuations over all beams (or a sample of them).
        if cfg.do_sample:
            cand = torch.multinomial(acc.softmax(dim=-1), num_samples=keep, generator=generator)
            cand_scores = acc.gather(1, cand)
            # transformers >= 5.24 ranks the draws by score (earlier releases kept draw order)
            cand_scores, order = cand_scores.sort(dim=-1, descending=True)
            cand = cand.gather(-1, order)
        else:
            cand_scores, cand = torch.topk(acc, k=keep)
        src = cand // vocab
        cand_seqs = _gather(running, src)
        cand_seqs[:, :, cur] = cand % vocab
        cand_src = _gather(running_src, src)
        cand_src[:, :, cur - prompt_len] = src + offsets

        # Which continuations stop here: EOS, or the length limit.
        if cur + 1 >= max_length:
            stops = torch.ones(b, keep, dtype=torch.bool, device=device)
        elif eos is not None:
            stops = torch.isin(cand_seqs[:, :, cur], eos)
        else:
            stops = torch.zeros(b, keep, dtype=torch.bool, device=device)

        # The best `nb` continuations that go on.
        go_on = cand_scores + stops.to(torch.float32) * _NEG
        nxt = torch.topk(go_on, k=nb)[1]
        running, running_scores, running_src = _gather(cand_seqs, nxt), _gather(go_on, nxt), _gather(cand_src, nxt)

        # New finished hypotheses: the top-`nb` continuations that stopped, length-penalized.
        just_done = stops & top_nb[None, :]
        done_scores = cand_scores / ((cur + 1 - prompt_len) ** lp)
        full = torch.all(is_finished, dim=-1, keepdim=True) & (early is True)
        done_scores = done_scores + full.to(torch.float32) * _NEG
        done_scores = done_scores + (~can_improve).to(torch.float32) * _NEG
        done_scores = done_scores + (~just_done) * _NEG
        merged_scores = torch.cat((finished_scores, done_scores), dim=1)
        best = torch.topk(merged_scores, k=nb)[1]
        finished_seqs = _gather(torch.cat((finished_seqs, cand_seqs), dim=1), best)
        finished_scores = _gather(merged_scores, best)
        finished_src = _gather(torch.cat((finished_src, cand_src), dim=1), best)
        is_finished = _gather(torch.cat((is_finished, just_done), dim=1), best)

        beam_idx = running_src[:, :, cur - prompt_len].reshape(-1)
        cur += 1

        # Can a running beam still beat the worst finished hypothesis?
        horizon = (max_length if (early == "never" and lp > 0.0) else cur) - prompt_len
        best_running = running_scores[:, :1] / (horizon ** lp)
        worst_done = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], _NEG)
        can_improve = can_improve & torch.any(best_running > worst_done, dim=-1, keepdim=True)

        # Go on while some item can improve, some beam is open (early_stopping=True) and some
        # continuation did not stop: one host sync per step.
        go = can_improve.any() & ~stops.all()
        if early is True:
            go = go & ~is_finished.all()
        if not bool(go):
            break
        logits = step(running[:, :, cur - 1].reshape(-1), beam_idx)

    r = beams.num_return_sequences
    out, src = finished_seqs[:, :r].reshape(b * r, -1), finished_src[:, :r].reshape(b * r, -1)
    length = prompt_len + int((src + 1).bool().sum(dim=1).max())
    return out[:, :length]
