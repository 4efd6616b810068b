"""trifuse engine: transformer models built on trifuse's fused kernels.

``engine.from_pretrained(source)`` loads a Hugging Face checkpoint (a local
directory or an in-memory ``transformers`` model) into trifuse's own graph.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__version__ = "0.1.0"

from .pooling import mean_pool  # noqa: E402  (no kernels imported: see engine/cli.py)
from .loading import read_checkpoint  # noqa: E402
from .outputs import EncoderOutput, LogitsOutput, ModelOutput, QuestionAnsweringOutput  # noqa: E402

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


#: ``model_type`` -> the module under ``engine.models`` that builds it. Each module has
#: ``from_checkpoint(config: dict, state: dict, *, task, dtype, device) -> nn.Module``.
MODEL_TYPES = {
    "bert": "bert", "roberta": "bert", "distilbert": "bert", "albert": "bert", "electra": "bert",
    "gpt2": "gpt2",
    "vit": "vit", "deit": "vit",
    "t5": "t5",
}


def _family_module(model_type):
    import importlib

    name = MODEL_TYPES.get(model_type)
    if name is None:
        return None
    try:
        return importlib.import_module(f"{__name__}.models.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.models.{name}":
            raise
        return None  # registered, but not in this build yet


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for t in MODEL_TYPES if _family_module(t) is not None)


def from_pretrained(source, *, dtype: Union[str, torch.dtype, None] = None, device=None,
                    task: Optional[str] = None):
    """Load a Hugging Face checkpoint into trifuse.

    ``source``: a directory with ``config.json`` and ``model.safetensors`` (or
    ``pytorch_model.bin``), or an in-memory ``transformers`` model. The family
    comes from ``config.model_type``; the head from ``config.architectures``
    unless ``task`` names one. ``dtype`` (``torch.float16``, ``"bf16"``, ...)
    casts the floating-point weights; the default keeps the checkpoint's.
    """
    dtype = resolve_dtype(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    config, state = read_checkpoint(source)
    model_type = config.get("model_type")
    module = _family_module(model_type)
    if module is not None:
        return module.from_checkpoint(config, state, task=task, dtype=dtype, device=device)
    raise ValueError(f"unsupported model_type {model_type!r}; trifuse supports {', '.join(supported_model_types())}")


__all__ = ["from_pretrained", "read_checkpoint", "mean_pool", "ModelOutput", "EncoderOutput", "LogitsOutput",
           "QuestionAnsweringOutput", "__version__"]
