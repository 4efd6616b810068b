"""Which module builds which ``model_type``, and ``from_pretrained`` on top of it."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .loading import read_checkpoint

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


#: ``model_type`` -> the module under ``trifuse.engine.models`` that builds it. Each module has
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
    return None if name is None else importlib.import_module(f"trifuse.engine.models.{name}")


def supported_model_types() -> tuple[str, ...]:
    return tuple(MODEL_TYPES)


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
