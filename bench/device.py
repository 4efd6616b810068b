"""``python -m trifuse.bench.device`` (``scripts/device-check.sh``): the one prepared run for a lent GPU.

A GPU is lent rarely and briefly, so everything it should tell us is measured by
this one command, in stages, each with its own deadline carved from ``--budget``:

1. ``environment``: GPU, SMs, driver, clocks and power limit (``nvidia-smi -q``,
   read only), versions, git commit; device-to-device copy GB/s and fp16/bf16
   matmul TFLOP/s, the ceilings the later stages are measured against;
2. ``gpu-tests``: the ``gpu``-marked tests in one pytest run, each under its own
   alarm; every test's outcome is a row, failures by name;
3. ``kernels``: ``trifuse.bench.attention`` and ``trifuse.bench.kernels`` (their
   ``run(Options)``) at the shapes of issue 20, plus a padding-mask row, most
   telling first;
4. ``models``: BERT-base, ViT-B/16, GPT-2 small and T5-base through the model
   suites against Hugging Face eager/SDPA, CUDA graphs, then ``torch.compile``;
5. ``memcheck``: ``compute-sanitizer --tool memcheck`` over a small attention,
   norm and GELU run; skipped when the tool is absent.

Each stage runs in its own process, killed at its deadline and then recorded as
``timeout`` while the run goes on. A stage's rows are streamed to ``rows.jsonl`` as
they are measured, and ``device-check.json`` and ``summary.md`` are rewritten after
every stage, so a run killed from outside still leaves what it measured. Within a
stage, work items run in order of value; an item whose estimate exceeds the time
left is recorded as skipped rather than started.

``--dry-run`` runs every stage on the CPU with tiny shapes (Triton's interpreter,
PyTorch peers on their CPU paths) and writes the same files: the rehearsal that
leaves only GPU reasons for the real run to fail. Nothing is downloaded; models
are named sizes with random weights or tiny checkpoints written to a temporary
folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

_REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 480.0
TEST_TIMEOUT_S = 120  # one gpu test (several autotunes) at most; the stage deadline bounds the rest
DRY_TEST_TIMEOUT_S = 60


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


# ----------------------------------------------------------------------------
# The parent: stages as subprocesses, deadlines, the files.


def _default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return _REPO / "bench" / "results" / f"device-{datetime.date.today().isoformat()}"


def _stage_deadlines(budget: float, remaining: list[Stage], spent: float, overrides: dict) -> float:
    """Seconds for the first of ``remaining``: its weight's share of what is left of the budget
    (time a stage leaves unused rolls over to the ones after it), unless overridden."""
    stage = remaining[0]
    if stage.name in overrides:
        return overrides[stage.name]
    left = max(0.0, budget - spent)
    return left * stage.weight / sum(s.weight for s in remaining)


def _child_env(dry_run: bool, rows_file: Path, stage: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["TRIFUSE_DEVICE_ROWS"] = str(rows_file)
    env["TRIFUSE_DEVICE_STAGE"] = stage
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # read when trifuse's kernels are decorated: set before the child starts
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def _read_rows(path: Path, stage: str) -> list[dict]:
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
    proc = subprocess.Popen(cmd, cwd=_REPO, env=_child_env(dry_run, rows_file, stage.name), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail: list[str] = []
    timed_out = False
    import threading

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
    rows = _read_rows(rows_file, stage.name)
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


def _write_json(path: Path, obj) -> None:
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
            seconds = _stage_deadlines(budget, plan[i:], spent, overrides)
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
                doc["device"] = _device_record(result["rows"])
            doc["seconds"] = round(time.perf_counter() - t_start, 1)
            _write_json(out / "device-check.json", doc)
            (out / "summary.md").write_text(summary_markdown(doc))
    pngs = write_plots(doc, out)
    (out / "summary.md").write_text(summary_markdown(doc, pngs))
    print()
    print("\n".join(compact_table(doc, out)))
    return 0 if all(s["status"] in ("ok", "skipped") for s in doc["stages"]) else 1


def _device_record(rows: list[dict]) -> Optional[dict]:
    """The one-line device record of the JSON, from the environment stage's rows."""
    rec: dict = {}
    for r in rows:
        if r.get("what") in ("device", "versions"):
            rec.update({k: v for k, v in r.items() if k not in ("what", "item")})
        elif r.get("what") == "ceiling":
            rec[r["name"]] = r["value"]
    return rec or None


