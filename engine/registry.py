"""Which module builds which ``model_type``, and ``from_pretrained`` on top of it."""

from __future__ import annotations

import functools
import importlib
from typing import Dict, Optional, Tuple, Union

import torch

from .family import Family
from .decoding import generation_defaults
from .loading import check_config_values, read_checkpoint, read_generation_config

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


#: The model families, one module each under ``trifuse.engine.models``, each ending with
#: ``FAMILY = engine.family.Family(...)``. A new family is one more name here.
FAMILY_MODULES = ("bert", "gpt2", "t5", "vit", "bart")


@functools.lru_cache(maxsize=None)
def families() -> Tuple[Family, ...]:
    """Every family's contract, in :data:`FAMILY_MODULES` order."""
    found = tuple(importlib.import_module(f"trifuse.engine.models.{name}").FAMILY for name in FAMILY_MODULES)
    seen: dict = {}
    for fam in found:
        for t in fam.model_types:
            if t in seen:
                raise RuntimeError(f"model_type {t!r} is claimed by families {seen[t]!r} and {fam.name!r}")
            seen[t] = fam.name
    return found


def family_for(model_type) -> Optional[Family]:
    """The family that builds ``model_type``; ``None`` if none does."""
    return next((f for f in families() if model_type in f.model_types), None)


def family_of(model) -> Family:
    """The family of a trifuse model (``from_pretrained``'s result); ``TypeError`` for anything else."""
    for fam in families():
        if isinstance(model, fam.model_classes):
            return fam
    raise TypeError(f"{type(model).__module__}.{type(model).__name__} is not a trifuse model "
                    f"(trifuse.from_pretrained(...) builds one for {', '.join(supported_model_types())})")


def named_sizes() -> Dict[str, Tuple[Family, dict]]:
    """Every benchmark size of every family: name -> ``(family, config.json dict)``."""
    return {name: (fam, cfg) for fam in families() for name, cfg in fam.named_sizes.items()}


def with_hf_defaults(config: dict) -> dict:
    """``config`` with every key trifuse reads that it lacks set as Hugging Face's config class sets it."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"config has no 'model_type' (got {model_type!r}); trifuse supports "
                         f"{', '.join(supported_model_types())}")
    fam = family_for(model_type)
    out = dict(config)
    if fam is None:
        return out
    for name, alias in fam.config_aliases.get(model_type, {}).items():
        if name not in out and alias in out:
            out[name] = out[alias]
    defaults = fam.config_defaults.get(model_type, {})
    aliases = fam.config_aliases.get(model_type, {})
    check_config_values(out, {**defaults, **{alias: defaults.get(name) for name, alias in aliases.items()}})
    for name, value in defaults.items():
        out.setdefault(name, value)
    return out


def _one_dtype(config: dict, state: dict) -> Optional[torch.dtype]:
    """The dtype a checkpoint loads in when none is asked for; ``None``: keep the tensors' own.

    A checkpoint whose floating-point tensors share one dtype keeps it. A mixed one loads in
    one dtype, as Hugging Face's ``dtype="auto"`` picks it: the config's ``dtype`` (older
    configs: ``torch_dtype``), else the first floating-point tensor's.
    """
    found = {t.dtype for t in state.values() if torch.is_tensor(t) and t.is_floating_point()}
    if len(found) <= 1:
        return None
    named = config.get("dtype") or config.get("torch_dtype")
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        named = getattr(torch, named)
    if named not in _DTYPES.values():
        named = next(t.dtype for t in state.values() if torch.is_tensor(t) and t.is_floating_point())
    return named if named in _DTYPES.values() else torch.float32


def resolve_device(device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; ``ValueError`` naming the problem otherwise."""
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device={str(device)!r} but CUDA is not available ({why}); use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


_GENERATION_IDS = ("eos_token_id", "pad_token_id", "decoder_start_token_id")


def supported_model_types() -> tuple[str, ...]:
    return tuple(t for f in families() for t in f.model_types)


def from_pretrained(source, *, dtype: Union[str, torch.dtype, None] = None, device=None,
                    task: Optional[str] = None, quantize: Optional[str] = None, prepack: bool = True):
    """Load a Hugging Face checkpoint into trifuse.

    ``source``: a directory with ``config.json`` and ``model.safetensors`` (or
    ``pytorch_model.bin``), or an in-memory ``transformers`` model. The family
    comes from ``config.model_type``; the head from ``config.architectures``
    unless ``task`` names one. ``dtype`` (``torch.float16``, ``"bf16"``, ...)
    casts the floating-point weights; the default keeps the checkpoint's (one
    dtype chosen as Hugging Face's ``dtype="auto"`` does when the tensors mix
    dtypes). Keys missing from the config take Hugging Face's defaults. A decoder's
    ``generation_config.json`` sets its ``generate`` defaults (``model.generation_config``).
    ``quantize="int8"`` (CPU only) runs the layers' linears in int8 (:mod:`engine.quantize`).
    ``prepack`` (CPU): the linears and LM head read a second, oneDNN-blocked copy of each float
    weight, made on first use: faster GEMMs for about twice the weights' memory; ``prepack=False``
    keeps one copy (``docs/cpu.md`` has both's speed and memory).
    """
    # Imported here: the CLI imports this module before `trifuse bench` decides on Triton's
    # interpreter, which must happen before anything imports the kernels (engine.layers does).
    from .layers import pack_linears
    from .quantize import check_quantize, quantize_linears

    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    check_quantize(quantize, device, dtype)
    if not isinstance(prepack, bool):
        raise TypeError(f"prepack must be True or False, got {prepack!r}")
    config, state = read_checkpoint(source)
    config = with_hf_defaults(config)
    model_type = config["model_type"]
    fam = family_for(model_type)
    if fam is None:
        raise ValueError(f"unsupported model_type {model_type!r}; trifuse supports "
                         f"{', '.join(supported_model_types())}")
    if dtype is None:
        dtype = _one_dtype(config, state)
    generation = {}
    if fam.generative:
        # As in Hugging Face, generation_config.json decides generate's defaults (its token ids
        # over config.json's); arguments passed to generate() override it.
        generation = generation_defaults(read_generation_config(source))
        config.update({k: generation[k] for k in _GENERATION_IDS if k in generation})
    model = fam.from_checkpoint(config, state, task=task, dtype=dtype, device=device)
    if quantize is not None:
        quantize_linears(model, quantize)
    if device.type == "cpu":
        pack_linears(model, prepack)  # oneDNN's GEMM on the native CPU path; nn.Linear everywhere else
    if fam.generative:
        model.generation_config = generation
    return model
