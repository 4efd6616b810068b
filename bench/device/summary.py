"""Reading a device check's results: ``summary.md``, the plots, the closing table, the goals of issue 20."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional


def our_failure(row: dict) -> bool:
    """A trifuse row that did not match its reference or raised: the stage fails on it."""
    status = str(row.get("status", ""))
    ours = str(row.get("backend", "")).startswith("trifuse") or row.get("backend") == "reference"
    return ours and (status == "mismatch" or status.startswith("error"))


def _stage(doc: dict, name: str) -> dict:
    return next((s for s in doc["stages"] if s["name"] == name), {"rows": [], "status": "not run"})


def _timed(rows, **match):
    return [r for r in rows if r.get("median_ms") and all(r.get(k) == v for k, v in match.items())]


def attention_pairs(rows: list[dict]) -> list[dict]:
    """Per attention problem: trifuse against its fastest peer (SDPA backends; for T5 rows the
    materialized-bias SDPA and FlexAttention)."""
    out = []
    keys = dict.fromkeys((r["op"], r["shape"], r["dtype"]) for r in rows if r.get("suite") == "attention")
    for op, shape, dtype in keys:
        mine = _timed(rows, suite="attention", op=op, shape=shape, dtype=dtype)
        ours = next((r for r in mine if r["backend"] == "trifuse"), None)
        peers = [r for r in mine if r["backend"].startswith(("sdpa", "flex"))]
        notma = next((r for r in mine if r["backend"] == "trifuse-notma"), None)
        if ours is None:
            continue
        best = min(peers, key=lambda r: r["median_ms"]) if peers else None
        out.append({"op": op, "shape": shape, "dtype": dtype, "trifuse_ms": ours["median_ms"],
                    "tflops": ours.get("tflops"), "gbps": ours.get("gbps"), "frac_of_peak": ours.get("frac_of_peak"),
                    "peer": best["backend"] if best else None, "peer_ms": best["median_ms"] if best else None,
                    "speedup": best["median_ms"] / ours["median_ms"] if best else None,
                    "cold_ms": ours.get("cold_ms"), "d": ours.get("d"), "lq": ours.get("lq"),
                    # the same kernel with pointer loads instead of TMA (a 'trifuse-notma' row, when run)
                    "notma_ms": notma["median_ms"] if notma else None,
                    "tma_gain": notma["median_ms"] / ours["median_ms"] if notma else None})
    return out


def model_pairs(rows: list[dict]) -> list[dict]:
    """Per model, shape and phase: trifuse (and trifuse-graphs) against HF eager and torch.compile."""
    out = []
    keys = dict.fromkeys((r.get("suite"), r["op"], r["shape"], r.get("dtype")) for r in rows if "op" in r
                         and r.get("backend"))
    for suite, op, shape, dtype in keys:
        mine = _timed(rows, suite=suite, op=op, shape=shape, dtype=dtype)
        by = {}
        for r in mine:
            by.setdefault(r["backend"], r["median_ms"])  # first measurement of each backend
        ours = min((by[b], b) for b in ("trifuse", "trifuse-graphs") if b in by) if \
            any(b in by for b in ("trifuse", "trifuse-graphs")) else None
        if ours is None:
            continue
        pair = {"suite": suite, "op": op, "shape": shape, "dtype": dtype, "best_ours": ours[1], "ours_ms": ours[0],
                **{f"{b}_ms": by.get(b) for b in ("trifuse", "trifuse-graphs", "hf-eager", "hf-sdpa", "torch-compile")}}
        if by.get("hf-eager"):
            pair["vs_eager"] = by["hf-eager"] / ours[0]
        if by.get("torch-compile"):
            pair["vs_compile"] = by["torch-compile"] / ours[0]
        out.append(pair)
    # torch.compile ran in its own item: join it to the trifuse rows of the same model and shape.
    compiled = {(r["op"], r["shape"]): r["median_ms"] for r in rows
                if r.get("backend") == "torch-compile" and r.get("median_ms")}
    for p in out:
        if p.get("torch-compile_ms") is None and (p["op"], p["shape"]) in compiled:
            p["torch-compile_ms"] = compiled[(p["op"], p["shape"])]
            p["vs_compile"] = p["torch-compile_ms"] / p["ours_ms"]
    return out


def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def goals(doc: dict) -> list[tuple[str, str, Optional[bool]]]:
    """Issue 20's goals: (goal, measured, met?) with None where this run has no figure for it."""
    krows = _stage(doc, "kernels")["rows"]
    mrows = _stage(doc, "models")["rows"]
    att = attention_pairs(krows)
    ceil = {}
    for r in krows:
        for k, v in r.items():
            if k.startswith("ceiling_"):
                ceil[k[8:]] = v
    res = []

    def add(goal, values, fmt, ok):
        values = [v for v in values if v is not None]
        if not values:
            res.append((goal, "no figure in this run", None))
        else:
            res.append((goal, fmt(values), ok(values)))

    plain = [p for p in att if p["op"] in ("attn", "attn-causal") and p["speedup"]]
    add("attention >= best SDPA backend at every shape", [p["speedup"] for p in plain],
        lambda v: f"worst {min(v):.2f}x over {len(v)} shapes", lambda v: min(v) >= 1.0)
    big = [p for p in att if p["op"] == "attn" and p.get("d") == 128 and (p.get("lq") or 0) >= 2048]
    add(">= 70% of matmul peak, hd128, S>=2k", [p["frac_of_peak"] for p in big],
        lambda v: f"min {min(v):.0%}", lambda v: min(v) >= 0.70)
    bigc = [p for p in att if p["op"] == "attn-causal" and p.get("d") == 128 and (p.get("lq") or 0) >= 2048]
    add("causal >= 80% of the bidirectional fraction", [
        p["frac_of_peak"] / b["frac_of_peak"] for p in bigc for b in big
        if b["shape"] == p["shape"] and b["dtype"] == p["dtype"] and b["frac_of_peak"]],
        lambda v: f"min {min(v):.0%}", lambda v: min(v) >= 0.80)
    t5 = [(p, b) for p in att if p["op"] == "attn-t5" for b in att
          if b["op"] == "attn" and b["shape"] == p["shape"] and b["dtype"] == p["dtype"]]
    add("T5 in-kernel bias <= 10% slower than no bias", [p["trifuse_ms"] / b["trifuse_ms"] for p, b in t5],
        lambda v: f"worst {max(v):.2f}x the no-bias time", lambda v: max(v) <= 1.10)
    dense = [p["speedup"] for p in att if p["op"].startswith("attn-t5") and p["peer"] == "sdpa-dense-bias"]
    add("T5 bias >= 1.3x SDPA with the materialized bias", dense, lambda v: f"worst {min(v):.2f}x",
        lambda v: min(v) >= 1.3)
    copy = ceil.get("copy_gbps")
    dec = [p["gbps"] / copy for p in att if p["op"] == "decode" and p.get("gbps") and copy]
    add("decode >= 70% of copy bandwidth", dec, lambda v: f"min {min(v):.0%}, max {max(v):.0%}",
        lambda v: min(v) >= 0.70)
    norms = [r for r in _timed(krows, suite="kernels", backend="trifuse") if r.get("frac_of_peak")]
    wide = [r["frac_of_peak"] for r in norms if int(r["shape"].split("x")[1]) >= 4096]
    narrow = [r["frac_of_peak"] for r in norms if int(r["shape"].split("x")[1]) < 4096]
    add("norms >= 85% of copy bandwidth at width >= 4096", wide, lambda v: f"min {min(v):.0%}",
        lambda v: min(v) >= 0.85)
    add("norms >= 70% of copy bandwidth at width 768", narrow, lambda v: f"min {min(v):.0%}",
        lambda v: min(v) >= 0.70)
    pairs = model_pairs(mrows)
    bert = [p["ours_ms"] for p in pairs if p["op"] == "bert-base" and p["shape"] == "1x128"]
    add("BERT-base B1 S128 <= 0.5 ms", bert, lambda v: f"{min(v):.3f} ms", lambda v: min(v) <= 0.5)
    gpt = [p["ours_ms"] for p in pairs if p["op"].startswith("gpt2 decode") and p["shape"].startswith("1x")]
    add("GPT-2 small <= 0.4 ms/token at B1", gpt, lambda v: f"{min(v):.3f} ms/token", lambda v: min(v) <= 0.4)
    b1 = [p["vs_eager"] for p in pairs if p["shape"].startswith("1x") and p.get("vs_eager")]
    add(">= 3x HF eager at batch 1", b1, lambda v: f"worst {min(v):.2f}x, geomean {_geomean(v):.2f}x",
        lambda v: min(v) >= 3.0)
    comp = [p["vs_compile"] for p in pairs if p.get("vs_compile")]
    add(">= 1.3x torch.compile (geomean)", comp, lambda v: f"geomean {_geomean(v):.2f}x over {len(v)}",
        lambda v: _geomean(v) >= 1.3)
    return res


