"""Benchmark output: a console table, JSON and CSV rows, a markdown report, plots.

A result is a list of flat dict rows (one per op x shape x backend) plus the
environment record and the ceilings measured in the same run. Every CSV row
repeats the environment, so rows from different runs can be concatenated and
still say where they came from.

Tables show a few wide columns by default, so that they fit an 80-column terminal
without cutting a name (long cells wrap); ``wide=True`` (``--wide``) shows every
column. JSON and CSV always hold everything. Plots show only timings that are
results: rows flagged noisy are left out (and the plot says how many), and on the
CPU the ``reference`` backend is labelled as what it is there, trifuse's own path.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from .suite import is_timed_result as is_result  # a timing that is a result: timed, not flagged noisy

# A terminal gets its own width; a log or CI gets 120 columns unless COLUMNS says otherwise.
console = Console(highlight=False,
                  width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120)

# (row key, column header, format) of every column, in order: the wide tables and the markdown details.
ALL_COLUMNS = (
    ("op", "op", "{}"),
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("backend", "backend", "{}"),
    ("status", "status", "{}"),
    ("median_ms", "median ms", "{:.4g}"),
    ("p10_ms", "p10", "{:.4g}"),
    ("p90_ms", "p90", "{:.4g}"),
    ("spread", "p10-p90", "{:.0%}"),
    ("cv", "cv", "{:.1%}"),
    ("threads", "threads", "{}"),
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
DEFAULT_COLUMNS = ALL_COLUMNS  # kept for callers of markdown_table(rows, DEFAULT_COLUMNS)

# The default table: what was run, whether it passed, its time with its spread, one throughput
# figure and the speedup; the error and every other statistic are in --wide and the JSON/CSV.
_MEDIAN = ("median_ms", "median ms", None)  # formatted with its spread by _median_cell
NARROW_COLUMNS = (
    ("op", "op", "{}"),
    ("shape", "shape", "{}"),
    ("backend", "backend", "{}"),
    ("status", "status", "{}"),
    _MEDIAN,
    ("gbps", "GB/s", "{:.1f}"),
    ("tflops", "TFLOP/s", "{:.1f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("speedup_vs_hf_eager", "vs eager", "{:.2f}x"),
)
_TEXT = ("op", "shape", "dtype", "backend", "status")

# Short names of the reasons a row is noisy (timing.Timing.noise, suite._decode_noise), for narrow tables.
_NOISE_WORDS = (("spread", "spread"), ("repeats", "repeats"), ("load average", "load"), ("t(G) <= t(1)", "t(G)<=t(1)"),
                ("G-1 steps", "steps<spread"))


def _fmt(value, fmt: Optional[str]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def short_status(status: str) -> str:
    """``noisy: spread, load`` for a noisy row, the error's type for an error; others as they are."""
    if status.startswith("noisy"):
        words = [short for key, short in _NOISE_WORDS if key in status]
        return "noisy: " + ", ".join(words) if words else status
    if status.startswith("error: "):
        return status.split(":", 2)[0] + ": " + status.split(":", 2)[1].strip()
    return status


def _median_cell(r: dict) -> str:
    """``12.3 ±4%``: the median and half its p10..p90 band, relative."""
    m = r.get("median_ms")
    if m is None:
        return "-"
    if r.get("p10_ms") is not None and r.get("p90_ms") is not None and m > 0:
        return f"{m:.4g} ±{(r['p90_ms'] - r['p10_ms']) / 2 / m:.0%}"
    return f"{m:.4g}"


def _cell(r: dict, key: str, fmt: Optional[str], wide: bool) -> str:
    if fmt is None:
        return _median_cell(r)
    if key == "status" and not wide:
        return short_status(str(r.get(key, "-")))
    return _fmt(r.get(key), fmt)


def _present(rows: Sequence[dict], columns) -> list:
    return [c for c in columns if any(r.get(c[0]) is not None for r in rows)]


def _columns(rows: Sequence[dict], wide: bool) -> list:
    cols = _present(rows, ALL_COLUMNS if wide else NARROW_COLUMNS)
    # The title names one dtype; a mix needs a column.
    if not wide and len({r["dtype"] for r in rows if r.get("dtype") not in (None, "-")}) > 1:
        cols.insert(2, ("dtype", "dtype", "{}"))
    return cols


