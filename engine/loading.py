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
        return json.loads(cfg_file.read_text()), _read_weights(path)
    if hasattr(source, "config") and hasattr(source, "state_dict") and hasattr(source.config, "to_dict"):
        config = source.config.to_dict()
        # A model built in memory has no architectures yet; its class says which head it is.
        config["architectures"] = config.get("architectures") or [type(source).__name__]
        return config, dict(source.state_dict())
    raise TypeError(f"from_pretrained takes a checkpoint directory or a transformers model, "
                    f"got {type(source).__name__}")


def _read_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(path / shard))
        return state
    if (path / "pytorch_model.bin").is_file():
        # No pickle execution: weights_only refuses anything but tensors and plain containers.
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


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
    """Move ``module`` (built on the meta device) onto the loaded tensors without copies."""
    module.load_state_dict(state, strict=True, assign=True)
    return module.requires_grad_(False).eval()  # inference: no autograd bookkeeping
