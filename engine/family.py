"""The door a model family comes in by: one :class:`Family` per model file.

Each module under ``trifuse.engine.models`` ends with ``FAMILY = Family(...)``: what the rest
of trifuse needs to know about it. The registry (``engine.registry.FAMILY_MODULES``) lists
the modules; ``from_pretrained``, ``trifuse check``, the ONNX export and verify, the CUDA-graph
wrappers, the pipelines and the benchmarks read the contract and switch on a family's
``kind`` (never on its name), so a new family touches its model file, its tests and one line
of registration.

What a kind promises, beyond ``config``, ``dtype``, ``device``, ``task`` and ``model_type``
on every model:

* ``encoder`` (BERT family): ``model(input_ids, attention_mask, token_type_ids=...,
  output_hidden_states=...)``; ``uses_token_type_ids``; ``max_length``.
* ``vision`` (ViT, DeiT): ``model(pixel_values, interpolate_pos_encoding=...,
  output_hidden_states=...)``.
* ``decoder`` (decoder-only, e.g. GPT-2) and ``seq2seq`` (encoder-decoder, e.g. T5):
  :class:`engine.decoding.Decoding` (``generate``, ``stream``, ``start_decoding``,
  ``decode_step``, ``new_static_cache``) and, for the ONNX graphs, ``cache_shape()``
  ``(layers, heads, head_dim)``, ``has_lm_head`` and the graph forwards ``export_forward``
  (decoder) or ``export_encode`` / ``export_decode`` (seq2seq; with ``encode``, ``new_cache``,
  ``cross_key_values``, ``has_decoder``, ``cross_width``); see :mod:`export.onnx` and
  :mod:`export.verify`, and T5 or GPT-2 as worked examples.

Every model also has ``num_hidden_states(stack)``: how many hidden states
``output_hidden_states=True`` returns for ``stack`` (``"model"``, or ``"encoder"`` /
``"decoder"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Tuple

ENCODER, DECODER, SEQ2SEQ, VISION = "encoder", "decoder", "seq2seq", "vision"
KINDS = (ENCODER, DECODER, SEQ2SEQ, VISION)


@dataclass(frozen=True)
class Family:
    """A model family's contract with the rest of trifuse."""

    #: Short name (``"bert"``, ``"gpt2"``, ...): messages and the bench report's family column.
    name: str
    #: ``encoder``, ``decoder``, ``seq2seq`` or ``vision``.
    kind: str
    #: The Hugging Face ``model_type``s this module builds.
    model_types: Tuple[str, ...]
    #: The ``nn.Module`` class(es) it builds (``family_of`` recognizes a model by them).
    model_classes: Tuple[type, ...]
    #: ``from_checkpoint(config: dict, state: dict, *, task, dtype, device) -> nn.Module``.
    from_checkpoint: Callable
    #: trifuse task -> the ``transformers`` class holding the same head (``trifuse check``,
    #: the benchmarks' references).
    hf_classes: Mapping[str, str]
    #: ``model_type`` -> Hugging Face's config-class defaults for every key the family reads, so
    #: a ``config.json`` without one means what it means to Hugging Face.
    config_defaults: Mapping[str, Mapping]
    #: ``example_inputs(model, batch, seq, seed) -> dict``: keyword inputs both trifuse and
    #: Hugging Face's model take (mixed lengths, padded; on ``model.device``).
    example_inputs: Callable
    #: ``model_type`` -> Hugging Face's ``attribute_map`` (e.g. GPT-2's ``n_embd`` is ``hidden_size``).
    config_aliases: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: Output fields holding the hidden states, one per stack (``trifuse check``'s layer walk).
    hidden_streams: Tuple[str, ...] = ("hidden_states",)
    #: Benchmark sizes: name -> ``config.json`` dict (random weights; no hub at run time).
    named_sizes: Dict[str, dict] = field(default_factory=dict)
    #: The main job (``bench/default.py``): report label -> ``(small, base, quick CPU)`` sizes from
    #: ``named_sizes`` (the quick CPU size: what Triton's interpreter gets through in seconds).
    bench_plan: Dict[str, Tuple[str, str, str]] = field(default_factory=dict)
    #: Seconds each ``bench_plan`` row takes in a quick CPU run (measured on 2 shared cores): the main
    #: job's progress estimate, rescaled as parts finish.
    bench_seconds: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"family {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for label, sizes in self.bench_plan.items():
            if any(n not in self.named_sizes for n in sizes):
                raise ValueError(f"family {self.name!r}: bench_plan[{label!r}] = {sizes} names sizes not in "
                                 "named_sizes")

    @property
    def generative(self) -> bool:
        return self.kind in (DECODER, SEQ2SEQ)
