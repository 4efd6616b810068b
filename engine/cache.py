"""The decoder KV cache: keys and values of every layer, preallocated, written in place.

``keys``/``values``: ``[layers, B, H, max_len, D]``; ``mask``: ``[B, max_len]`` bool
(True = attend). ``length`` positions are filled. A forward writes its ``n`` new
positions at ``[length, length + n)`` and attends over the ``[:length + n]`` views
(``kernels.attention`` takes any strides), so nothing is concatenated per step.
A ``growable`` cache reallocates when a forward would overflow it (rarely: the
models size their caches up front); a fixed one raises instead.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


class KVCache:
    def __init__(self, batch: int, layers: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None, growable: bool = True):
        shape = (layers, batch, heads, max_len, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.padded = False  # whether a filled slot is masked (then the kernel reads the mask)
        self.growable = growable

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def __len__(self) -> int:
        return self.length

    def get_seq_length(self) -> int:  # Hugging Face's name
        return self.length

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Write ``k``, ``v`` ``[B, H, n, D]`` at ``[start, start + n)``; return the views up to there."""
        end = start + k.shape[2]
        self.keys[layer, :, :, start:end].copy_(k)
        self.values[layer, :, :, start:end].copy_(v)
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def update_at(self, layer: int, slot: Tensor, k: Tensor, v: Tensor, end: int) -> Tuple[Tensor, Tensor]:
        """Static decoding: write one position ``k``, ``v`` ``[B, H, 1, D]`` at ``slot`` (a one-element
        long tensor on the cache's device) and return the views up to ``end``.

        Nothing is read back to the host, so a CUDA graph can capture it; the caller
        keeps ``length`` and masks the slots past it.
        """
        self.keys[layer].index_copy_(2, slot, k)
        self.values[layer].index_copy_(2, slot, v)
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def self_attention_mask(self, attention_mask: Optional[Tensor], start: int, n: int) -> Optional[Tensor]:
        """Record the mask of ``n`` new positions at ``[start, start + n)`` and return the self-attention
        mask over everything cached, ``[B, start + n]`` bool, or ``None`` while no filled slot is masked.

        ``attention_mask``: ``[B, n]`` (the new tokens) or ``[B, start + n]`` (the whole history), Hugging
        Face's 1/True = attend; ``None`` attends to every new position.
        """
        end = start + n
        if attention_mask is not None:
            lo = end - attention_mask.shape[1]  # 0 (whole history) or start (new tokens only)
            self.mask[:, lo:end] = attention_mask.ne(0)
            self.padded = self.padded or not bool(self.mask[:, lo:end].all())
        else:
            self.mask[:, start:end] = True
        return self.mask[:, :end] if self.padded else None

    def step_mask(self, slot: Tensor, kv_len: int) -> Tensor:
        """Static decoding's self-attention mask: unmask ``slot`` (a one-element long tensor) in place and
        return the mask's first ``kv_len`` slots, with no read back to the host (CUDA graphs capture it)."""
        mask = self.mask[:, :kv_len]
        mask.index_fill_(1, slot, True)
        return mask

    def ensure_capacity(self, end: int, limit: Optional[int] = None) -> None:
        """Make room for ``end`` positions: grow (doubling, up to ``limit``) or raise if fixed."""
        if end <= self.max_len:
            return
        if not self.growable:
            raise ValueError(f"{end} positions ({self.length} cached + {end - self.length} new) exceed the cache's "
                             f"capacity of {self.max_len}; allocate model.new_cache(batch, max_len) large enough")
        self.grow(max(end, min(limit or 2 * self.max_len, 2 * self.max_len)))

    def grow(self, max_len: int) -> None:
        if max_len <= self.max_len:
            return
        n, keys, values, mask = self.length, self.keys, self.values, self.mask
        layers, batch, heads, _, d = keys.shape
        self.keys = keys.new_empty((layers, batch, heads, max_len, d))
        self.values = values.new_empty((layers, batch, heads, max_len, d))
        self.mask = mask.new_ones((batch, max_len))
        self.keys[:, :, :, :n] = keys[:, :, :, :n]
        self.values[:, :, :, :n] = values[:, :, :, :n]
        self.mask[:, :n] = mask[:, :n]

    def make_static(self) -> "KVCache":
        """Make this cache the fixed buffers of static decoding (:mod:`engine.graphs`): fixed capacity
        and zero-filled (masked slots still meet the kernel's dot products: 0 * NaN = NaN)."""
        self.keys.zero_()
        self.values.zero_()
        self.growable = False
        return self

    def reorder(self, index: Tensor) -> None:
        """Row ``i`` takes row ``index[i]``'s state (beam search): one ``index_select`` per buffer."""
        n = self.length
        idx = index.to(device=self.keys.device, dtype=torch.long)
        if n:
            self.keys[:, :, :, :n] = self.keys[:, :, :, :n].index_select(1, idx)
            self.values[:, :, :, :n] = self.values[:, :, :, :n].index_select(1, idx)
            if self.padded:
                self.mask[:, :n] = self.mask[:, :n].index_select(0, idx)

    def crop(self, length: int) -> None:
        """Forget everything after ``length`` positions (e.g. to re-run a step)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.mask[:, length:] = True
        self.length = length
        self.padded = bool(length and not self.mask[:, :length].all())

    def reset(self) -> None:
        self.crop(0)

    def _describe(self) -> str:
        layers, b, h, t, d = self.keys.shape
        return (f"batch={b}, layers={layers}, heads={h}, max_len={t}, head_dim={d}, length={self.length}, "
                f"dtype={self.keys.dtype}, device={self.keys.device}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"


class EncoderDecoderCache(KVCache):
    """An encoder-decoder's decoder state across calls (T5, ...).

    * self-attention ``keys``/``values``: ``[layers, B, H, max_len, D]``, preallocated;
      ``length`` positions are filled; each forward writes its ``n`` new positions in
      place and attends over the ``[:length + n]`` views (no concatenation);
    * ``mask`` ``[B, max_len]`` bool: the decoder attention mask seen so far;
    * ``cross_kv`` ``[B_enc, L_enc, layers*2*inner]``: every decoder layer's
      cross-attention keys/values, from one projection of ``encoder_hidden_state``,
      computed once; ``encoder_mask`` ``[B_enc, L_enc]`` bool (None: no padding).
      ``B`` may be a multiple ``g`` of ``B_enc``: rows ``[i*g, (i+1)*g)`` attend to encoder row ``i``.

    A cache built by the model's ``new_cache`` has a fixed capacity (decoding past it
    is a ``ValueError``); one the model starts itself (``use_cache=True``) grows.
    Beam search's ``reorder`` keeps rows within their encoder row's group, so the
    shared cross-attention keys/values are never reordered.
    """

    def __init__(self, batch: int, layers: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None, growable: bool = False):
        super().__init__(batch, layers, heads, max_len, head_dim, dtype, device, growable)
        self.cross_kv: Optional[Tensor] = None
        self.encoder_mask: Optional[Tensor] = None
        self.encoder_hidden_state: Optional[Tensor] = None
        # Static decoding (make_static): the encoder state is copied into buffers of one
        # encoder length that keep their addresses across calls (captured graphs read them).
        self.encoder_length: Optional[int] = None
        self._cross_buffer: Optional[Tensor] = None
        self._encoder_mask_buffer: Optional[Tensor] = None

    def make_static(self, encoder_length: int) -> "EncoderDecoderCache":
        """:meth:`KVCache.make_static`, with the encoder state held at ``encoder_length`` positions
        (padding masked) in buffers the first prefill allocates."""
        super().make_static()
        self.encoder_length = encoder_length
        return self

    def attach_encoder(self, cross_kv: Tensor, mask: Tensor, encoder_hidden_state: Tensor) -> None:
        """Hold the encoder's state for decoding: ``cross_kv`` ``[B_enc, L_enc, ...]`` (every decoder
        layer's cross keys/values), ``mask`` ``[B_enc, L_enc]`` bool. A static cache copies them into
        its fixed buffers, padded to its ``encoder_length``; another keeps them (the mask as the
        kernel's: ``None`` when nothing is masked)."""
        if self.encoder_length is None:
            from .layers import kernel_mask

            self.cross_kv, self.encoder_mask = cross_kv, kernel_mask(mask)
        else:
            b, n = mask.shape
            if self._cross_buffer is None:
                self._cross_buffer = cross_kv.new_zeros(b, self.encoder_length, cross_kv.shape[2])
                self._encoder_mask_buffer = torch.zeros(b, self.encoder_length, dtype=torch.bool,
                                                        device=cross_kv.device)
            self._cross_buffer[:, :n] = cross_kv
            self._cross_buffer[:, n:] = 0
            self._encoder_mask_buffer[:, :n] = mask
            self._encoder_mask_buffer[:, n:] = False  # the padding up to the encoder length
            self.cross_kv, self.encoder_mask = self._cross_buffer, self._encoder_mask_buffer
        self.encoder_hidden_state = encoder_hidden_state

    def reset(self) -> None:
        """Empty the decoder positions and drop the encoder state."""
        super().reset()
        self.cross_kv = self.encoder_mask = self.encoder_hidden_state = None

    def __repr__(self) -> str:
        enc = None if self.cross_kv is None else tuple(self.cross_kv.shape[:2])
        return f"{type(self).__name__}({self._describe()}, encoder={enc})"


def self_attention_mask(attention_mask: Optional[Tensor], cache: Optional[KVCache], start: int,
                        n: int) -> Optional[Tensor]:
    """A decoder's self-attention mask for ``n`` new positions at ``start``: with a ``cache``, its
    :meth:`KVCache.self_attention_mask` (the mask is recorded there); without one, the kernel's mask of
    ``attention_mask`` (``None`` when nothing is masked)."""
    if cache is None:
        from .layers import kernel_mask

        return kernel_mask(attention_mask)
    return cache.self_attention_mask(attention_mask, start, n)


def encoder_state(model, cache: Optional[EncoderDecoderCache], input_ids: Optional[Tensor],
                  attention_mask: Optional[Tensor], encoder_outputs, output_hidden_states: bool,
                  decoder_batch: int):
    """The encoder side of an encoder-decoder's forward (T5, BART, ...): ``(encoder hidden state, its
    hidden states or None, cross keys/values, the kernel's encoder mask)``.

    From ``encoder_outputs`` if given; else from a ``cache`` that already holds an encoder (a new
    ``attention_mask`` may replace its mask); else the model's ``encode`` on ``input_ids``. The cross
    keys/values are projected once (``model.cross_key_values``) and kept in the cache, and reused
    while the cache holds the same encoder output. ``model``: ``encode``, ``cross_key_values``,
    ``dtype``, ``config.d_model``, ``_check_mask``.
    """
    from .inputs import encoder_hidden_state
    from .layers import kernel_mask
    from .outputs import EncoderOutput

    enc_hidden, enc_states = None, None
    if encoder_outputs is not None:
        enc_hidden = encoder_hidden_state(encoder_outputs)
        if isinstance(encoder_outputs, EncoderOutput):
            enc_states = encoder_outputs.hidden_states
    if cache is not None and cache.cross_kv is not None and enc_hidden is None:
        enc_hidden, cross_kv = cache.encoder_hidden_state, cache.cross_kv
        enc_mask = cache.encoder_mask
        if attention_mask is not None:
            model._check_mask("attention_mask", attention_mask, [tuple(enc_hidden.shape[:2])])
            enc_mask = kernel_mask(attention_mask)
    else:
        if enc_hidden is None:
            if input_ids is None:
                raise ValueError("pass input_ids, encoder_outputs, or a past_key_values that holds the encoder")
            enc = model.encode(input_ids, attention_mask, output_hidden_states)
            enc_hidden, enc_states = enc.last_hidden_state, enc.hidden_states
        d = model.config.d_model
        if not isinstance(enc_hidden, Tensor) or enc_hidden.dim() != 3 or enc_hidden.shape[-1] != d:
            raise ValueError(f"encoder_outputs must hold a [batch, seq, {d}] hidden state")
        enc_hidden = enc_hidden.to(model.dtype)
        model._check_mask("attention_mask", attention_mask, [tuple(enc_hidden.shape[:2])])
        enc_mask = kernel_mask(attention_mask)
        if cache is not None and cache.cross_kv is not None and cache.encoder_hidden_state is enc_hidden:
            cross_kv = cache.cross_kv  # the same encoder output as before: reuse its keys/values
        else:
            cross_kv = model.cross_key_values(enc_hidden)
        if cache is not None:
            cache.cross_kv, cache.encoder_mask, cache.encoder_hidden_state = cross_kv, enc_mask, enc_hidden
    if decoder_batch % enc_hidden.shape[0]:
        raise ValueError(f"the decoder batch ({decoder_batch}) must be a multiple of the encoder batch "
                         f"({enc_hidden.shape[0]})")
    return enc_hidden, enc_states, cross_kv, enc_mask
