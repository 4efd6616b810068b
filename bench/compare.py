"""``trifuse compare OLD.json NEW.json``: what got faster or slower between two runs.

Rows are matched on what was measured (suite, op, shape, dtype, backend, phase).
A change counts only when it is larger than the noise both runs measured: the
new run's p10..p90 band must lie wholly beyond the old one's, and the medians
must differ by more than ``--threshold`` (default 2%). Everything else is
"within noise". A row either run flagged noisy (``status: noisy: ...``) is not compared
at all: its verdict is "noisy". The exit status is 1 when anything regressed, so CI can gate on it.
"""

from __future__ import annotations

import json
from pathlib import Path

KEY = ("suite", "op", "shape", "dtype", "backend", "phase")


def load(path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "rows" not in data:
        raise SystemExit(f"{path}: not a trifuse bench result (expected a JSON object with 'rows')")
    return data.get("environment", {}), data["rows"]


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY)


def compare(old_rows: list[dict], new_rows: list[dict], threshold: float = 0.02) -> list[dict]:
    """One entry per measurement timed in both runs, with its verdict."""
    old = {_key(r): r for r in old_rows if r.get("median_ms")}
    out = []
    for r in new_rows:
        o = old.get(_key(r))
        if o is None or not r.get("median_ms"):
            continue
        change = r["median_ms"] / o["median_ms"] - 1
        if any(str(x.get("status", "")).startswith("noisy") for x in (r, o)):
            out.append({**{k: r.get(k) for k in KEY}, "old_ms": o["median_ms"], "new_ms": r["median_ms"],
                        "change": change, "verdict": "noisy"})
            continue
        separated_up = r.get("p10_ms", r["median_ms"]) > o.get("p90_ms", o["median_ms"])
        separated_down = r.get("p90_ms", r["median_ms"]) < o.get("p10_ms", o["median_ms"])
        if change > threshold and separated_up:
            verdict = "regression"
        elif change < -threshold and separated_down:
            verdict = "improvement"
        else:
            verdict = "within noise"
        out.append({**{k: r.get(k) for k in KEY}, "old_ms": o["median_ms"], "new_ms": r["median_ms"],
                    "change": change, "verdict": verdict})
    return out


def print_comparison(entries: list[dict], old_env: dict, new_env: dict) -> None:
    from rich.table import Table

    from .report import console

    for name, env in (("old", old_env), ("new", new_env)):
        console.print(f"{name}: {env.get('device')} · torch {env.get('torch')} · commit {env.get('git_commit')}")
    if old_env.get("device") != new_env.get("device"):
        console.print("[yellow]note:[/] the runs are from different devices; ratios compare machines, not code")
    table = Table(title_justify="left")
    for col in ("op", "shape", "dtype", "backend", "old ms", "new ms", "change", "verdict"):
        table.add_column(col, justify="right" if col.endswith(("ms", "change")) else "left")
    colour = {"regression": "red", "improvement": "green", "within noise": "dim", "noisy": "yellow"}
    for e in entries:
        op = e["op"] + (f" ({e['phase']})" if e.get("phase") else "")
        table.add_row(op, str(e["shape"]), str(e["dtype"]), e["backend"], f"{e['old_ms']:.4f}",
                      f"{e['new_ms']:.4f}", f"{e['change']:+.1%}", f"[{colour[e['verdict']]}]{e['verdict']}[/]")
    console.print(table)
    counts = {v: sum(e["verdict"] == v for e in entries) for v in colour}
    console.print(", ".join(f"{n} {v}" for v, n in counts.items() if n or v != "noisy")
                  + f" (of {len(entries)} matched rows)")


def add_arguments(p) -> None:
    p.add_argument("old", help="earlier result JSON (from trifuse bench)")
    p.add_argument("new", help="later result JSON")
    p.add_argument("--threshold", type=float, default=0.02,
                   help="smallest relative change of the median that can count (default 0.02)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    old_env, old_rows = load(args.old)
    new_env, new_rows = load(args.new)
    entries = compare(old_rows, new_rows, args.threshold)
    if not entries:
        raise SystemExit("no measurement appears in both files")
    print_comparison(entries, old_env, new_env)
    return 1 if any(e["verdict"] == "regression" for e in entries) else 0
