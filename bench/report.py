"""Benchmark output: a console table, JSON and CSV rows, a markdown report, a plot.

A result is a list of flat dict rows (one per op x shape x backend) plus the
environment record and the ceilings measured in the same run. Every CSV row
repeats the environment, so rows from different runs can be concatenated and
still say where they came from.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Sequence

from rich.console import Console
from rich.table import Table

# Reports go to logs and CI as often as to terminals: do not squeeze the table to 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

# (row key, column header, format) of the console / markdown tables.
DEFAULT_COLUMNS = (
    ("op", "op", "{}"),
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("backend", "backend", "{}"),
    ("status", "status", "{}"),
    ("median_ms", "median ms", "{:.4f}"),
    ("p10_ms", "p10", "{:.4f}"),
    ("p90_ms", "p90", "{:.4f}"),
    ("cv", "cv", "{:.1%}"),
    ("gbps", "GB/s", "{:.1f}"),
    ("tflops", "TFLOP/s", "{:.1f}"),
    ("frac_of_peak", "% of peak", "{:.0%}"),
    ("seq_per_s", "seq/s", "{:.1f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("speedup_vs_hf_eager", "vs hf-eager", "{:.2f}x"),
    ("peak_mem_mib", "peak MiB", "{:.0f}"),
    ("max_abs_err", "max err", "{:.1e}"),
    ("rel_err", "rel err", "{:.1e}"),
    ("cold_ms", "cold ms", "{:.1f}"),
)


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _present(rows: Sequence[dict], columns) -> list:
    return [c for c in columns if any(r.get(c[0]) is not None for r in rows)]


def print_table(rows: Sequence[dict], title: str, columns=DEFAULT_COLUMNS) -> None:
    cols = _present(rows, columns)
    table = Table(title=title, title_justify="left")
    for key, header, _ in cols:
        table.add_column(header, justify="left" if key in ("op", "shape", "dtype", "backend", "status") else "right")
    for r in rows:
        table.add_row(*(_fmt(r.get(k), f) for k, _, f in cols))
    console.print(table)


def markdown_table(rows: Sequence[dict], columns=DEFAULT_COLUMNS) -> str:
    cols = _present(rows, columns)
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(rows: Sequence[dict], env: dict, ceilings: dict, out_dir: Path, stem: str,
                  title: str, notes: Iterable[str] = ()) -> list[Path]:
    """Write ``stem.json``, ``stem.csv`` and ``stem.md`` (and ``stem.png`` if matplotlib is there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    p = out_dir / f"{stem}.json"
    p.write_text(json.dumps({"environment": env, "ceilings": ceilings, "rows": list(rows)}, indent=1))
    paths.append(p)

    p = out_dir / f"{stem}.csv"
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    env_keys = [k for k in env if k not in keys]
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + env_keys)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: env[k] for k in env_keys}, **r})
    paths.append(p)

    plot = out_dir / f"{stem}.png"
    if plot_bandwidth(rows, ceilings, plot, title) or plot_latency(rows, plot, title):
        paths.append(plot)
    speedup = out_dir / f"{stem}-speedup.png"
    if plot_speedup(rows, speedup, title):
        paths.append(speedup)

    md = [f"# {title}", "", "## Environment", ""]
    md += [f"- {k}: {v}" for k, v in env.items() if v is not None]
    md += ["", "## Ceilings measured in this run", ""]
    md += [f"- {k}: {v:.1f}" for k, v in ceilings.items()]
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    md += ["", "## Results", "", markdown_table(rows), ""]
    if plot in paths:
        md += [f"![{title}]({plot.name})", ""]
    p = out_dir / f"{stem}.md"
    p.write_text("\n".join(md))
    paths.append(p)
    return paths


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_latency(rows: Sequence[dict], path: Path, title: str) -> bool:
    """Median latency against batch size per backend, one panel per model and sequence length."""
    timed = [r for r in rows if r.get("median_ms") and "batch" in r]
    plt = _pyplot() if timed else None
    if plt is None:
        return False
    panels = list(dict.fromkeys((r["op"], r["seq"]) for r in timed))
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (op, seq) in zip(axes.flat, panels):
        mine = [r for r in timed if r["op"] == op and r["seq"] == seq]
        for backend in dict.fromkeys(r["backend"] for r in mine):
            pts = sorted((r["batch"], r["median_ms"]) for r in mine if r["backend"] == backend)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{op}, seq {seq}")
        ax.set_xlabel("batch")
        ax.set_ylabel("median latency (ms)")
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_speedup(rows: Sequence[dict], path: Path, title: str) -> bool:
    """Speedup over Hugging Face eager per backend, grouped by model and shape (log scale)."""
    timed = [r for r in rows if r.get("speedup_vs_hf_eager") and r["backend"] != "hf-eager"]
    plt = _pyplot() if timed else None
    if plt is None:
        return False
    groups = list(dict.fromkeys(f"{r['op']} {r['shape']}" for r in timed))
    backends = list(dict.fromkeys(r["backend"] for r in timed))
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(backends)) ** 0.5), 3.8))
    for j, backend in enumerate(backends):
        vals = {f"{r['op']} {r['shape']}": r["speedup_vs_hf_eager"] for r in timed if r["backend"] == backend}
        xs = [i + (j - (len(backends) - 1) / 2) * width for i, g in enumerate(groups) if g in vals]
        ax.bar(xs, [vals[g] for g in groups if g in vals], width, label=backend)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    ticks = FuncFormatter(lambda v, _: f"{v:.2g}x")
    ax.yaxis.set_major_formatter(ticks)
    ax.yaxis.set_minor_formatter(ticks)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup over hf-eager")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_bandwidth(rows: Sequence[dict], ceilings: dict, path: Path, title: str) -> bool:
    """GB/s per backend against width, one panel per op; the copy ceiling as a line."""
    timed = [r for r in rows if r.get("gbps")]
    plt = _pyplot() if timed else None
    if plt is None:
        return False
    ops = list(dict.fromkeys(r["op"] for r in timed))
    ncols = min(3, len(ops))
    nrows = -(-len(ops) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False, sharey=True)
    for ax in axes.flat[len(ops):]:
        ax.set_visible(False)
    for ax, op in zip(axes.flat, ops):
        mine = [r for r in timed if r["op"] == op]
        for backend in dict.fromkeys(r["backend"] for r in mine):
            pts = sorted((r["numel"], r["gbps"]) for r in mine if r["backend"] == backend)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        if "copy_gbps" in ceilings:
            ax.axhline(ceilings["copy_gbps"], color="gray", linestyle="--", label="copy")
        ax.set_xscale("log")
        ax.set_title(op)
        ax.set_xlabel("elements (rows x width)")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("GB/s")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
