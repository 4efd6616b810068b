"""The parent of a device check: the stages as subprocesses, each killed at its deadline, and the files.

See :mod:`trifuse.bench.device` for what a run measures.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .summary import compact_table, summary_markdown, write_plots

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_S = 480.0


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    weight: float  # share of the budget, among the stages still to run
    what: str


STAGES = (
    Stage("environment", 0.6, "GPU, driver, clocks, versions; copy GB/s and matmul TFLOP/s"),
    Stage("gpu-tests", 2.0, "the gpu-marked tests, one pytest run, per-test alarms"),
    Stage("kernels", 3.4, "attention, split-K decode, norms and GELU against SDPA / eager / torch.compile"),
    Stage("models", 3.4, "BERT, ViT, GPT-2, T5 against HF eager / sdpa / torch.compile"),
    Stage("memcheck", 0.6, "compute-sanitizer memcheck over a small attention + norm run"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return REPO / "bench" / "results" / f"device-{datetime.date.today().isoformat()}"


def stage_deadline(budget: float, remaining: list[Stage], spent: float, overrides: dict) -> float:
    """Seconds for the first of ``remaining``: its weight's share of what is left of the budget
    (time a stage leaves unused rolls over to the ones after it), unless overridden."""
    stage = remaining[0]
    if stage.name in overrides:
        return overrides[stage.name]
    left = max(0.0, budget - spent)
    return left * stage.weight / sum(s.weight for s in remaining)


def child_env(dry_run: bool, rows_file: Path, stage: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["TRIFUSE_DEVICE_ROWS"] = str(rows_file)
    env["TRIFUSE_DEVICE_STAGE"] = stage
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # read when trifuse's kernels are decorated: set before the child starts
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def read_rows(path: Path, stage: str) -> list[dict]:
    """The rows ``stage`` streamed into the run's ``rows.jsonl`` (every stage's rows, tagged)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the last line of a killed stage may be cut short
                continue
            if row.pop("stage", None) == stage:
                rows.append(row)
    return rows


def _run_stage(stage: Stage, seconds: float, dry_run: bool, log, rows_file: Path) -> dict:
    """Run one stage in its own process group; kill it at its deadline."""
    cmd = [sys.executable, "-m", "trifuse.bench.device", "--run-stage", stage.name,
           "--seconds", f"{seconds:.1f}"] + (["--dry-run"] if dry_run else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(dry_run, rows_file, stage.name), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail: list[str] = []
    timed_out = False
    def pump():  # the child's output to our stdout and the log, as it comes
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail.append(line)
            del tail[:-30]
        log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(seconds, 0.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    reader.join(timeout=10)
    took = time.perf_counter() - t0
    rows = read_rows(rows_file, stage.name)
    meta = [r for r in rows if r.get("_meta")]
    rows = [r for r in rows if not r.get("_meta")]
    result = {"name": stage.name, "seconds": round(took, 2), "deadline_s": round(seconds, 1), "rows": rows}
    if timed_out:
        result["status"] = "timeout"
        result["error"] = f"stopped at its deadline of {seconds:.1f} s; rows measured before it are kept"
    elif meta and meta[-1].get("status") == "skipped":
        result["status"] = "skipped"
        result["error"] = meta[-1].get("reason", "")
    elif proc.returncode == 0:
        result["status"] = "ok"
    else:
        result["status"] = "failed"
        reason = meta[-1].get("reason") if meta else None
        result["error"] = reason or f"exit code {proc.returncode}: " + "".join(tail[-8:]).strip()[-1500:]
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    """The stage's whole process group (pytest, compute-sanitizer and their children too)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)  # a reader never sees half a file


def run_all(out: Path, budget: float, dry_run: bool, stages: tuple[str, ...], overrides: dict) -> int:
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    doc = {"device": None, "dry_run": dry_run, "budget_s": budget,
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["scripts/device-check.sh"] + sys.argv[1:]), "stages": []}
    plan = [s for s in STAGES if s.name in stages]
    rows_file = out / "rows.jsonl"  # streamed by the stages: what a run killed from outside still keeps
    rows_file.write_text("")
    with (out / "device-check.log").open("w") as log:
        for i, stage in enumerate(plan):
            spent = time.perf_counter() - t_start
            seconds = stage_deadline(budget, plan[i:], spent, overrides)
            banner = f"\n=== stage {stage.name}: {stage.what} (deadline {seconds:.0f} s) ===\n"
            sys.stdout.write(banner)
            log.write(banner)
            if seconds < 1.0 and stage.name not in overrides:
                result = {"name": stage.name, "status": "skipped", "seconds": 0.0, "rows": [],
                          "error": "no budget left"}
            else:
                result = _run_stage(stage, seconds, dry_run, log, rows_file)
            doc["stages"].append(result)
            if stage.name == "environment":
                doc["device"] = device_record(result["rows"])
            doc["seconds"] = round(time.perf_counter() - t_start, 1)
            write_json(out / "device-check.json", doc)
            (out / "summary.md").write_text(summary_markdown(doc))
    pngs = write_plots(doc, out)
    (out / "summary.md").write_text(summary_markdown(doc, pngs))
    print()
    print("\n".join(compact_table(doc, out)))
    return 0 if all(s["status"] in ("ok", "skipped") for s in doc["stages"]) else 1


def device_record(rows: list[dict]) -> Optional[dict]:
    """The one-line device record of the JSON, from the environment stage's rows."""
    rec: dict = {}
    for r in rows:
        if r.get("what") in ("device", "versions"):
            rec.update({k: v for k, v in r.items() if k not in ("what", "item")})
        elif r.get("what") == "ceiling":
            rec[r["name"]] = r["value"]
    return rec or None


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or name not in STAGE_NAMES:
            raise SystemExit(f"--deadline takes STAGE=SECONDS with STAGE one of {STAGE_NAMES}; got {item!r}")
        out[name] = float(value)
    return out
