"""Serving throughput and latency: ``trifuse serve`` under 1, 8, 64 concurrent clients.

    python -m trifuse.bench.serving path/to/checkpoint --task text-classification \\
        [--concurrency 1 8 64] [--requests 256] [--max-batch-size 32] [--routes / /v1/embeddings] [--out results]

Routes: ``POST /`` (Hugging Face's shape) and the OpenAI route of the task: ``/v1/embeddings``
for sentence-embedding and feature-extraction (embeddings/s), ``/v1/completions`` for
text-generation (greedy, 16 new tokens; generated tokens/s). The workload mixes lengths
(2 to ~130 tokens).

Starts ``trifuse serve`` twice, as a user does (Ray Serve batching on, with
``--max-batch-size``; then off, batches of one), and for each concurrency level runs that
many clients over loopback, each sending its requests one after another. Rows report
requests/s over the level's wall time, latency p50/p90/p99 (and p10) per request, and the
mean number of requests the replica gathered per forward pass. Every answer is checked
against ``trifuse.pipeline`` on the same input before anything is reported. Written as
``serve-<device>.{json,csv,md,png}``. On a CPU (and a shared machine) the numbers are
indicative: the clients, the proxy and the replica share the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SENTENCES = ["I love it", "meh", "the worst film I have seen this year, by far", "ok", "a fine, quiet day",
             "what a wonderful world it is when the sun is out and the birds sing all day long"]


def _inputs(task: str, n: int) -> list:
    """A mixed-length workload: 1 to 8 repeats of sentences of 1 to 16 words (2 to ~130 tokens)."""
    texts = [" ".join([SENTENCES[i % len(SENTENCES)]] * (1 + (i * 7) % 8)) for i in range(n)]
    if task == "fill-mask":
        return [f"{t} [MASK] ." for t in texts]
    if task == "question-answering":
        return [{"question": "what is out?", "context": t} for t in texts]
    return texts


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _post(url: str, payload: dict) -> tuple[float, object]:
    data = json.dumps(payload).encode()
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        body = json.loads(r.read())
    return (time.perf_counter() - t0) * 1e3, body


def _level(url: str, inputs: list, clients: int, expected: list, route: str = "/") -> dict:
    """``clients`` threads share ``inputs`` round-robin, each sending its share one by one to
    ``route`` (``/``, ``/v1/embeddings`` or ``/v1/completions``)."""
    shares = [list(range(c, len(inputs), clients)) for c in range(clients)]
    latencies: list[float] = []
    wrong = []
    units = [0]  # embeddings, or generated tokens

    def client(idx: list[int]) -> None:
        for i in idx:
            ms, got = _post(url + route.lstrip("/"), _payload(route, inputs[i]))
            latencies.append(ms)
            got, n = _answer(route, got)
            units[0] += n
            if not _close(got, expected[i]):
                wrong.append(i)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, shares))
    wall = time.perf_counter() - t0
    return {"latencies": latencies, "wall_s": wall, "wrong": wrong, "stats": _stats(url), "units": units[0]}


#: new tokens per completion in the benchmark
COMPLETION_TOKENS = 16
MODEL_NAME = "bench"


def _payload(route: str, x) -> dict:
    if route == "/v1/embeddings":
        return {"model": MODEL_NAME, "input": x, "encoding_format": "float"}
    if route == "/v1/completions":
        return {"model": MODEL_NAME, "prompt": x, "max_tokens": COMPLETION_TOKENS, "temperature": 0}
    return {"inputs": x}


def _answer(route: str, body) -> tuple:
    """``(what to compare with the pipeline, units of work)`` of one answer."""
    if route == "/v1/embeddings":
        return body["data"][0]["embedding"], 1
    if route == "/v1/completions":
        return body["choices"][0]["text"], body["usage"]["completion_tokens"]
    return body, 1


def _expected(pipe, task: str, route: str, x):
    from trifuse.engine.pipelines import jsonable

    if route == "/v1/completions":
        return pipe(x, max_new_tokens=COMPLETION_TOKENS, do_sample=False, return_full_text=False)[0]["generated_text"]
    out = jsonable(pipe(x))
    if route == "/v1/embeddings" and task == "feature-extraction":
        import numpy as np

        return np.asarray(out, dtype=np.float32)[0].mean(0).tolist()
    return out


def _fit(pipe, text: str, tokens: int) -> str:
    """``text`` without its last words until it is at most ``tokens`` tokens."""
    words = text.split(" ")
    while len(words) > 1 and len(pipe.tokenizer.encode([" ".join(words)])[0].ids) > tokens:
        words.pop()
    return " ".join(words)


def routes_for(task: str) -> list:
    """The routes the benchmark drives for ``task``: ``POST /`` and the OpenAI route it has."""
    if task in ("sentence-embedding", "feature-extraction"):
        return ["/", "/v1/embeddings"]
    if task == "text-generation":
        return ["/v1/completions"]  # POST / samples by default; the OpenAI route is greedy at temperature 0
    return ["/"]


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url + "stats", timeout=60) as r:
        return json.loads(r.read())


def _close(a, b, tol=1e-4) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= tol
    return a == b


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(checkpoint: str, task: str, *flags: str, timeout_s: float = 600):
    """``trifuse serve CHECKPOINT --task TASK FLAGS`` on a free loopback port, as a user starts it:
    yields its base URL once it answers, then stops it (SIGTERM) and waits for it to exit."""
    port = _free_port()
    cmd = [sys.executable, "-m", "trifuse", "serve", str(checkpoint), "--task", task, "--port", str(port), *flags]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            log.append(line)
            if "trifuse serve: Ray at " in line:
                break
        else:
            raise RuntimeError("trifuse serve did not come up in time:\n" + "".join(log[-30:]))
        if proc.poll() is not None:
            raise RuntimeError("trifuse serve exited:\n" + "".join(log[-30:]))
        threading.Thread(target=lambda: [log.append(x) for x in proc.stdout], daemon=True).start()
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(checkpoint: str, task: str, *, concurrency=(1, 8, 64), requests: int = 256, max_batch_size: int = 32,
        batch_wait_ms: float = 5.0, device=None, dtype=None, routes=None) -> list[dict]:
    import trifuse

    inputs = _inputs(task, requests)
    routes = routes or routes_for(task)
    pipe = trifuse.pipeline(task, checkpoint, device=device, dtype=dtype)
    if task == "text-generation":  # prompts and their new tokens within the model's positions
        inputs = [_fit(pipe, x, pipe.max_tokens - COMPLETION_TOKENS) for x in inputs]
    expected = {route: [_expected(pipe, task, route, x) for x in inputs] for route in routes}
    common = [*(["--device", device] if device else []), *(["--dtype", dtype] if dtype else []),
              "--served-model-name", MODEL_NAME, "--max-new-tokens", str(max(COMPLETION_TOKENS, 256)),
              "--max-concurrent-requests", str(max(512, 2 * max(concurrency)))]
    rows = []
    for mode, bs in (("batched", max_batch_size), ("unbatched", 1)):
        wait = batch_wait_ms if bs > 1 else 0.0
        with served(checkpoint, task, "--max-batch-size", str(bs), "--batch-wait-ms", str(wait), *common) as url:
            for route in routes:
                _post(url + route.lstrip("/"), _payload(route, inputs[0]))  # warm-up (first pass, allocations)
                for clients in concurrency:
                    before = _stats(url)
                    r = _level(url, inputs, clients, expected[route], route)
                    after, lat = r["stats"], r["latencies"]
                    unit = "tokens_per_s" if route == "/v1/completions" else (
                        "embeddings_per_s" if route == "/v1/embeddings" else "answers_per_s")
                    row = {"op": f"serve {task} {route}", "backend": mode, "route": route, "concurrency": clients,
                           "requests": len(lat), "max_batch_size": bs, "median_ms": statistics.median(lat),
                           "p10_ms": _percentile(lat, 0.1), "p90_ms": _percentile(lat, 0.9),
                           "p99_ms": _percentile(lat, 0.99), "requests_per_s": len(lat) / r["wall_s"],
                           unit: r["units"] / r["wall_s"], "status": "ok",
                           "mean_batch_size": (after["requests"] - before["requests"])
                           / max(1, after["batches"] - before["batches"])}
                    if r["wrong"]:
                        row["status"] = f"mismatch: {len(r['wrong'])} answers differ from trifuse.pipeline"
                    rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("No plot: matplotlib is not installed (pip install 'trifuse[bench]')", file=sys.stderr)
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    colors = ("tab:blue", "tab:orange", "tab:green")
    for k, route in enumerate(dict.fromkeys(r.get("route", "/") for r in rows)):
        for mode, style in (("batched", dict(color=colors[k % 3], marker="o")),
                            ("unbatched", dict(color=colors[k % 3], marker="s", linestyle="--", alpha=0.6))):
            rs = [r for r in rows if r["backend"] == mode and r.get("route", "/") == route and r["status"] == "ok"]
            if not rs:
                continue
            x = [r["concurrency"] for r in rs]
            label = f"{route} {mode} (max batch {rs[0]['max_batch_size']})"
            a.plot(x, [r["requests_per_s"] for r in rs], label=label, **style)
            med = [r["median_ms"] for r in rs]
            band = [[m - r["p10_ms"] for m, r in zip(med, rs)], [r["p90_ms"] - m for m, r in zip(med, rs)]]
            b.errorbar(x, med, yerr=band, capsize=3, label=f"{label}: p50 (p10-p90)", **style)
            b.plot(x, [r["p99_ms"] for r in rs], alpha=0.5, label=f"{mode}: p99", color=style["color"], marker="^",
                   linestyle=":")
    for ax, ylabel in ((a, "requests / s"), (b, "latency per request (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["concurrency"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    b.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trifuse.bench.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--task", required=True)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--requests", type=int, default=256, help="requests per concurrency level (default 256)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--routes", nargs="+", default=None, choices=["/", "/v1/embeddings", "/v1/completions"],
                   help="routes to drive (default: POST / and the task's OpenAI route)")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    if min(args.concurrency) < 1 or args.requests < 1 or args.max_batch_size < 1 or args.batch_wait_ms < 0:
        p.error("--concurrency, --requests and --max-batch-size must be >= 1, --batch-wait-ms >= 0")
    from .env import device_slug, environment
    from .report import markdown_table

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows = run(args.checkpoint, args.task, concurrency=args.concurrency, requests=args.requests,
               max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, device=args.device,
               dtype=args.dtype, routes=args.routes)
    env = environment(args.device or "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serve-{device_slug(env)}"
    title = f"trifuse serve {args.task}: throughput and latency vs concurrent clients ({env.get('device')})"
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    (out / f"{stem}.csv").write_text("\n".join([",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys)
                                                                    for r in rows]) + "\n")
    drew = plot(rows, out / f"{stem}.png", title)
    md = [f"# {title}", "", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items() if v is not None]
    md += ["", "## Results", "", markdown_table(rows), ""] + ([f"![{title}]({stem}.png)", ""] if drew else [])
    (out / f"{stem}.md").write_text("\n".join(md))
    print(f"{'route':<17}{'mode':<10}{'clients':>8}{'req/s':>9}{'units/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}"
          f"  status")
    for r in rows:
        units = next((r[k] for k in ("tokens_per_s", "embeddings_per_s", "answers_per_s") if k in r), 0.0)
        print(f"{r['route']:<17}{r['backend']:<10}{r['concurrency']:>8}{r['requests_per_s']:>9.1f}{units:>9.1f}"
              f"{r['median_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['mean_batch_size']:>7.1f}  {r['status']}")
    print(f"wrote {out / stem}.{{json,csv,md{',png' if drew else ''}}}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
