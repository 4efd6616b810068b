"""Continuous batching against static batching and one request at a time: throughput and latency.

``python -m trifuse.bench.continuous [--models gpt2-tiny,t5-tiny] [--concurrency 1,8,64] [--out DIR]``;
the main job's ``continuous`` part (``trifuse bench``, bench/default.py; alone: ``trifuse bench continuous``).

A workload of ``--requests`` (48) requests with prompts of 3-40 tokens and 4-96 new tokens (seeded;
EOS off, so every request generates exactly its count) is served three ways, each by one server
thread that ``--concurrency`` client threads submit to and wait on (a closed loop: a client sends its
next request when the last one returns):

* ``engine``: :class:`trifuse.GenerationEngine` (continuous batching over a paged KV cache);
* ``static``: batches of up to 16 waiting requests in arrival order, each one ``model.generate`` call
  (left-padded prompts, ``max_new_tokens`` = the batch's largest): a batch decodes until its longest
  request is done and new requests wait for the whole batch — what ``@serve.batch`` does;
* ``sequential``: ``model.generate`` on one request at a time.

Every row: generated tokens per second (the workload's tokens over the wall time), p50/p99 latency
(submit to result), steps, and the engine's outputs checked token for token against ``sequential``'s
(greedy, so they must agree). The ideal engine-vs-static ratio follows from the token counts: a static
batch pays for ``len(batch) * max(new tokens)`` decode slots where the engine pays for the tokens
themselves; it is printed beside the measured one. Models are random-weight named sizes
(``engine.family``), no checkpoint needed. On a CPU the numbers are only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

from trifuse import engine
from trifuse.engine.continuous import GenerationEngine

from .env import environment
from .suite import build_hf_named, kind_sizes

STATIC_BATCH = 16


def workload(n: int, seed: int = 0, prompt=(3, 40), new=(4, 96), vocab: int = 1000) -> List[tuple]:
    """``n`` requests ``(prompt ids, new tokens)`` in arrival order."""
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt))], rng.randint(*new)) for _ in range(n)]


def ideal_ratio(requests: List[tuple], batch: int = STATIC_BATCH) -> float:
    """Decode slots static batches of ``batch`` pay (every row runs to its batch's longest) over the tokens."""
    news = [n for _, n in requests]
    padded = sum(len(news[i:i + batch]) * max(news[i:i + batch]) for i in range(0, len(news), batch))
    return padded / sum(news)


def build(name: str, device: str):
    seq2seq = name in kind_sizes("seq2seq")
    named = kind_sizes("seq2seq" if seq2seq else "decoder")
    if name not in named:
        raise SystemExit(f"unknown model {name!r}; named sizes: {', '.join(sorted(kind_sizes('decoder')))}, "
                         f"{', '.join(sorted(kind_sizes('seq2seq')))}")
    hf = build_hf_named(name, named, torch.float32, torch.device(device), "eager",
                        "AutoModelForSeq2SeqLM" if seq2seq else "AutoModelForCausalLM")
    return engine.from_pretrained(hf)


def _generate_batch(model, reqs: List[tuple]) -> List[List[int]]:
    """One ``generate`` over a left-padded batch; each request's own new tokens."""
    width = max(len(p) for p, _ in reqs)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in reqs], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in reqs], device=model.device)
    out = model.generate(ids, mask, max_new_tokens=max(n for _, n in reqs), eos_token_id=[])
    skip = 1 if model.is_encoder_decoder else width
    return [out[i, skip:skip + n].tolist() for i, (_, n) in enumerate(reqs)]


class BatchServer:
    """A server thread that runs ``generate`` on up to ``batch`` waiting requests at a time."""

    def __init__(self, model, batch: int):
        self.model, self.batch, self.q, self.steps = model, batch, queue.Queue(), 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def submit(self, prompt, n) -> Callable[[], List[int]]:
        done, box = threading.Event(), []
        self.q.put((prompt, n, done, box))
        return lambda: (done.wait(), box[0])[1]

    def _loop(self):
        with torch.inference_mode():
            while True:
                items = [self.q.get()]
                if items[0] is None:
                    return
                while len(items) < self.batch:
                    try:
                        item = self.q.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self.q.put(None)
                        break
                    items.append(item)
                outs = _generate_batch(self.model, [(p, n) for p, n, _, _ in items])
                self.steps += max(n for _, n, _, _ in items)
                for (_, _, done, box), out in zip(items, outs):
                    box.append(out)
                    done.set()

    def close(self):
        self.q.put(None)
        self.thread.join()


