"""``trifuse bench`` / ``python -m bench``: run benchmark suites and write their reports."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# Suite name -> module with ``run(Options) -> SuiteResult``; imported on demand.
SUITES = {
    "kernels": "trifuse.bench.kernels",
    "attention": "trifuse.bench.attention",
}


def _model_suites() -> list:
    """Model suites, most specific first: each has ``NAMED`` sizes and ``is_model(name)``."""
    from . import gpt2, models, t5, vit

    return [vit, gpt2, t5, models]


def _model_suite(name: str, suites: list):
    return next((m for m in suites if m.is_model(name)), None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suites", nargs="*", metavar="SUITE|MODEL",
                   help=f"what to benchmark: a suite ({', '.join(SUITES)}), a named model size (bert-base, "
                        "roberta-base, ..., gpt2, ..., t5-small, ..., vit-base-patch16-224, ...) or a local checkpoint "
                        "directory (default: the main job, every suite and family, see bench/default.py)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                   help="activation dtype (default: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--backends", nargs="+", help="backends to run side by side (default: all the suite has)")
    p.add_argument("--rows", nargs="+", type=int, help="kernels: row counts to sweep")
    p.add_argument("--widths", nargs="+", type=int, help="kernels: widths to sweep")
    p.add_argument("--batch", nargs="+", type=int, help="batch sizes to sweep")
    p.add_argument("--seq", nargs="+", type=int, help="sequence lengths to sweep")
    p.add_argument("--head-dims", nargs="+", type=int, help="attention: head dims to sweep")
    p.add_argument("--warmup", type=int, default=10, help="warm-up calls before timing (default 10)")
    p.add_argument("--min-time", type=float, default=0.25,
                   help="seconds of samples per measurement (default 0.25)")
    p.add_argument("--quick", action="store_true", help="a few shapes, short timings: a smoke run")
    p.add_argument("--out", type=Path, default=Path("results"),
                   help="directory for the JSON, CSV, markdown and PNG reports (default: ./results)")
    p.set_defaults(func=run_from_args)


def use_interpreter_without_gpu(argv) -> None:
    """Without a GPU, let ``trifuse bench`` check the Triton kernels through Triton's interpreter.

    Triton reads ``TRITON_INTERPRET`` when trifuse's kernels are decorated, i.e. when
    ``kernels`` is first imported: this must run before anything imports it. A user's
    own ``TRITON_INTERPRET`` (e.g. ``=0``) wins.
    """
    import torch

    on_cpu = "--device" in argv and argv[argv.index("--device") + 1:][:1] == ["cpu"]
    if (on_cpu or not torch.cuda.is_available()) and "kernels" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def run_from_args(args: argparse.Namespace) -> int:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    from . import report
    from .env import device_slug, environment
    from .suite import DTYPES, Options

    model_suites = _model_suites()
    unknown = [s for s in args.suites if s not in SUITES and _model_suite(s, model_suites) is None]
    if unknown:
        named = [n for m in model_suites for n in m.NAMED]
        raise SystemExit(f"unknown suite(s) {unknown}; choose a suite from {list(SUITES)}, a model from "
                         f"{named} or a checkpoint directory")
    # Model names run through the suite of their family, in the order given.
    by_suite: dict = {}
    for s in args.suites:
        if s not in SUITES:
            by_suite.setdefault(_model_suite(s, model_suites), []).append(s)
    suites = [s for s in args.suites if s in SUITES] + list(by_suite)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    opts = Options(device=device, dtype=dtype, backends=args.backends, quick=args.quick,
                   warmup=args.warmup, min_time_s=args.min_time, rows=args.rows, widths=args.widths,
                   batch=args.batch, seq=args.seq, head_dims=args.head_dims)
    env = environment(str(device))
    report.console.print(f"[bold]trifuse bench[/] on {env['device']} ({device.type}), "
                         f"torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}")
    if not suites:  # the main job
        from .default import run_main_job

        folder, failed = run_main_job(opts, args.out)
        report.console.print(f"[bold]report:[/] {folder / 'report.md'} (rows, tables and plots in {folder})")
        return 1 if failed else 0
    failed = False
    for name in suites:
        if not isinstance(name, str):  # a model family's suite module
            suite, models = name, by_suite[name]
            name = suite.__name__.rsplit(".", 1)[-1]
            result = suite.run(opts, models)
        else:
            try:
                suite = importlib.import_module(SUITES[name])
            except ModuleNotFoundError as e:
                raise SystemExit(f"suite {name!r} is not available in this build: {e}") from e
            result = suite.run(opts)
        report.print_table(result.rows, result.title)
        for note in result.notes:
            report.console.print(f"[yellow]note:[/] {note}")
        for k, v in result.ceilings.items():
            report.console.print(f"measured ceiling {k}: {v:.1f}")
        stem = f"{name}-{device_slug(env)}-{args.dtype or ('fp16' if device.type == 'cuda' else 'fp32')}"
        paths = report.write_results(result.rows, env, result.ceilings, args.out, stem,
                                     result.title, result.notes)
        report.console.print("wrote " + ", ".join(str(p) for p in paths))
        bad = [r for r in result.rows if r["status"] == "mismatch" or r["status"].startswith("error")]
        for r in bad:
            report.console.print(f"[red]{r['backend']} {r['op']} {r['shape']}: {r['status']}[/]")
        failed |= any(r["backend"].startswith("trifuse") or r["backend"] == "reference" for r in bad)
    # A wrong answer from our own kernels fails the run; a peer's failure is only reported.
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:  # python -m bench compare OLD NEW
        from . import compare

        p = argparse.ArgumentParser(prog="python -m bench compare", description=compare.__doc__)
        compare.add_arguments(p)
        argv = argv[1:]
    else:
        use_interpreter_without_gpu(argv)
        p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
        add_arguments(p)
    args = p.parse_args(argv)
    return args.func(args)
