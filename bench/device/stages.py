"""The child of a device check: one stage per process, its rows streamed to ``TRIFUSE_DEVICE_ROWS``.

A stage is a function of a :class:`Ctx` returning whether it was clean; :data:`STAGE_FNS` names them
in the order of :data:`~.runner.STAGES`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .runner import REPO
from .summary import our_failure

TEST_TIMEOUT_S = 120  # one gpu test (several autotunes) at most; the stage deadline bounds the rest
DRY_TEST_TIMEOUT_S = 60


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
            bad = [r for r in rows if our_failure(r)]
            clean &= not bad
            print(f"--- {name}: {len(rows)} rows in {time.perf_counter() - t0:.1f} s"
                  + (f", {len(bad)} of ours wrong or failing" if bad else ""), flush=True)
        return clean


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _suite_rows(result, ctx: Ctx) -> list[dict]:
    """A suite's rows, printed as its own table for the log."""
    from .. import report

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

    from ..env import environment
    from ..timing import copy_bandwidth, matmul_peak

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
    cmd = [sys.executable, "-m", "pytest", *targets, "-m", "gpu", "-q", "-p", "trifuse.bench.device.plugin",
           "-p", "no:cacheprovider", "-o", "addopts=", "-rfE"]
    print(" ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    if code == 5:  # pytest: nothing collected
        ctx.fail("pytest collected no gpu-marked test")
    return code == 0


def _options(ctx: Ctx, dtype=None, **kw):
    import torch

    from ..suite import Options

    if dtype is None:
        dtype = torch.float32 if ctx.dry_run else torch.float16
    # The rehearsal: the suites' smoke mode (few shapes, short timings); on a GPU, short timings.
    base = dict(quick=True) if ctx.dry_run else dict(warmup=3, min_time_s=0.05)
    return Options(device=ctx.device, dtype=dtype, **{**base, **kw})


def _attention(ctx: Ctx, **kw) -> Callable[[], list[dict]]:
    def run():
        from .. import attention

        return _suite_rows(attention.run(_options(ctx, **kw)), ctx)
    return run


def _norms(ctx: Ctx, **kw) -> Callable[[], list[dict]]:
    def run():
        from .. import kernels

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

        from ..suite import DTYPE_NAMES, check_and_time
        from ..timing import matmul_peak

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
        from .. import report

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


def _continuous(ctx: Ctx, models: list[str], concurrency: list[int], requests: int,
                new: tuple = (4, 96)) -> Callable[[], list[dict]]:
    """Continuous batching (trifuse.GenerationEngine) against static batches of 16 and one request at a
    time (bench/continuous.py), the engine's tokens checked against one-at-a-time's."""
    def run():
        from trifuse.bench import continuous

        return continuous.device_rows(models, concurrency, requests, str(ctx.device), new=new)
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
            # bench/packed.py's batch (32 log-normal lengths, median 24); issue 27's goal: packed within 80%
            # of the ideal padded/real ratio
            ("bert-base mixed-length B32, packed vs padded", 30,
             _model(ctx, "packed", "bert-base", ["trifuse-packed", "trifuse-padded", "hf-eager", "hf-sdpa"])),
            ("t5-base B1 S128", 45, _model(ctx, "seq2seq", "t5-base", ours, batch=[1], seq=[128])),
            # 48 requests (prompts 3-40, 4-96 new tokens): engine vs static batches of 16, at concurrency 8
            # and 64; one at a time at 8 only (it is the same work at every concurrency).
            ("continuous batching gpt2 + t5-small, 48 requests", 120,
             _continuous(ctx, ["gpt2", "t5-small"], [8, 64], 48)),
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
        code = subprocess.run(workload, cwd=REPO).returncode
        ctx.emit({"check": "workload without compute-sanitizer", "exit_code": code})
        if code != 0:
            ctx.fail(f"memcheck workload failed on the CPU (exit {code})")
        ctx.skip("dry run: compute-sanitizer needs a GPU" if exe is None else "dry run: the checker runs on a GPU only")
    if exe is None:
        ctx.skip("compute-sanitizer is not on this machine")
    cmd = [exe, "--tool", "memcheck", "--error-exitcode", "86", "--print-limit", "20", *workload]
    print(" ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