class EngineServer:
    def __init__(self, model, max_num_seqs: int):
        self.engine = GenerationEngine(model, max_num_seqs=max_num_seqs, max_batch_tokens=512)

    def submit(self, prompt, n):
        f = self.engine.submit(prompt, max_new_tokens=n, eos_token_id=[])
        return f.result

    @property
    def steps(self):
        return self.engine.stats()["steps"]

    def close(self):
        self.engine.close()


def serve(server, requests: List[tuple], concurrency: int) -> dict:
    """Clients in a closed loop; returns the wall time, latencies and outputs (in request order)."""
    todo = queue.Queue()
    for i, r in enumerate(requests):
        todo.put((i, r))
    lat, outs = [0.0] * len(requests), [None] * len(requests)

    def client():
        while True:
            try:
                i, (p, n) = todo.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            outs[i] = server.submit(p, n)()
            lat[i] = time.perf_counter() - t0

    t0 = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(min(concurrency, len(requests)))]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    return {"wall_s": time.perf_counter() - t0, "latencies": lat, "outputs": outs}


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def measure(models, concurrency, n_requests, device, seed=0, modes=("engine", "static", "sequential"),
            once=(), new=(4, 96)) -> list:
    """Rows per model, concurrency and mode; the modes in ``once`` run at the first concurrency only."""
    env = environment(device)
    rows = []
    for name in models:
        model = build(name, device)
        reqs = workload(n_requests, seed, new=new, vocab=min(1000, model.config.vocab_size))
        tokens = sum(n for _, n in reqs)
        # Warm-up (first calls allocate and pick kernels), then the timed runs.
        _generate_batch(model, reqs[:2])
        reference = None
        for ci, c in enumerate(concurrency):
            for mode in modes:
                if mode in once and ci:
                    continue
                server = (EngineServer(model, max(c, 1)) if mode == "engine"
                          else BatchServer(model, STATIC_BATCH if mode == "static" else 1))
                try:
                    res = serve(server, reqs, c)
                    steps = server.steps
                finally:
                    server.close()
                if mode == "sequential" and reference is None:
                    reference = res["outputs"]
                rows.append(dict(model=name, mode=mode, concurrency=c, requests=len(reqs), tokens=tokens,
                                 wall_s=round(res["wall_s"], 3), tokens_per_s=round(tokens / res["wall_s"], 1),
                                 p50_s=round(statistics.median(res["latencies"]), 3),
                                 p99_s=round(_pct(res["latencies"], 99), 3), steps=steps,
                                 outputs=res["outputs"], ideal_engine_vs_static=round(ideal_ratio(reqs), 2),
                                 **{k: env[k] for k in ("device", "torch", "git_commit", "timestamp")}))
                print(f"{name:10s} {mode:10s} c={c:3d}  {rows[-1]['tokens_per_s']:9.1f} tok/s  "
                      f"p50 {rows[-1]['p50_s']:.3f}s  p99 {rows[-1]['p99_s']:.3f}s  steps {steps}", flush=True)
        for r in rows:
            if r["model"] == name:
                out = r.pop("outputs")
                r["agrees_with_sequential"] = None if reference is None else sum(
                    a == b for a, b in zip(out, reference))
    return rows