def _fmt(v, f="{:.3g}"):
    if v is None:
        return "-"
    try:
        return f.format(v)
    except (TypeError, ValueError):
        return str(v)


def _stage_note(s: dict) -> str:
    rows = s.get("rows", [])
    if s["name"] == "gpu-tests":
        n = {o: sum(r.get("outcome") == o for r in rows) for o in ("passed", "failed", "skipped")}
        failed = [r["test"] for r in rows if r.get("outcome") == "failed"]
        note = f"{n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped"
        return note + (": " + ", ".join(failed[:4]) + (" ..." if len(failed) > 4 else "") if failed else "")
    skipped = [r["item"] for r in rows if str(r.get("status", "")).startswith("skipped: needs")]
    bad = [r for r in rows if our_failure(r)]
    parts = []
    if bad:
        parts.append(f"{len(bad)} trifuse rows wrong/failing: " + ", ".join(
            f"{r.get('op')} {r.get('shape')} {r.get('backend')} {r.get('status')}" for r in bad[:3]))
    if skipped:
        parts.append(f"{len(skipped)} items skipped for budget")
    if s.get("error") and s["status"] != "ok":
        parts.append(s["error"].splitlines()[-1][:150] if s["error"].strip() else "")
    return "; ".join(p for p in parts if p)


