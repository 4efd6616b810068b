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

The package: :mod:`.runner` (the parent: stages as subprocesses, deadlines, the files),
:mod:`.stages` (the child: one stage, its rows streamed to disk), :mod:`.plugin` (the pytest
plugin of the ``gpu-tests`` stage: per-test alarms, outcomes as rows) and :mod:`.summary`
(reading the results: ``summary.md``, plots, the closing table, the goals of issue 20).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .runner import DEFAULT_BUDGET_S, STAGE_NAMES, STAGES, Stage, default_out, parse_overrides, run_all
from .summary import attention_pairs, compact_table, goals, model_pairs, summary_markdown, write_plots

__all__ = ["main", "run_all", "Stage", "STAGES", "STAGE_NAMES", "DEFAULT_BUDGET_S", "attention_pairs", "model_pairs",
           "goals", "compact_table", "summary_markdown", "write_plots"]


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
        from .stages import memcheck_workload

        return memcheck_workload(args.memcheck_workload)
    if args.run_stage:
        from .stages import STAGE_FNS, Ctx

        ctx = Ctx(args.seconds, args.dry_run)
        return 0 if STAGE_FNS[args.run_stage](ctx) else 1
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; choose from {STAGE_NAMES}")
    return run_all(args.out or default_out(), args.budget, args.dry_run, stages, parse_overrides(args.deadline))
