"""Reading Hugging Face checkpoints and mapping their tensors onto trifuse modules.

A checkpoint is a local directory (``config.json`` plus ``model.safetensors``,
sharded safetensors, or ``pytorch_model.bin`` read with ``weights_only=True``)
or an in-memory ``transformers`` model. The mapping from checkpoint names to
ours is explicit: every tensor a model needs must be found with the right
shape, and every tensor the checkpoint holds must be used or knowingly skipped;
anything else is an error that names the tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

#: One checkpoint name, or alternatives for the same tensor (older and newer spellings).
Key = Union[str, Tuple[str, ...]]


def read_checkpoint(source) -> Tuple[dict, dict]:
    """``(config dict, {name: tensor})`` from a checkpoint directory or a transformers model."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a checkpoint directory (expected config.json and weights)")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json")
        return read_json_object(cfg_file), _read_weights(path)
    if hasattr(source, "config") and hasattr(source, "state_dict") and hasattr(source.config, "to_dict"):
        config = source.config.to_dict()
        # A model built in memory has no architectures yet; its class says which head it is.
        config["architectures"] = config.get("architectures") or [type(source).__name__]
        return config, dict(source.state_dict())
    raise TypeError(f"from_pretrained takes a checkpoint directory or a transformers model, "
                    f"got {type(source).__name__}")


def read_json_object(file: Path) -> dict:
    """A JSON file that must hold one object (``config.json`` and friends); ``ValueError`` naming it otherwise."""
    try:
        value = json.loads(Path(file).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def check_config_values(config: dict, defaults: dict) -> None:
    """A ``ValueError`` naming the ``config.json`` field whose value cannot be what trifuse reads there:
    a string (or bool, object) where the family's default is a number (``"hidden_size": "32"``), and a
    token id (``*_token_id``) that is not an int (or a list of them) a 64-bit tensor can hold."""
    for name, value in config.items():
        if value is None:
            continue
        if name.endswith("_token_id"):
            ids = value if isinstance(value, list) else [value]
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError(f"config.json: {name!r} must be a token id (an int) or a list of them, got {value!r}")
            if any(not -(1 << 63) <= i < 1 << 63 for i in ids):
                raise ValueError(f"config.json: {name!r} = {value!r} is not a token id (beyond a 64-bit int)")
            continue
        default = defaults.get(name)
        if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, (str, bool, dict))
                or isinstance(value, list) and not all(isinstance(v, (int, float)) for v in value)):
            raise ValueError(f"config.json: {name!r} must be a number, got {type(value).__name__} {value!r}")


def read_generation_config(source) -> dict:
    """The checkpoint's generation defaults, as Hugging Face keeps them: ``generation_config.json``
    (or a transformers model's ``generation_config``), only the values it sets. ``{}`` when none."""
    if isinstance(source, (str, os.PathLike)):
        file = Path(source) / "generation_config.json"
        return read_json_object(file) if file.is_file() else {}
    gen_cfg = getattr(source, "generation_config", None)
    return dict(gen_cfg.to_diff_dict()) if hasattr(gen_cfg, "to_diff_dict") else {}


def _read_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return _read_shards(path, index)
    if (path / "pytorch_model.bin").is_file():
        # No pickle execution: weights_only refuses anything but tensors and plain containers.
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_shards(path: Path, index_file: Path) -> dict:
    """Sharded safetensors, as the index assigns them: each shard a file inside ``path`` (no
    absolute paths, no ``..``), each tensor taken from the shard the index names for it, and a
    shard holding a tensor the index puts elsewhere (or does not list) an error."""
    from safetensors import safe_open

    weight_map = read_json_object(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file}: no 'weight_map' object mapping tensor names to shard files")
    by_shard: dict = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ValueError(f"{index_file}: tensor {name!r} maps to {shard!r}, not a shard file name")
        if os.path.isabs(shard) or ".." in Path(shard.replace("\\", "/")).parts:
            raise ValueError(f"{index_file}: shard {shard!r} (for {name!r}) is not a file inside the checkpoint "
                             "directory; shard names must be relative, without '..'")
        by_shard.setdefault(shard, []).append(name)
    def opened(shard):
        file = path / shard
        if not file.is_file():
            raise FileNotFoundError(f"{index_file}: shard {shard!r} does not exist")
        try:
            return safe_open(file, framework="pt")
        except Exception as e:  # safetensors' own error type for a corrupt file
            raise ValueError(f"{file}: cannot read this shard: {e}") from None

    held = {}
    for shard in sorted(by_shard):  # headers only: check the whole layout before reading any tensor
        with opened(shard) as f:
            held[shard] = set(f.keys())
    for shard, names in sorted(by_shard.items()):
        missing = sorted(set(names) - held[shard])
        if missing:
            raise ValueError(f"{index_file}: {shard} does not hold {_fmt(missing)}, which the index assigns to it")
    for shard in sorted(by_shard):
        strays = sorted(held[shard] - set(by_shard[shard]))
        if strays:
            twice = [f"{n} (indexed in {weight_map[n]})" for n in strays if n in weight_map]
            unlisted = [n for n in strays if n not in weight_map]
            raise ValueError(f"{path / shard}: holds tensors the index does not assign to it: "
                             + "; ".join(x for x in (_fmt(twice), _fmt(unlisted)) if x)
                             + (" (a tensor in two shards)" if twice else " (not in the index)"))
    state = {}
    for shard, names in sorted(by_shard.items()):
        with opened(shard) as f:
            for name in names:
                state[name] = f.get_tensor(name)
    return state