def compact_table(doc: dict, out: Path) -> list[str]:
    """The closing lines a reader acts on (about 40)."""
    lines = []
    d = doc.get("device") or {}
    lines.append(f"== device-check{' (DRY RUN on the CPU)' if doc['dry_run'] else ''}: "
                 f"{d.get('name') or d.get('host_device') or '?'}, {d.get('sm_count', '-')} SMs, driver "
                 f"{d.get('driver', '-')}, torch {d.get('torch', '-')}, triton {d.get('triton', '-')}, "
                 f"commit {d.get('git_commit', '-')}")
    lines.append(f"ceilings: copy {_fmt(d.get('copy_gbps'), '{:.0f}')} GB/s, matmul fp16 "
                 f"{_fmt(d.get('matmul_fp16_tflops'), '{:.0f}')} / bf16 {_fmt(d.get('matmul_bf16_tflops'), '{:.0f}')}"
                 f" TFLOP/s; clocks SM {d.get('sm_clock_mhz', '-')} (max {d.get('max_sm_clock_mhz', '-')}), "
                 f"power limit {d.get('power_limit_w', '-')}")
    lines.append(f"{'stage':<12} {'status':<8} {'s':>6} {'rows':>5}  note")
    for s in doc["stages"]:
        line = f"{s['name']:<12} {s['status']:<8} {s['seconds']:>6.0f} {len(s['rows']):>5}  {_stage_note(s)}"
        lines.append(line[:200])
    att = attention_pairs(_stage(doc, "kernels")["rows"])
    if att:
        lines.append("attention (worst first): op shape dtype | trifuse ms TFLOP/s-or-GB/s %peak | best peer ms | x")
        for p in sorted(att, key=lambda p: p["speedup"] or 9e9)[:8]:
            rate = f"{p['tflops']:.0f}TF" if p.get("tflops") else f"{p['gbps']:.0f}GB/s" if p.get("gbps") else "-"
            lines.append(f"  {p['op']:<15} {p['shape']:<20} {p['dtype']:<4} | {p['trifuse_ms']:.4f} {rate:>8} "
                         f"{_fmt(p['frac_of_peak'], '{:.0%}'):>4} | {p['peer'] or '-'} {_fmt(p['peer_ms'], '{:.4f}')}"
                         f" | {_fmt(p['speedup'], '{:.2f}x')}")
    gains = [p["tma_gain"] for p in att if p.get("tma_gain")]
    if gains:
        lines.append(f"TMA loads vs pointer loads (trifuse-notma ms / trifuse ms): geomean "
                     f"{_geomean(gains):.2f}x over {len(gains)} problems, {min(gains):.2f}x..{max(gains):.2f}x")
    pairs = model_pairs(_stage(doc, "models")["rows"])
    if pairs:
        lines.append("models: op shape | ours ms (which) | hf-eager | torch.compile | x eager | x compile")
        for p in pairs[:10]:
            lines.append(f"  {p['op']:<28} {p['shape']:<12} | {p['ours_ms']:.3f} ({p['best_ours']}) | "
                         f"{_fmt(p.get('hf-eager_ms'), '{:.3f}')} | {_fmt(p.get('torch-compile_ms'), '{:.3f}')} | "
                         f"{_fmt(p.get('vs_eager'), '{:.2f}x')} | {_fmt(p.get('vs_compile'), '{:.2f}x')}")
    cold = _cold_starts(doc)
    if cold:
        lines.append(f"cold start (first call: compile + autotune): {cold['total_s']:.0f} s over {cold['n']} trifuse "
                     f"rows; worst {cold['worst']}")
    lines.append("goals (issue 20):")
    for goal, measured, ok in goals(doc):
        lines.append(f"  [{'MET' if ok else 'not met' if ok is not None else 'n/a'}] {goal}: {measured}")
    lines.append(f"files: {out}/device-check.json, summary.md, device-check.log, rows.jsonl, *.png")
    return lines