def print_table(rows: Sequence[dict], title: str, columns=None, *, wide: bool = False) -> None:
    """The rows as a table on the console; failures spelled out under it."""
    cols = list(columns) if columns is not None else _columns(rows, wide)
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    cells = [[_cell(r, k, f, wide) for k, _, f in cols] for r in rows]
    for i, (key, header, fmt) in enumerate(cols):
        if key in _TEXT:  # names wrap onto the next line, at a word or '-' if they can, rather than being cut
            # A backend name up to 16 characters is kept whole (folding cut "trifuse-native" mid-word);
            # longer names and other text break at '-'.
            words = [w for c in cells for w in
                     (c[i] if key == "backend" and len(c[i]) <= 16 else c[i].replace("-", "- ")).split()]
            longest = max(map(len, words), default=len(header))
            cap = 16 if key == "backend" else 14 if key == "op" else 8
            table.add_column(header, justify="left", overflow="fold", min_width=min(longest, cap))
        else:
            table.add_column(header, justify="right", no_wrap=True)
    for c in cells:
        table.add_row(*c)
    if wide:  # every column at its natural width, even past the terminal's edge: nothing is cut
        from rich.measure import Measurement

        need = Measurement.get(console, console.options.update(width=10_000), table).maximum
        width = console.width
        console.width = max(width, need)
        try:
            console.print(table)
        finally:
            console.width = width
    else:
        console.print(table)
    for r in rows:
        status = str(r.get("status", ""))
        if status == "mismatch" or status.startswith("error"):
            err = f" (rel err {r['rel_err']:.1e})" if r.get("rel_err") is not None else ""
            console.print(f"[red]{r['backend']} {r['op']} {r['shape']}: {status}{err}[/]")


def markdown_table(rows: Sequence[dict], columns=None, *, wide: bool = True) -> str:
    cols = list(columns) if columns is not None else _columns(rows, wide)
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, k, f, True).replace("|", "/") for k, _, f in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(rows: Sequence[dict], env: dict, ceilings: dict, out_dir: Path, stem: str,
                  title: str, notes: Iterable[str] = ()) -> list[Path]:
    """Write ``stem.json``, ``stem.csv``, ``stem.md`` and the plots (``stem*.png``, with matplotlib)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    notes = list(notes)

    p = out_dir / f"{stem}.json"
    p.write_text(json.dumps({"environment": env, "ceilings": ceilings, "notes": notes, "rows": list(rows)}, indent=1))
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

    device_type = env.get("device_type", "cuda")
    plots = []
    for suffix, draw in (("", lambda q: plot_main(rows, ceilings, q, title, device_type)),
                         ("-speedup", lambda q: plot_speedup(rows, q, title, device_type)),
                         ("-roofline", lambda q: plot_roofline(rows, ceilings, q, title))):
        q = out_dir / f"{stem}{suffix}.png"
        q.unlink(missing_ok=True)  # a plot of an earlier, partial write of this result
        if draw(q):
            plots.append(q)
    paths += plots

    md = [f"# {title}", "", "## Environment", ""]
    md += [f"- {k}: {v}" for k, v in env.items() if v is not None]
    if ceilings:
        md += ["", "## Ceilings measured in this run", ""]
        md += [f"- {k}: {v:.1f}" for k, v in ceilings.items()]
    if rows and _pyplot(warn=False) is None:
        notes.append(MATPLOTLIB_MISSING)
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    md += ["", "## Results", "", markdown_table(rows) if rows else "(nothing ran)", ""]
    md += [f"![{title}]({q.name})" for q in plots] + [""]
    p = out_dir / f"{stem}.md"
    p.write_text("\n".join(md))
    paths.append(p)
    return paths


# ----------------------------------------------------------------------------
# Plots

MATPLOTLIB_MISSING = "No plots: matplotlib is not installed (pip install 'trifuse[bench]')."
_warned = []


def _pyplot(warn: bool = True):
    """matplotlib's pyplot on the Agg backend, or None; says so (loudly, once) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if warn and not _warned:
            _warned.append(True)
            from rich.markup import escape

            console.print(f"[bold yellow]{escape(MATPLOTLIB_MISSING)}[/]")  # '[bench]' is not markup
        return None
    return plt


