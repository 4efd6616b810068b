"""``trifuse check SOURCE``: trifuse against Hugging Face transformers on one checkpoint.

Both load the checkpoint and run the same batch (mixed lengths, padded; images
for ViT; decoder ids for T5). For
every output the report gives the max absolute error and the error relative to
the largest reference value (``max|ours - ref| / max|ref|``; element-wise
relative error is meaningless next to zeros), first in fp32, then in the
requested low-precision dtype, and walks the hidden states layer by layer to
name the first one that leaves its budget. Per-token outputs are compared at the
real tokens: a padded batch runs packed, with zeros at its padded positions.

Budgets: fp32 errors must stay under 1e-4 relative. In fp16/bf16 the reference
is Hugging Face in fp32 and the budget is the flash-attention rule: at most
twice Hugging Face's own error in that dtype, plus a small floor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch

from .family import SEQ2SEQ
from .registry import family_of, from_pretrained, resolve_dtype

FP32_BUDGET = 1e-4
LOWP_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FIELDS = ("last_hidden_state", "pooler_output", "logits", "start_logits", "end_logits", "encoder_last_hidden_state",
          "cls_logits", "distillation_logits")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Row:
    dtype: str
    output: str
    max_abs: float
    rel: float
    budget: float
    hf_rel: Optional[float] = None  # Hugging Face's own error in this dtype

    @property
    def ok(self) -> bool:
        return self.rel <= self.budget


@dataclass
class Report:
    rows: list
    first_bad_layer: dict  # dtype name -> (hidden-state index, relative error, label) or None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.double() - b.double()).abs().max().item()
    return d, d / max(b.double().abs().max().item(), 1e-30)


def _run(model, inputs: dict):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True)


def _real_tokens(inputs: dict, seq2seq: bool):
    """``real(field, t)``: ``t`` at the real tokens where it is per token of a padded batch. Padded
    batches run packed and hold zeros at padded positions (docs/padding-free.md), where Hugging Face
    computes the padding tokens anyway; nothing downstream reads them."""
    def real(field: str, t: torch.Tensor) -> torch.Tensor:
        encoder_side = not seq2seq or field.startswith("encoder_")
        mask = inputs.get("attention_mask" if encoder_side else "decoder_attention_mask")
        if mask is None or t.dim() < 2 or tuple(t.shape[:2]) != tuple(mask.shape):
            return t
        return t[mask.bool()]
    return real


def _hidden(out, names, real) -> list:
    """``(label, tensor)`` per hidden state: the embeddings, then each layer's output; ``names``:
    the output fields holding them, one per stack (the family's ``hidden_streams``)."""
    found = []
    for name in names:
        stack = "" if len(names) == 1 else name.split("_")[0] + " "
        found += [(f"{stack}embeddings" if i == 0 else f"{stack}layer {i}", real(name, h))
                  for i, h in enumerate(getattr(out, name, None) or ())]
    return found


def check(source, *, dtype="fp32", device=None, batch: int = 3, seq: int = 32, task: Optional[str] = None,
          seed: int = 0) -> Report:
    try:
        import transformers
    except ImportError as e:
        raise SystemExit("trifuse check compares with Hugging Face transformers: pip install 'trifuse[hf]'") from e
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    lowp = resolve_dtype(dtype) or torch.float32
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    ours32 = from_pretrained(source, task=task, device=device, dtype=torch.float32)
    fam = family_of(ours32)
    if ours32.task not in fam.hf_classes:
        raise SystemExit(f"trifuse check does not know the transformers class for {fam.name}'s task {ours32.task!r}")
    inputs = fam.example_inputs(ours32, batch, seq, seed)  # ValueError past the position table
    auto = getattr(transformers, fam.hf_classes[ours32.task])
    hf32 = auto.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").to(device).eval()
    streams = fam.hidden_streams
    real = _real_tokens(inputs, fam.kind == SEQ2SEQ)

    ref = _run(hf32, inputs)
    runs = [(torch.float32, _run(ours32, inputs), None)]
    if lowp != torch.float32:
        ours_lp = from_pretrained(source, task=task, device=device, dtype=lowp)
        hf_lp = auto.from_pretrained(source, dtype=lowp, attn_implementation="eager").to(device).eval()
        lp_inputs = {k: v.to(lowp) if v.is_floating_point() else v for k, v in inputs.items()}
        runs.append((lowp, _run(ours_lp, lp_inputs), _run(hf_lp, lp_inputs)))

    rows, first_bad = [], {}
    for dt, ours, theirs in runs:
        name = _DTYPE_NAMES[dt]

        def budget(a_theirs, b_ref):
            if theirs is None:
                return FP32_BUDGET, None
            hf_rel = _rel(a_theirs, b_ref)[1]
            return 2 * hf_rel + LOWP_FLOOR[dt], hf_rel

        for key in FIELDS:
            if key in ours.keys() and getattr(ref, key, None) is not None:
                max_abs, rel = _rel(real(key, ours[key]), real(key, ref[key]))
                bud, hf_rel = budget(real(key, theirs[key]) if theirs is not None else None, real(key, ref[key]))
                rows.append(Row(name, key, max_abs, rel, bud, hf_rel))
        first_bad[name] = None
        ref_hidden = _hidden(ref, streams, real)
        theirs_hidden = _hidden(theirs, streams, real) if theirs is not None else [(None, None)] * len(ref_hidden)
        for i, ((label, h), (_, r), (_, t)) in enumerate(zip(_hidden(ours, streams, real), ref_hidden,
                                                             theirs_hidden)):
            rel = _rel(h, r)[1]
            if rel > budget(t, r)[0]:
                first_bad[name] = (i, rel, label)
                break
    return Report(rows, first_bad)


def print_report(report: Report, source) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    table = Table(title=f"trifuse vs Hugging Face: {source}", title_justify="left")
    for col in ("dtype", "output", "max abs err", "rel err", "HF's own rel err", "budget", ""):
        table.add_column(col, justify="left" if col in ("dtype", "output") else "right")
    for r in report.rows:
        table.add_row(r.dtype, r.output, f"{r.max_abs:.2e}", f"{r.rel:.2e}",
                      "-" if r.hf_rel is None else f"{r.hf_rel:.2e}", f"{r.budget:.1e}",
                      "[green]ok[/]" if r.ok else "[red]OVER[/]")
    console.print(table)
    for dt, bad in report.first_bad_layer.items():
        where = ("every hidden state within budget" if bad is None else
                 f"first hidden state over budget: {bad[2]} (rel err {bad[1]:.2e})")
        console.print(f"{dt}: {where}")
    console.print("[green]PASS[/]" if report.ok else "[red]FAIL: out of budget[/]")


def add_arguments(p) -> None:
    from .cliargs import positive_int

    p.add_argument("source", help="a Hugging Face checkpoint directory (any family trifuse runs)")
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"],
                   help="low-precision dtype checked after fp32 (default fp16)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--task", help="override the head chosen from config.architectures")
    p.add_argument("--batch", type=positive_int, default=3, help="rows of the batch (default 3)")
    p.add_argument("--seq", type=positive_int, default=32,
                   help="tokens per row, within the position table (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_main)


def _main(args) -> int:
    report = check(args.source, dtype=args.dtype, device=args.device, batch=args.batch, seq=args.seq,
                   task=args.task, seed=args.seed)
    print_report(report, args.source)
    return 0 if report.ok else 1
