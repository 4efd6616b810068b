"""The main job, ``trifuse bench`` with no suite named: the whole engine on whatever is here.

1. the kernel suites (norms, GELU, attention): each kernel checked against a float64
   reference, then timed against PyTorch;
2. every model family at a small and a base size (random weights from the named
   configs): each backend checked against Hugging Face eager, then timed;
3. each small model (and, on a GPU, each base model) exported to ONNX and verified
   in ONNX Runtime against PyTorch.

Everything lands in one folder: each suite's JSON/CSV/markdown/PNG and an index,
``report.md``. On a machine without a GPU the Triton kernels are checked under
Triton's interpreter rather than timed, and the report says which figures need a GPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import shutil
import time
from pathlib import Path

import torch

from . import report
from .env import device_slug, environment
from .suite import DTYPE_NAMES, Options, SuiteResult, cpu_note, onnx_export

# (family, suite module, (small size, base size)): the named sizes live in the suites.
PLAN = [
    ("bert", "models", ("bert-small", "bert-base")),
    ("roberta", "models", ("roberta-small", "roberta-base")),
    ("distilbert", "models", ("distilbert-small", "distilbert-base")),
    ("albert", "models", ("albert-small", "albert-base")),
    ("electra", "models", ("electra-small", "electra-base")),
    ("gpt2", "gpt2", ("gpt2-tiny", "gpt2")),
    ("t5", "t5", ("t5-small", "t5-base")),
    ("vit", "vit", ("vit-small-patch16-224", "vit-base-patch16-224")),
]


def _suite(module: str):
    try:
        return importlib.import_module(f"trifuse.bench.{module}")
    except ModuleNotFoundError:
        return None


def _export_rows(opts: Options, folder: Path, names: list[tuple[str, str]]) -> tuple[list[dict], list[str]]:
    """Export each (suite, model name) to ONNX and verify it in ONNX Runtime.

    A model a suite's onnxruntime backend has exported already is not exported again:
    its files are linked into ``folder/onnx/<name>/`` and ``export_s`` is that export's time.
    """
    try:
        from trifuse import export
        verify = export.verify
    except (ImportError, AttributeError):
        return [], ["ONNX export is not available in this build: export and verification skipped."]
    from trifuse import engine, kernels

    rows = []
    onnx_dir = folder / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    for module, name in names:
        suite = _suite(module)
        row = {"suite": "onnx", "op": name, "shape": "-", "dtype": DTYPE_NAMES[opts.dtype],
               "backend": "onnxruntime"}
        try:
            cpu = torch.device("cpu")  # exported in fp32 from the CPU; verified on ONNX Runtime's CPU provider
            hf = suite.build_hf(name, torch.float32, cpu, "eager")
            model = engine.from_pretrained(hf, dtype=torch.float32, device="cpu")
            paths, row["export_s"] = onnx_export(hf, model.task, model=model)
            paths = _link_files(paths, onnx_dir / Path(name).name)  # name may be a checkpoint path
            t0 = time.perf_counter()
            # PyTorch's side on the reference ops, as it is on a GPU machine (the model is on the CPU):
            # without a GPU the kernels would run interpreted, which the model suites check already.
            with kernels.use_backend("reference"):
                result = verify(paths, model)  # T5: the (encoder, decoder) pair to_onnx wrote
            row["verify_s"] = time.perf_counter() - t0
            row.update(_verification_fields(result))
        except Exception as e:  # noqa: BLE001 - a model that does not export is a result
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row)
    return rows, []


def _link_files(paths: tuple[Path, ...], folder: Path) -> tuple[Path, ...]:
    """Hard-link (or copy) every file of one export, weights files included, into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for src in paths[0].parent.iterdir():
        dest = folder / src.name
        dest.unlink(missing_ok=True)
        try:
            os.link(src, dest)
        except OSError:  # another file system
            shutil.copy2(src, dest)
    return tuple(folder / p.name for p in paths)