# ----------------------------------------------------------------------------
# The child: one stage, its rows streamed to TRIFUSE_DEVICE_ROWS.


class Ctx:
    """What a stage function gets: where it runs, its clock, and ``emit`` for its rows."""

    def __init__(self, seconds: float, dry_run: bool):
        import torch

        self.t_end = time.perf_counter() + seconds
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self._rows = open(os.environ["TRIFUSE_DEVICE_ROWS"], "a")
        if not dry_run and not torch.cuda.is_available():
            self.fail("no CUDA device here: run with --dry-run to rehearse on the CPU")

    def left(self) -> float:
        return self.t_end - time.perf_counter()

    def emit(self, row: dict) -> None:
        self._rows.write(json.dumps({"stage": os.environ.get("TRIFUSE_DEVICE_STAGE"), **row}, default=_jsonable)
                         + "\n")
        self._rows.flush()

    def skip(self, reason: str) -> None:
        self.emit({"_meta": True, "status": "skipped", "reason": reason})
        print(f"skipped: {reason}")
        sys.exit(0)

    def fail(self, reason: str) -> None:
        self.emit({"_meta": True, "status": "failed", "reason": reason})
        print(f"failed: {reason}")
        sys.exit(1)

    def items(self, items: list[tuple[str, float, Callable[[], list[dict]]]]) -> bool:
        """Run ``(name, estimated seconds, fn)`` items in order; an item whose estimate exceeds the
        time left is recorded as skipped. Returns whether every item that ran was clean."""
        clean = True
        for name, estimate, fn in items:
            if estimate > self.left():
                self.emit({"item": name, "status": f"skipped: needs ~{estimate:.0f} s, {self.left():.0f} s left"})
                continue
            t0 = time.perf_counter()
            print(f"--- {name} (~{estimate:.0f} s estimated, {self.left():.0f} s left)", flush=True)
            try:
                rows = fn()
            except Exception as e:  # noqa: BLE001 - one broken item is a row, the stage goes on
                import traceback

                traceback.print_exc()
                self.emit({"item": name, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                clean = False
                continue
            for r in rows:
                self.emit({"item": name, **r})
            bad = [r for r in rows if _our_failure(r)]
            clean &= not bad
            print(f"--- {name}: {len(rows)} rows in {time.perf_counter() - t0:.1f} s"
                  + (f", {len(bad)} of ours wrong or failing" if bad else ""), flush=True)
        return clean


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _our_failure(row: dict) -> bool:
    """A trifuse row that did not match its reference or raised: the stage fails on it."""
    status = str(row.get("status", ""))
    ours = str(row.get("backend", "")).startswith("trifuse") or row.get("backend") == "reference"
    return ours and (status == "mismatch" or status.startswith("error"))


def _suite_rows(result, ctx: Ctx) -> list[dict]:
    """A suite's rows, printed as its own table for the log."""
    from . import report

    report.print_table(result.rows, result.title)
    for note in result.notes:
        print(f"note: {note}")
    ceil = {f"ceiling_{k}": v for k, v in result.ceilings.items()}
    return [{**r, **ceil} for r in result.rows]


# -- stage 1 -----------------------------------------------------------------


def _nvidia_smi() -> dict:
    """``nvidia-smi -q`` flattened to ``Section/Key: value`` (read only: no option that changes anything)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    flat, stack = {}, []
    for line in out.splitlines():
        if not line.strip() or line.startswith("="):
            continue
        indent = len(line) - len(line.lstrip())
        key, sep, value = line.strip().partition(":")
        key = key.strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if sep and value.strip():
            flat["/".join([s[1] for s in stack] + [key])] = value.strip()
        else:
            stack.append((indent, key))
    return flat


_SMI_FIELDS = {  # our name: the first flattened nvidia-smi key that ends with one of these
    "product": ("Product Name",), "driver": ("Driver Version",), "cuda_driver": ("CUDA Version",),
    "vbios": ("VBIOS Version",), "pstate": ("Performance State",), "persistence": ("Persistence Mode",),
    "compute_mode": ("Compute Mode",), "mig": ("MIG Mode/Current",), "ecc": ("Ecc Mode/Current",),
    "sm_clock_mhz": ("Clocks/SM",), "mem_clock_mhz": ("Clocks/Memory",),
    "max_sm_clock_mhz": ("Max Clocks/SM",), "max_mem_clock_mhz": ("Max Clocks/Memory",),
    "power_limit_w": ("Current Power Limit", "Power Limit"), "power_draw_w": ("Power Draw", "Average Power Draw"),
    "temperature_c": ("GPU Current Temp",),
    "throttle": ("Clocks Event Reasons/Active", "Clocks Throttle Reasons/Active"),
}


def stage_environment(ctx: Ctx) -> bool:
    import torch

    from .env import environment
    from .timing import copy_bandwidth, matmul_peak

    smi = _nvidia_smi()
    dev: dict = {"what": "device", "nvidia_smi": bool(smi)}
    for name, suffixes in _SMI_FIELDS.items():
        for suffix in suffixes:
            hit = next((v for k, v in smi.items() if k.endswith(suffix)), None)
            if hit is not None:
                dev[name] = hit
                break
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        dev.update(name=p.name, sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   compute_capability=f"{p.major}.{p.minor}",
                   l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None)
    ctx.emit(dev)
    env = environment(str(ctx.device))
    ctx.emit({"what": "versions", **{k: v for k, v in env.items() if k != "device"}, "host_device": env["device"]})
    print(json.dumps(dev, indent=1))
    print(json.dumps(env, indent=1))
    n_copy = (1 << 30) if ctx.device.type == "cuda" else (1 << 24)
    n_mm = 8192 if ctx.device.type == "cuda" else 256
    gbps = copy_bandwidth(ctx.device, n_copy)
    ctx.emit({"what": "ceiling", "name": "copy_gbps", "value": gbps, "bytes": 2 * n_copy})
    print(f"device-to-device copy: {gbps:.0f} GB/s (read + write, {n_copy >> 20} MiB)")
    dtypes = (torch.float16, torch.bfloat16) if ctx.device.type == "cuda" else (torch.float32,)
    for dt in dtypes:
        tf = matmul_peak(ctx.device, dt, n_mm)
        name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dt]
        ctx.emit({"what": "ceiling", "name": f"matmul_{name}_tflops", "value": tf, "n": n_mm})
        print(f"{name} matmul {n_mm}^3: {tf:.1f} TFLOP/s")
    return True


# -- stage 2 -----------------------------------------------------------------


def stage_gpu_tests(ctx: Ctx) -> bool:
    # On the CPU the gpu-marked tests skip (tests/conftest.py): the rehearsal runs one small file's
    # worth, so that collection, the alarm plugin and the streamed rows are exercised.
    targets = ["tests/test_gelu.py"] if ctx.dry_run else ["tests"]
    timeout = DRY_TEST_TIMEOUT_S if ctx.dry_run else TEST_TIMEOUT_S
    env = dict(os.environ, TRIFUSE_TEST_TIMEOUT=str(timeout))
    cmd = [sys.executable, "-m", "pytest", *targets, "-m", "gpu", "-q", "-p", "trifuse.bench.device",
           "-p", "no:cacheprovider", "-o", "addopts=", "-rfE"]
    print(" ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=_REPO, env=env).returncode
    if code == 5:  # pytest: nothing collected
        ctx.fail("pytest collected no gpu-marked test")
    return code == 0


# The pytest side (this module is also a pytest plugin: ``-p trifuse.bench.device``): each test
# under an alarm, and each outcome a row of the stage as soon as it is known.

def _alarm(signum, frame):
    raise TimeoutError(f"test exceeded its {os.environ.get('TRIFUSE_TEST_TIMEOUT')} s alarm "
                       "(scripts/device-check.sh per-test timeout)")


try:
    import pytest as _pytest
except ImportError:  # the device check itself does not need pytest
    _pytest = None

if _pytest is not None:
    @_pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):
        seconds = int(os.environ.get("TRIFUSE_TEST_TIMEOUT", "0"))
        if seconds > 0:
            old = signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(seconds)
        try:
            yield
        finally:
            if seconds > 0:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)


def pytest_runtest_logreport(report):
    rows_file = os.environ.get("TRIFUSE_DEVICE_ROWS")
    if not rows_file or not os.environ.get("TRIFUSE_TEST_TIMEOUT"):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or \
            (report.when == "teardown" and report.outcome == "failed"):
        row = {"stage": os.environ.get("TRIFUSE_DEVICE_STAGE"), "test": report.nodeid, "when": report.when,
               "outcome": report.outcome, "seconds": round(report.duration, 3)}
        if report.outcome == "failed":
            text = str(report.longrepr) if report.longrepr else ""
            row["message"] = (text.strip().splitlines() or [""])[-1][:300]
        elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            row["message"] = str(report.longrepr[2])[:200]
        with open(rows_file, "a") as f:
            f.write(json.dumps(row) + "\n")


# -- stage 3 -----------------------------------------------------------------


def _options(ctx: Ctx, dtype=None, **kw):
    import torch

    from .suite import Options

    if dtype is None:
        dtype = torch.float32 if ctx.dry_run else torch.float16
    # The rehearsal: the suites' smoke mode (few shapes, short timings); on a GPU, short timings.
    base = dict(quick=True) if ctx.dry_run else dict(warmup=3, min_time_s=0.05)
    return Options(device=ctx.device, dtype=dtype, **{**base, **kw})


def _attention(ctx: Ctx, **kw) -> Callable[[], list[dict]]:
    def run():
        from . import attention

        return _suite_rows(attention.run(_options(ctx, **kw)), ctx)
    return run


def _norms(ctx: Ctx, **kw) -> Callable[[], list[dict]]:
    def run():
        from . import kernels

        return _suite_rows(kernels.run(_options(ctx, **kw)), ctx)
    return run


def _mask_rows(ctx: Ctx, dtype, B: int, H: int, L: int, D: int) -> Callable[[], list[dict]]:
    """Attention with a padding mask (a quarter of the keys padded in half the batch) and with an
    all-ones mask (what BERT passes when nothing is padded), against no mask and SDPA's bool mask.
    The attention suite has no mask rows; this is the issue's 'with a padding mask' line."""
    def run():
        import torch
        import torch.nn.functional as F

        from trifuse import kernels

        from .suite import DTYPE_NAMES, check_and_time
        from .timing import matmul_peak

        opts = _options(ctx, dtype=dtype)
        dev = ctx.device
        q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dtype) for _ in range(3))
        padded = torch.ones(B, L, dtype=torch.bool, device=dev)
        padded[: B // 2, L - L // 4:] = False
        ones = torch.ones(B, L, dtype=torch.bool, device=dev)
        peak = matmul_peak(dev, dtype) if dev.type == "cuda" else None
        flops = 4 * B * H * L * L * D
        triton_here = kernels.triton_runnable(dev)
        rows = []
        for op, mask in (("attn-mask", padded), ("attn-mask-ones", ones), ("attn", None)):
            ref = kernels.attention_reference(q.double(), k.double(), v.double(), attention_mask=mask)
            fns = {"trifuse": lambda mask=mask: kernels.attention(q, k, v, attention_mask=mask)}
            if mask is not None:
                fns["sdpa"] = lambda mask=mask: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask[:, None, None, :])
            for backend, fn in fns.items():
                res = check_and_time(fn, ref, opts, time_it=dev.type == "cuda" or backend != "trifuse"
                                     or not triton_here)
                row = {"suite": "attention", "op": op, "shape": f"{B}x{H}x{L}x{L}x{D}", "dtype": DTYPE_NAMES[dtype],
                       "backend": backend, "b": B, "h": H, "lq": L, "lk": L, "d": D, **res}
                if "median_ms" in res:
                    row["tflops"] = flops / (res["median_ms"] * 1e-3) / 1e12
                    if peak:
                        row["frac_of_peak"] = row["tflops"] / peak
                rows.append(row)
        from . import report

        report.print_table(rows, f"attention with a padding mask ({DTYPE_NAMES[dtype]})")
        return rows
    return run


