"""Serving on Ray Serve: ``trifuse.pipeline`` behind HTTP, with dynamic batching.

    from ray import serve
    import trifuse.serve

    app = trifuse.serve.deployment("path/to/checkpoint", "text-classification", max_batch_size=32)
    serve.run(app, route_prefix="/classify")   # or compose it with your own Ray Serve apps

or ``trifuse serve CHECKPOINT --task TASK``. ``POST /`` with ``{"inputs": ..., "parameters":
{...}}`` answers with what ``trifuse.pipeline(task, checkpoint)(inputs, **parameters)`` returns,
as JSON. ``GET /stats`` reports how requests were batched.

Ray Serve's ``@serve.batch`` gathers concurrent requests into one call of the pipeline
(requests with the same parameters share a call; the pipeline sorts their inputs by length
so a batch pads little, and on a GPU runs them through the shape buckets), and each request
gets exactly its own results back. A bad request (malformed JSON, an input of the wrong
type, an unknown parameter, an input the model cannot take) is answered 4xx with a one-line
reason and never fails the other requests of its batch or the replica. Replicas that die
are restarted by Ray Serve, which fails their in-flight requests with 5xx.
A text-generation request with ``"parameters": {..., "stream": true}`` is answered as it is
decoded, outside the batches: newline-delimited JSON (``application/x-ndjson``), one
``{"token": PIECE}`` line per piece of new text, then one ``{"generated_text": TEXT}`` line with
what the pipeline returns for the same prompt and parameters (the prompt included unless
``return_full_text`` is false), or an ``{"error": ...}`` line if decoding fails midway. A request
the stream cannot take (not text generation, not one string prompt, beams, clean-up of
tokenization spaces, bad parameters) is answered 4xx with a one-line reason before anything is
streamed.

Needs ``pip install 'trifuse[serve]'`` (Ray Serve).
"""

from __future__ import annotations

import asyncio
import collections
import json
import queue
import threading
import time
from typing import Any, Optional

from trifuse.engine.cliargs import non_negative_float, port, positive_int
from trifuse.engine.extras import require
from trifuse.engine.pipelines import jsonable

#: largest request body accepted, in bytes (a larger one is answered 413)
MAX_BODY_BYTES = 8 * 2**20


class BadRequest(Exception):
    """A request the pipeline cannot take; becomes an HTTP 4xx with this one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def parse_request(body: bytes) -> tuple[Any, dict]:
    """``(inputs, parameters)`` from a request body, or :class:`BadRequest`."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"request body of {len(body)} bytes is over the {MAX_BODY_BYTES}-byte limit", 413)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequest('the body must be a JSON object {"inputs": ..., "parameters": {...}}')
    unknown = set(payload) - {"inputs", "parameters"}
    if unknown:
        raise BadRequest(f"unknown field(s) {sorted(unknown)}; expected 'inputs' and optional 'parameters'")
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest(f"'parameters' must be a JSON object, got {type(params).__name__}")
    inputs = payload["inputs"]
    if inputs is None or (isinstance(inputs, list) and not inputs):
        raise BadRequest("'inputs' is empty")
    return inputs, params


def stream_option(params: dict) -> tuple[bool, dict]:
    """``(stream, parameters without 'stream')``: whether a request asks for a streamed answer."""
    params = dict(params)
    stream = params.pop("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {json.dumps(stream)[:60]}")
    return stream, params


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


_END = object()  # the end of a stream


