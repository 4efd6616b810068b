"""Encoders under CUDA graphs: capture once per shape bucket, pad inputs up to it.

At small batch a transformer forward is dominated by kernel launch overhead, not
by the kernels. A CUDA graph replays the whole forward as one launch. Graphs fix
shapes, so inputs are padded up to the nearest bucket (batch, and sequence for
text models) with masked padding, run through the bucket's graph, and the
outputs are cut back to the caller's shape. Padded keys are masked and padded
rows see no key at all, so the real positions compute exactly what an unpadded
call computes.

``BucketedModel`` holds the padding logic and runs eagerly (any device; this is
what the CPU tests exercise); ``CUDAGraphModel`` adds capture and replay.

    graphed = engine.graphs.CUDAGraphModel(model, batch_sizes=(1, 8, 32), seq_lengths=(128, 384))
    out = graphed(input_ids, attention_mask=mask)    # same fields as model(...)
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

# Output fields that carry a sequence axis (dim 1) for text models.
_SEQ_FIELDS = ("last_hidden_state", "start_logits", "end_logits")
_TOKEN_TASKS = ("token-classification", "masked-lm")


class BucketedModel:
    """Run an encoder (BERT family or ViT) on inputs padded up to fixed shape buckets."""

    def __init__(self, model: nn.Module, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
                 seq_lengths: Sequence[int] = (16, 32, 64, 128, 256, 384, 512), *, validate: bool = True):
        self.model = model
        # Token-id range checks read values back to the host (a sync per call); at batch 1 that
        # is a visible share of the latency graphs exist to cut. Shapes are always checked.
        self.validate = validate
        self.vision = hasattr(model.config, "image_size")
        self.batch_sizes = sorted(set(batch_sizes))
        max_len = getattr(model.config, "max_length", None)
        self.seq_lengths = sorted({n for n in seq_lengths if max_len is None or n <= max_len})
        if not self.batch_sizes or (not self.vision and not self.seq_lengths):
            raise ValueError("need at least one batch size and one sequence length that fits the model")

    @staticmethod
    def _bucket(n: int, sizes: Sequence[int]) -> Optional[int]:
        i = bisect.bisect_left(sizes, n)
        return sizes[i] if i < len(sizes) else None

    def bucket_of(self, batch: int, seq: int = 0) -> Optional[Tuple[int, int]]:
        """The smallest bucket holding ``batch`` x ``seq``, or None (then the call runs unpadded)."""
        b = self._bucket(batch, self.batch_sizes)
        n = 0 if self.vision else self._bucket(seq, self.seq_lengths)
        return None if b is None or n is None else (b, n)

    def _pad_value(self, name: str) -> int:
        return getattr(self.model.config, "pad_token_id", 0) or 0 if name == "input_ids" else 0

    def _pad(self, inputs: Dict[str, Tensor], key: Tuple[int, int]) -> Dict[str, Tensor]:
        b, n = key
        out = {}
        for name, t in inputs.items():
            shape = (b,) + t.shape[1:] if self.vision else (b, n)
            padded = t.new_full(shape, self._pad_value(name))
            padded[tuple(slice(0, s) for s in t.shape)] = t
            out[name] = padded
        return out

    def _unpad(self, out, batch: int, seq: int):
        def cut(name, t):
            if t is None:
                return None
            if isinstance(t, tuple):
                return tuple(cut("hidden", x) for x in t)
            t = t[:batch]
            has_seq = name in _SEQ_FIELDS or name == "hidden" or (
                name == "logits" and getattr(self.model, "task", None) in _TOKEN_TASKS)
            return t[:, :seq] if has_seq and not self.vision else t

        return dataclasses.replace(out, **{f.name: cut(f.name, getattr(out, f.name))
                                           for f in dataclasses.fields(out)})

    def _inputs(self, args, kwargs) -> Dict[str, Tensor]:
        names = ("pixel_values",) if self.vision else ("input_ids", "attention_mask", "token_type_ids")
        inputs = dict(zip(names, args), **kwargs)
        unknown = set(inputs) - set(names)
        if unknown:
            raise ValueError(f"bucketed runs take only {', '.join(names)}; got {', '.join(sorted(unknown))}")
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if not self.vision and "attention_mask" not in inputs:
            # Padding needs a mask: an unpadded call means "attend to everything".
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs

    def _run(self, key, padded: Dict[str, Tensor]):
        with torch.no_grad():
            return self.model(**padded)

    def __call__(self, *args, **kwargs):
        inputs = self._inputs(args, kwargs)
        first = inputs["pixel_values" if self.vision else "input_ids"]
        batch, seq = first.shape[0], (0 if self.vision else first.shape[1])
        key = self.bucket_of(batch, seq)
        if key is None:  # larger than every bucket: no graph, run as is
            with torch.no_grad():
                return self.model(**inputs)
        if not self.vision and self.validate:
            self.model._check(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"), None)
        return self._unpad(self._run(key, self._pad(inputs, key)), batch, seq)


class CUDAGraphModel(BucketedModel):
    """``BucketedModel`` whose buckets are CUDA graphs, captured on first use.

    Capture warms the bucket up on a side stream first (Triton compiles and
    autotunes there), then records one forward into a graph that shares a memory
    pool with the other buckets. Each call copies the padded inputs into the
    bucket's static buffers, replays, and returns copies of the outputs (pass
    ``copy_outputs=False`` for views that the next call overwrites). ``validate=False``
    skips the token-id range check, the one host sync left per call.
    """

    def __init__(self, model: nn.Module, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
                 seq_lengths: Sequence[int] = (16, 32, 64, 128, 256, 384, 512), *, warmup: int = 3,
                 copy_outputs: bool = True, validate: bool = True):
        super().__init__(model, batch_sizes, seq_lengths, validate=validate)
        param = next(model.parameters())
        if param.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {param.device}")
        self.warmup, self.copy_outputs = warmup, copy_outputs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: Dict[Tuple[int, int], Tuple[torch.cuda.CUDAGraph, Dict[str, Tensor], object]] = {}

    def capture(self, key: Tuple[int, int], example: Dict[str, Tensor]) -> None:
        """Capture the graph of one bucket (``example``: padded inputs of that shape)."""
        static = {k: v.clone() for k, v in example.items()}
        if "attention_mask" in static:
            static["attention_mask"].fill_(1)  # warm up on the ordinary path, not on all-masked rows
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                self.model(**static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            out = self.model(**static)
        self.graphs[key] = (graph, static, out)

    def _run(self, key, padded: Dict[str, Tensor]):
        if key not in self.graphs:
            self.capture(key, padded)
        graph, static, out = self.graphs[key]
        for name, t in padded.items():
            static[name].copy_(t)
        graph.replay()
        if not self.copy_outputs:
            return out
        return dataclasses.replace(out, **{f.name: _clone(getattr(out, f.name)) for f in dataclasses.fields(out)})


def _clone(t):
    if t is None:
        return None
    return tuple(x.clone() for x in t) if isinstance(t, tuple) else t.clone()
