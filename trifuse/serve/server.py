"""One replica's work: a ``trifuse.pipeline`` behind a batching front, without Ray.

Ray Serve's ``@serve.batch`` (:mod:`trifuse.serve.app`) hands :meth:`PipelineServer.run_batch`
the requests it gathered; requests with the same parameters share one pipeline call. Each
request's failure stays its own: when a shared call fails, for whatever reason (a bad
input, the allocator, a tokenizer's panic, which is a ``BaseException``), each request of it
runs alone, and only the ones that fail again are answered with an error (4xx for input the
model cannot take, 500 for anything else), the others with their results. Groups whose
clients have all gone are skipped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import queue
import threading
import time
from typing import Any, Optional

from trifuse.engine.pipelines import jsonable

from .requests import BadRequest, Limits, check_inputs, check_parameters, image_from_request, one_line

#: tasks ``engine=`` serves (translation_xx_to_yy too)
GENERATION_TASKS = ("text-generation", "text2text-generation", "summarization", "translation")
#: exceptions of a pipeline call that mean "this input or option is wrong": 400 (an OSError: an
#: input that cannot be read; the server itself opens no file a request names)
_INPUT_ERRORS = (TypeError, ValueError, KeyError, IndexError, OSError)


class ServerError(Exception):
    """A request that failed inside the model for a reason other than its input: HTTP 500, for it alone."""

    status = 500


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _as_error(e: BaseException) -> Exception:
    """What a request that raised ``e`` is answered with."""
    if isinstance(e, (BadRequest, ServerError)):
        return e
    if isinstance(e, _INPUT_ERRORS):
        return BadRequest(one_line(e))
    if type(e).__name__ == "PanicException":  # the tokenizers library panicked on this input
        return BadRequest(f"the tokenizer cannot take this input ({one_line(e)})")
    return ServerError(one_line(e))


_END = object()  # the end of a stream


class Request:
    """One request in a batch: its inputs and parameters, and whether its client is still there."""

    __slots__ = ("inputs", "params", "gone", "arrived")

    def __init__(self, inputs, params: dict):
        self.inputs, self.params, self.gone = inputs, params, threading.Event()
        self.arrived = time.monotonic()


class PipelineServer:
    """One replica: a ``trifuse.pipeline`` and a batching front to it (Ray Serve's ``@serve.batch``).

    Usable without Ray too (``server.run_batch(...)``), which is how the tests drive the
    batching logic directly. ``limits`` caps what a request may ask for (see :class:`Limits`).
    """

    def __init__(self, checkpoint: str, task: str, *, device: Optional[str] = None, dtype: Optional[str] = None,
                 max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005, pipeline=None,
                 limits: Optional[Limits] = None, quantize: Optional[str] = None,
                 engine=None, max_batch_tokens: Optional[int] = None):
        if pipeline is None:
            import trifuse

            pipeline = trifuse.pipeline(task, checkpoint, device=device, dtype=dtype, batch_size=max_batch_size,
                                        quantize=quantize)
        self.pipeline, self.task, self.checkpoint = pipeline, task, checkpoint
        self.limits = limits or Limits()
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self._lock = threading.Lock()  # one forward pass at a time per replica
        self._sizes: collections.Counter = collections.Counter()  # requests per batch -> how many batches
        self._requests = 0
        self._streams = 0  # streamed requests started (past their first step)
        self._skipped = 0  # requests whose clients were gone before their batch ran
        self._started = time.time()
        self.on_batch = None  # called with (requests, start, seconds) after each batch (metrics)
        if max_batch_tokens is not None and (isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int)
                                             or max_batch_tokens < 1):
            raise ValueError(f"max_batch_tokens must be a positive int, got {max_batch_tokens!r}")
        #: an encoder task's token budget: each pipeline call runs its inputs in batches of at most this
        #: many real tokens, packed (the pipeline's token batches; None: batches of max_batch_size inputs)
        self.max_batch_tokens = None
        if getattr(pipeline, "default_max_batch_tokens", None) is not None:
            self.max_batch_tokens = max_batch_tokens or pipeline.default_max_batch_tokens
        self.engine = None  # the continuous-batching engine: every generation request (POST / too) runs on it
        if engine is True:  # on where the task generates and the model can run in an engine
            engine = {"max_num_seqs": max_batch_size} if self.can_use_engine() else None
        if engine not in (None, False):
            if max_batch_tokens is not None:  # the engine's tokens per step
                engine = {"max_batch_tokens": max_batch_tokens, **engine}
            self._use_engine(engine)
        elif max_batch_tokens is not None and self.max_batch_tokens is None:
            raise ValueError(f"max_batch_tokens is for encoder tasks and the generation engine; {task} runs "
                             "batches of max_batch_size inputs")

    def can_use_engine(self) -> bool:
        """Whether this replica's task generates text and its model runs in a :class:`trifuse.GenerationEngine`
        (trifuse's GPT-2, T5 and BART)."""
        model = getattr(self.pipeline, "model", None)
        return ((self.task in GENERATION_TASKS or self.task.startswith("translation"))
                and callable(getattr(model, "packed_logits", None)) and callable(getattr(model, "prepare", None)))

    def _use_engine(self, options: dict) -> None:
        """Generation on a :class:`trifuse.GenerationEngine` (continuous batching; ``options`` are its
        keyword options): the pipeline's model generates through it, pipeline calls run concurrently
        (each request on its own, the engine merging their steps) instead of one batch at a time, and
        streams take their ids from the engine's :meth:`~trifuse.GenerationEngine.astream`."""
        from trifuse.engine.continuous import EngineBackedModel, GenerationEngine

        if self.task not in GENERATION_TASKS and not self.task.startswith("translation"):
            raise ValueError(f"the generation engine serves {', '.join(GENERATION_TASKS)}, not {self.task}")
        model = self.pipeline.model
        self.engine = GenerationEngine(model, **options)  # the OpenAI routes' engine too
        self.pipeline.model = EngineBackedModel(model, self.engine)
        self._lock = contextlib.nullcontext()  # the engine's thread runs the forwards

    @property
    def prompt_room(self) -> int:
        """The longest prompt the model takes (its position table, or the tokenizer's limit)."""
        try:
            room = int(self.pipeline.max_tokens)
        except (AttributeError, TypeError, ValueError):
            room = 4096
        return min(room, 1 << 20)

    def generation_engine(self):
        """The continuous-batching engine (:class:`trifuse.GenerationEngine`) this replica's generation
        runs on, or ``None`` (turned off, or a task or model it cannot run)."""
        return self.engine

    def engine_stats(self) -> Optional[dict]:
        """The generation engine's running/waiting sequences and KV-pool use (None without one)."""
        return self.engine.stats() if self.engine is not None else None

    def check(self, inputs, params: dict):
        """``inputs`` ready for the pipeline, or :class:`BadRequest`: option types and sizes against
        the limits, images decoded from base64 (a request never names a path the server opens)."""
        check_parameters(params, self.limits, self.prompt_room)
        single = self.pipeline.is_single(inputs)
        check_inputs(inputs, self.limits, single)
        if self.task == "image-classification":
            if single:
                return image_from_request(inputs, self.limits)
            if not isinstance(inputs, list):
                raise BadRequest("image-classification takes an image (base64) or a list of them", param="inputs")
            return [image_from_request(x, self.limits) for x in inputs]
        return inputs

    # -- the batch: several requests' inputs, one pipeline call per parameter set --------------

    def run_batch(self, requests: list) -> list[Any]:
        """Results (or :class:`BadRequest` / :class:`ServerError`) for each request, in order;
        a request is a :class:`Request` or an ``(inputs, parameters)`` pair."""
        t0 = time.monotonic()
        requests = [r if isinstance(r, Request) else Request(*r) for r in requests]
        self._sizes[len(requests)] += 1
        self._requests += len(requests)
        out: list[Any] = [None] * len(requests)
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.params, sort_keys=True, default=str)].append(i)
        for members in groups.values():
            if all(requests[i].gone.is_set() for i in members):  # nobody is waiting for these
                self._skipped += len(members)
                for i in members:
                    out[i] = BadRequest("the client went away", 499)
                continue
            params = requests[members[0]].params
            flat, spans = [], []
            for i in members:
                inputs = requests[i].inputs
                try:
                    single = self.pipeline.is_single(inputs)
                except Exception as e:  # noqa: BLE001 - answered for this request alone
                    out[i] = _as_error(e)
                    continue
                items = [inputs] if single else list(inputs)
                spans.append((i, len(flat), len(items), single))
                flat.extend(items)
            try:
                results = self._call(flat, params) if len(spans) > 1 else None
            except BaseException as e:  # noqa: BLE001 - one bad request must not fail the others
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                results = None
            if results is None:  # run each alone: each failure stays its own
                for i, _, _, _ in spans:
                    out[i] = self._alone(requests[i])
                continue
            for i, start, n, single in spans:
                try:
                    out[i] = self._finish(results[start:start + n], requests[i], single)
                except BaseException as e:  # noqa: BLE001
                    if isinstance(e, (KeyboardInterrupt, SystemExit)):
                        raise
                    out[i] = _as_error(e)
        if self.on_batch is not None:
            self.on_batch(requests, t0, time.monotonic() - t0)
        return out

    def _alone(self, request: Request):
        try:
            single = self.pipeline.is_single(request.inputs)
            results = self._call([request.inputs] if single else list(request.inputs), request.params)
            return self._finish(results, request, single)
        except BaseException as e:  # noqa: BLE001 - answered for this request alone
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            return _as_error(e)

    def _finish(self, results: list, request: Request, single: bool):
        """A request's answer from its slice of the batch: what ``pipe(inputs, **params)`` returns."""
        if not single:
            return jsonable(results)
        return jsonable(self.pipeline.single_result(results[0], request.inputs, **request.params))

    def _call(self, items: list, params: dict) -> list:
        if not items:
            raise BadRequest("'inputs' is empty")
        if self.max_batch_tokens is not None:  # token batches, run packed (the pipeline's padding-free path)
            params = {**params, "max_batch_tokens": self.max_batch_tokens}
        with self._lock:
            results = self.pipeline(items, **params)
        results = list(results) if not isinstance(results, list) else results
        if len(results) != len(items):
            raise ServerError(f"the pipeline returned {len(results)} results for {len(items)} inputs")
        return results

    # -- streamed text generation: one request, piece by piece, not batched -------------------

    def _stream_checks(self, inputs, params: dict) -> None:
        if not hasattr(self.pipeline, "stream"):
            raise BadRequest(f"streaming is for text-generation; this server runs {self.task}")
        if not isinstance(inputs, str):
            raise BadRequest("a streamed request takes one prompt (a string) as 'inputs'")
        if params.get("return_tensors") or params.get("return_text") is False:
            raise BadRequest("a streamed request returns text: drop 'return_tensors' / 'return_text'")

    def _start_stream(self, inputs, params: dict, put) -> threading.Event:
        """Decode ``inputs`` in a thread of its own (the model's step state and torch's inference
        mode stay in one thread), handing each piece, then :data:`_END` (or the exception), to
        ``put``. Each step holds the replica's lock, so batches interleave with streams. Setting
        the returned event stops the decoding after the current step (the client went away)."""
        self._stream_checks(inputs, params)
        stop = threading.Event()

        def produce():
            it = None
            try:
                it = self.pipeline.stream(inputs, **params)
                while not stop.is_set():
                    with self._lock:
                        piece = next(it, _END)
                    put(piece)
                    if piece is _END:
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                put(e)
            finally:
                if it is not None:
                    it.close()

        threading.Thread(target=produce, name="trifuse-stream", daemon=True).start()
        return stop

    def _check_first(self, first):
        if isinstance(first, BaseException):
            raise _as_error(first)
        self._streams += 1

    def stream(self, inputs, params: dict):
        """A text-generation request answered piece by piece: an iterator over the pieces of new
        text (joined: ``pipe(inputs, return_full_text=False, **params)``'s ``generated_text``), or
        :class:`BadRequest` before anything is sent. Blocks until the first piece."""
        pieces: queue.Queue = queue.Queue()
        stop = self._start_stream(inputs, params, pieces.put)
        first = pieces.get()
        self._check_first(first)

        def rest(item=first):
            try:
                while item is not _END:
                    if isinstance(item, BaseException):
                        raise _as_error(item)
                    yield item
                    item = pieces.get()
            finally:
                stop.set()

        return rest()

    async def astream(self, inputs, params: dict):
        """:meth:`stream` for an event loop: awaits the first piece (or :class:`BadRequest`) without
        blocking the loop, then returns an async iterator over the pieces. Closing it early stops
        the decoding."""
        if self.engine is not None and hasattr(self.pipeline, "stream_start"):
            return await self._engine_stream(inputs, params)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        stop: Optional[threading.Event] = None

        def put(item):
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                if stop is not None:
                    stop.set()

        stop = self._start_stream(inputs, params, put)
        try:
            first = await pieces.get()
            self._check_first(first)
        except BaseException:
            stop.set()
            raise

        async def rest(item=first):
            try:
                while item is not _END:
                    if isinstance(item, BaseException):
                        raise _as_error(item)
                    yield item
                    item = await pieces.get()
            finally:
                stop.set()

        return rest()

    async def _engine_stream(self, inputs, params: dict):
        """:meth:`astream` on the generation engine: the ids come from its ``astream`` (this request's
        sequence in the engine's steps beside every other), the pieces from the pipeline's
        :class:`~trifuse.engine.pipelines.text_generation.TextPieces`. Closing the iterator cancels the
        request in the engine."""
        self._stream_checks(inputs, params)
        try:
            prompt, kw, text = self.pipeline.stream_start(inputs, **params)
        except BaseException as e:  # noqa: BLE001 - a bad input or option: 4xx before anything is sent
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise _as_error(e) from None

        async def pieces():
            ids = self.engine.astream(prompt, **kw)
            try:
                async for token in ids:
                    piece = text.feed(token)
                    if piece:
                        yield piece
                    if text.ended:
                        break
                tail = text.flush()
                if tail:
                    yield tail
            finally:
                await ids.aclose()  # cancels the request in the engine if it is still running

        it = pieces()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:  # nothing to say (EOS first)
            first = _END
        except BaseException as e:
            await it.aclose()
            if isinstance(e, Exception):
                raise _as_error(e) from None
            raise
        self._streams += 1

        async def rest():
            try:
                if first is _END:
                    return
                yield first
                async for piece in it:
                    yield piece
            except Exception as e:  # noqa: BLE001 - as the step-wise stream reports it
                raise _as_error(e) from None
            finally:
                await it.aclose()

        return rest()

    async def ndjson(self, inputs, params: dict):
        """A streamed request's response body, after :meth:`astream` has accepted it: one
        ``{"token": piece}`` line per piece, then ``{"generated_text": ...}`` holding what
        ``pipe(inputs, **params)[0]["generated_text"]`` returns (an ``{"error": ...}`` line instead
        if the decoding fails midway). Raises :class:`BadRequest` before the first line."""
        pieces = await self.astream(inputs, params)
        full = inputs if params.get("return_full_text", True) else ""

        async def lines():
            said = []
            try:
                async for piece in pieces:
                    said.append(piece)
                    yield _line({"token": piece})
                yield _line({"generated_text": full + "".join(said)})
            except Exception as e:  # noqa: BLE001 - the status line is sent: report it in the body
                yield _line({"error": one_line(e)})
            finally:
                await pieces.aclose()

        return lines()

    def stats(self) -> dict:
        batches = sum(self._sizes.values())
        return {"task": self.task, "requests": self._requests, "batches": batches,
                "max_batch_size": self.max_batch_size, "max_batch_tokens": self.max_batch_tokens,
                "batch_sizes": {str(k): v for k, v in sorted(self._sizes.items())},
                "mean_batch_size": self._requests / batches if batches else 0.0, "streams": self._streams,
                "skipped": self._skipped, "engine": self.engine_stats(),
                "uptime_s": time.time() - self._started}