class PipelineServer:
    """One replica: a ``trifuse.pipeline`` and a batching front to it (Ray Serve's ``@serve.batch``).

    Usable without Ray too (``await server.handle(body)``), which is how the tests drive the
    batching logic directly.
    """

    def __init__(self, checkpoint: str, task: str, *, device: Optional[str] = None, dtype: Optional[str] = None,
                 max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005, pipeline=None):
        if pipeline is None:
            import trifuse

            pipeline = trifuse.pipeline(task, checkpoint, device=device, dtype=dtype, batch_size=max_batch_size)
        self.pipeline, self.task = pipeline, task
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self._lock = threading.Lock()  # one forward pass at a time per replica
        self._sizes: collections.Counter = collections.Counter()  # requests per batch -> how many batches
        self._requests = 0
        self._streams = 0  # streamed requests started (past their first step)
        self._started = time.time()

    # -- the batch: several requests' inputs, one pipeline call per parameter set --------------

    def run_batch(self, requests: list[tuple[Any, dict]]) -> list[Any]:
        """Results (or :class:`BadRequest`) for each ``(inputs, parameters)``, in order."""
        self._sizes[len(requests)] += 1
        self._requests += len(requests)
        out: list[Any] = [None] * len(requests)
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, (_, params) in enumerate(requests):
            groups[json.dumps(params, sort_keys=True, default=str)].append(i)
        for members in groups.values():
            params = requests[members[0]][1]
            flat, spans = [], []
            for i in members:
                inputs = requests[i][0]
                single = self.pipeline.is_single(inputs)
                items = [inputs] if single else list(inputs)
                spans.append((i, len(flat), len(items), single))
                flat.extend(items)
            try:
                results = self._call(flat, params)
            except BadRequest:
                results = None
            if results is None:  # one bad request must not fail the others: run each alone
                for i in members:
                    out[i] = self._alone(*requests[i])
                continue
            for i, start, n, single in spans:
                try:
                    out[i] = self._finish(results[start:start + n], requests[i], single)
                except BadRequest as e:
                    out[i] = e
        return out

    def _alone(self, inputs, params):
        single = self.pipeline.is_single(inputs)
        try:
            results = self._call([inputs] if single else list(inputs), params)
            return self._finish(results, (inputs, params), single)
        except BadRequest as e:
            return e

    def _finish(self, results: list, request, single: bool):
        """A request's answer from its slice of the batch: what ``pipe(inputs, **params)`` returns."""
        inputs, params = request
        if not single:
            return jsonable(results)
        try:
            return jsonable(self.pipeline.single_result(results[0], inputs, **params))
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise BadRequest(_one_line(e)) from None

    def _call(self, items: list, params: dict) -> list:
        if not items:
            raise BadRequest("'inputs' is empty")
        try:
            with self._lock:
                results = self.pipeline(items, **params)
        except (TypeError, ValueError, KeyError, IndexError) as e:  # bad inputs or parameters
            raise BadRequest(_one_line(e)) from None
        results = list(results) if not isinstance(results, list) else results
        if len(results) != len(items):
            raise RuntimeError(f"the pipeline returned {len(results)} results for {len(items)} inputs")
        return results

    # -- streamed text generation: one request, piece by piece, not batched -------------------

    def _start_stream(self, inputs, params: dict, put) -> threading.Event:
        """Decode ``inputs`` in a thread of its own (the model's step state and torch's inference
        mode stay in one thread), handing each piece, then :data:`_END` (or the exception), to
        ``put``. Each step holds the replica's lock, so batches interleave with streams. Setting
        the returned event stops the decoding after the current step (the client went away)."""
        if not hasattr(self.pipeline, "stream"):
            raise BadRequest(f"streaming is for text-generation; this server runs {self.task}")
        if not isinstance(inputs, str):
            raise BadRequest("a streamed request takes one prompt (a string) as 'inputs'")
        if params.get("return_tensors") or params.get("return_text") is False:
            raise BadRequest("a streamed request returns text: drop 'return_tensors' / 'return_text'")
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
        if isinstance(first, (TypeError, ValueError, KeyError, IndexError)):  # bad prompt or parameters
            raise BadRequest(_one_line(first))
        if isinstance(first, BaseException):
            raise first
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
                        raise item
                    yield item
                    item = pieces.get()
            finally:
                stop.set()

        return rest()

    async def astream(self, inputs, params: dict):
        """:meth:`stream` for an event loop: awaits the first piece (or :class:`BadRequest`) without
        blocking the loop, then returns an async iterator over the pieces. Closing it early stops
        the decoding."""
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
                        raise item
                    yield item
                    item = await pieces.get()
            finally:
                stop.set()

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
                yield _line({"error": _one_line(e)})
            finally:
                await pieces.aclose()

        return lines()

    def stats(self) -> dict:
        batches = sum(self._sizes.values())
        return {"task": self.task, "requests": self._requests, "batches": batches,
                "max_batch_size": self.max_batch_size,
                "batch_sizes": {str(k): v for k, v in sorted(self._sizes.items())},
                "mean_batch_size": self._requests / batches if batches else 0.0, "streams": self._streams,
                "uptime_s": time.time() - self._started}