def _noisy(row: dict) -> bool:
    return str(row.get("status", "")).startswith("noisy")


def _drawable(row: dict) -> bool:
    """A timing a plot shows: a result, or a noisy one (drawn hollow and faded, as not a result)."""
    return bool(row.get("median_ms")) and (row.get("status") == "ok" or _noisy(row))


def backend_label(backend: str, device_type: str) -> str:
    """What a reader should call a backend's series: on the CPU, ``reference`` is what trifuse runs."""
    if device_type == "cpu" and backend == "reference":
        return "trifuse on CPU (reference ops)"
    if device_type == "cuda" and backend == "trifuse":
        return "trifuse (Triton)"
    return backend


def _ours(backend: str, device_type: str) -> bool:
    return backend.startswith("trifuse") or (device_type == "cpu" and backend == "reference")


def _order(backends: Iterable[str], device_type: str) -> list[str]:
    """trifuse's own series first, then the peers in the order they ran."""
    backends = list(dict.fromkeys(backends))
    return [b for b in backends if _ours(b, device_type)] + [b for b in backends if not _ours(b, device_type)]


# One colour per peer in every plot; trifuse's own series are blues.
_PEER_COLORS = {"hf-eager": "tab:green", "hf-sdpa": "tab:red", "torch-compile": "tab:brown",
                "torch-compile-max-autotune": "tab:pink", "onnxruntime-cpu": "tab:purple",
                "onnxruntime-cuda": "tab:purple", "eager": "tab:green", "sdpa": "tab:red",
                "sdpa-flash": "tab:red", "sdpa-efficient": "tab:orange", "sdpa-cudnn": "tab:olive",
                "sdpa-math": "tab:gray", "sdpa-dense-bias": "tab:orange", "flex": "tab:cyan",
                "reference": "tab:gray"}


#: trifuse's own series in shades of blue, one shade per variant that shares a plot with another.
_OUR_COLORS = {"trifuse": "#08306b", "reference": "#08306b", "trifuse-packed": "#08306b", "trifuse-padded": "#9ecae1",
               "trifuse-native": "#2171b5", "trifuse-graphs": "#6baed6", "trifuse-fp32": "#08306b",
               "trifuse-bf16": "#2171b5", "trifuse-int8": "#6baed6"}


def _style(backend: str, device_type: str, index: int) -> dict:
    """trifuse's series: heavy and dark blue; each peer its own colour."""
    import matplotlib

    if _ours(backend, device_type):
        return {"color": _OUR_COLORS.get(backend, "#4292c6"), "linewidth": 2.4, "zorder": 3}
    color = _PEER_COLORS.get(backend) or matplotlib.colormaps["tab10"](1 + index % 9)
    return {"color": color, "linewidth": 1.4, "zorder": 2}


def _left_out(rows: Sequence[dict], drawn: Sequence[dict]) -> str:
    """The plot's footnote: what is hollow, what is missing."""
    noisy = sum(1 for r in drawn if _noisy(r))
    untimed = sum(1 for r in rows if r.get("status") == "checked")
    parts = [f"hollow points, dotted lines: {noisy} timing(s) flagged noisy, not results"] if noisy else []
    if untimed:
        parts.append(f"{untimed} row(s) checked, not timed (interpreted Triton)")
    return "; ".join(parts)


def _finish(fig, path: Path, title: str, footnote: str = "") -> bool:
    import textwrap

    heading = textwrap.wrap(title, width=int(fig.get_figwidth() * 12))  # about 12 characters an inch at 11 points
    fig.suptitle("\n".join(heading), fontsize=11)  # tight_layout leaves it room
    bottom = 0.0
    if footnote:  # wrapped to the figure's width (about 15 characters an inch at 8 points)
        lines = textwrap.wrap(footnote, width=int(fig.get_figwidth() * 15))
        fig.text(0.01, 0.005, "\n".join(lines), fontsize=8, color="dimgray", ha="left", va="bottom")
        bottom = (0.16 * len(lines) + 0.05) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return True