def _verification_fields(report) -> dict:
    """Status and worst errors of an ``export.VerifyReport``."""
    fields = {"status": "verified" if report.ok else "mismatch"}
    if report.rows:
        fields["max_abs_err"] = max(r.max_abs for r in report.rows)
        fields["rel_err"] = max(r.max_rel for r in report.rows)
    return fields


def _took(took: dict, name: str, t0: float) -> None:
    took[name] = time.perf_counter() - t0
    report.console.print(f"[dim]{name}: {took[name]:.0f} s[/dim]")


def run_main_job(opts: Options, out_root: Path) -> tuple[Path, bool]:
    """Run everything; return the report folder and whether any check failed."""
    env = environment(str(opts.device))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = out_root / f"{stamp}-{device_slug(env)}-{DTYPE_NAMES[opts.dtype]}"
    folder.mkdir(parents=True, exist_ok=True)
    gpu = opts.on_gpu
    if not gpu:  # a CPU run checks everything but keeps the timings short
        opts = dataclasses.replace(opts, warmup=min(opts.warmup, 3), min_time_s=min(opts.min_time_s, 0.1))
    results: dict[str, SuiteResult] = {}
    took: dict[str, float] = {}  # wall seconds per part, for the index

    for name in ("kernels", "attention"):
        report.console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        results[name] = importlib.import_module(f"trifuse.bench.{name}").run(dataclasses.replace(opts, quick=not gpu))
        _took(took, name, t0)

    exported, missing = [], []
    for family, module, sizes in PLAN:
        suite = _suite(module)
        if suite is None:
            missing.append(family)
            continue
        report.console.rule(f"[bold]{family}")
        t0 = time.perf_counter()
        res = suite.run(opts, list(sizes))
        _took(took, family, t0)
        prev = results.get(module)
        results[module] = res if prev is None else SuiteResult(
            prev.title, prev.rows + res.rows, {**prev.ceilings, **res.ceilings},
            prev.notes + [n for n in res.notes if n not in prev.notes])
        exported += [(module, sizes[0])] + ([(module, sizes[1])] if gpu else [])

    report.console.rule("[bold]ONNX export")
    t0 = time.perf_counter()
    onnx_rows, onnx_notes = _export_rows(opts, folder, exported)
    _took(took, "ONNX export", t0)
    if not gpu:
        onnx_notes.append("Without a GPU only the small sizes are exported (the base ones take minutes each).")
    results["onnx"] = SuiteResult("ONNX export, verified in ONNX Runtime against PyTorch", onnx_rows, {}, onnx_notes)

    failed = False
    index = [f"# trifuse main job on {env['device']} ({DTYPE_NAMES[opts.dtype]})", "",
             "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items() if v is not None]
    if not gpu:
        index += ["", f"**No GPU here.** {cpu_note(opts.device)} Every speed goal needs a GPU."]
    if missing:
        index += ["", f"Not in this build: {', '.join(missing)}."]
    index += ["", "Wall time per part: " + ", ".join(f"{k} {v:.0f} s" for k, v in took.items()) + "."]
    for name, res in results.items():
        report.print_table(res.rows, res.title)
        stem = f"{name}-{device_slug(env)}-{DTYPE_NAMES[opts.dtype]}"
        paths = report.write_results(res.rows, env, res.ceilings, folder, stem, res.title, res.notes)
        bad = [r for r in res.rows if r.get("status") in ("mismatch",) or str(r.get("status")).startswith("error")]
        failed |= any(r["backend"].startswith("trifuse") or r["backend"] in ("reference", "onnxruntime")
                      for r in bad)
        index += ["", f"## {res.title}", ""]
        index += [f"- note: {n}" for n in res.notes]
        index += ["", report.markdown_table(res.rows) if res.rows else "(nothing ran)", ""]
        index += [f"![{res.title}]({p.name})" for p in paths if p.suffix == ".png"]
        links = [f"[{p.suffix[1:]}]({p.name})" for p in paths if p.suffix in (".json", ".csv")]
        index += ["", "Rows: " + ", ".join(links)]
    (folder / "report.md").write_text("\n".join(index) + "\n")
    return folder, failed