def _app_class():
    """The Ray Serve deployment class (built on first use, so importing this module needs no Ray)."""
    require("trifuse serve", "serve", "ray", "starlette")
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse

    class TrifuseDeployment:
        def __init__(self, checkpoint, task, device, dtype, max_batch_size, batch_wait_timeout_s):
            self.server = PipelineServer(checkpoint, task, device=device, dtype=dtype,
                                         max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
            self.batched.set_max_batch_size(max_batch_size)
            self.batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def batched(self, requests: list) -> list:
            # the forward pass runs off the event loop, so the replica keeps accepting requests
            return await asyncio.to_thread(self.server.run_batch, requests)

        async def __call__(self, request: Request):
            if request.method == "GET" and request.url.path.rstrip("/").endswith("/stats"):
                return JSONResponse(self.server.stats())
            if request.method != "POST":
                return JSONResponse({"error": f"use POST with a JSON body (got {request.method})"}, status_code=405)
            try:
                inputs, params = parse_request(await request.body())
                stream, params = stream_option(params)
                if stream:  # not batched: decoded step by step in a thread, sent line by line
                    body = await self.server.ndjson(inputs, params)
                    return StreamingResponse(body, media_type="application/x-ndjson",
                                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                result = await self.batched((inputs, params))
            except BadRequest as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            if isinstance(result, BadRequest):
                return JSONResponse({"error": str(result)}, status_code=result.status)
            return JSONResponse(result)

    return TrifuseDeployment


def deployment(checkpoint, task: str, *, device: Optional[str] = None, dtype: Optional[str] = None,
               max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005, num_replicas: int = 1,
               gpus_per_replica: Optional[float] = None, name: str = "trifuse"):
    """A Ray Serve application serving ``trifuse.pipeline(task, checkpoint)``; pass it to
    ``serve.run`` or compose it with your own deployments. ``gpus_per_replica`` reserves GPUs
    per replica through Ray (default: 1 when ``device`` is CUDA, else none)."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
    if not isinstance(num_replicas, int) or isinstance(num_replicas, bool) or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
    if not batch_wait_timeout_s >= 0:
        raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s!r}")
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if device is not None and str(device).startswith("cuda") else 0.0
    if gpus_per_replica < 0:
        raise ValueError(f"gpus_per_replica must be >= 0, got {gpus_per_replica!r}")
    from ray import serve

    cls = serve.deployment(_app_class(), name=name, num_replicas=num_replicas,
                           ray_actor_options={"num_gpus": gpus_per_replica},
                           max_ongoing_requests=max(4 * max_batch_size, 16))
    return cls.bind(str(checkpoint), task, device, dtype, max_batch_size, batch_wait_timeout_s)


# ----------------------------------------------------------------------------
# `trifuse serve`


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (config.json, weights, tokenizer files)")
    p.add_argument("--task", required=True, help="pipeline task, e.g. text-classification, fill-mask, "
                   "feature-extraction, question-answering, text-generation")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, metavar="N", help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=positive_int, default=1, metavar="N", help="replicas of the model (default 1)")
    p.add_argument("--gpus-per-replica", type=non_negative_float, default=None, metavar="F",
                   help="GPUs Ray reserves per replica (default: 1 with --device cuda, else 0)")
    p.add_argument("--max-batch-size", type=positive_int, default=32, metavar="N",
                   help="requests per batch (default 32)")
    p.add_argument("--batch-wait-ms", type=non_negative_float, default=5.0, metavar="MS",
                   help="how long a batch waits to fill, in ms (default 5)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the pipeline's)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the checkpoint's)")
    p.add_argument("--address", default=None, metavar="RAY_ADDRESS",
                   help="an existing Ray cluster (default: start a local Ray)")
    p.add_argument("--access-log", action="store_true", help="log every request (Ray Serve's access log)")
    p.set_defaults(func=main)


def main(args) -> int:
    """Start Ray (local, or ``--address``), serve the app, wait for Ctrl-C / SIGTERM, shut down."""
    import os
    import signal
    import sys
    from pathlib import Path

    require("trifuse serve", "serve", "ray", "starlette")
    if not (Path(args.checkpoint) / "config.json").is_file():
        print(f"trifuse serve: error: {args.checkpoint}: no config.json (not a checkpoint directory)",
              file=sys.stderr)
        return 2
    import ray
    from ray import serve

    app = deployment(os.path.abspath(args.checkpoint), args.task, device=args.device, dtype=args.dtype,
                     max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                     num_replicas=args.replicas, gpus_per_replica=args.gpus_per_replica)
    if args.address:
        ray.init(address=args.address, logging_level="ERROR")
    else:
        ray.init(include_dashboard=False, logging_level="ERROR", configure_logging=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    quiet = {"log_level": "WARNING", "enable_access_log": args.access_log}
    try:
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=quiet)
        serve.run(app, name="trifuse", route_prefix="/", logging_config=quiet)
        url = f"http://{args.host}:{args.port}/"
        print(f"trifuse serve: {args.task} on {args.checkpoint} at {url} "
              f"(POST {{\"inputs\": ..., \"parameters\": {{...}}}}; GET {url}stats; health {url}-/healthz)",
              flush=True)
        print(f"trifuse serve: Ray at {ray.get_runtime_context().gcs_address} (compose more apps with "
              f"ray.init(address=...) and serve.run)", flush=True)
        while not stop.wait(0.5):
            pass
        print("trifuse serve: shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
