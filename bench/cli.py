"""``trifuse bench`` / ``python -m bench``: run benchmark suites and write their reports."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# Suite name -> module with ``run(Options) -> SuiteResult``; imported on demand.
SUITES = {
    "kernels": "bench.kernels",
    "attention": "bench.attention",
}
DEFAULT_SUITES = ["kernels"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help=f"what to benchmark: {', '.join(SUITES)} (default: {' '.join(DEFAULT_SUITES)})")
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


def run_from_args(args: argparse.Namespace) -> int:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and "triton" not in sys.modules:
        # Without a GPU, check the Triton kernels themselves through Triton's interpreter.
        # Triton reads the flag when trifuse's kernels are decorated, i.e. on first import.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from . import report
    from .env import device_slug, environment
    from .suite import DTYPES, Options

    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    opts = Options(device=device, dtype=dtype, backends=args.backends, quick=args.quick,
                   warmup=args.warmup, min_time_s=args.min_time, rows=args.rows, widths=args.widths,
                   batch=args.batch, seq=args.seq, head_dims=args.head_dims)
    env = environment(str(device))
    report.console.print(f"[bold]trifuse bench[/] on {env['device']} ({device.type}), "
                         f"torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}")
    failed = False
    for name in args.suites or DEFAULT_SUITES:
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
        failed |= any(r["backend"] in ("trifuse", "reference") for r in bad)
    # A wrong answer from our own kernels fails the run; a peer's failure is only reported.
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    return args.func(args)
