"""``trifuse bench`` / ``python -m bench``: run benchmark suites and write their reports."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path

# Suite name -> module with ``run(Options) -> SuiteResult``; imported on demand.
SUITES = {
    "kernels": "trifuse.bench.kernels",
    "attention": "trifuse.bench.attention",
    "packed": "trifuse.bench.packed",
    "cpu": "trifuse.bench.cpu",
    "continuous": "trifuse.bench.continuous",
}


def _model_suites() -> list:
    """Model suites, one per kind of family (engine.family), most specific first: each has ``NAMED`` sizes
    (its families' contracts) and ``is_model(name)``; ``models``, the text encoders', takes any other checkpoint."""
    from . import decoder, models, seq2seq, vision

    return [vision, decoder, seq2seq, models]


def _model_suite(name: str, suites: list):
    return next((m for m in suites if m.is_model(name)), None)


def _number(kind, text: str, *, low: float, low_ok: bool):
    """``text`` as a ``kind`` (int or float) ``>= low`` (``low_ok``) or ``> low``; else a one-line
    argparse error (exit status 2). Nothing is clamped: a value out of range is refused."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}")
    if not math.isfinite(value) or value < low or (value == low and not low_ok):
        bound = f">= {low:g}" if low_ok else f"> {low:g}"
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, low=0, low_ok=False)


def non_negative_int(text: str) -> int:
    return _number(int, text, low=0, low_ok=True)


def positive_float(text: str) -> float:
    return _number(float, text, low=0.0, low_ok=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suites", nargs="*", metavar="SUITE|MODEL",
                   help=f"what to benchmark: a suite ({', '.join(SUITES)}), a named model size (bert-base, "
                        "roberta-base, ..., gpt2, ..., t5-small, ..., vit-base-patch16-224, ...) or a local checkpoint "
                        "directory (default: the main job, every suite and family, see bench/default.py)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                   help="activation dtype (default: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quantize", choices=["int8"],
                   help="trifuse's rows load with quantize='int8' (CPU only; checked against Hugging Face in the "
                        "run's dtype within the int8 budget); the cpu suite always has its int8 rows")
    p.add_argument("--backends", nargs="+", help="backends to run side by side (default: all the suite has)")
    p.add_argument("--rows", nargs="+", type=positive_int, help="kernels: row counts to sweep")
    p.add_argument("--widths", nargs="+", type=positive_int, help="kernels: widths to sweep")
    p.add_argument("--batch", nargs="+", type=positive_int, help="batch sizes to sweep")
    p.add_argument("--seq", nargs="+", type=positive_int, help="sequence lengths to sweep")
    p.add_argument("--head-dims", nargs="+", type=positive_int, help="attention: head dims to sweep")
    p.add_argument("--warmup", type=non_negative_int, default=10, help="warm-up calls before timing (default 10)")
    p.add_argument("--min-time", type=positive_float, default=0.25,
                   help="seconds of samples per measurement (default 0.25)")
    p.add_argument("--threads", type=positive_int,
                   help="CPU: torch and ONNX Runtime intra-op threads while timing (default 1: more threads "
                        "than free cores make a timing measure the scheduler)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true",
                        help="a few shapes, short timings (the main job's default without a GPU: every kernel and "
                             "family checked, ONNX verified, a short CPU timing)")
    length.add_argument("--full", action="store_true",
                        help="every shape of each sweep (the default on a GPU; the main job adds base sizes)")
    p.add_argument("--keep-onnx", action="store_true",
                   help="main job: keep the exported ONNX files (deleted after verification by default)")
    p.add_argument("--wide", action="store_true", help="tables with every column (default: the few that fit 80)")
    p.add_argument("--out", type=Path, default=Path("results"),
                   help="directory for the JSON, CSV, markdown and PNG reports (default: ./results)")
    p.set_defaults(func=run_from_args, parser=p)


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
        import difflib

        named = [n for m in model_suites for n in m.NAMED]
        close = [c for u in unknown for c in difflib.get_close_matches(u, list(SUITES) + named, n=3)]
        hint = f"did you mean {', '.join(dict.fromkeys(close))}? " if close else ""
        args.parser.error(f"unknown suite(s) {unknown}; {hint}choose a suite ({', '.join(SUITES)}), one of "
                          f"{len(named)} named model sizes (e.g. {', '.join(named[::6])}; docs/benchmarks.md lists them) "
                          "or a checkpoint directory")
    if args.suites and args.keep_onnx:
        args.parser.error("--keep-onnx applies to the main job (no suite named) only")
    # Model names run through the suite of their family, in the order given.
    by_suite: dict = {}
    for s in args.suites:
        if s not in SUITES:
            by_suite.setdefault(_model_suite(s, model_suites), []).append(s)
    suites = [s for s in args.suites if s in SUITES] + list(by_suite)
    if args.quantize and device.type != "cpu":
        args.parser.error(f"--quantize {args.quantize} runs on the CPU only for now (device {device})")
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    # A suite runs its whole sweep unless --quick; the main job is quick without a GPU unless --full.
    quick = args.quick or (not suites and not args.full and device.type != "cuda")
    opts = Options(device=device, dtype=dtype, backends=args.backends, quick=quick,
                   warmup=args.warmup, min_time_s=args.min_time, rows=args.rows, widths=args.widths,
                   batch=args.batch, seq=args.seq, head_dims=args.head_dims, threads=args.threads,
                   quantize=args.quantize)
    env = environment(str(device))
    report.console.print(f"[bold]trifuse bench[/] on {env['device']} ({device.type}), "
                         f"torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}")
    if not suites:  # the main job
        from .default import run_main_job

        try:
            folder, failed = run_main_job(opts, args.out, keep_onnx=args.keep_onnx, wide=args.wide)
        except KeyboardInterrupt:
            return 130
        report.console.print(f"[bold]report:[/] {folder / 'report.md'} (rows, tables and plots in {folder})")
        return 1 if failed else 0
    from .default import DEFAULT_WEIGHT, WEIGHTS, Progress, summary, write_plot

    def part_name(s) -> str:
        return s if isinstance(s, str) else s.__name__.rsplit(".", 1)[-1]

    failed = False
    with Progress([(part_name(s), WEIGHTS.get(part_name(s), DEFAULT_WEIGHT)) for s in suites]) as progress:
        opts.progress = progress.step
        for name in suites:
            progress.start(part_name(name))
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
            stem = f"{name}-{device_slug(env)}-{args.dtype or ('fp16' if device.type == 'cuda' else 'fp32')}"
            paths = report.write_results(result.rows, env, result.ceilings, args.out, stem,
                                         result.title, result.notes)
            paths += write_plot(name, result.rows, args.out / f"{stem}.png")
            progress.finish(summary(result.rows))
            report.print_table(result.rows, result.title, wide=args.wide)
            for note in result.notes:
                report.console.print(f"[yellow]note:[/] {note}")
            for k, v in result.ceilings.items():
                report.console.print(f"measured ceiling {k}: {v:.1f}")
            report.console.print("wrote " + ", ".join(str(p) for p in paths))
            bad = [r for r in result.rows if r["status"] == "mismatch" or r["status"].startswith("error")]
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