def stage_kernels(ctx: Ctx) -> bool:
    import torch

    if ctx.dry_run:
        cpu = ["trifuse", "trifuse-notma", "reference", "sdpa", "sdpa-dense-bias"]
        items = [
            ("attention fp32 hd64 (interpreted)", 5, _attention(ctx, head_dims=[64], seq=[64], backends=cpu)),
            ("norms+gelu fp32", 5, _norms(ctx, rows=[64], widths=[768], backends=["trifuse", "reference", "eager"])),
            ("attention padding mask fp32", 3, _mask_rows(ctx, torch.float32, 2, 2, 64, 64)),
        ]
    else:
        fp16, bf16 = torch.float16, torch.bfloat16
        peers = ["trifuse", "trifuse-nosplit", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-dense-bias"]
        norm_peers = ["trifuse", "eager", "torch-compile"]
        # Most telling first; estimates are seconds on an H100/H200 with a cold Triton cache
        # (each new attention specialization autotunes ~5-7 configs).
        items = [
            ("attention fp16 hd128 S1k/4k + decode B1", 70,
             _attention(ctx, head_dims=[128], seq=[1024, 4096], backends=peers)),
            ("attention fp16 hd128 S2k, TMA on/off", 35,
             _attention(ctx, head_dims=[128], seq=[2048], backends=["trifuse", "trifuse-notma"])),
            ("norms+gelu fp16", 45, _norms(ctx, rows=[16384], widths=[768, 4096, 8192], backends=norm_peers)),
            ("attention padding mask fp16 hd64", 15, _mask_rows(ctx, fp16, 8, 12, 512, 64)),
            ("attention fp16 hd64 S1k/4k B8 + decode B8", 60,
             _attention(ctx, head_dims=[64], seq=[1024, 4096], batch=[8], backends=peers)),
            ("attention bf16 hd128 S2k + decode B1", 45,
             _attention(ctx, dtype=bf16, head_dims=[128], seq=[2048], backends=peers)),
            ("attention fp16 hd128 S128/512/2k/8k", 60,
             _attention(ctx, head_dims=[128], seq=[128, 512, 2048, 8192], backends=peers)),
            ("decode fp16 hd128 B32", 40, _attention(ctx, head_dims=[128], seq=[128], batch=[32], backends=peers)),
            ("flex (T5 score_mod) fp16 hd128 S2k", 90,
             _attention(ctx, head_dims=[128], seq=[2048], backends=["trifuse", "sdpa-dense-bias", "flex"])),
            ("norms+gelu bf16", 40, _norms(ctx, dtype=bf16, rows=[16384], widths=[768, 4096, 8192],
                                           backends=norm_peers)),
            ("attention bf16 hd64 S1k/4k B8", 60,
             _attention(ctx, dtype=bf16, head_dims=[64], seq=[1024, 4096], batch=[8], backends=peers)),
        ]
    return ctx.items(items)


# -- stage 4 -----------------------------------------------------------------


def _model(ctx: Ctx, suite: str, name: str, backends: list[str], **kw) -> Callable[[], list[dict]]:
    def run():
        import importlib

        mod = importlib.import_module(f"trifuse.bench.{suite}")
        return _suite_rows(mod.run(_options(ctx, backends=backends, **kw), [name]), ctx)
    return run


def _tiny_checkpoints(folder: Path) -> dict[str, str]:
    """Tiny random BERT and ViT checkpoints (the suites' named sizes are base-sized or larger)."""
    import torch
    import transformers

    torch.manual_seed(0)
    out = {}
    bert = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=128, max_position_embeddings=64)
    out["bert"] = str(folder / "bert-tiny")
    transformers.BertModel(bert).save_pretrained(out["bert"])
    vit = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                 image_size=32, patch_size=8)
    out["vit"] = str(folder / "vit-tiny")
    transformers.ViTModel(vit, add_pooling_layer=False).save_pretrained(out["vit"])
    return out


