"""Serving on Ray Serve: ``trifuse.pipeline`` behind HTTP, with dynamic batching.

    from ray import serve
    import trifuse.serve

    app = trifuse.serve.deployment("path/to/checkpoint", "text-classification", max_batch_size=32)
    serve.run(app, route_prefix="/classify")   # or compose it with your own Ray Serve apps

or ``trifuse serve CHECKPOINT --task TASK``. ``POST /`` with ``{"inputs": ..., "parameters":
{...}}`` answers with what ``trifuse.pipeline(task, checkpoint)(inputs, **parameters)`` returns,
as JSON; ``GET /stats`` reports how requests were batched; ``GET /metrics`` is Prometheus';
OpenAI's ``/v1/models``, ``/v1/embeddings``, ``/v1/completions``, ``/v1/chat/completions``
and text-embeddings-inference's ``/rerank`` answer as those APIs do (:mod:`.openai`).

Ray Serve's ``@serve.batch`` gathers concurrent requests into one call of the pipeline
(requests with the same parameters share a call), and each request gets exactly its own
results back. A bad request is answered 4xx with a one-line reason before any work and never
fails the other requests of its batch or the replica (:mod:`.server`); every size a request can
ask for is capped (:class:`Limits`, raised by ``trifuse serve`` flags); a request never names a
file the server opens (images come as base64 or ``data:`` URIs). A text-generation request with
``"parameters": {..., "stream": true}`` is answered as it is decoded: newline-delimited JSON,
one ``{"token": PIECE}`` line per piece, then ``{"generated_text": TEXT}`` (or ``{"error": ...}``).

The modules: :mod:`.requests` (what a request may ask for), :mod:`.server` (one replica's work,
no Ray), :mod:`.openai` (the OpenAI routes), :mod:`.metrics` (Prometheus), :mod:`.app` (the Ray
Serve deployment), :mod:`.cli` (``trifuse serve``). Needs ``pip install 'trifuse[serve]'``.
"""

from trifuse.engine.pipelines import jsonable

from .app import deployment, openai_error
from .cli import add_arguments, main
from .requests import MAX_BODY_BYTES, BadRequest, Limits, parse_request, stream_option
from .server import PipelineServer, Request, ServerError

__all__ = ["deployment", "PipelineServer", "Request", "BadRequest", "ServerError", "Limits", "parse_request",
           "stream_option", "jsonable", "MAX_BODY_BYTES", "openai_error", "add_arguments", "main"]
