"""CUDA graphs: encoders captured per shape bucket, decoders per cache-length bucket.

At small batch a transformer forward is dominated by kernel launch overhead, not
by the kernels. A CUDA graph replays the whole forward as one launch. Graphs fix
shapes, so inputs are padded up to the nearest bucket (batch, and sequence for
text models) with masked padding, run through the bucket's graph, and the
outputs are cut back to the caller's shape. Padded keys are masked and padded
rows see no key at all, so the real positions compute exactly what an unpadded
call computes.

``BucketedModel`` holds the padding logic and runs eagerly (any device; this is
what the CPU tests exercise); ``CUDAGraphModel`` adds capture and replay.

    graphed = engine.graphs.CUDAGraphModel(model, batch_sizes=(1, 8, 32), seq_lengths=(128, 384))
    out = graphed(input_ids, attention_mask=mask)    # same fields as model(...)

Decoding (GPT-2, T5) is where launch overhead hurts most: one token per row per
step. ``StaticDecoder`` / ``CUDAGraphDecoder`` run each step on static buffers
(the cache slot lives in a device tensor, attention covers a bucket of cache
slots with the unwritten ones masked), so one graph per (batch, bucket) serves
every step; ``generate`` takes the model's own arguments and returns the same.

    dec = engine.graphs.CUDAGraphDecoder(gpt2)
    out = dec.generate(input_ids, attention_mask=mask, max_new_tokens=64)   # == gpt2.generate(...)
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .decoding import Decoding, Prefill

# Output fields that carry a sequence axis (dim 1) for text models.
_SEQ_FIELDS = ("last_hidden_state", "start_logits", "end_logits")
_TOKEN_TASKS = ("token-classification", "masked-lm")


class BucketedModel:
    """Run an encoder (BERT family or ViT) on inputs padded up to fixed shape buckets."""

    def __init__(self, model: nn.Module, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
                 seq_lengths: Sequence[int] = (16, 32, 64, 128, 256, 384, 512), *, validate: bool = True):
        self.model = model
        # Token-id range checks read values back to the host (a sync per call); at batch 1 that
        # is a visible share of the latency graphs exist to cut. Shapes are always checked.
        self.validate = validate
        self.vision = hasattr(model.config, "image_size")
        self.batch_sizes = sorted(set(batch_sizes))
        max_len = getattr(model.config, "max_length", None)
        self.seq_lengths = sorted({n for n in seq_lengths if max_len is None or n <= max_len})
        if not self.batch_sizes or (not self.vision and not self.seq_lengths):
            raise ValueError("need at least one batch size and one sequence length that fits the model")

    @staticmethod
    def _bucket(n: int, sizes: Sequence[int]) -> Optional[int]:
        i = bisect.bisect_left(sizes, n)
        return sizes[i] if i < len(sizes) else None

    def bucket_of(self, batch: int, seq: int = 0) -> Optional[Tuple[int, int]]:
        """The smallest bucket holding ``batch`` x ``seq``, or None (then the call runs unpadded)."""
        b = self._bucket(batch, self.batch_sizes)
        n = 0 if self.vision else self._bucket(seq, self.seq_lengths)
        return None if b is None or n is None else (b, n)

    def _pad_value(self, name: str) -> int:
        return getattr(self.model.config, "pad_token_id", 0) or 0 if name == "input_ids" else 0

    def _pad(self, inputs: Dict[str, Tensor], key: Tuple[int, int]) -> Dict[str, Tensor]:
        b, n = key
        out = {}
        for name, t in inputs.items():
            shape = (b,) + t.shape[1:] if self.vision else (b, n)
            padded = t.new_full(shape, self._pad_value(name))
            padded[tuple(slice(0, s) for s in t.shape)] = t
            out[name] = padded
        return out

    def _unpad(self, out, batch: int, seq: int):
        def cut(name, t):
            if t is None:
                return None
            if isinstance(t, tuple):
                return tuple(cut("hidden", x) for x in t)
            t = t[:batch]
            has_seq = name in _SEQ_FIELDS or name == "hidden" or (
                name == "logits" and getattr(self.model, "task", None) in _TOKEN_TASKS)
            return t[:, :seq] if has_seq and not self.vision else t

        return dataclasses.replace(out, **{f.name: cut(f.name, getattr(out, f.name))
                                           for f in dataclasses.fields(out)})

    def _inputs(self, args, kwargs) -> Dict[str, Tensor]:
        names = ("pixel_values",) if self.vision else ("input_ids", "attention_mask", "token_type_ids")
        inputs = dict(zip(names, args), **kwargs)
        unknown = set(inputs) - set(names)
        if unknown:
            raise ValueError(f"bucketed runs take only {', '.join(names)}; got {', '.join(sorted(unknown))}")
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if not self.vision and "attention_mask" not in inputs:
            # Padding needs a mask: an unpadded call means "attend to everything".
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs

    def _run(self, key, padded: Dict[str, Tensor]):
        with torch.no_grad():
            return self.model(**padded)

    def __call__(self, *args, **kwargs):
        inputs = self._inputs(args, kwargs)
        first = inputs["pixel_values" if self.vision else "input_ids"]
        batch, seq = first.shape[0], (0 if self.vision else first.shape[1])
        key = self.bucket_of(batch, seq)
        if key is None:  # larger than every bucket: no graph, run as is
            with torch.no_grad():
                return self.model(**inputs)
        if not self.vision and self.validate:
            self.model._check(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"), None)
        return self._unpad(self._run(key, self._pad(inputs, key)), batch, seq)


class CUDAGraphModel(BucketedModel):
    """``BucketedModel`` whose buckets are CUDA graphs, captured on first use.

    Capture warms the bucket up on a side stream first (Triton compiles and
    autotunes there), then records one forward into a graph that shares a memory
    pool with the other buckets. Each call copies the padded inputs into the
    bucket's static buffers, replays, and returns copies of the outputs (pass
    ``copy_outputs=False`` for views that the next call overwrites). ``validate=False``
    skips the token-id range check, the one host sync left per call.
    """

    def __init__(self, model: nn.Module, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
                 seq_lengths: Sequence[int] = (16, 32, 64, 128, 256, 384, 512), *, warmup: int = 3,
                 copy_outputs: bool = True, validate: bool = True):
        super().__init__(model, batch_sizes, seq_lengths, validate=validate)
        param = next(model.parameters())
        if param.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {param.device}")
        self.warmup, self.copy_outputs = warmup, copy_outputs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: Dict[Tuple[int, int], Tuple[torch.cuda.CUDAGraph, Dict[str, Tensor], object]] = {}

    def capture(self, key: Tuple[int, int], example: Dict[str, Tensor]) -> None:
        """Capture the graph of one bucket (``example``: padded inputs of that shape)."""
        static = {k: v.clone() for k, v in example.items()}
        if "attention_mask" in static:
            static["attention_mask"].fill_(1)  # warm up on the ordinary path, not on all-masked rows
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                self.model(**static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            out = self.model(**static)
        self.graphs[key] = (graph, static, out)

    def _run(self, key, padded: Dict[str, Tensor]):
        if key not in self.graphs:
            self.capture(key, padded)
        graph, static, out = self.graphs[key]
        for name, t in padded.items():
            static[name].copy_(t)
        graph.replay()
        if not self.copy_outputs:
            return out
        return dataclasses.replace(out, **{f.name: _clone(getattr(out, f.name)) for f in dataclasses.fields(out)})


def _clone(t):
    if t is None:
        return None
    return tuple(x.clone() for x in t) if isinstance(t, tuple) else t.clone()


# ----------------------------------------------------------------------------
# Decoders (GPT-2, T5): the decoding step under CUDA graphs.


def _powers_of_two_up_to(limit: int, lowest: int = 32) -> Tuple[int, ...]:
    sizes, n = [], lowest
    while n < limit:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (limit,)


@dataclasses.dataclass
class _DecodeState:
    """The static buffers of one batch shape: what a captured step reads and writes."""

    cache: object  # the model's static cache (new_static_cache), fixed capacity
    tokens: Tensor  # [rows, 1] the token fed at the next step
    slot: Tensor  # [1] the cache slot it is written to
    positions: Tensor  # [rows, 1] its position id (models with learned positions read it)
    graphs: dict = dataclasses.field(default_factory=dict)  # kv bucket -> (graph, logits)


class StaticDecoder:
    """A decoder's ``generate`` / ``stream`` whose per-token step runs on static buffers, bucketed by
    cache length.

    Any model with :mod:`engine.decoding`'s contract works (GPT-2, T5, ...). The prompt
    (a decoder-only model's prefill; an encoder-decoder's encoder and first decoder step)
    runs eagerly; every later step is ``model.decode_step``: the new token is written at a
    cache slot held in a device tensor, and attention reads the first ``kv`` cache slots,
    ``kv`` being the smallest of ``kv_buckets`` that holds the sequence so far, with the
    slots not yet written masked. Shapes then depend only on (rows, bucket), so each pair is
    one graph in :class:`CUDAGraphDecoder`; this class runs the same steps eagerly (any
    device; what the CPU tests check against ``model.generate``).

    ``generate`` / ``stream`` take the model's own options (``engine.decoding.OPTIONS``,
    the checkpoint's generation config as defaults) and return what the model's return.
    Buffers are kept per batch shape (encoder-decoders: also per ``encoder_lengths``
    bucket the prompt is padded to), sized for ``max_len`` positions (decoder-only: prompt
    + new tokens, default the position table; encoder-decoders: decoder positions, start
    token included, default the position table or 512).
    """

    def __init__(self, model: nn.Module, max_len: Optional[int] = None, kv_buckets: Optional[Sequence[int]] = None,
                 encoder_lengths: Sequence[int] = (16, 32, 64, 128, 256, 512)):
        if not (isinstance(model, Decoding) and hasattr(model, "decode_step") and hasattr(model, "new_static_cache")):
            raise TypeError(f"static decoding needs a trifuse decoder (GPT-2, T5, ...), not {type(model).__name__}")
        self.model = model
        self.seq2seq = model.is_encoder_decoder
        limit = model.max_decoder_positions
        self.max_len = (limit or 512) if max_len is None else max_len
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 2 or (
                limit is not None and self.max_len > limit):
            raise ValueError(f"max_len must be an int in [2, {limit or 'inf'}], got {self.max_len!r}")
        buckets = _powers_of_two_up_to(self.max_len) if kv_buckets is None else kv_buckets
        self.kv_buckets = sorted({int(n) for n in buckets if 0 < n < self.max_len} | {self.max_len})
        self.encoder_lengths = sorted(set(encoder_lengths))
        self.states: Dict[tuple, _DecodeState] = {}

    # -- the step -------------------------------------------------------------

    def _step(self, state: _DecodeState, kv: int) -> Tensor:
        """Run one step for the bucket ``kv``; the next-token logits ``[rows, V]``."""
        return self._decode_step(state, kv)

    def _decode_step(self, state: _DecodeState, kv: int) -> Tensor:
        with torch.no_grad():
            return self.model.decode_step(state.tokens, state.positions, state.slot, state.cache, kv)

    def _stepper(self, state: _DecodeState, length: int):
        """``step(tokens, beam_idx=None) -> logits`` continuing a cache that holds ``length`` positions."""
        cache = state.cache
        cache.mask[:, length:] = False  # the slots not yet written
        cache.length = length
        state.slot.fill_(length)

        def step(tokens: Tensor, beam_idx: Optional[Tensor] = None) -> Tensor:
            if cache.length >= self.max_len:
                raise ValueError(f"decoding past max_len={self.max_len}; build the decoder with a larger max_len")
            if beam_idx is not None:
                cache.reorder(beam_idx)
            state.tokens.copy_(tokens.view(-1, 1))
            kv = self.kv_buckets[bisect.bisect_left(self.kv_buckets, cache.length + 1)]
            logits = self._step(state, kv)
            cache.length += 1
            return logits.clone()  # the graph overwrites its output at the next step

        return step

    # -- buffers --------------------------------------------------------------

    def _state(self, key: tuple, rows: int, encoder_length: int) -> _DecodeState:
        state = self.states.get(key)
        if state is None:
            m, dev = self.model, self.model.device
            cache = m.new_static_cache(rows, self.max_len, encoder_length=encoder_length)
            zeros = lambda n: torch.zeros(n, 1, dtype=torch.long, device=dev)  # noqa: E731
            state = _DecodeState(cache, zeros(rows), torch.zeros(1, dtype=torch.long, device=dev), zeros(rows))
            self.states[key] = state
        return state

    def _session(self, input_ids: Tensor, mask: Tensor, *, num_beams: int, max_new_tokens: int,
                 start_token: Optional[int] = None) -> Prefill:
        """``model.start_decoding`` on this shape's static buffers, stepping through ``decode_step``."""
        b, n = input_ids.shape
        counted = 1 if self.seq2seq else n
        if counted + max_new_tokens > self.max_len:
            what = "the decoder start token" if self.seq2seq else f"prompt length {n}"
            raise ValueError(f"{what} + max_new_tokens {max_new_tokens} exceeds this decoder's "
                             f"max_len={self.max_len}")
        enc_len = 0
        if self.seq2seq:
            i = bisect.bisect_left(self.encoder_lengths, n)
            enc_len = self.encoder_lengths[i] if i < len(self.encoder_lengths) else n  # longer: its own buffers
        rows = b * num_beams
        state = self._state((rows, b, enc_len), rows, enc_len)
        pre = self.model.start_decoding(input_ids, mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                        start_token=start_token, cache=state.cache)
        if pre.positions is not None:
            state.positions.copy_(pre.positions)
        pre.step = self._stepper(state, state.cache.length)
        return pre

    # -- the public calls ----------------------------------------------------

    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        """``model.generate`` with the same arguments and result, decoded on static buffers."""
        return self.model.generate_with(self._session, input_ids, attention_mask, **kwargs)

    def stream(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        """``model.stream`` (greedy or sampling): an iterator over each step's tokens ``[B]``."""
        return self.model.stream_with(self._session, input_ids, attention_mask, **kwargs)


class CUDAGraphDecoder(StaticDecoder):
    """:class:`StaticDecoder` whose steps are CUDA graphs: one per (batch shape, cache bucket).

    A bucket's graph is captured the first time a step needs it: a few eager warm-up
    steps on a side stream (Triton compiles and autotunes there; the slot and
    positions are restored afterwards, and what they wrote is rewritten by the real
    step), then one captured ``decode_step`` sharing a memory pool with the other
    graphs. Each later step copies the new tokens in and replays.

        dec = engine.graphs.CUDAGraphDecoder(model)           # GPT-2 or T5, on a GPU
        out = dec.generate(input_ids, attention_mask=mask, max_new_tokens=64)   # == model.generate(...)
    """

    def __init__(self, model: nn.Module, max_len: Optional[int] = None, kv_buckets: Optional[Sequence[int]] = None,
                 encoder_lengths: Sequence[int] = (16, 32, 64, 128, 256, 512), *, warmup: int = 2):
        super().__init__(model, max_len, kv_buckets, encoder_lengths)
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {model.device}")
        self.warmup = warmup
        self.pool = torch.cuda.graph_pool_handle()

    def _capture(self, state: _DecodeState, kv: int):
        advanced = [t for t in (state.slot, state.positions) if t is not None]  # what a step moves on
        saved = [t.clone() for t in advanced]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._decode_step(state, kv)
                for t, s in zip(advanced, saved):
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._decode_step(state, kv)
        return graph, logits

    def _step(self, state: _DecodeState, kv: int) -> Tensor:
        if kv not in state.graphs:
            state.graphs[kv] = self._capture(state, kv)
        graph, logits = state.graphs[kv]
        graph.replay()
        return logits