def device_rows(models, concurrency, n_requests, device, once=("sequential",), new=(4, 96)) -> list:
    """Rows for the device check (``bench/device``): the runs of :func:`measure`, the modes in ``once`` only at
    the first concurrency (one at a time is as slow at every concurrency), each row with a ``backend``
    and a ``status``: ``checked`` when the engine's tokens equal one-at-a-time's, else how many do
    (random weights leave near-ties an fp32 rounding can flip, so a difference is reported, not failed)."""
    rows = measure(models, concurrency, n_requests, device, once=once, new=new)
    for r in rows:
        agree = r.pop("agrees_with_sequential", None)
        if r["mode"] == "engine":
            ref = [x for x in rows if x["model"] == r["model"] and x["mode"] == "sequential"]
            r["status"] = "timed" if not ref else "checked" if agree == r["requests"] else \
                f"differs: {agree} of {r['requests']} requests equal one-at-a-time's"
        else:
            r["status"] = "timed"
        r.update(suite="continuous", op=r["model"], shape=f"{r['requests']} req c{r['concurrency']}",
                 backend={"engine": "trifuse-engine", "static": "static-batches-16",
                          "sequential": "one-at-a-time"}[r["mode"]])
    return rows


def summarize(rows) -> list:
    """Per model and concurrency: engine over static and over sequential (tokens/s), beside the ideal."""
    out = []
    for (m, c) in sorted({(r["model"], r["concurrency"]) for r in rows}):
        by = {r["mode"]: r for r in rows if r["model"] == m and r["concurrency"] == c}
        if "engine" in by and "static" in by:
            out.append(dict(model=m, concurrency=c,
                            engine_vs_static=round(by["engine"]["tokens_per_s"] / by["static"]["tokens_per_s"], 2),
                            ideal=by["engine"]["ideal_engine_vs_static"],
                            engine_vs_sequential=round(by["engine"]["tokens_per_s"]
                                                       / by["sequential"]["tokens_per_s"], 2)
                            if "sequential" in by else None,
                            p50_engine_over_static=round(by["engine"]["p50_s"] / by["static"]["p50_s"], 2),
                            p99_engine_over_static=round(by["engine"]["p99_s"] / by["static"]["p99_s"], 2)))
    return out

# ----------------------------------------------------------------------------
# The main job's part (``trifuse bench`` with no suite, bench/default.py) and ``trifuse bench continuous``

#: A --quick run on the CPU: half the issue's requests with half its longest outputs, two concurrencies.
QUICK = dict(models=("gpt2-tiny", "t5-tiny"), requests=24, concurrency=(8, 64), new=(4, 48))
#: --full (and any run on a GPU): the issue's workload; on a GPU at GPT-2's and T5's real sizes.
FULL = dict(models=("gpt2-tiny", "t5-tiny"), requests=48, concurrency=(1, 8, 64), new=(4, 96))
FULL_GPU_MODELS = ("gpt2", "t5-small")


def run(opts, models=None):
    """The suite: :func:`device_rows` on ``opts.device``, the workload of :data:`QUICK` or :data:`FULL`.
    The engine's row is ``checked`` when its tokens equal one-at-a-time ``generate``'s; on the CPU a
    difference is a ``mismatch`` (a failed check), on a GPU it is reported as :func:`device_rows` does."""
    from .suite import SuiteResult, step

    plan = QUICK if opts.quick and not opts.on_gpu else FULL
    models = list(models or (FULL_GPU_MODELS if opts.on_gpu else plan["models"]))
    step(opts, f"continuous batching: {', '.join(models)}, {plan['requests']} requests")
    if opts.on_gpu:
        rows = device_rows(models, list(plan["concurrency"]), plan["requests"], str(opts.device), new=plan["new"])
    else:
        # The CPU's native path, as a user's process has it: `trifuse bench` turns Triton's interpreter on
        # to check the kernels, which would otherwise run here (far slower). Process-wide, as the servers
        # run in their own threads; called from the main thread, get_backend() is the process-wide one.
        from trifuse import kernels

        previous = kernels.get_backend()
        kernels.set_backend("native")
        try:
            rows = device_rows(models, list(plan["concurrency"]), plan["requests"], "cpu", new=plan["new"])
        finally:
            kernels.set_backend(previous)
    for r in rows:
        if not opts.on_gpu and str(r["status"]).startswith("differs"):
            r["detail"], r["status"] = r["status"], "mismatch"
    notes = [f"{plan['requests']} requests (prompts of 3-40 tokens, {plan['new'][0]}-{plan['new'][1]} new tokens, "
             f"seeded, EOS off) served by {', '.join(map(str, plan['concurrency']))} closed-loop clients: the "
             f"engine, static batches of {STATIC_BATCH} in arrival order, and one at a time (at the first "
             "concurrency only); random-weight models. tokens_per_s counts generated tokens."]
    if not opts.on_gpu:
        notes.append("On the CPU every mode runs trifuse's native CPU path (not Triton's interpreter).")
    return SuiteResult(f"Continuous batching vs static batches of {STATIC_BATCH} on {opts.device.type}", rows, {}, notes)


