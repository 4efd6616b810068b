"""The paged KV cache of continuous batching: a pool of fixed-size blocks, per-sequence block tables,
and the packed step that runs many sequences' attention over them.

* :class:`BlockPool` hands out block ids from a free list and counts what is in use; nothing is
  ever reallocated, so memory is bounded by the pool: when it runs out the scheduler preempts a
  sequence (:mod:`engine.continuous`) instead of failing.
* :class:`PagedKV` holds the pool's storage, ``keys`` / ``values`` ``[layers, blocks, block_size, H, D]``
  (vLLM's layout per layer), and writes a step's new keys and values at their slots.
* :class:`BlockTable` is one sequence's list of blocks: its decoder keys, and for an
  encoder-decoder a second table holding its cross-attention keys/values, written once when the
  request is admitted (the encoder runs once per request, its keys are projected once).
* :class:`PackedStep` is what a model's ``packed_logits`` receives as its ``cache``: the step's
  tokens sit in one row ``[1, T, hidden]`` (every linear layer runs on all of them at once), and
  each attention layer hands it its queries (:class:`engine.layers.Attention` asks ``cache.packed``);
  the step writes the new keys/values and calls :func:`kernels.paged_attention` once per layer.

Reference: Kwon et al., "Efficient Memory Management for LLM Serving with PagedAttention" (SOSP 2023).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from trifuse import kernels


class BlockPool:
    """Block ids ``0 .. num_blocks - 1``: a free list, most recently freed first (warm in cache)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> List[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free (the scheduler checks first)")
        out = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return out

    def release(self, blocks: Sequence[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass
class BlockTable:
    """One sequence's blocks in order: token ``p`` lives in slot ``p % block_size`` of ``blocks[p // block_size]``."""

    block_size: int
    blocks: List[int] = field(default_factory=list)

    def blocks_for(self, tokens: int) -> int:
        """How many more blocks holding ``tokens`` tokens takes."""
        return max(0, -(-tokens // self.block_size) - len(self.blocks))

    def slots(self, start: int, end: int) -> List[int]:
        bs = self.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(start, end)]


class PagedKV:
    """The pool's storage for a model: ``keys`` / ``values`` ``[layers, blocks, block_size, H, D]``."""

    def __init__(self, layers: int, heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device):
        shape = (layers, num_blocks, block_size, heads, head_dim)
        # Zero-filled: a slot a query cannot see is still multiplied by 0 in the kernel's padding.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size

    @staticmethod
    def block_bytes(layers: int, heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across layers, keys and values."""
        return 2 * layers * block_size * heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Keys/values ``[T, H, D]`` of ``T`` tokens into their ``slots`` ``[T]`` (long) of ``layer``."""
        flat = (-1, *self.keys.shape[3:])
        self.keys[layer].view(flat).index_copy_(0, slots, k)
        self.values[layer].view(flat).index_copy_(0, slots, v)

    def write_sequence(self, layer: int, table: BlockTable, k: Tensor, v: Tensor) -> None:
        """A whole sequence's keys/values ``[L, H, D]`` into ``table``'s first ``L`` slots."""
        slots = torch.tensor(table.slots(0, k.shape[0]), dtype=torch.long, device=self.keys.device)
        self.write(layer, slots, k, v)


def _tables(tables: Sequence[BlockTable], device) -> Tensor:
    """``[S, max blocks]`` int32, rows padded with block 0 (never read past a sequence's length)."""
    width = max(1, max(len(t.blocks) for t in tables))
    rows = [t.blocks + [0] * (width - len(t.blocks)) for t in tables]
    return torch.tensor(rows, dtype=torch.int32, device=device)


class PackedStep:
    """One engine step's attention over the paged cache, handed to a model as its ``cache``.

    ``tables``: each scheduled sequence's :class:`BlockTable`; ``token_seq`` ``[T]``: which of them
    each token belongs to; ``positions`` ``[T]``: each token's position in its sequence (its keys
    go to that slot; it sees the keys up to it). ``cross_tables`` / ``cross_lens``: an
    encoder-decoder's per-sequence cross-attention blocks and encoder lengths.
    """

    packed = True

    def __init__(self, kv: PagedKV, tables: Sequence[BlockTable], token_seq: Sequence[int],
                 positions: Sequence[int], cross_tables: Optional[Sequence[BlockTable]] = None,
                 cross_lens: Optional[Sequence[int]] = None):
        dev = kv.keys.device
        self.kv = kv
        slots = []
        for s, p in zip(token_seq, positions):
            t = tables[s]
            slots.append(t.blocks[p // t.block_size] * t.block_size + p % t.block_size)
        self.slots = torch.tensor(slots, dtype=torch.long, device=dev)
        self.token_seq = torch.tensor(list(token_seq), dtype=torch.int32, device=dev)
        self.kv_lens = torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=dev)
        self.block_tables = _tables(tables, dev)
        self.cross_tables = self.cross_lens = None
        if cross_tables is not None:
            self.cross_tables = _tables(cross_tables, dev)
            self.cross_lens = torch.tensor([cross_lens[s] for s in token_seq], dtype=torch.int32, device=dev)

    def attention(self, attn, x: Tensor, relative_bias: Optional[kernels.RelativeBias] = None) -> Tensor:
        """The attention of ``attn`` (an :class:`engine.layers.Attention`) for the step's tokens
        ``x`` ``[1, T, hidden]``, before its output projection: ``[1, T, heads * head_dim]``."""
        T = x.shape[1]
        shape = (T, attn.heads, attn.head_dim)
        keys, values = self.kv.keys[attn.layer], self.kv.values[attn.layer]
        if attn.cross:
            if self.cross_tables is None:
                raise ValueError("a cross-attention layer in a packed step that holds no encoder state")
            q = attn.q(x[0]).view(shape)
            ctx = kernels.paged_attention(q, keys, values, self.cross_tables, self.token_seq, self.cross_lens,
                                          scale=attn.scale)
        else:
            qkv = attn.qkv(x[0]).view(T, 3, attn.heads, attn.head_dim)
            q, k, v = qkv.unbind(1)
            self.kv.write(attn.layer, self.slots, k, v)
            ctx = kernels.paged_attention(q, keys, values, self.block_tables, self.token_seq, self.kv_lens,
                                          scale=attn.scale, relative_bias=relative_bias)
        return ctx.reshape(1, T, -1)
