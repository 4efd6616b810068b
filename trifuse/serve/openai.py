"""OpenAI-compatible routes on a :class:`~trifuse.serve.server.PipelineServer`, without Ray.

``GET /v1/models``, ``POST /v1/embeddings`` (sentence-embedding, feature-extraction),
``POST /v1/completions`` and ``/v1/chat/completions`` (text-generation; chat only where the
checkpoint has a chat template), ``POST /rerank`` (text-embeddings-inference's shape, on a
sequence-classification cross-encoder). Wire formats follow OpenAI's API reference and
vLLM's server (``vllm/entrypoints/openai/``); errors are :class:`BadRequest` with the status
and the option at fault, which the app turns into OpenAI's error JSON.

Embeddings and rerank go through the replica's batches (``run``: the same ``@serve.batch`` as
``POST /``). Completions, streamed or not, run on the continuous-batching engine
(:class:`trifuse.GenerationEngine`, :meth:`PipelineServer.generation_engine`; streams through
:meth:`PipelineServer.astream`, which takes its ids from the engine's ``astream``): concurrent requests
share its steps, and a request whose client leaves (or that times out) is cancelled there. With the
engine off (``--no-continuous-batching``) they decode through the server's step-wise stream, one
sequence at a time, interleaved with the batches step by step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from pathlib import Path
from typing import Awaitable, Callable, Optional

import numpy as np

from .requests import BadRequest, one_line, over_limit
from .server import PipelineServer

EMBEDDING_TASKS = ("sentence-embedding", "feature-extraction")
_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
                      "stream_options", "echo", "user", "best_of", "logprobs", "suffix", "logit_bias",
                      "presence_penalty", "frequency_penalty"}
_CHAT_FIELDS = (_COMPLETION_FIELDS - {"prompt", "echo", "best_of", "suffix"}) | {
    "messages", "max_completion_tokens", "top_logprobs"}


def _field(body: dict, name: str, kinds, default=None, *, check=None, what: str = ""):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise BadRequest(f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}, got "
                         f"{json.dumps(v)[:40]}", param=name)
    if check is not None and not check(v):
        raise BadRequest(f"'{name}' must be {what}, got {json.dumps(v)[:40]}", param=name)
    return v


def _unknown(body: dict, known: set) -> None:
    extra = sorted(set(body) - known)
    if extra:
        raise BadRequest(f"unknown field(s) {extra}", param=extra[0])


def _token_lists(value, name: str):
    """A string, a list of strings, a list of token ids or a list of such lists -> ``[str | [int]]``."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return [value]
        if all(isinstance(x, str) for x in value):
            return value
        if all(isinstance(x, list) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x)
               for x in value):
            return value
    raise BadRequest(f"'{name}' must be a non-empty string, a list of strings, a list of token ids or a list "
                     f"of such lists", param=name)