def module_keys(spec: dict, ours: str, theirs, *, bias: bool = True) -> None:
    """Map our module's ``weight`` (and ``bias``) onto checkpoint module(s) ``theirs``.

    ``theirs``: a module name, or a list of them fused along dim 0 (a QKV projection);
    each may be a tuple of alternative spellings of one module. LayerNorms are also
    found under the ``gamma``/``beta`` names of older checkpoints.
    """
    theirs = [theirs] if isinstance(theirs, (str, tuple)) else theirs
    for suffix in ("weight", "bias") if bias else ("weight",):
        legacy = {"weight": "gamma", "bias": "beta"}[suffix]
        keys = []
        for module in theirs:
            alts = (module,) if isinstance(module, str) else tuple(module)
            names = tuple(f"{a}.{suffix}" for a in alts)
            names += tuple(f"{a}.{legacy}" for a in alts if "LayerNorm" in a or "layer_norm" in a)
            keys.append(names[0] if len(names) == 1 else names)
        spec[f"{ours}.{suffix}"] = keys


def _fmt(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def assemble_state(module: nn.Module, state: Mapping[str, Tensor], spec: Mapping[str, Sequence[Key]], *,
                   skip: Callable[[str], bool] = lambda name: False, what: str = "checkpoint",
                   dtype: Optional[torch.dtype] = None, device=None) -> dict:
    """Build ``module``'s state dict from checkpoint tensors.

    ``spec`` maps each of our parameter names to the checkpoint tensor(s) it is
    made of; several are concatenated along dim 0 (a fused QKV projection).
    Checkpoint tensors that no spec entry uses must satisfy ``skip`` (buffers,
    heads the chosen task does not use), or they are reported as unexpected.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    uncovered = sorted(set(expected) - set(spec))
    if uncovered:  # a bug in a model's key map, not in the checkpoint
        raise AssertionError(f"no checkpoint mapping for parameters {uncovered}")
    out, used, missing, misshapen = {}, set(), [], []
    for ours, keys in spec.items():
        parts = []
        for key in keys:
            alternatives = (key,) if isinstance(key, str) else tuple(key)
            found = next((a for a in alternatives if a in state), None)
            if found is None:
                missing.append(alternatives[0])
                continue
            used.update(alternatives)
            parts.append(state[found])
        if len(parts) != len(keys):
            continue
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(t.shape) != expected[ours]:
            names = " + ".join(k if isinstance(k, str) else k[0] for k in keys)
            misshapen.append(f"{names} has shape {tuple(t.shape)}, expected {expected[ours]}")
            continue
        if t.is_floating_point():
            t = t.to(device=device, dtype=dtype or t.dtype)
        elif device is not None:
            t = t.to(device)
        if t is parts[0]:  # no cat and no conversion made a new tensor
            # Our own copy: a tensor still backed by the checkpoint's memory-mapped file would keep the
            # whole mapping resident (the fused and transposed weights are copies already, so the file's
            # pages would count twice), and one taken from an in-memory model would alias the user's.
            t = t.clone()
        out[ours] = t
    unexpected = sorted(k for k in state if k not in used and not skip(k))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_fmt(missing)}")
    if misshapen:
        problems.append(f"mis-shaped tensors: {_fmt(misshapen)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_fmt(unexpected)}")
    if problems:
        raise ValueError(f"{what} does not match the model: " + "; ".join(problems))
    return out


def load_into(module: nn.Module, state: dict) -> nn.Module:
    """Move ``module`` (built on the meta device) onto the tensors :func:`assemble_state` built (its own
    copies), without copying them again."""
    module.load_state_dict(state, strict=True, assign=True)
    return module.requires_grad_(False).eval()  # inference: no autograd bookkeeping
