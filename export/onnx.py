"""trifuse models -> ONNX: :func:`to_onnx`, with every fused op translated to ops ONNX Runtime runs fast.

``to_onnx(model, path)`` traces a trifuse model with ``torch.onnx.export(...,
dynamo=True)``, one graph per :class:`~export.graphs.GraphSpec` of the model's kind
(:mod:`export.graphs`: the graph layouts), our custom ops translated by
:func:`~export.ops.translation_table` (:mod:`export.ops`). Each file records
``trifuse.family``, ``trifuse.dtype``, ``trifuse.opset``, ``trifuse.version`` and the rest of
:data:`METADATA_KEYS` in its ``metadata_props``; :mod:`export.verify` reads them to refuse a
file that does not belong to the model it is checked against. ONNX Runtime's side
(:class:`OrtRunner`, :func:`ort_generate_greedy`) is :mod:`export.runtime`; its names are
importable from here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from trifuse.engine.extras import require

from .graphs import SPECS, ExportError, Graph, GraphSpec, graphs_for, model_kind
from .ops import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, translation_table
from .runtime import OrtRunner, default_providers, onnx_paths, ort_generate_greedy, ort_session, read_metadata

__all__ = ["to_onnx", "ExportError", "translation_table", "graphs_for", "read_metadata", "ort_session",
           "default_providers", "OrtRunner", "onnx_paths", "ort_generate_greedy", "DEFAULT_OPSET", "MIN_OPSET",
           "MAX_OPSET", "METADATA_KEYS", "SPECS", "Graph", "GraphSpec", "model_kind", "config_json", "DTYPE_NAMES"]

METADATA_KEYS = ("trifuse.version", "trifuse.family", "trifuse.kind", "trifuse.graph", "trifuse.task",
                 "trifuse.dtype", "trifuse.opset", "trifuse.config", "trifuse.inputs", "trifuse.outputs",
                 "trifuse.dynamic", "trifuse.layer_outputs", "trifuse.example_shapes")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def config_json(model) -> str:
    """The model's config as sorted JSON (recorded in ``trifuse.config``)."""
    c = model.config
    d = dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(vars(c))
    return json.dumps(d, sort_keys=True, default=str)


def _set_dims(value, labels: Sequence[Any]) -> None:
    shape = value.shape
    if shape is None:
        return
    dims = list(shape)
    for i, label in enumerate(labels):
        if label is not None and i < len(dims) and not isinstance(dims[i], int):
            dims[i] = label
    value.shape = type(shape)(dims)


def _check_opset(opset: Optional[int]) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset must be an int in {MIN_OPSET}..{MAX_OPSET} (Gelu needs opset 20), got {opset!r}")
    return opset


def _resolve_model(model):
    if isinstance(model, (str, os.PathLike)) or (hasattr(model, "config") and hasattr(model.config, "to_dict")):
        from trifuse import engine

        return engine.from_pretrained(model)
    return model


def to_onnx(model, path, *, opset: Optional[int] = None, dynamic: bool = True, example_inputs=None,
            layer_outputs: bool = False):
    """Export ``model`` to ONNX at ``path``; returns the written path (T5: ``(encoder, decoder)`` paths).

    ``model``: a trifuse model (``engine.from_pretrained(...)``; a checkpoint directory or a
    ``transformers`` model is loaded first). ``opset``: 20..23 (default 20; 23 uses
    ``RMSNormalization``). ``dynamic``: batch and sequence (image height/width, past length)
    axes are symbolic; ``False`` pins the example's shapes. ``example_inputs``: ``{graph input
    name: tensor}`` to trace with (default: generated, padded, batch 2). ``layer_outputs``:
    add every block's output as ``hidden_states.{i}`` graph outputs (for ``verify(...,
    layerwise=True)``).
    """
    require("ONNX export", "onnx", "onnx", "onnxscript")
    model = _resolve_model(model)
    family, kind = model_kind(model)
    opset = _check_opset(opset)
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"{path}: the output file must end in .onnx")
    if getattr(model, "quantization", None):
        raise ExportError(f"a {model.quantization}-quantized model does not export; export the float model and "
                          "quantize the ONNX file (onnxruntime.quantization.quantize_dynamic)")
    graphs = graphs_for(model, dynamic=dynamic, example_inputs=example_inputs, layer_outputs=layer_outputs)
    dtype = next(model.parameters()).dtype
    path.parent.mkdir(parents=True, exist_ok=True)
    outs = [path if len(graphs) == 1 else path.with_name(f"{path.stem}.{graph.name}.onnx") for graph in graphs]
    # All or nothing: every graph is written into a scratch folder beside the output and moved into
    # place (under its final name, so external-data references stay valid) only once all succeeded;
    # a failed T5 export leaves no encoder file without its decoder.
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for graph, out in zip(graphs, outs):
            _export_graph(model, graph, scratch / out.name, family, kind, dtype, opset, dynamic, layer_outputs)
        for f in sorted(scratch.iterdir()):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return outs[0] if len(outs) == 1 else tuple(outs)


def _export_graph(model, graph: Graph, out: Path, family: str, kind: str, dtype, opset: int, dynamic: bool,
                  layer_outputs: bool) -> None:
    import trifuse

    with warnings.catch_warnings(), _quiet_loggers():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            graph.module.eval(), graph.example, dynamo=True, opset_version=opset,
            custom_translation_table=translation_table(opset), dynamic_shapes=graph.dynamic,
            input_names=graph.inputs, output_names=graph.outputs, verbose=False)
    ir_model = prog.model
    for value in list(ir_model.graph.inputs) + list(ir_model.graph.outputs):
        if value.name in graph.dims:
            _set_dims(value, graph.dims[value.name])
    meta = {
        "trifuse.version": trifuse.__version__, "trifuse.family": family, "trifuse.kind": kind,
        "trifuse.graph": graph.name, "trifuse.task": str(getattr(model, "task", "")),
        "trifuse.dtype": DTYPE_NAMES.get(dtype, str(dtype)), "trifuse.opset": str(opset),
        "trifuse.config": config_json(model), "trifuse.inputs": ",".join(graph.inputs),
        "trifuse.outputs": ",".join(graph.outputs), "trifuse.dynamic": str(bool(dynamic)).lower(),
        "trifuse.layer_outputs": str(model.num_hidden_states(graph.name) if layer_outputs else 0),
        "trifuse.example_shapes": json.dumps({name: list(t.shape) for name, t in _flat_example(graph)}),
    }
    ir_model.metadata_props.update(meta)
    ir_model.producer_name = "trifuse"
    ir_model.producer_version = trifuse.__version__
    prog.save(str(out))


@contextlib.contextmanager
def _quiet_loggers():
    """The exporter logs warnings about optional packages (torchvision) on every call; mute them."""
    names = ("torch.onnx._internal.exporter._registration", "torch.onnx")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _flat_example(graph: Graph):
    flat = []
    for a in graph.example:
        flat += list(a) if isinstance(a, (list, tuple)) else [a]
    return list(zip(graph.inputs, flat))