def stage_models(ctx: Ctx) -> bool:
    if ctx.dry_run:
        tmp = tempfile.TemporaryDirectory(prefix="trifuse-dry-")
        ckpt = _tiny_checkpoints(Path(tmp.name))
        cpu = ["trifuse", "hf-eager"]
        items = [
            ("bert tiny B1 S16", 5, _model(ctx, "models", ckpt["bert"], cpu, batch=[1], seq=[16])),
            ("vit tiny B1", 5, _model(ctx, "vision", ckpt["vit"], cpu, batch=[1])),
            ("gpt2-tiny B1 ctx16", 10, _model(ctx, "decoder", "gpt2-tiny", cpu, batch=[1], seq=[16])),
            ("t5-tiny B1 S16", 10, _model(ctx, "seq2seq", "t5-tiny", cpu, batch=[1], seq=[16])),
        ]
    else:
        ours = ["trifuse", "trifuse-graphs", "hf-eager", "hf-sdpa"]
        compiled = ["hf-eager", "torch-compile"]
        items = [
            ("bert-base B1 S128", 25, _model(ctx, "models", "bert-base", ours, batch=[1], seq=[128])),
            ("gpt2 B1 ctx512", 40, _model(ctx, "decoder", "gpt2", ours, batch=[1], seq=[512])),
            ("vit-base B1/B32", 30, _model(ctx, "vision", "vit-base-patch16-224", ours, batch=[1, 32])),
            ("bert-base B32 S384", 25, _model(ctx, "models", "bert-base", ours, batch=[32], seq=[384])),
            ("t5-base B1 S128", 45, _model(ctx, "seq2seq", "t5-base", ours, batch=[1], seq=[128])),
            ("bert-base torch.compile B1 S128 / B32 S384", 60,
             _model(ctx, "models", "bert-base", compiled, batch=[1, 32], seq=[128, 384])),
            ("vit-base torch.compile B1/B32", 50,
             _model(ctx, "vision", "vit-base-patch16-224", compiled, batch=[1, 32])),
            ("t5-base torch.compile B1 S128", 70, _model(ctx, "seq2seq", "t5-base", compiled, batch=[1], seq=[128])),
            ("gpt2 torch.compile B1 ctx512", 90, _model(ctx, "decoder", "gpt2", compiled, batch=[1], seq=[512])),
            ("bert-base max-autotune B1 S128", 150,
             _model(ctx, "models", "bert-base", ["hf-eager", "torch-compile-max-autotune"], batch=[1], seq=[128])),
        ]
    return ctx.items(items)


