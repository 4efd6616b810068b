"""``trifuse export SOURCE OUT.onnx`` and ``trifuse verify OUT.onnx SOURCE``.

Wire into a parser with ``add_export_arguments(sub.add_parser("export"))`` and
``add_verify_arguments(sub.add_parser("verify"))``; each sets ``func``, which
returns the exit status (verify: 0 pass, 1 out of budget, 2 bad input, including a
provider that does not load).
"""

from __future__ import annotations

import sys

from trifuse.engine.cliargs import one_line, positive_int


def add_export_arguments(p) -> None:
    p.add_argument("source", help="a Hugging Face checkpoint directory")
    p.add_argument("output", help="the .onnx file to write (T5: OUT.encoder.onnx and OUT.decoder.onnx beside it)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights and activations of the exported graph (default fp32)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 20..23 (default 20)")
    p.add_argument("--task", help="override the head chosen from config.architectures")
    p.add_argument("--device", default="cpu", help="where the model is loaded for tracing (default cpu)")
    p.add_argument("--static", action="store_true", help="pin the example's shapes instead of dynamic axes")
    p.add_argument("--layer-outputs", action="store_true",
                   help="also output every block's hidden state (for trifuse verify --layerwise)")
    p.add_argument("--verify", action="store_true", help="verify the file in ONNX Runtime (CPU) right after")
    p.set_defaults(func=_export_main)


def add_verify_arguments(p) -> None:
    p.add_argument("onnx", help="a .onnx file written by trifuse export")
    p.add_argument("source", help="the checkpoint directory it was exported from")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="ONNX Runtime provider (default cpu)")
    p.add_argument("--layerwise", action="store_true",
                   help="compare every block's output (needs a file exported with --layer-outputs)")
    p.add_argument("--batch", type=positive_int, default=3, help="rows of the generated inputs (default 3)")
    p.add_argument("--seq", type=positive_int, default=11, help="tokens per row (default 11)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_verify_main)


_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _error(cmd: str, e: BaseException) -> int:
    print(f"trifuse {cmd}: error: {one_line(e)}", file=sys.stderr)
    return 2


def _export_main(args) -> int:
    from trifuse import engine

    from . import onnx as ox
    from .verify import print_report, verify

    try:
        model = engine.from_pretrained(args.source, dtype=args.dtype, device=args.device, task=args.task)
        written = ox.to_onnx(model, args.output, opset=args.opset, dynamic=not args.static,
                             layer_outputs=args.layer_outputs)
    except (ValueError, TypeError, FileNotFoundError) as e:
        return _error("export", e)
    paths = written if isinstance(written, tuple) else (written,)
    for path in paths:
        print(f"wrote {path}")
    if args.verify:
        report = verify(paths[0] if len(paths) == 1 else paths, model, providers=_PROVIDERS["cpu"])
        print_report(report)
        return 0 if report.ok else 1
    return 0


def _verify_main(args) -> int:
    from .verify import print_report, verify

    try:
        report = verify(args.onnx, args.source, providers=_PROVIDERS[args.provider], layerwise=args.layerwise,
                        batch=args.batch, seq=args.seq, seed=args.seed)
    except (ValueError, TypeError, FileNotFoundError) as e:
        return _error("verify", e)
    print_report(report)
    return 0 if report.ok else 1
