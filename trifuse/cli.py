"""The ``trifuse`` command."""

from __future__ import annotations

import argparse
import os
import sys

from trifuse.engine.cliargs import USER_ERRORS, Parser, one_line, positive_int  # noqa: F401 (re-exported)

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    from trifuse.bench import cli as bench_cli

    p = Parser(prog="trifuse", description="trifuse: a transformer inference engine on fused Triton kernels")
    p.add_argument("--version", action="version", version=f"trifuse {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_cli.add_arguments(sub.add_parser(
        "bench", help="benchmark kernels and models against PyTorch peers",
        description="Check, then time, trifuse against its peers; write JSON/CSV/markdown/PNG reports."))
    from trifuse.bench import compare

    compare.add_arguments(sub.add_parser(
        "compare", help="diff two benchmark result files and flag regressions beyond the noise",
        description=compare.__doc__.split("\n\n")[0]))
    from trifuse.export import cli as export_cli

    export_cli.add_export_arguments(sub.add_parser(
        "export", help="export a checkpoint to ONNX", description="Export a checkpoint to ONNX (opset 20 by default)."))
    export_cli.add_verify_arguments(sub.add_parser(
        "verify", help="check an ONNX file against PyTorch in ONNX Runtime",
        description="Run ONNX Runtime and PyTorch on the same inputs and compare every output."))
    from trifuse.engine import check

    check.add_arguments(sub.add_parser(
        "check", help="compare a checkpoint in trifuse with Hugging Face transformers",
        description=check.__doc__.split("\n\n")[0]))
    from trifuse.engine.pipelines import run as run_cli

    run_cli.add_arguments(sub.add_parser(
        "run", help="run a pipeline task (classification, NER, QA, summarization, ...) on inputs; JSON lines out",
        description=run_cli.__doc__.split("\n\n")[0]))
    from trifuse import serve

    serve.add_arguments(sub.add_parser(
        "serve", help="serve a pipeline over HTTP on Ray Serve, with dynamic batching",
        description="Serve trifuse.pipeline(TASK, CHECKPOINT) over HTTP on Ray Serve (local Ray, or --address)."))
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # before the parser's imports load the kernels
        from trifuse.bench.cli import use_interpreter_without_gpu

        use_interpreter_without_gpu(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("TRIFUSE_TRACEBACK") == "1":
            raise
        print(f"trifuse {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"trifuse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
