"""Padding-free execution: a padded batch's real tokens packed into one ``[total_tokens, ...]`` run.

A model unpads once at its embeddings (:meth:`Packed.unpad`), runs every block on
``[total_tokens, hidden]`` (linear layers, norms and activations see real tokens only; attention is
:func:`kernels.attention_varlen` over ``cu_seqlens``) and pads back (:meth:`Packed.pad`) only
what its API returns padded. :class:`Packed` is the descriptor the blocks receive in place of a
padding mask (:class:`PackedCross` for a packed decoder's cross-attention). Decoders pack a padded
batch that starts from an empty cache (:func:`plan` with ``decoder=True``, :func:`plan_decoder`),
writing the real tokens' keys/values into the cache slots the padded run fills. See docs/padding-free.md.

When packing pays (:func:`plan`): the rule below, measured on the CPU with bench/packing_rule.py on
MiniLM -- see the docs page for the figures and how they were taken.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator, Optional

import torch
from torch import Tensor

#: Pack a padded batch when at most this fraction of its positions are real tokens. Above it the
#: gather/scatter and the per-sequence attention cost more than the padding they save (measured on
#: a quiet CPU with ``python -m trifuse.bench.packing_rule``: 0.97-1.04x at 89-92% real, a loss or
#: nothing above; docs/padding-free.md).
PACK_BELOW = 0.9
#: ... and when the padded batch holds at least this many positions (conservative: at 32 positions
#: packing still won 4-23% below 85% real, a fraction of a millisecond to a few).
PACK_MIN_POSITIONS = 64

_enabled: contextvars.ContextVar = contextvars.ContextVar("trifuse_packing", default=True)


@contextlib.contextmanager
def use_packing(enabled) -> Iterator[None]:
    """``with engine.use_packing(False): model(ids, mask)`` runs padded batches padded (this thread
    only), e.g. to time one against the other; packing is on by default. ``"always"`` packs every
    batch the structure allows, whatever :data:`PACK_BELOW` and :data:`PACK_MIN_POSITIONS` say (how
    ``python -m trifuse.bench.packing_rule`` measures where the rule should sit)."""
    if enabled != "always" and not isinstance(enabled, bool):
        raise ValueError(f"use_packing takes True, False or 'always', got {enabled!r}")
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)


@dataclasses.dataclass(frozen=True, eq=False)
class Packed:
    """Where the real tokens of a ``[batch, seqlen]`` batch sit in the packed ``[total]`` run.

    ``cu_seqlens`` int32 ``[batch + 1]`` (prefix sums from 0, on the model's device);
    ``max_seqlen`` the longest sequence; ``indices`` int64 ``[total]``: each packed token's
    flat position ``b * seqlen + i`` in the padded batch; ``positions`` int64 ``[total]``: its
    position within its sequence, counting padding before it (as a padded batch's would).
    """

    cu_seqlens: Tensor
    max_seqlen: int
    indices: Tensor
    positions: Tensor
    batch: int
    seqlen: int

    @property
    def total(self) -> int:
        return self.indices.numel()

    @classmethod
    def from_mask(cls, attention_mask: Tensor) -> "Packed":
        """The real tokens (mask nonzero) of a ``[B, L]`` batch, in order; holes are allowed."""
        keep = attention_mask.ne(0)
        b, n = keep.shape
        lengths = keep.sum(1, dtype=torch.int32)
        cu = torch.zeros(b + 1, dtype=torch.int32, device=keep.device)
        torch.cumsum(lengths, 0, out=cu[1:])
        flat = keep.reshape(-1)
        indices = flat.nonzero().squeeze(1)
        return cls(cu, int(lengths.max()) if b else 0, indices, indices % n, b, n)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor, total: int) -> "Packed":
        """Packed input as it comes (text-embeddings-inference style): ``cu_seqlens`` int32 ``[B + 1]``
        over ``total`` tokens. Padding back gives ``[B, max_seqlen]`` with the sequences left-aligned."""
        if (not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
                or cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool):
            raise ValueError("cu_seqlens must be a 1-D integer tensor [B + 1] of prefix sums starting at 0")
        c = cu_seqlens.tolist()
        lengths = [e - s for s, e in zip(c[:-1], c[1:])]
        if c[0] != 0 or any(n < 1 for n in lengths):
            raise ValueError(f"cu_seqlens must start at 0 and increase strictly (no empty sequence), got {c}")
        if c[-1] != total:
            raise ValueError(f"cu_seqlens ends at {c[-1]} but input_ids holds {total} tokens")
        device = cu_seqlens.device
        n = max(lengths)
        lens = torch.tensor(lengths, device=device)
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
        start = torch.repeat_interleave(cu_seqlens[:-1].long(), lens)
        positions = torch.arange(total, device=device) - start
        return cls(cu_seqlens.to(torch.int32), n, seq * n + positions, positions, len(lengths), n)

    def unpad(self, x: Tensor) -> Tensor:
        """``[B, L, ...]`` -> ``[total, ...]``: the real tokens only."""
        return x.reshape(self.batch * self.seqlen, *x.shape[2:]).index_select(0, self.indices)

    def pad(self, x: Tensor) -> Tensor:
        """``[total, ...]`` -> ``[B, L, ...]``, zeros at the padded positions."""
        out = x.new_zeros(self.batch * self.seqlen, *x.shape[1:])
        out.index_copy_(0, self.indices, x)
        return out.view(self.batch, self.seqlen, *x.shape[1:])

    def first_tokens(self, x: Tensor) -> Tensor:
        """``[total, ...]`` -> ``[B, ...]``: each sequence's first token (what ``x_padded[:, 0]`` reads)."""
        return x.index_select(0, self.cu_seqlens[:-1].long())

    def mask(self) -> Tensor:
        """The ``[B, L]`` bool mask the padded outputs follow."""
        m = torch.zeros(self.batch * self.seqlen, dtype=torch.bool, device=self.indices.device)
        m[self.indices] = True
        return m.view(self.batch, self.seqlen)


@dataclasses.dataclass(frozen=True, eq=False)
class PackedCross:
    """Cross-attention of a packed decoder batch: its tokens (``queries``) attend to their encoder
    row's real tokens (``keys``, the encoder's states packed the same way), row for row."""

    queries: Packed
    keys: Packed


def plan(attention_mask: Optional[Tensor], *, need_probs: bool = False, decoder: bool = False,
         relative: bool = False) -> Optional[Packed]:
    """A :class:`Packed` for this padded batch when packing pays, else ``None`` (run padded).

    Packs when: there is padding to drop (at most :data:`PACK_BELOW` of the positions are real),
    the batch holds at least :data:`PACK_MIN_POSITIONS` positions, every row starts with a real
    token (left padding keeps an encoder's padded path: a padded row's first position is what the
    pooler and Hugging Face's classifiers read; a ``decoder`` reads no such position, and left
    padding is how decoder-only prompts come), no attention probabilities are asked for, and
    nothing is being traced or captured (packing reads the mask back to the host), and packing is
    not switched off (:func:`use_packing`). ``relative`` (T5's relative positions): each row's real
    tokens must also sit side by side, as a mask with holes spaces them differently when padded.
    """
    if attention_mask is None or need_probs or attention_mask.dim() != 2 or not _enabled.get():
        return None
    if torch.compiler.is_compiling() or (attention_mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        return None  # the export keeps the padded interface (docs/padding-free.md)
    always = _enabled.get() == "always"
    if attention_mask.numel() < PACK_MIN_POSITIONS and not always:
        return None
    keep = attention_mask.ne(0)
    if not decoder and not bool(keep[:, 0].all()):
        return None
    if relative and not _contiguous(keep):
        return None
    if int(keep.sum()) > PACK_BELOW * keep.numel() and not always:
        return None
    return Packed.from_mask(keep)


def _contiguous(keep: Tensor) -> bool:
    """Whether each row's real tokens (``keep`` ``[B, L]`` bool) form one run (an empty row does)."""
    pos = torch.arange(keep.shape[1], device=keep.device)
    first = torch.where(keep, pos, keep.shape[1]).amin(1)
    last = torch.where(keep, pos, -1).amax(1)
    return bool(((last - first + 1).clamp(min=0) == keep.sum(1)).all())


def plan_cross(queries: Packed, encoder_mask: Optional[Tensor], encoder_shape) -> Optional[PackedCross]:
    """The cross-attention layout of a packed decoder batch over an encoder batch of ``encoder_shape``
    ``(B_enc, L_enc)`` with ``encoder_mask`` (bool, ``None``: no padding), or ``None`` when the decoder
    must run padded: its rows are not one per encoder row (beams share an encoder row), or an encoder
    row is empty (the padded kernels define what such a row's queries read)."""
    b, n = encoder_shape
    if queries.batch != b:
        return None
    keep = torch.ones(b, n, dtype=torch.bool, device=queries.indices.device) if encoder_mask is None else encoder_mask
    keys = Packed.from_mask(keep)
    if bool((keys.cu_seqlens[1:] == keys.cu_seqlens[:-1]).any()):
        return None
    return PackedCross(queries, keys)


def plan_decoder(attention_mask: Optional[Tensor], start: int, encoder_mask: Optional[Tensor],
                 cross_kv: Optional[Tensor], *, relative: bool = False) -> Optional[tuple]:
    """An encoder-decoder's padded decoder batch, packed when it pays: ``(PackedCross, cross_kv
    [1, T_enc, width])`` -- the decoder's and the encoder's layouts, and every layer's cross keys/values
    (``cross_kv`` ``[B_enc, L_enc, width]``) at the encoder's real tokens only -- or ``None`` (run
    padded): nothing cached before (``start`` 0), :func:`plan` and :func:`plan_cross` agree."""
    if start or cross_kv is None:
        return None
    queries = plan(attention_mask, decoder=True, relative=relative)
    cross = None if queries is None else plan_cross(queries, encoder_mask, cross_kv.shape[:2])
    return None if cross is None else (cross, cross.keys.unpad(cross_kv)[None])


def token_batches(order: list, lengths: list, max_batch_tokens: int) -> list:
    """``order`` (items, longest first) cut into batches of at most ``max_batch_tokens`` real tokens,
    text-embeddings-inference's queue: an item longer than the budget runs alone. ``lengths[i]`` is
    ``order[i]``'s length. A packed batch costs its real tokens, so the budget bounds each call's work."""
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be a positive int, got {max_batch_tokens!r}")
    batches, used = [], 0
    for item, n in zip(order, lengths):
        if batches and used + n <= max_batch_tokens:
            batches[-1].append(item)
            used += n
        else:
            batches.append([item])
            used = n
    return batches