class OpenAIRoutes:
    """The routes of one replica. ``run(inputs, params)`` answers like ``POST /`` (through the
    batches); ``name`` is the model's id in ``/v1/models`` and in requests' ``model``."""

    def __init__(self, server: PipelineServer, name: str, run: Callable[..., Awaitable], metrics=None):
        self.server, self.name, self.run, self.metrics = server, name, run, metrics
        self.created = int(time.time())
        self.pipe = server.pipeline
        self.chat_template = self._chat_template()

    # -- shared ---------------------------------------------------------------------------

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "trifuse", "task": self.server.task}]}

    def _model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            raise BadRequest("'model' is required", param="model")
        if model != self.name:
            raise BadRequest(f"the model {model!r} does not exist here; this server serves {self.name!r}", 404,
                             "model")

    def _task(self, route: str, tasks) -> None:
        if self.server.task not in tasks:
            raise BadRequest(f"{route} is for {' and '.join(tasks)} servers; this one runs {self.server.task}", 404)

    def _texts(self, items: list, name: str) -> list[str]:
        if len(items) > self.server.limits.max_inputs:
            raise over_limit(f"the number of inputs in '{name}'", len(items), self.server.limits, "max_inputs", name)
        tok = self.pipe.tokenizer
        vocab = tok.get_vocab_size() if hasattr(tok, "get_vocab_size") else len(tok.get_vocab())
        out = []
        for x in items:
            if isinstance(x, list):  # token ids: decoded, then tokenized again by the pipeline
                if any(not 0 <= i < vocab for i in x):
                    raise BadRequest(f"'{name}' holds a token id outside the vocabulary (0..{vocab - 1})", param=name)
                x = tok.decode(x, skip_special_tokens=True)
            out.append(x)
        return out

    def _count(self, texts: list[str], **kw) -> list[int]:
        return [len(e.ids) for e in self.pipe.tokenizer.encode(texts, **kw)]

    # -- /v1/embeddings -------------------------------------------------------------------

    async def embeddings(self, body: dict) -> dict:
        self._task("/v1/embeddings", EMBEDDING_TASKS)
        _unknown(body, {"model", "input", "encoding_format", "dimensions", "user"})
        self._model(body)
        if "input" not in body:
            raise BadRequest("'input' is required", param="input")
        texts = self._texts(_token_lists(body["input"], "input"), "input")
        fmt = _field(body, "encoding_format", (str,), "float", check=lambda v: v in ("float", "base64"),
                     what="'float' or 'base64'")
        dims = _field(body, "dimensions", (int,), check=lambda v: v >= 1, what="a whole number >= 1")
        results = await self.run(texts, {})
        vectors = []
        for r in results:
            v = np.asarray(r, dtype=np.float32)
            if v.ndim == 3:  # feature-extraction: [1, L, H] token vectors -> their mean
                v = v[0].mean(0)
            vectors.append(v)
        if dims is not None:
            if dims > vectors[0].shape[-1]:
                raise BadRequest(f"dimensions is {dims} but this model's vectors have {vectors[0].shape[-1]}", 422,
                                 "dimensions")
            vectors = [v[:dims] / max(float(np.linalg.norm(v[:dims])), 1e-12) for v in vectors]
        seq = getattr(self.pipe, "max_seq_length", None)
        tokens = sum(self._count(texts, **({"truncation": True, "max_length": seq} if seq else {})))
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(tokens)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64"
                 else [float(x) for x in v]} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": self.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # -- /rerank --------------------------------------------------------------------------

    async def rerank(self, body: dict) -> list:
        self._task("/rerank", ("text-classification",))
        _unknown(body, {"query", "texts", "raw_scores", "return_text", "truncate", "model"})
        query = _field(body, "query", (str,), what="a string")
        texts = body.get("texts")
        if query is None or not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("/rerank takes {\"query\": str, \"texts\": [str, ...]}", param="texts")
        if len(texts) > self.server.limits.max_inputs:
            raise over_limit("the number of texts", len(texts), self.server.limits, "max_inputs", "texts")
        raw = _field(body, "raw_scores", (bool,), False, what="true or false")
        with_text = _field(body, "return_text", (bool,), False, what="true or false")
        truncate = _field(body, "truncate", (bool,), False, what="true or false")
        labels = len(getattr(self.pipe, "id2label", {}) or {}) or self.pipe.config.get("num_labels", 0)
        if labels != 1:
            raise BadRequest(f"/rerank needs a cross-encoder with one output; this model has {labels} labels", 422)
        params = {"function_to_apply": "none" if raw else "sigmoid", **({"truncation": True} if truncate else {})}
        results = await self.run([{"text": query, "text_pair": t} for t in texts], params)
        ranked = [{"index": i, "score": float(r["score"]), **({"text": texts[i]} if with_text else {})}
                  for i, r in enumerate(results)]
        return sorted(ranked, key=lambda x: -x["score"])

    # -- /v1/completions and /v1/chat/completions -----------------------------------------

    def _chat_template(self) -> Optional[str]:
        path = getattr(self.pipe, "path", None)
        cfg = Path(path) / "tokenizer_config.json" if path is not None else None
        if cfg is None or not cfg.is_file():
            return None
        template = json.loads(cfg.read_text()).get("chat_template")
        return template if isinstance(template, str) else None

    def _render_chat(self, messages) -> str:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise BadRequest("'messages' must be a non-empty list of {\"role\": str, \"content\": str}",
                             param="messages")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        tok = self.pipe.tokenizer
        special = {k: getattr(tok, k, None) for k in ("bos_token", "eos_token")}
        try:
            return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True,
                                                              **{k: v or "" for k, v in special.items()})
        except Exception as e:  # noqa: BLE001 - the template's own error, e.g. raise_exception(...)
            raise BadRequest(f"the chat template refused the messages: {e}", 422, "messages") from None

    def _generation(self, body: dict, chat: bool) -> tuple[list[str], dict, dict]:
        """``(prompts, pipeline options, request settings)`` of a (chat) completion request."""
        self._task("/v1/chat/completions" if chat else "/v1/completions", ("text-generation",))
        if chat and self.chat_template is None:
            raise BadRequest("/v1/chat/completions needs a chat template (tokenizer_config.json's chat_template) "
                             "and this checkpoint has none; use /v1/completions", 404)
        _unknown(body, _CHAT_FIELDS if chat else _COMPLETION_FIELDS)
        self._model(body)
        for name, off in (("best_of", (None, 1)), ("logprobs", (None, False)), ("suffix", (None,)),
                          ("logit_bias", (None, {})), ("presence_penalty", (None, 0, 0.0)),
                          ("frequency_penalty", (None, 0, 0.0)), ("top_logprobs", (None,))):
            if body.get(name) not in off:
                raise BadRequest(f"'{name}' is not supported by this server", param=name)
        if chat:
            prompts = [self._render_chat(body.get("messages"))]
        else:
            if "prompt" not in body:
                raise BadRequest("'prompt' is required", param="prompt")
            prompts = self._texts(_token_lists(body["prompt"], "prompt"), "prompt")
        limits = self.server.limits
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        room = self.server.prompt_room
        counts = self._count(prompts)
        default = 16 if not chat else max(1, min(limits.max_new_tokens, room - max(counts)))
        max_tokens = _field(body, name, (int,), default, check=lambda v: v >= 1, what="a whole number >= 1")
        if max_tokens > limits.max_new_tokens:
            raise over_limit(name, max_tokens, limits, "max_new_tokens")
        n = _field(body, "n", (int,), 1, check=lambda v: v >= 1, what="a whole number >= 1")
        if n > limits.max_return_sequences:
            raise over_limit("n", n, limits, "max_return_sequences")
        if n * len(prompts) > limits.max_inputs:
            raise over_limit("n x prompts", n * len(prompts), limits, "max_inputs", "n")
        temperature = float(_field(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 2,
                                   what="a number 0..2"))
        top_p = float(_field(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, what="a number in (0, 1]"))
        seed = _field(body, "seed", (int,), what="a whole number")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise BadRequest("'stop' must be a non-empty string or a list of at most 4 of them", param="stop")
        stream = _field(body, "stream", (bool,), False, what="true or false")
        so = body.get("stream_options") or {}
        if not isinstance(so, dict) or set(so) - {"include_usage"} or not isinstance(so.get("include_usage", False),
                                                                                       bool):
            raise BadRequest("'stream_options' takes {\"include_usage\": true|false}", param="stream_options")
        echo = _field(body, "echo", (bool,), False, what="true or false") if not chat else False
        for count in counts:
            if count + max_tokens > room:
                raise BadRequest(f"the prompt is {count} tokens and {name} {max_tokens}: {count + max_tokens} "
                                 f"is over the model's {room} positions", 422, "prompt")
        params = {"max_new_tokens": max_tokens, "do_sample": temperature > 0, "top_k": 0}
        if temperature > 0:
            params.update(temperature=temperature, top_p=top_p)
        settings = {"n": n, "seed": seed, "stop": stop or [], "stream": stream, "echo": echo,
                    "include_usage": so.get("include_usage", False), "max_tokens": max_tokens}
        return prompts, params, settings

    async def _choice(self, prompt: str, params: dict, stop: list[str], generator):
        """Pieces of one completion (stop strings cut off, never sent), then its finish reason."""
        if generator is not None:
            params = {**params, "generator": generator}
        pieces = await self.server.astream(prompt, params)
        matcher = _StopMatcher(stop)
        text = []
        try:
            async for piece in pieces:
                text.append(piece)
                out, stopped = matcher.feed(piece)
                if out:
                    yield out
                if stopped:
                    yield _Finish("stop")
                    return
        finally:
            await pieces.aclose()
        out = matcher.flush()
        if out:
            yield out
        n = self._count(["".join(text)], add_special_tokens=False)[0]
        yield _Finish("length" if n >= params["max_new_tokens"] else "stop")

    async def _engine_choice(self, engine, prompt: str, params: dict, stop: list[str], index: int, seed):
        """``(text, finish_reason, tokens generated)`` of one completion on the continuous-batching
        engine; a cancelled request (a client gone, the timeout) is cancelled in the engine."""
        ids = self.pipe.tokenizer.encode([prompt])[0].ids
        if not ids:
            raise BadRequest("the prompt is empty", param="prompt")
        try:
            tokens = await engine.agenerate(ids, seed=None if seed is None else seed + index, **params)
        except (TypeError, ValueError) as e:
            raise BadRequest(one_line(e)) from None
        text = self.pipe.tokenizer.decode(tokens, skip_special_tokens=True)  # as the pipeline decodes
        cuts = [i for i in (text.find(x) for x in stop) if i >= 0]
        if cuts:
            return text[:min(cuts)], "stop", len(tokens)
        eos = self.pipe.config.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        ended = bool(tokens) and tokens[-1] in eos
        return text, "stop" if ended or len(tokens) < params["max_new_tokens"] else "length", len(tokens)

    def _generators(self, seed, count: int):
        if seed is None:
            return [None] * count
        import torch

        g = torch.Generator().manual_seed(seed)
        return [g] * count  # one stream of draws for the whole request, as one seeded generate call

    async def completions(self, body: dict, chat: bool = False):
        """The response body (a dict), or for ``stream`` an async iterator of SSE ``bytes``."""
        prompts, params, s = self._generation(body, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        jobs = [(p, i * s["n"] + j) for i, p in enumerate(prompts) for j in range(s["n"])]
        gens = self._generators(s["seed"], len(jobs))
        prompt_tokens = sum(self._count(prompts))
        obj = "chat.completion" if chat else "text_completion"

        if not s["stream"]:
            engine = self.server.generation_engine()
            if engine is not None:  # every choice at once: they share the engine's steps with other requests
                done = await asyncio.gather(*(self._engine_choice(engine, prompt, params, s["stop"], index, s["seed"])
                                              for prompt, index in jobs))
                choices = [{"index": index, "finish_reason": finish, "logprobs": None,
                            **({"message": {"role": "assistant", "content": text}} if chat
                               else {"text": (prompt if s["echo"] else "") + text})}
                           for (prompt, index), (text, finish, _) in zip(jobs, done)]
                completion_tokens = sum(n for _, _, n in done)
                self._generated(completion_tokens)
                return {"id": rid, "object": obj, "created": created, "model": self.name, "choices": choices,
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                  "total_tokens": prompt_tokens + completion_tokens}}
            choices, completion_tokens = [], 0
            for (prompt, index), g in zip(jobs, gens):
                text, finish = [prompt] if s["echo"] else [], None
                async for item in self._choice(prompt, params, s["stop"], g):
                    if isinstance(item, _Finish):
                        finish = item.reason
                    else:
                        text.append(item)
                joined = "".join(text)
                completion_tokens += self._count([joined[len(prompt):] if s["echo"] else joined],
                                                 add_special_tokens=False)[0]
                said = {"message": {"role": "assistant", "content": joined}} if chat else {"text": joined}
                choices.append({"index": index, "finish_reason": finish, "logprobs": None, **said})
            self._generated(completion_tokens)
            return {"id": rid, "object": obj, "created": created, "model": self.name, "choices": choices,
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}}

        # Streamed: validate and start the first choice before the status line goes out.
        first = self._choice(jobs[0][0], params, s["stop"], gens[0])
        head = await first.__anext__()
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def event(index, text=None, finish=None, role=False):
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {}) | (
                    {"content": text} if text is not None else {})
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
            return _sse({"id": rid, "object": chunk_obj, "created": created, "model": self.name, "choices": [choice]})

        async def events():
            completion_tokens = 0
            it = first
            try:
                for k, ((prompt, index), g) in enumerate(zip(jobs, gens)):
                    it = first if k == 0 else self._choice(prompt, params, s["stop"], g)
                    item = head if k == 0 else await it.__anext__()
                    if chat:
                        yield event(index, role=True)
                    if s["echo"]:
                        yield event(index, prompt)
                    said = []
                    while True:
                        if isinstance(item, _Finish):
                            yield event(index, None if chat else "", item.reason)
                            break
                        said.append(item)
                        yield event(index, item)
                        item = await it.__anext__()
                    await it.aclose()  # a stop string ends the decoding now
                    completion_tokens += self._count(["".join(said)], add_special_tokens=False)[0]
                if s["include_usage"]:
                    yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": self.name,
                                "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                         "completion_tokens": completion_tokens,
                                                         "total_tokens": prompt_tokens + completion_tokens}})
                yield b"data: [DONE]\n\n"
            except BadRequest as e:  # the status line is sent: report it as an event
                yield _sse({"error": {"message": str(e), "type": "invalid_request_error", "param": e.param,
                                      "code": e.status}})
            except Exception as e:  # noqa: BLE001
                yield _sse({"error": {"message": f"{type(e).__name__}: {e}"[:500], "type": "server_error",
                                      "param": None, "code": 500}})
            finally:
                self._generated(completion_tokens)
                await it.aclose()
                await first.aclose()

        return events()

    def _generated(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.generated_tokens.inc(n)


class _Finish:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class _StopMatcher:
    """Cuts a stream of text pieces at the first stop string, holding back a tail that may be
    the start of one, so no character past a stop string is ever sent."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf = stops, ""
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str) -> tuple[str, bool]:
        self.buf += piece
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        cut = max(len(self.buf) - self.hold, 0)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out
