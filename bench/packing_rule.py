"""Where packing starts to pay: packed against padded over batch shapes and real-token fractions.

``engine.packing.plan`` packs a padded batch when at most ``PACK_BELOW`` of its positions are real
and it holds at least ``PACK_MIN_POSITIONS`` positions. This sweep is how those two numbers were
chosen (docs/padding-free.md, "When it packs"): for each ``batch x seqlen`` and target real
fraction, one row of full length and the others' lengths drawn around it, the same model times
``use_packing("always")`` against ``use_packing(False)`` on the same batch, checked equal at the
real tokens first.

    python -m trifuse.bench.packing_rule bert-base --threads 1 --out packing-rule.json
    python -m trifuse.bench.packing_rule path/to/checkpoint

Run it on a quiet machine: it is a timing, and only its ratios near 1.0 matter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from trifuse import engine, kernels
from trifuse.engine.family import ENCODER

from .suite import build_hf_named, kind_sizes
from .timing import measure

SHAPES = ((2, 16), (4, 16), (2, 32), (4, 32), (8, 32), (8, 64), (16, 64), (16, 128))
FRACTIONS = (0.5, 0.75, 0.85, 0.9, 0.95)


def batch_lengths(batch: int, seqlen: int, frac: float, g: torch.Generator) -> list[int]:
    """One full row, the rest uniform around the length that makes the batch ``frac`` real."""
    rest = max(0.0, (frac * batch * seqlen - seqlen) / max(1, batch - 1))
    spread = min(rest, seqlen - rest)
    return [seqlen] + [int(min(seqlen, max(1, round(rest + spread * (2 * float(torch.rand(1, generator=g)) - 1)))))
                       for _ in range(batch - 1)]


def sweep(model, vocab: int, threads: int, min_time_s: float = 0.3) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch, seqlen in SHAPES:
        for frac in FRACTIONS:
            lens = batch_lengths(batch, seqlen, frac, g)
            ids = torch.randint(3, vocab, (batch, seqlen), generator=g)
            mask = (torch.arange(seqlen)[None, :] < torch.tensor(lens)[:, None]).long()
            keep = mask.bool()
            real = int(keep.sum()) / keep.numel()
            if real == 1.0:
                continue

            def run(mode):
                with engine.use_packing(mode), kernels.use_backend("native"), torch.inference_mode():
                    return model(ids, attention_mask=mask).last_hidden_state

            a, b = run("always")[keep], run(False)[keep]
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            t = {m: measure(lambda m=m: run(m), "cpu", warmup=2, min_time_s=min_time_s, min_iters=5,
                            flush_l2=False, threads=threads) for m in ("always", False)}
            row = dict(batch=batch, seqlen=seqlen, positions=batch * seqlen, real_fraction=round(real, 3),
                       padded_ms=round(t[False].median, 3), packed_ms=round(t["always"].median, 3),
                       packed_speedup=round(t[False].median / t["always"].median, 3),
                       noisy=bool(t[False].noise() or t["always"].noise()))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a named text-encoder size (bert-base, bert-small, ...) or a checkpoint directory")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads while timing (default 1)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    sizes = kind_sizes(ENCODER)
    if args.model not in sizes and not Path(args.model).is_dir():
        p.error(f"{args.model!r} is neither a named size ({', '.join(sizes)}) nor a checkpoint directory")
    hf = build_hf_named(args.model, sizes, torch.float32, torch.device("cpu"), "eager")
    model = engine.from_pretrained(hf, task="feature-extraction", device="cpu")
    rows = sweep(model, hf.config.vocab_size, args.threads)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "threads": args.threads,
                                        "cpu": torch.backends.cpu.get_cpu_capability(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