def _cold_starts(doc: dict) -> Optional[dict]:
    rows = [r for s in doc["stages"] for r in s["rows"]
            if str(r.get("backend", "")).startswith("trifuse") and r.get("cold_ms")]
    if not rows:
        return None
    worst = max(rows, key=lambda r: r["cold_ms"])
    return {"n": len(rows), "total_s": sum(r["cold_ms"] for r in rows) / 1e3,
            "worst": f"{worst['op']} {worst['shape']} {worst['cold_ms'] / 1e3:.1f} s"}


def summary_markdown(doc: dict, pngs: tuple = ()) -> str:
    d = doc.get("device") or {}
    md = [f"# trifuse device check{' (dry run on the CPU)' if doc['dry_run'] else ''}", "",
          f"`{doc['command']}`, started {doc['started']}, budget {doc['budget_s']:.0f} s, "
          f"took {doc.get('seconds', 0):.0f} s.", "", "## Device", ""]
    md += [f"- {k}: {v}" for k, v in d.items() if v is not None]
    md += ["", "## Stages", "", "| stage | status | seconds | deadline | rows | note |", "|---|---|---|---|---|---|"]
    for s in doc["stages"]:
        md.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s.get('deadline_s', '-')} | "
                  f"{len(s['rows'])} | {_stage_note(s).replace('|', '/')} |")
    md += ["", "## Goals (issue 20)", "", "| goal | measured | met |", "|---|---|---|"]
    md += [f"| {g} | {m} | {'yes' if ok else 'no' if ok is not None else 'n/a'} |" for g, m, ok in goals(doc)]
    tests = _stage(doc, "gpu-tests")["rows"]
    failed = [r for r in tests if r.get("outcome") == "failed"]
    if failed:
        md += ["", "## Failed GPU tests", ""] + [f"- `{r['test']}`: {r.get('message', '')}" for r in failed]
    att = attention_pairs(_stage(doc, "kernels")["rows"])
    if att:
        md += ["", "## Attention: trifuse against the fastest peer", "",
               markdown_table(att, (("op", "op", "{}"), ("shape", "B x H x Lq x Lk x D", "{}"),
                                    ("dtype", "dtype", "{}"),
                                    ("trifuse_ms", "trifuse ms", "{:.4f}"), ("tflops", "TFLOP/s", "{:.1f}"),
                                    ("gbps", "GB/s", "{:.0f}"), ("frac_of_peak", "% of peak", "{:.0%}"),
                                    ("peer", "best peer", "{}"), ("peer_ms", "peer ms", "{:.4f}"),
                                    ("speedup", "speedup", "{:.2f}x"), ("cold_ms", "cold ms", "{:.0f}"),
                                    ("notma_ms", "no-TMA ms", "{:.4f}"), ("tma_gain", "TMA gain", "{:.2f}x")))]
    pairs = model_pairs(_stage(doc, "models")["rows"])
    if pairs:
        md += ["", "## Models", "",
               markdown_table(pairs, (("op", "model", "{}"), ("shape", "shape", "{}"), ("dtype", "dtype", "{}"),
                                      ("trifuse_ms", "trifuse ms", "{:.3f}"),
                                      ("trifuse-graphs_ms", "trifuse-graphs ms", "{:.3f}"),
                                      ("hf-eager_ms", "hf-eager ms", "{:.3f}"), ("hf-sdpa_ms", "hf-sdpa ms", "{:.3f}"),
                                      ("torch-compile_ms", "torch.compile ms", "{:.3f}"),
                                      ("vs_eager", "x eager", "{:.2f}x"), ("vs_compile", "x compile", "{:.2f}x")))]
    cold = _cold_starts(doc)
    if cold:
        md += ["", "## Cold start", "",
               f"First calls of trifuse rows (Triton compile + autotune, graph capture): {cold['total_s']:.1f} s "
               f"over {cold['n']} rows; the worst: {cold['worst']}. Steady-state figures above exclude it."]
    md += ["", "## Every row", "", "Full rows, with environment, in `device-check.json`; the stages' output in "
           "`device-check.log`."]
    md += ["", *[f"![{p}]({p})" for p in pngs]]
    return "\n".join(md) + "\n"