def _readable_log_axis(axis) -> None:
    """Log-scale ticks as plain numbers, majors only: no overlapping minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _tick(x: float) -> str:
    """A tick label a reader takes in at a glance: 768, 4096, 1.6M, 67M."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= max(div, 1e4):
            v = x / div
            return f"{v:.0f}{unit}" if v >= 10 else f"{v:.1f}{unit}"
    return f"{x:g}"


def _panel(ax, rows: Sequence[dict], x_key: str, y_key: str, device_type: str, *, x_label: str,
           y_label: str, band: Optional[tuple] = None) -> None:
    """One panel: a line per backend against ``x_key`` when there is more than one x, else bars.

    ``band(row) -> (lo, hi)`` draws the p10..p90 band as error bars.
    """
    backends = _order((r["backend"] for r in rows), device_type)
    xs = sorted({r[x_key] for r in rows})
    if len(xs) > 1:
        for i, b in enumerate(backends):
            pts = sorted(((r[x_key], r[y_key], r) for r in rows if r["backend"] == b), key=lambda p: p[0])
            ys = [p[1] for p in pts]
            err = None
            if band is not None:
                lohi = [band(p[2]) for p in pts]
                err = [[max(0.0, y - lo) for y, (lo, _) in zip(ys, lohi)],
                       [max(0.0, hi - y) for y, (_, hi) in zip(ys, lohi)]]
                err = err if any(map(any, err)) else None  # no band recorded (decode): no bars
            st = _style(b, device_type, i)
            if any(_noisy(p[2]) for p in pts):  # a line through noise is not a trend: dotted, faded
                st = {**st, "linestyle": ":", "alpha": 0.6}
            ax.errorbar([p[0] for p in pts], ys, yerr=err, marker=None, capsize=3,
                        label=backend_label(b, device_type), **st)
            for x, y, r in pts:  # a clean point filled, a noisy one hollow and faded
                ax.plot([x], [y], marker="o", markersize=6, color=st["color"], zorder=st["zorder"] + 1,
                        markerfacecolor="white" if _noisy(r) else st["color"])
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [_tick(x) for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(x_label)
    else:
        for i, b in enumerate(backends):
            (r,) = [r for r in rows if r["backend"] == b][:1]
            y = r[y_key]
            err = None
            if band is not None and band(r)[0] != band(r)[1]:
                lo, hi = band(r)
                err = [[max(0.0, y - lo)], [max(0.0, hi - y)]]
            st = _style(b, device_type, i)
            if _noisy(r):
                ax.bar(i, y, yerr=err, capsize=4, color="white", edgecolor=st["color"], hatch="//", alpha=0.6,
                       label=backend_label(b, device_type) + " (noisy)")
            else:
                ax.bar(i, y, yerr=err, capsize=4, color=st["color"], label=backend_label(b, device_type))
            top = y + (err[1][0] if err else 0)
            ax.text(i, top, f"{y:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(backends)), [backend_label(b, device_type).replace(" (", "\n(") for b in backends],
                      rotation=25, ha="right", fontsize=8)
        ax.set_xlabel(f"{x_label} {_tick(xs[0])}" if xs else "")
        ax.margins(y=0.15)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3, axis="y")


def _time_band(r: dict) -> tuple:
    return r.get("p10_ms", r["median_ms"]), r.get("p90_ms", r["median_ms"])


def _rate_band(key: str):
    """p10..p90 of a rate (GB/s, TFLOP/s): the rate at the p90 time and at the p10 time."""
    def band(r: dict) -> tuple:
        m = r["median_ms"]
        return r[key] * m / r.get("p90_ms", m), r[key] * m / r.get("p10_ms", m)
    return band


def _grid(plt, n: int, width: float = 4.8, height: float = 3.6):
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.4), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def plot_main(rows: Sequence[dict], ceilings: dict, path: Path, title: str, device_type: str = "cuda") -> bool:
    """The suite's main plot: bandwidth (kernels, decode attention), TFLOP/s (attention prefill) or
    latency (models), one panel per op; False when there is nothing to draw."""
    timed = [r for r in rows if _drawable(r)]
    if not timed:
        return False
    if any("batch" in r for r in timed):
        return plot_latency(rows, path, title, device_type)
    return plot_throughput(rows, ceilings, path, title, device_type)


def plot_throughput(rows: Sequence[dict], ceilings: dict, path: Path, title: str, device_type: str = "cuda") -> bool:
    """GB/s (or TFLOP/s) per backend against problem size, one panel per op, with the measured ceiling."""
    timed = [r for r in rows if _drawable(r) and (r.get("gbps") or r.get("tflops"))]
    plt = _pyplot() if timed else None
    if plt is None:
        return False
    ops = list(dict.fromkeys(r["op"] for r in timed))
    fig, axes = _grid(plt, len(ops))
    for ax, op in zip(axes.flat, ops):
        mine = [r for r in timed if r["op"] == op]
        key = "gbps" if all(r.get("gbps") for r in mine) else "tflops"
        mine = [r for r in mine if r.get(key)]
        x_key, x_label = ("lk", "keys (Lk)") if op == "decode" else ("lq", "sequence length") if "lq" in mine[0] \
            else ("numel", "elements (rows x width)")
        _panel(ax, mine, x_key, key, device_type, x_label=x_label,
               y_label="GB/s" if key == "gbps" else "TFLOP/s", band=_rate_band(key))
        ceiling = ceilings.get("copy_gbps" if key == "gbps" else "matmul_tflops")
        if ceiling:
            ax.axhline(ceiling, color="gray", linestyle="--", linewidth=1,
                       label="copy bandwidth (measured)" if key == "gbps" else "matmul (measured)")
        ax.set_title(op, fontsize=10)
        ax.legend(fontsize=7, loc="best")
    return _finish(fig, path, title, _left_out(rows, timed))


def plot_latency(rows: Sequence[dict], path: Path, title: str, device_type: str = "cuda") -> bool:
    """Median latency with its p10..p90 band per backend, one panel per model (and phase): against
    batch when several batches ran, against sequence length when several lengths ran, else bars."""
    timed = [r for r in rows if _drawable(r) and "batch" in r]
    plt = _pyplot() if timed else None
    if plt is None:
        return False
    ops = list(dict.fromkeys(r["op"] for r in timed))
    fig, axes = _grid(plt, len(ops))
    for ax, op in zip(axes.flat, ops):
        mine = [r for r in timed if r["op"] == op]
        batches, seqs = {r["batch"] for r in mine}, {r["seq"] for r in mine}
        y_label = "ms per token" if op.endswith("decode") else "median latency (ms)"
        if len(batches) > 1:
            for s in sorted(seqs)[:1]:  # one sequence length per panel keeps it readable
                sub = [r for r in mine if r["seq"] == s]
                _panel(ax, sub, "batch", "median_ms", device_type, x_label="batch", y_label=y_label, band=_time_band)
            ax.set_title(f"{op}, seq {min(seqs)}", fontsize=10)
        elif len(seqs) > 1:
            _panel(ax, mine, "seq", "median_ms", device_type, x_label="sequence length", y_label=y_label,
                   band=_time_band)
            ax.set_title(f"{op}, batch {min(batches)}", fontsize=10)
        else:
            _panel(ax, mine, "seq", "median_ms", device_type, x_label="seq", y_label=y_label, band=_time_band)
            ax.set_title(f"{op}, batch {min(batches)}", fontsize=10)
        if len(batches) > 1 or len(seqs) > 1:  # lines: a log axis; bars: linear, named on the x axis
            ax.set_yscale("log")
            _readable_log_axis(ax.yaxis)
            ax.legend(fontsize=7)
    note = "error bars: p10-p90" + ("; " + _left_out(rows, timed) if _left_out(rows, timed) else "")
    return _finish(fig, path, title, note)


def plot_speedup(rows: Sequence[dict], path: Path, title: str, device_type: str = "cuda") -> bool:
    """Speedup over Hugging Face eager per backend, grouped by model and shape; noisy rows never count."""
    timed = [r for r in rows if is_result(r) and r.get("speedup_vs_hf_eager") and r["backend"] != "hf-eager"]
    plt = _pyplot() if len(timed) > 1 else None
    if plt is None:
        return False
    groups = list(dict.fromkeys(f"{r['op']} {r['shape']}" for r in timed))
    backends = _order((r["backend"] for r in timed), device_type)
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(groups) * max(1, len(backends)) ** 0.5), 4.2))
    for j, backend in enumerate(backends):
        vals = {f"{r['op']} {r['shape']}": r["speedup_vs_hf_eager"] for r in timed if r["backend"] == backend}
        xs = [i + (j - (len(backends) - 1) / 2) * width for i, g in enumerate(groups) if g in vals]
        ys = [vals[g] for g in groups if g in vals]
        bars = ax.bar(xs, ys, width, label=backend_label(backend, device_type),
                      color=_style(backend, device_type, j)["color"])
        if len(groups) * len(backends) <= 24:
            ax.bar_label(bars, labels=[f"{y:.2f}x" for y in ys], fontsize=7, padding=1)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="hf-eager")
    ax.set_xticks(range(len(groups)), groups, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("speedup over hf-eager (x)")
    ax.margins(y=0.12)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    noisy = sum(1 for r in rows if _noisy(r))
    note = f"{noisy} timing(s) flagged noisy: no speedup drawn from them" if noisy else ""
    return _finish(fig, path, title + ": speedup over Hugging Face eager", note)


def plot_roofline(rows: Sequence[dict], ceilings: dict, path: Path, title: str) -> bool:
    """Achieved vs ceiling for trifuse's kernels (a GPU run): per op at its largest timed shape,
    trifuse's fraction of the measured ceiling (copy bandwidth for memory-bound ops and decode,
    matmul throughput for attention prefill) beside the best peer's."""
    timed = [r for r in rows if is_result(r) and r.get("frac_of_peak") is not None]
    ours = [r for r in timed if r["backend"] == "trifuse"]
    plt = _pyplot() if ours else None
    if plt is None:
        return False
    ops = list(dict.fromkeys(r["op"] for r in ours))
    best_ours, best_peer = [], []
    for op in ops:
        largest = max((r for r in ours if r["op"] == op), key=lambda r: r.get("numel", 0))
        best_ours.append(largest)
        peers = [r for r in timed if r["op"] == op and r["shape"] == largest["shape"]
                 and not r["backend"].startswith("trifuse") and r["backend"] != "reference"]
        best_peer.append(max(peers, key=lambda r: r["frac_of_peak"]) if peers else None)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(ops) + 2), 4.4))
    xs = range(len(ops))
    b1 = ax.bar([x - 0.2 for x in xs], [100 * r["frac_of_peak"] for r in best_ours], 0.4, color="#08306b",
                label="trifuse (Triton)")
    ax.bar_label(b1, labels=[f"{100 * r['frac_of_peak']:.0f}%" for r in best_ours], fontsize=7)
    pk = [(x, r) for x, r in zip(xs, best_peer) if r is not None]
    if pk:
        b2 = ax.bar([x + 0.2 for x, _ in pk], [100 * r["frac_of_peak"] for _, r in pk], 0.4, color="#fd8d3c",
                    label="best peer")
        ax.bar_label(b2, labels=[f"{r['backend']}\n{100 * r['frac_of_peak']:.0f}%" for _, r in pk], fontsize=6)
    ax.axhline(100, color="gray", linestyle="--", linewidth=1, label="measured ceiling")
    labels = [f"{r['op']}\n{r['shape']}\n({'TFLOP/s' if r.get('tflops') and r['op'] != 'decode' else 'GB/s'})"
              for r in best_ours]
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("% of the measured ceiling")
    ax.set_ylim(0, max(110, 1.15 * max(100 * r["frac_of_peak"] for r in timed)))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="upper right")
    ceil = ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items())
    return _finish(fig, path, title + ": achieved vs ceiling", f"ceilings measured in this run: {ceil}")