# -- stage 5 -----------------------------------------------------------------


def memcheck_workload(device: str) -> int:
    """A small run over every kernel family, each result checked: what compute-sanitizer watches."""
    import torch

    from trifuse import kernels

    dev = torch.device(device)
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    failures = []

    def check(name, out, ref, tol=2e-2):
        err = (out.double() - ref.double()).abs().max().item()
        print(f"{name}: max abs err {err:.2e}")
        if not err <= tol:
            failures.append(f"{name}: {err:.2e}")

    gpu = dev.type == "cuda"
    B, H, L, D = (2, 4, 200, 64) if gpu else (2, 2, 72, 32)  # ragged L: the masked tail blocks run
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dt) for _ in range(3))
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    mask[0, 150:] = False
    ref = kernels.attention_reference(q.double(), k.double(), v.double(), causal=True, attention_mask=mask)
    check("attention causal+mask", kernels.attention(q, k, v, causal=True, attention_mask=mask), ref)
    table = torch.randn(32, H, device=dev, dtype=dt)
    rel = kernels.RelativeBias(table, True)
    rel64 = kernels.RelativeBias(table.double(), True)
    qs = q * D ** -0.5  # T5 runs unscaled: keep the logits in a realistic range
    check("attention T5 bias", kernels.attention(qs, k, v, relative_bias=rel, scale=1.0),
          kernels.attention_reference(qs.double(), k.double(), v.double(), relative_bias=rel64, scale=1.0))
    kd, vd = (torch.randn(B, H, 2048 if gpu else 256, D, device=dev, dtype=dt) for _ in range(2))
    qd = torch.randn(B, H, 1, D, device=dev, dtype=dt)
    check("attention split-K decode", kernels.attention(qd, kd, vd, causal=True, _num_splits=4),
          kernels.attention_reference(qd.double(), kd.double(), vd.double(), causal=True))
    N = 768 if gpu else 96
    x, r = (torch.randn(37, N, device=dev, dtype=dt) for _ in range(2))
    w, b = torch.randn(N, device=dev, dtype=dt), torch.randn(N, device=dev, dtype=dt)
    out = kernels.layer_norm(x, w, b, residual=r)
    ref = kernels.layer_norm_reference(x.double(), w.double(), b.double(), residual=r.double())
    check("layer_norm+residual", out[0], ref[0], tol=5e-2)
    check("gelu+bias", kernels.gelu(x, b), kernels.gelu_reference(x.double(), b.double()), tol=5e-2)
    if gpu:
        torch.cuda.synchronize()
    if failures:
        print("WRONG: " + "; ".join(failures))
        return 1
    return 0


