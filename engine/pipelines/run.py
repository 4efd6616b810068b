"""``trifuse run TASK CHECKPOINT [INPUT ...] | --file inputs.jsonl | -``: a pipeline from the shell.

Prints one JSON line per input, in input order, as each batch finishes. Inputs are
plain text (or image paths), or JSON when they start with ``{``, ``[`` or ``"``
(a question-answering input is ``{"question": ..., "context": ...}``); ``--file``
reads one input per line (JSON lines, or plain text lines), ``-`` reads them from
stdin. Task options are flags with the option's name (``--top-k 3``,
``--aggregation-strategy simple``, ``--num-beams 4``, ``--candidate-labels "a,b"``);
their values are read as JSON when they parse (numbers, ``true``, ``null``, lists),
else as strings.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterator


def _option_names() -> list:
    from . import _PIPELINES

    names = set()
    for cls in _PIPELINES.values():
        names.update(cls.options)
    names.discard("generator")  # not expressible on a command line
    return sorted(names)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _input(text: str):
    text = text.rstrip("\n")
    if text[:1] in ("{", "[", '"'):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="a pipeline task: text-classification, ner, fill-mask, question-answering, "
                                "summarization, translation_en_to_de, text-generation, ...")
    p.add_argument("checkpoint", help="checkpoint directory (config.json, weights, tokenizer files)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="inputs; '-' reads one per line from stdin")
    p.add_argument("--file", help="read inputs from this file, one per line (JSON lines or plain text)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16, bf16 (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=None, help="inputs per model call")
    group = p.add_argument_group("task options (values read as JSON when they parse)")
    for name in _option_names():
        group.add_argument("--" + name.replace("_", "-"), dest="opt_" + name, type=_value, default=argparse.SUPPRESS,
                           metavar="VALUE")
    p.set_defaults(func=run)


def _read(args) -> Iterator:
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield _input(line)
    for x in args.inputs:
        if x == "-":
            for line in sys.stdin:
                if line.strip():
                    yield _input(line)
        else:
            yield _input(x)


def run(args) -> int:
    from . import jsonable, pipeline

    opts = {k[len("opt_"):]: v for k, v in vars(args).items() if k.startswith("opt_")}
    question, context = opts.pop("question", None), opts.pop("context", None)
    if (question is None) != (context is None):
        print("trifuse run: --question and --context go together", file=sys.stderr)
        return 2
    if question is not None:  # one question-answering input given by flags
        args.inputs = [json.dumps({"question": question, "context": context}), *args.inputs]
    if not args.inputs and not args.file:
        print("trifuse run: no inputs: give them as arguments, --file FILE, or '-' for stdin", file=sys.stderr)
        return 2
    try:
        pipe = pipeline(args.task, args.checkpoint, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                        **opts)
    except (TypeError, ValueError, FileNotFoundError) as e:
        print(f"trifuse run: {e}", file=sys.stderr)
        return 2
    try:
        for result in pipe(_read(args)):
            print(json.dumps(result, ensure_ascii=False, default=jsonable), flush=True)
    except (TypeError, ValueError, KeyError, OSError) as e:  # bad input: say which, no traceback
        print(f"trifuse run: {e}", file=sys.stderr)
        return 1
    return 0
