"""Which module builds which ``model_type``, and ``from_pretrained`` on top of it."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .loading import generation_defaults, read_checkpoint, read_generation_config

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


#: Hugging Face's config-class defaults (transformers 5.24, ``AutoConfig.for_model(t)``) for every
#: key trifuse reads: a ``config.json`` without one means exactly what it means to Hugging Face.
_BERT = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
             layer_norm_eps=1e-12, pad_token_id=0, tie_word_embeddings=True)
_VIT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3, qkv_bias=True,
            pooler_act="tanh")
HF_CONFIG_DEFAULTS = {
    "bert": _BERT,
    "roberta": {**_BERT, "vocab_size": 50265, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    "distilbert": dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072, activation="gelu",
                       max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=True),
    "albert": {**_BERT, "vocab_size": 30000, "embedding_size": 128, "hidden_size": 4096, "num_attention_heads": 64,
               "intermediate_size": 16384, "hidden_act": "gelu_new", "num_hidden_groups": 1, "inner_group_num": 1},
    "electra": {**_BERT, "embedding_size": 128, "hidden_size": 256, "num_attention_heads": 4,
                "intermediate_size": 1024},
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
                 scale_attn_by_inverse_layer_idx=False, tie_word_embeddings=True, bos_token_id=50256,
                 eos_token_id=50256),
    "t5": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
               feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, tie_word_embeddings=True),
    "vit": _VIT,
    "deit": _VIT,
}

#: Hugging Face's ``attribute_map``: a config may say ``hidden_size`` for GPT-2's ``n_embd`` and so on.
_ALIASES = {
    "gpt2": {"n_embd": "hidden_size", "n_positions": "max_position_embeddings", "n_layer": "num_hidden_layers",
             "n_head": "num_attention_heads"},
    "distilbert": {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads"},
    "t5": {"d_model": "hidden_size", "num_heads": "num_attention_heads", "num_layers": "num_hidden_layers"},
}


def with_hf_defaults(config: dict) -> dict:
    """``config`` with every key trifuse reads that it lacks set as Hugging Face's config class sets it."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"config has no 'model_type' (got {model_type!r}); trifuse supports "
                         f"{', '.join(supported_model_types())}")
    out = dict(config)
    for name, alias in _ALIASES.get(model_type, {}).items():
        if name not in out and alias in out:
            out[name] = out[alias]
    for name, value in HF_CONFIG_DEFAULTS.get(model_type, {}).items():
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


_GENERATIVE = ("gpt2", "t5")  # the families with generate()
_GENERATION_IDS = ("eos_token_id", "pad_token_id", "decoder_start_token_id")


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
    casts the floating-point weights; the default keeps the checkpoint's (one
    dtype chosen as Hugging Face's ``dtype="auto"`` does when the tensors mix
    dtypes). Keys missing from the config take Hugging Face's defaults. A decoder's
    ``generation_config.json`` sets its ``generate`` defaults (``model.generation_config``).
    """
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    config, state = read_checkpoint(source)
    config = with_hf_defaults(config)
    model_type = config["model_type"]
    module = _family_module(model_type)
    if module is None:
        raise ValueError(f"unsupported model_type {model_type!r}; trifuse supports "
                         f"{', '.join(supported_model_types())}")
    if dtype is None:
        dtype = _one_dtype(config, state)
    generation = {}
    if model_type in _GENERATIVE:
        # As in Hugging Face, generation_config.json decides generate's defaults (its token ids
        # over config.json's); arguments passed to generate() override it.
        generation = generation_defaults(read_generation_config(source))
        config.update({k: generation[k] for k in _GENERATION_IDS if k in generation})
    model = module.from_checkpoint(config, state, task=task, dtype=dtype, device=device)
    if model_type in _GENERATIVE:
        model.generation_config = generation
    return model
