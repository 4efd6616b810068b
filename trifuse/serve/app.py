"""The Ray Serve application: routes, errors, backpressure, timeouts, metrics.

One deployment class, built on first use (importing this module needs no Ray). Its
``__call__`` routes by path; every answer is counted in ``/metrics`` by route and status.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from trifuse.engine.extras import require

from .openai import OpenAIRoutes
from .requests import BadRequest, Limits, parse_json, parse_request, stream_option
from .server import PipelineServer, Request, ServerError

#: OpenAI's error ``type`` per status
_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request", 500: "server_error",
          504: "timeout_error"}
_ROUTES = ("/", "/stats", "/metrics", "/v1/models", "/v1/embeddings", "/v1/completions", "/v1/chat/completions",
           "/rerank")


def openai_error(message: str, status: int, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": status}}


def _bind_replica_grpc_to_loopback() -> None:
    """Ray Serve binds each replica's inter-deployment gRPC server to every interface (``"[::]:0"``
    in ``ray/serve/_private/replica.py``, no option to change it). On a Ray node that listens on
    loopback only (the local Ray ``trifuse serve`` starts), bind it to 127.0.0.1 as well: called
    in the replica's constructor, before Ray Serve starts that server."""
    import ray

    try:
        from ray._common.network_utils import is_localhost
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "trifuse_loopback", False):
        return
    if not is_localhost(ray.util.get_node_ip_address()):
        return

    def bind(server, address: str):
        return original(server, address.replace("[::]", "127.0.0.1", 1))

    bind.trifuse_loopback = True
    replica.add_port_to_grpc_server = bind


def _app_class():
    """The Ray Serve deployment class."""
    require("trifuse serve", "serve", "ray", "starlette", "prometheus_client")
    from ray import serve
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, Response, StreamingResponse

    from .metrics import Metrics

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    class TrifuseDeployment:
        def __init__(self, checkpoint, task, device, dtype, max_batch_size, batch_wait_timeout_s, limits=None,
                     served_model_name=None, max_concurrent_requests=512, request_timeout_s=300.0, quantize=None,
                     engine=None, max_batch_tokens=None):
            _bind_replica_grpc_to_loopback()
            self.server = PipelineServer(checkpoint, task, device=device, dtype=dtype, max_batch_size=max_batch_size,
                                         batch_wait_timeout_s=batch_wait_timeout_s, limits=limits, quantize=quantize,
                                         engine=engine, max_batch_tokens=max_batch_tokens)
            self.batched.set_max_batch_size(max_batch_size)
            self.batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
            self.name = served_model_name or _model_name(checkpoint)
            self.metrics = Metrics(self.name)
            self.server.on_batch = self.metrics.batch
            self.metrics.engine_stats = self.server.engine_stats
            self.openai = OpenAIRoutes(self.server, self.name, self._run, self.metrics)
            self.max_concurrent, self.timeout_s = max_concurrent_requests, request_timeout_s
            self.in_flight = 0

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def batched(self, requests: list) -> list:
            # the forward pass runs off the event loop, so the replica keeps accepting requests
            return await asyncio.to_thread(self.server.run_batch, requests)

        async def _run(self, inputs, params: dict):
            """``POST /``'s answer for ``(inputs, params)``: checked, batched, failures its own."""
            inputs = self.server.check(inputs, params)
            request = Request(inputs, params)
            scope = None
            try:
                if self.server.engine is not None:  # continuous batching: the engine merges requests' steps
                    from trifuse.engine.continuous import CANCEL_SCOPE, CancelScope

                    scope = CancelScope()  # its engine requests, cancelled if the client goes away
                    token = CANCEL_SCOPE.set(scope)  # asyncio.to_thread takes it into the thread
                    try:
                        result = (await asyncio.to_thread(self.server.run_batch, [request]))[0]
                    finally:
                        CANCEL_SCOPE.reset(token)
                else:
                    result = await self.batched(request)
            except asyncio.CancelledError:  # the client went away (or the timeout): skip it if not started
                request.gone.set()
                if scope is not None:
                    scope.cancel()
                raise
            if isinstance(result, (BadRequest, ServerError)):
                raise result
            return result

        async def __call__(self, request: HTTPRequest):
            root = request.scope.get("root_path", "")
            path = request.url.path
            route = (path[len(root):] if root and path.startswith(root) else path).rstrip("/") or "/"
            label = route if route in _ROUTES else "other"
            t0 = time.monotonic()
            openai = route.startswith("/v1/") or route == "/rerank"
            response = None
            try:
                if request.method == "GET" or route not in _ROUTES:
                    response = self._get(route, request.method)
                elif request.method != "POST":
                    raise BadRequest(f"use POST with a JSON body (got {request.method})", 405)
                elif self.in_flight >= self.max_concurrent:
                    self.metrics.rejected.labels("overloaded").inc()
                    raise BadRequest(f"the model is overloaded: {self.in_flight} requests in flight, this replica "
                                     f"takes {self.max_concurrent} (trifuse serve --max-concurrent-requests)", 429)
                else:
                    self.in_flight += 1
                    self.metrics.in_flight.inc()
                    streaming = False
                    try:
                        response = await asyncio.wait_for(self._post(route, await request.body()), self.timeout_s)
                        if isinstance(response, StreamingResponse):  # in flight until its last byte
                            response.body_iterator = self._tracked(response.body_iterator, t0 + self.timeout_s)
                            streaming = True
                    except asyncio.TimeoutError:
                        raise BadRequest(f"the request took longer than this server's {self.timeout_s:g} s "
                                         f"(trifuse serve --request-timeout-s)", 504) from None
                    finally:
                        if not streaming:
                            self._done()
            except (BadRequest, ServerError) as e:
                status = e.status
                body = openai_error(str(e), status, getattr(e, "param", None)) if openai else {"error": str(e)}
                response = JSONResponse(body, status_code=status)
            self.metrics.requests.labels(label, str(response.status_code)).inc()
            self.metrics.latency.labels(label).observe(time.monotonic() - t0)
            return response

        def _done(self):
            self.in_flight -= 1
            self.metrics.in_flight.dec()

        async def _tracked(self, body, deadline: float):
            """A streamed body that stops at the request's deadline (the decoding with it) and
            counts as in flight until it ends, however it ends (a client that leaves closes it)."""
            try:
                async for chunk in body:
                    yield chunk
                    if time.monotonic() > deadline:
                        break
            finally:
                self._done()
                await body.aclose()

        def _get(self, route: str, method: str):
            if method != "GET" or route not in ("/stats", "/metrics", "/v1/models"):
                if route in _ROUTES:
                    raise BadRequest(f"{route} takes POST with a JSON body (got {method})", 405)
                raise BadRequest(f"no route {route}; this server answers {', '.join(_ROUTES)}", 404)
            if route == "/stats":
                return JSONResponse(self.server.stats())
            if route == "/metrics":
                body, content_type = self.metrics.render()
                return Response(body, media_type=content_type)
            return JSONResponse(self.openai.models())

        async def _post(self, route: str, body: bytes):
            limits = self.server.limits
            if route == "/":
                inputs, params = parse_request(body, limits)
                stream, params = stream_option(params)
                if stream:  # not batched: decoded step by step in a thread, sent line by line
                    self.server.check(inputs, params)
                    lines = await self.server.ndjson(inputs, params)
                    return StreamingResponse(lines, media_type="application/x-ndjson", headers=sse_headers)
                return JSONResponse(await self._run(inputs, params))
            payload = parse_json(body, limits)
            if not isinstance(payload, dict):
                raise BadRequest("the body must be a JSON object")
            if route == "/v1/embeddings":
                return JSONResponse(await self.openai.embeddings(payload))
            if route == "/rerank":
                return JSONResponse(await self.openai.rerank(payload))
            result = await self.openai.completions(payload, chat=route == "/v1/chat/completions")
            if isinstance(result, dict):
                return JSONResponse(result)
            return StreamingResponse(result, media_type="text/event-stream", headers=sse_headers)

    return TrifuseDeployment