def write_plots(doc: dict, out: Path) -> tuple:
    """attention.png (TFLOP/s against sequence length), kernels.png (GB/s: norms, GELU, split-K
    decode, with the copy ceiling), models.png (speedups over HF eager). Names of the files made."""
    made = []
    krows = [r for r in _stage(doc, "kernels")["rows"] if r.get("median_ms")]
    copy = next((r["ceiling_copy_gbps"] for r in krows if r.get("ceiling_copy_gbps")), None)
    att = [r for r in krows if r.get("suite") == "attention" and r.get("tflops") and (r.get("lq") or 0) > 1]
    if _plot_panels(att, lambda r: f"{r['op']} {r['dtype']} hd{r['d']}", lambda r: r["lq"], "tflops",
                    out / "attention.png", "sequence length", "TFLOP/s", log2x=True):
        made.append("attention.png")
    bw = [r for r in krows if r.get("gbps")]
    if _plot_panels(bw, lambda r: f"{r['op']} {r['dtype']}" + (f" B{r['b']} hd{r['d']}" if r["op"] == "decode" else ""),
                    lambda r: r["lk"] if r["op"] == "decode" else int(str(r["shape"]).split("x")[-1]), "gbps",
                    out / "kernels.png", "keys (decode) or width", "GB/s", log2x=True, hline=copy):
        made.append("kernels.png")
    if _plot_speedups(model_pairs(_stage(doc, "models")["rows"]), out / "models.png"):
        made.append("models.png")
    return tuple(made)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot_panels(rows, panel, x, y: str, path: Path, xlabel: str, ylabel: str, *, log2x: bool = False,
                 hline: Optional[float] = None) -> bool:
    """One panel per ``panel(row)``, one line per backend of ``x(row)`` against ``row[y]``."""
    plt = _pyplot() if rows else None
    if plt is None:
        return False
    panels = list(dict.fromkeys(panel(r) for r in rows))
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, panels):
        mine = [r for r in rows if panel(r) == name]
        for backend in dict.fromkeys(r["backend"] for r in mine):
            pts = sorted({x(r): r[y] for r in mine if r["backend"] == backend}.items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        if hline:
            ax.axhline(hline, color="gray", linestyle="--", linewidth=1, label="copy ceiling")
        if log2x:
            ax.set_xscale("log", base=2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def markdown_table(rows: list[dict], columns) -> str:
    """``columns``: (key, header, format) triples."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def _plot_speedups(pairs: list[dict], path: Path) -> bool:
    bars = [(f"{p['op']} {p['shape']}", b, p["hf-eager_ms"] / p[f"{b}_ms"]) for p in pairs if p.get("hf-eager_ms")
            for b in ("trifuse", "trifuse-graphs", "hf-sdpa", "torch-compile") if p.get(f"{b}_ms")]
    plt = _pyplot() if bars else None
    if plt is None:
        return False
    groups = list(dict.fromkeys(g for g, _, _ in bars))
    backends = list(dict.fromkeys(b for _, b, _ in bars))
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(groups) * len(backends) ** 0.5), 3.8))
    for j, b in enumerate(backends):
        vals = {g: v for g, bb, v in bars if bb == b}
        xs = [i + (j - (len(backends) - 1) / 2) * width for i, g in enumerate(groups) if g in vals]
        ax.bar(xs, [vals[g] for g in groups if g in vals], width, label=b)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speedup over hf-eager")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
