"""Continuous batching: requests join and leave a running batch between steps (iteration-level scheduling).

:class:`GenerationEngine` wraps any trifuse model that generates (GPT-2, T5 v1.0 / v1.1, BART): each
:meth:`~GenerationEngine.step` runs **one** forward over every running sequence — chunks of new
prompts (prefill) together with one token of each sequence already decoding — under a token budget,
then picks each finished-prefill sequence's next token with its own options. The KV cache is paged
(:mod:`engine.paged`): fixed-size blocks from one pool, per-sequence block tables. When the pool
runs out, the newest running sequence is preempted, its blocks freed, and it is recomputed from its
prompt and the tokens it already has once blocks free up: memory is bounded, and no token changes.

The scheduler follows vLLM V1's (``vllm/v1/core/sched/scheduler.py``): running sequences first, in
the order they were admitted, each taking what it still has to compute (``max_batch_tokens`` caps
the step; a long prompt is cut into chunks across steps); then waiting ones, while there is budget,
a free ``max_num_seqs`` slot and blocks. An encoder-decoder runs its encoder once when a request is
admitted and writes every decoder layer's cross-attention keys/values into pool blocks of their own.

Every request's options are ``model.generate``'s keyword options (:data:`engine.decoding.OPTIONS`),
checked when it is submitted, plus ``seed`` (its own sampling generator, so a sampled request
gives the same tokens every time, whatever runs beside it). Its result is the ids
``model.generate`` adds after the prompt (after the decoder start token for an encoder-decoder),
EOS included when generated. The logits processors are :mod:`engine.generation`'s. Beam search
(``num_beams > 1``) runs outside the batch, through ``model.generate``, on the engine's thread.
:class:`EngineBackedModel` puts a model's ``generate`` / ``stream`` on an engine (for pipelines).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Deque, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from . import generation as gen
from .paged import BlockTable, PackedStep, PagedKV


class EngineClosed(RuntimeError):
    """The engine was closed before the request finished."""


#: Bytes of KV pool when ``kv_cache_bytes`` is not given: room for every ``max_num_seqs`` sequence at
#: ``_DEFAULT_TOKENS`` tokens, but never more than this.
_DEFAULT_POOL_CAP = 1 << 30
_DEFAULT_TOKENS = 1024


@dataclass(eq=False)
class _Request:
    id: int
    cfg: gen.GenerationConfig
    encoder_ids: Optional[Tensor]  # [1, L] an encoder-decoder's input, until it is encoded
    tokens: List[int]  # the decoder's sequence: a prompt (or the start token), then what was generated
    prefix: int  # len(tokens) before generation
    generator: Optional[torch.Generator]
    future: Future
    on_token: Optional[Callable[[int], None]] = None
    table: BlockTable = None
    cross: Optional[BlockTable] = None
    enc_len: int = 0
    computed: int = 0  # tokens whose keys/values are in the pool
    cancelled: bool = False
    beam_kwargs: Optional[dict] = None  # num_beams > 1: run by model.generate instead
    input_ids: Optional[Tensor] = None

    @property
    def generated(self) -> List[int]:
        return self.tokens[self.prefix:]


def _plain_greedy(cfg: gen.GenerationConfig, cur_len: int) -> bool:
    """Whether no processor acts at this length, so the next token is the argmax (batched)."""
    return (not cfg.do_sample and cfg.repetition_penalty == 1.0 and not cfg.no_repeat_ngram_size
            and (cur_len >= cfg.min_length or not cfg.eos_token_id)
            and not (cfg.forced_bos_token_id is not None and cur_len == 1)
            and not (cfg.forced_eos_token_id and cfg.max_length is not None and cur_len == cfg.max_length - 1))


class GenerationEngine:
    """Continuous batching over a paged KV cache for a model from :func:`trifuse.from_pretrained`.

    ``max_num_seqs``: sequences in a step at most. ``max_batch_tokens``: tokens in a step at most (prefill
    chunks plus one per decoding sequence). ``kv_cache_bytes``: the KV pool (keys and values of every
    decoder layer; for an encoder-decoder also each running request's cross-attention keys/values);
    default: ``max_num_seqs`` sequences of 1024 tokens, at most 1 GiB. ``block_size``: tokens per block.
    ``background``: run steps on a thread of the engine's own (default); ``False`` leaves them to
    :meth:`step` (deterministic, for tests and custom loops).

    A context manager: ``with GenerationEngine(model) as engine: engine.generate(prompts)``.
    """

    def __init__(self, model, *, max_num_seqs: int = 64, max_batch_tokens: int = 512,
                 kv_cache_bytes: Optional[int] = None, block_size: int = 16, background: bool = True):
        if not callable(getattr(model, "packed_logits", None)) or not callable(getattr(model, "prepare", None)):
            raise TypeError(f"{type(model).__name__} cannot run in a GenerationEngine: it needs packed_logits "
                            "and prepare (trifuse's GPT-2, T5 and BART have them)")
        if not getattr(model, "has_lm_head", True):
            raise ValueError("the model has no LM head; load it for generation (causal-lm / text2text-generation)")
        for name, v in (("max_num_seqs", max_num_seqs), ("max_batch_tokens", max_batch_tokens),
                        ("block_size", block_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.model = model
        self.max_num_seqs, self.max_batch_tokens, self.block_size = max_num_seqs, max_batch_tokens, block_size
        self.encoder_decoder = bool(model.is_encoder_decoder)
        layers, heads, head_dim = model.cache_shape()
        per_block = PagedKV.block_bytes(layers, heads, head_dim, block_size, model.dtype)
        if kv_cache_bytes is None:
            kv_cache_bytes = min(_DEFAULT_POOL_CAP, max_num_seqs * -(-_DEFAULT_TOKENS // block_size) * per_block)
        if isinstance(kv_cache_bytes, bool) or not isinstance(kv_cache_bytes, int) or kv_cache_bytes < per_block:
            raise ValueError(f"kv_cache_bytes must be an int of at least one block ({per_block} bytes: "
                             f"{layers} layers x keys and values x {block_size} tokens x {heads} heads x "
                             f"{head_dim}), got {kv_cache_bytes!r}")
        self.kv = PagedKV(layers, heads, head_dim, kv_cache_bytes // per_block, block_size, model.dtype,
                          model.device)
        self.waiting: Deque[_Request] = collections.deque()
        self.running: List[_Request] = []
        self._incoming: List[_Request] = []
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self.counters = collections.Counter()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="trifuse-generation-engine", daemon=True)
            self._thread.start()

    # -- submitting -----------------------------------------------------------

    def submit(self, input_ids, *, seed: Optional[int] = None, **generate_kwargs) -> Future:
        """Queue one prompt (a list of token ids or a 1-D tensor); a :class:`~concurrent.futures.Future`
        of the generated ids (``list[int]``). Bad ids or options raise here, before any work.
        ``future.cancel()`` frees the sequence at the next step."""
        return self._submit(input_ids, seed, generate_kwargs).future

    def stream(self, input_ids, *, seed: Optional[int] = None, **generate_kwargs) -> Iterator[int]:
        """Like :meth:`submit`, yielding each id as it is decided. Closing the iterator early
        (``break``, a client gone) cancels the request."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        req = self._submit(input_ids, seed, generate_kwargs, on_token=q.put, done=lambda f: q.put(None))
        return self._drain(req, q)

    def _drain(self, req: _Request, q: queue.SimpleQueue) -> Iterator[int]:
        try:
            while True:
                while self._thread is None and q.empty():  # no loop of its own: step here
                    self.step()
                tok = q.get()
                if tok is None:
                    break
                yield tok
            req.future.result()  # raises the request's error, if it failed
        finally:
            if not req.future.done():
                self.cancel(req)

    def generate(self, prompts: Sequence, **generate_kwargs) -> List[List[int]]:
        """Every prompt's generated ids, in order (an offline batch, as vLLM's ``LLM.generate``)."""
        futures = [self.submit(p, **generate_kwargs) for p in prompts]
        if self._thread is None:
            while any(not f.done() for f in futures):
                if not self.step() and not self._incoming and any(not f.done() for f in futures):
                    raise RuntimeError("the engine has nothing it can run but requests are unfinished")
        return [f.result() for f in futures]

    async def agenerate(self, input_ids, *, seed: Optional[int] = None, **generate_kwargs) -> List[int]:
        """:meth:`submit` for asyncio: awaits the generated ids; a cancelled task cancels the request."""
        fut = self.submit(input_ids, seed=seed, **generate_kwargs)
        try:
            return await asyncio.wrap_future(fut)
        finally:
            fut.cancel()  # a no-op once done

    async def astream(self, input_ids, *, seed: Optional[int] = None, **generate_kwargs) -> AsyncIterator[int]:
        """:meth:`stream` for asyncio: an async iterator over the ids as they are decided."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = self._submit(input_ids, seed, generate_kwargs,
                           on_token=lambda t: loop.call_soon_threadsafe(q.put_nowait, t),
                           done=lambda f: loop.call_soon_threadsafe(q.put_nowait, None))
        try:
            while True:
                tok = await q.get()
                if tok is None:
                    break
                yield tok
            req.future.result()
        finally:
            if not req.future.done():
                self.cancel(req)

    def cancel(self, request) -> None:
        """Cancel a request (its future, or the object :meth:`stream` used): freed at the next step."""
        if isinstance(request, Future):
            request.cancel()
            return
        request.cancelled = True
        request.future.cancel()
        with self._cond:
            self._cond.notify()

    def _submit(self, input_ids, seed, kwargs, on_token=None, done=None) -> _Request:
        if self._closed:
            raise EngineClosed("the GenerationEngine is closed")
        ids = self._as_ids(input_ids)
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"seed must be an int, got {seed!r}")
            if kwargs.get("generator") is not None:
                raise ValueError("pass seed or generator, not both")
            kwargs = dict(kwargs, generator=torch.Generator(device=self.model.device).manual_seed(seed))
        if kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("a request returns one sequence: submit one request per sequence (each with its own "
                             "seed) instead of num_return_sequences")
        o, cfg, start = self.model.prepare(ids, **kwargs)
        req = _Request(id=next(self._ids), cfg=cfg, encoder_ids=ids if self.encoder_decoder else None,
                       tokens=[start] if self.encoder_decoder else ids[0].tolist(), prefix=0, generator=o.generator,
                       future=Future(), on_token=on_token, table=BlockTable(self.block_size), input_ids=ids)
        req.prefix = len(req.tokens)
        if o.num_beams != 1:
            req.beam_kwargs = kwargs
        else:
            if cfg.do_sample and req.generator is None:  # its own draws, seeded from torch's global RNG
                req.generator = torch.Generator(device=self.model.device).manual_seed(
                    int(torch.randint(2 ** 62, ())))
            need = self._blocks(req.prefix + 1) + (self._blocks(ids.shape[1]) if self.encoder_decoder else 0)
            if need > self.kv.pool.num_blocks:
                raise ValueError(f"this request needs {need} KV blocks to start but the pool holds "
                                 f"{self.kv.pool.num_blocks}; raise kv_cache_bytes")
        if done is not None:
            req.future.add_done_callback(done)
        with self._cond:
            if self._closed:
                raise EngineClosed("the GenerationEngine is closed")
            self._incoming.append(req)
            self._cond.notify()
        return req

    def _as_ids(self, input_ids) -> Tensor:
        if isinstance(input_ids, Tensor):
            if input_ids.dim() == 2 and input_ids.shape[0] == 1:
                input_ids = input_ids[0]
            if input_ids.dim() != 1 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
                raise ValueError(f"input_ids must be one prompt: a list of ints or a 1-D integer tensor, got "
                                 f"{input_ids.dtype} {tuple(input_ids.shape)}")
            ids = input_ids.to(torch.long)
        else:
            if (not isinstance(input_ids, (list, tuple)) or not input_ids
                    or not all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids)):
                raise ValueError("input_ids must be one prompt: a non-empty list of ints or a 1-D integer tensor")
            ids = torch.tensor(input_ids, dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("input_ids is empty")
        return ids[None].to(self.model.device)

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- the loop -------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._incoming and not self.waiting and not self.running:
                        self._cond.wait()
                    if self._closed:
                        return
                try:
                    if not self.step():
                        with self._cond:  # nothing could run (requests wait for blocks): do not spin
                            self._cond.wait(0.01)
                except Exception as exc:  # a bug or a broken model: fail what is in flight, keep serving
                    for req in list(self.running) + list(self.waiting):
                        self._release(req)
                        self._finish(req, exc)
                    self.running.clear()
                    self.waiting.clear()

    def step(self) -> int:
        """Admit new requests, free cancelled ones, schedule and run one forward, pick the tokens.
        Returns the number of tokens the forward ran (0: nothing to do)."""
        with torch.inference_mode():
            self._admit_incoming()
            scheduled = self._schedule()
            if not scheduled:
                return 0
            self._run(scheduled)
            return sum(n for _, n in scheduled)

    def _admit_incoming(self) -> None:
        with self._cond:
            new, self._incoming = self._incoming, []
        for req in new:
            if req.beam_kwargs is not None:  # beam search: outside the batch, with generate's results
                try:
                    out = self.model.generate(req.input_ids, **req.beam_kwargs)[0].tolist()
                    self._finish(req, None, out[req.prefix:])
                except Exception as exc:
                    self._finish(req, exc)
            else:
                self.waiting.append(req)
        for req in [r for r in self.running if self._gone(r)]:
            self._release(req)
            self.running.remove(req)
            self.counters["cancelled"] += 1
        for req in [r for r in self.waiting if self._gone(r)]:
            self.waiting.remove(req)
            self._release(req)
            self.counters["cancelled"] += 1

    @staticmethod
    def _gone(req: _Request) -> bool:
        return req.cancelled or req.future.cancelled()

    def _schedule(self) -> list:
        """``[(request, tokens to compute this step)]``: running first, then waiting (vLLM V1's order)."""
        budget, scheduled, preempted = self.max_batch_tokens, [], False
        pool = self.kv.pool
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(len(req.tokens) - req.computed, budget)
            need = req.table.blocks_for(req.computed + n)
            while need > pool.free and self.running[-1] is not req:
                self._preempt(self.running.pop())  # the newest goes back to the queue
                preempted = True
            if need > pool.free and i > 0:  # the newest itself: back to the queue
                self._preempt(self.running.pop())
                preempted = True
                break
            if need > pool.free:  # alone and still too big: the pool cannot hold this sequence
                self.running.pop()
                self._release(req)
                self._finish(req, RuntimeError(
                    f"the sequence grew to {req.computed + n} tokens, more than the KV pool holds "
                    f"({pool.num_blocks} blocks of {self.block_size}); raise kv_cache_bytes"))
                break
            req.table.blocks += pool.allocate(need)
            scheduled.append((req, n))
            budget -= n
            i += 1
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(len(req.tokens) - req.computed, budget)
            enc = self._blocks(req.encoder_ids.shape[1]) if self.encoder_decoder else 0
            need = req.table.blocks_for(n) + enc
            if need > pool.free:
                break
            self.waiting.popleft()
            req.table.blocks += pool.allocate(need - enc)
            if self.encoder_decoder:
                self._encode(req, pool.allocate(enc))
            self.running.append(req)
            scheduled.append((req, n))
            budget -= n
        return scheduled

    def _encode(self, req: _Request, blocks: List[int]) -> None:
        """Run the encoder once and write every decoder layer's cross keys/values into ``blocks``."""
        req.cross = BlockTable(self.block_size, blocks)
        req.enc_len = req.encoder_ids.shape[1]
        for layer, (k, v) in enumerate(self.model.cross_attention_kv(req.encoder_ids)):
            self.kv.write_sequence(layer, req.cross, k, v)
        self.counters["encoded"] += 1

    def _preempt(self, req: _Request) -> None:
        """Free a running sequence's blocks; it is recomputed (prompt + tokens so far) when readmitted."""
        self._release(req)
        req.computed = 0
        self.waiting.appendleft(req)
        self.counters["preemptions"] += 1

    def _release(self, req: _Request) -> None:
        self.kv.pool.release(req.table.blocks)
        req.table.blocks = []
        if req.cross is not None:
            self.kv.pool.release(req.cross.blocks)
            req.cross = None

    def _run(self, scheduled: list) -> None:
        ids, positions, token_seq, rows, sampled = [], [], [], [], []
        for s, (req, n) in enumerate(scheduled):
            start = req.computed
            ids += req.tokens[start:start + n]
            positions += range(start, start + n)
            token_seq += [s] * n
            if start + n == len(req.tokens):  # its prompt (or recomputation) is done: a token is due
                rows.append(len(ids) - 1)
                sampled.append(req)
        reqs = [r for r, _ in scheduled]
        step = PackedStep(self.kv, [r.table for r in reqs], token_seq, positions,
                          [r.cross for r in reqs] if self.encoder_decoder else None,
                          [r.enc_len for r in reqs] if self.encoder_decoder else None)
        dev = self.model.device
        logits = None
        if rows:
            logits = self.model.packed_logits(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                                              step, torch.tensor(rows, device=dev))
        else:  # every sequence is mid-prompt: run the forward for its keys, no logits wanted
            self.model.packed_logits(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), step,
                                     torch.tensor([len(ids) - 1], device=dev))
        for req, n in scheduled:
            req.computed += n
        self.counters["steps"] += 1
        self.counters["step_tokens"] += len(ids)
        if logits is not None:
            self._choose(sampled, logits)

    def _choose(self, reqs: List[_Request], logits: Tensor) -> None:
        scores = logits.float()
        plain = [i for i, r in enumerate(reqs) if _plain_greedy(r.cfg, len(r.tokens))]
        tokens = [0] * len(reqs)
        if plain:  # one argmax for every row no processor touches
            best = scores.argmax(-1).tolist()
            for i in plain:
                tokens[i] = best[i]
        plain = set(plain)
        for i, req in enumerate(reqs):
            if i in plain:
                continue
            cfg = req.cfg
            row = gen.process_logits(scores[i:i + 1], torch.tensor([req.tokens], device=scores.device), cfg)
            tokens[i] = int(gen.select_tokens(row, cfg.do_sample, req.generator))
        for req, tok in zip(reqs, tokens):
            if self._gone(req):
                continue  # freed at the next step
            req.tokens.append(tok)
            self.counters["generated"] += 1
            if req.on_token is not None:
                req.on_token(tok)
            if tok in req.cfg.eos_token_id or len(req.generated) >= req.cfg.max_new_tokens:
                self.running.remove(req)
                self._release(req)
                self._finish(req, None, req.generated)

    def _finish(self, req: _Request, exc: Optional[BaseException], result=None) -> None:
        fut = req.future
        if not fut.set_running_or_notify_cancel():
            return  # cancelled meanwhile
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(list(result))
        self.counters["finished"] += 1

    # -- state ----------------------------------------------------------------

    def stats(self) -> dict:
        """Running and waiting sequences, KV-pool use, and counters (steps, tokens, preemptions, requests
        cancelled before they finished)."""
        pool = self.kv.pool
        return {"running": len(self.running), "waiting": len(self.waiting) + len(self._incoming),
                "kv_blocks_used": pool.used, "kv_blocks_total": pool.num_blocks, "block_size": self.block_size,
                "kv_cache_bytes": self.kv.keys.numel() * self.kv.keys.element_size() * 2,
                **{k: self.counters[k] for k in ("steps", "step_tokens", "generated", "finished", "preemptions",
                                                 "encoded", "cancelled")}}

    def close(self) -> None:
        """Stop the loop; every unfinished request fails with :class:`EngineClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._cond:
            pending, self._incoming = self._incoming, []
        for req in list(self.running) + list(self.waiting) + pending:
            self._release(req)
            self._finish(req, EngineClosed("the GenerationEngine was closed before this request finished"))
        self.running.clear()
        self.waiting.clear()

    def __enter__(self) -> "GenerationEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()



class CancelScope:
    """The engine requests a piece of work submits through :class:`EngineBackedModel` while the scope is
    current (:data:`CANCEL_SCOPE`, a context variable: ``asyncio.to_thread`` carries it into the thread),
    so that whoever started the work can cancel them all from another thread (a server whose client
    went away). Requests submitted after :meth:`cancel` are cancelled at once."""

    def __init__(self):
        self._futures: List[Future] = []
        self._lock = threading.Lock()
        self.cancelled = False

    def add(self, future: Future) -> None:
        with self._lock:
            if not self.cancelled:
                self._futures.append(future)
                return
        future.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            futures, self._futures = self._futures, []
        for f in futures:
            f.cancel()


#: the current :class:`CancelScope` (None: requests are not tracked)
CANCEL_SCOPE: contextvars.ContextVar = contextvars.ContextVar("trifuse_cancel_scope", default=None)


class EngineBackedModel:
    """A model whose ``generate`` and ``stream`` run through a :class:`GenerationEngine` (everything else is
    the model's): what ``trifuse serve`` hands a generation pipeline, so that concurrent pipeline calls
    share the engine's steps instead of each decoding its own static batch.

    ``generate(input_ids, attention_mask, **options)`` submits each row (its padding dropped by the mask)
    and returns what ``model.generate`` returns: the ids as given, then each row's new tokens, padded with
    ``pad_token_id``. Beam search and ``num_return_sequences`` > 1 go to ``model.generate`` directly.
    ``stream`` takes one row and yields ``[1]`` tensors, as ``model.stream``.
    """

    def __init__(self, model, engine: GenerationEngine):
        self._model, self._engine = model, engine

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _rows(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> List[Tensor]:
        if attention_mask is None:
            return list(input_ids)
        return [ids[m.ne(0)] for ids, m in zip(input_ids, attention_mask)]

    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        if (kwargs.get("num_beams") or 1) != 1 or (kwargs.get("num_return_sequences") or 1) != 1:
            return self._model.generate(input_ids, attention_mask, **kwargs)
        rows = self._rows(input_ids, attention_mask)
        futures = [self._engine.submit(r, **kwargs) for r in rows]
        scope = CANCEL_SCOPE.get()
        if scope is not None:
            for f in futures:
                scope.add(f)
        try:
            outs = [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()  # a no-op once done; frees the others if one failed
        _, cfg, start = self._model.prepare(rows[0][None], **kwargs)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        width = max(len(o) for o in outs)
        new = torch.tensor([o + [pad] * (width - len(o)) for o in outs], dtype=torch.long, device=input_ids.device)
        if self._model.is_encoder_decoder:
            head = torch.full((len(rows), 1), start, dtype=torch.long, device=input_ids.device)
        else:
            head = input_ids
        return torch.cat([head, new.to(head.dtype)], dim=1) if width else head

    def stream(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Iterator[Tensor]:
        if input_ids.shape[0] != 1:
            return self._model.stream(input_ids, attention_mask, **kwargs)
        tokens = self._engine.stream(self._rows(input_ids, attention_mask)[0], **kwargs)
        return (torch.tensor([t], device=input_ids.device) for t in tokens)