def headline_line(rows: list) -> Optional[str]:
    """The main job's line: engine over static batches at the highest concurrency, per model, beside the ideal."""
    parts = []
    for s in summarize(rows):
        top = max(r["concurrency"] for r in rows if r["model"] == s["model"])
        if s["concurrency"] != top:
            continue
        by = {r["mode"]: r for r in rows if r["model"] == s["model"] and r["concurrency"] == top}
        e, st = by["engine"], by["static"]
        parts.append(f"{s['model']} {s['engine_vs_static']:.2f}x tokens/s (ideal {s['ideal']:.2f}x), p50 "
                     f"{e['p50_s']:.2f} s vs {st['p50_s']:.2f} s, p99 {e['p99_s']:.2f} s vs {st['p99_s']:.2f} s")
    if not parts:
        return None
    r0 = rows[0]
    return (f"Continuous batching ({r0['requests']} requests, concurrency {top}): the engine against static batches "
            f"of {STATIC_BATCH}: " + "; ".join(parts) + ".")


def plot_rows(rows: list, path: Path) -> bool:
    """The main job's PNG of this part (:func:`plot` on the rows that were timed)."""
    rows = [r for r in rows if r.get("tokens_per_s")]
    return bool(rows) and plot(rows, path)


def _span(text: str) -> tuple:
    lo, _, hi = text.partition(",")
    try:
        span = (int(lo), int(hi))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO,HI (two whole numbers)") from None
    if not 1 <= span[0] <= span[1]:
        raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {text}")
    return span


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'trifuse[bench]')")
        return False
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    for ax_row, m in zip(axes, models):
        for mode, style in (("engine", "o-"), ("static", "s--"), ("sequential", "^:")):
            rs = sorted((r for r in rows if r["model"] == m and r["mode"] == mode), key=lambda r: r["concurrency"])
            if not rs:
                continue
            cs = [r["concurrency"] for r in rs]
            ax_row[0].plot(cs, [r["tokens_per_s"] for r in rs], style, label=mode)
            line, = ax_row[1].plot(cs, [r["p50_s"] for r in rs], style, label=f"{mode} p50")
            ax_row[1].plot(cs, [r["p99_s"] for r in rs], style, alpha=0.45, color=line.get_color(),
                           label=f"{mode} p99")
        for ax, ylabel in ((ax_row[0], "generated tokens / s"), (ax_row[1], "latency (s)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency (clients)")
            ax.set_ylabel(ylabel)
            ax.set_title(m)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"Continuous batching vs static batches of {STATIC_BATCH} vs one at a time — {r0['device']}, "
                 f"{r0['requests']} requests, git {r0['git_commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trifuse.bench.continuous", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2-tiny,t5-tiny")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--new", type=_span, default=(4, 96), help="LO,HI new tokens per request (default 4,96)")
    ap.add_argument("--modes", default="engine,static,sequential")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench-results/continuous")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(a.models.split(","), [int(c) for c in a.concurrency.split(",")], a.requests, a.device,
                   modes=tuple(a.modes.split(",")), new=a.new)
    summary = summarize(rows)
    (out / "continuous.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    for s in summary:
        print(f"{s['model']:10s} c={s['concurrency']:3d}  engine/static {s['engine_vs_static']}x "
              f"(ideal {s['ideal']}x)  engine/sequential {s['engine_vs_sequential']}x  "
              f"p50 ratio {s['p50_engine_over_static']}  p99 ratio {s['p99_engine_over_static']}")
    if plot(rows, out / "continuous.png"):
        print(f"plot: {out / 'continuous.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