def _model_name(checkpoint) -> str:
    """A checkpoint's name for ``/v1/models``: ``_name_or_path`` of its config when it names a hub
    model, else the directory's name."""
    import json
    from pathlib import Path

    path = Path(checkpoint)
    try:
        name = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        name = None
    if isinstance(name, str) and name and not Path(name).is_absolute() and name.count("/") <= 1:
        return name
    return path.resolve().name


def deployment(checkpoint, task: str, *, device: Optional[str] = None, dtype: Optional[str] = None,
               max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005, num_replicas: int = 1,
               gpus_per_replica: Optional[float] = None, cpus_per_replica: float = 1.0, name: str = "trifuse",
               limits: Optional[Limits] = None, served_model_name: Optional[str] = None,
               max_concurrent_requests: int = 512, request_timeout_s: float = 300.0, quantize: Optional[str] = None,
               engine=True, max_batch_tokens: Optional[int] = None):
    """A Ray Serve application serving ``trifuse.pipeline(task, checkpoint)``; pass it to
    ``serve.run`` or compose it with your own deployments. ``gpus_per_replica`` reserves GPUs
    per replica through Ray (default: 1 when ``device`` is CUDA, else none). ``limits`` caps
    what one request may ask for; past ``max_concurrent_requests`` in flight a replica answers
    429; a request running longer than ``request_timeout_s`` is answered 504. ``engine``: generation tasks
    (text-generation, text2text-generation, summarization, translation) run every request, streamed or
    not, on a :class:`trifuse.GenerationEngine` (continuous batching; ``max_batch_size`` is its
    ``max_num_seqs``) instead of ``@serve.batch``: ``True`` (default) where the model can run in one,
    a dict of the engine's options to insist, ``False`` for batches. ``max_batch_tokens``: encoder tasks
    run each batch's inputs in groups of at most this many real tokens, packed (default: the pipeline's,
    16384 as text-embeddings-inference); on the generation engine, its tokens per step."""
    for key, v in (("max_batch_size", max_batch_size), ("num_replicas", num_replicas),
                   ("max_concurrent_requests", max_concurrent_requests)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} must be a positive int, got {v!r}")
    if not batch_wait_timeout_s >= 0:
        raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s!r}")
    if not request_timeout_s > 0:
        raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s!r}")
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if device is not None and str(device).startswith("cuda") else 0.0
    if gpus_per_replica < 0:
        raise ValueError(f"gpus_per_replica must be >= 0, got {gpus_per_replica!r}")
    if not cpus_per_replica >= 0:
        raise ValueError(f"cpus_per_replica must be >= 0, got {cpus_per_replica!r}")
    from ray import serve

    # Ray lets a few more requests than the limit reach the replica, which answers them 429
    # itself; past that Ray queues at most as many again and answers 503 beyond.
    ongoing = max_concurrent_requests + max_batch_size
    cls = serve.deployment(_app_class(), name=name, num_replicas=num_replicas,
                           ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
                           max_ongoing_requests=ongoing, max_queued_requests=ongoing)
    return cls.bind(str(checkpoint), task, device, dtype, max_batch_size, batch_wait_timeout_s, limits or Limits(),
                    served_model_name, max_concurrent_requests, request_timeout_s, quantize, engine, max_batch_tokens)