def stage_memcheck(ctx: Ctx) -> bool:
    exe = shutil.which("compute-sanitizer")
    for guess in ("/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if exe is None and os.path.exists(guess):
            exe = guess
    workload = [sys.executable, "-m", "trifuse.bench.device", "--memcheck-workload", str(ctx.device)]
    if ctx.dry_run:
        # The workload itself, without the checker, so its code is rehearsed too.
        code = subprocess.run(workload, cwd=_REPO).returncode
        ctx.emit({"check": "workload without compute-sanitizer", "exit_code": code})
        if code != 0:
            ctx.fail(f"memcheck workload failed on the CPU (exit {code})")
        ctx.skip("dry run: compute-sanitizer needs a GPU" if exe is None else "dry run: the checker runs on a GPU only")
    if exe is None:
        ctx.skip("compute-sanitizer is not on this machine")
    cmd = [exe, "--tool", "memcheck", "--error-exitcode", "86", "--print-limit", "20", *workload]
    print(" ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line.rstrip())
    code = proc.wait()
    text = "\n".join(lines)
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    errors = int(m.group(1)) if m else None
    row = {"check": "compute-sanitizer memcheck", "exit_code": code, "errors": errors,
           "first_errors": [ln for ln in lines if "Invalid" in ln or "Error" in ln][:10]}
    ctx.emit(row)
    if errors is None and ("not supported" in text.lower() or code not in (0, 86, 1)):
        ctx.skip(f"compute-sanitizer did not run on this device (exit {code}): "
                 + next((ln for ln in lines if "rror" in ln), "no error summary")[:200])
    return code == 0 and errors == 0


STAGE_FNS = {"environment": stage_environment, "gpu-tests": stage_gpu_tests, "kernels": stage_kernels,
             "models": stage_models, "memcheck": stage_memcheck}


# ----------------------------------------------------------------------------
# Reading the results: summary.md, plots, the closing table, the goals of issue 20.


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
    bad = [r for r in rows if _our_failure(r)]
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


# ----------------------------------------------------------------------------


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or name not in STAGE_NAMES:
            raise SystemExit(f"--deadline takes STAGE=SECONDS with STAGE one of {STAGE_NAMES}; got {item!r}")
        out[name] = float(value)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trifuse.bench.device", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="output folder (default: $OUT if set, else bench/results/device-<date>)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole run, shared among the stages (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU with tiny shapes")
    p.add_argument("--stages", default=",".join(STAGE_NAMES), help=f"comma-separated subset of {STAGE_NAMES}")
    p.add_argument("--deadline", action="append", metavar="STAGE=SECONDS", help="override one stage's deadline")
    p.add_argument("--run-stage", choices=STAGE_NAMES, help=argparse.SUPPRESS)  # the child's entry
    p.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--memcheck-workload", metavar="DEVICE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memcheck_workload:
        return memcheck_workload(args.memcheck_workload)
    if args.run_stage:
        ctx = Ctx(args.seconds, args.dry_run)
        return 0 if STAGE_FNS[args.run_stage](ctx) else 1
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; choose from {STAGE_NAMES}")
    return run_all(args.out or _default_out(), args.budget, args.dry_run, stages, _parse_overrides(args.deadline))


if __name__ == "__main__":
    sys.exit(main())
