"""ONNX Runtime on trifuse's files: sessions, :class:`OrtRunner` (torch tensors in and out),
:func:`ort_generate_greedy` (decoding run entirely in ONNX Runtime), and reading a file's
``trifuse.*`` metadata back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from trifuse.engine.extras import require

def read_metadata(path) -> Dict[str, str]:
    """The ``metadata_props`` of an ONNX file (weights not loaded). Clear errors for a missing
    file, a file that is not ONNX, or one trifuse did not write."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError and friends
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    if "trifuse.family" not in meta:
        raise ValueError(f"{path}: not exported by trifuse (no trifuse.* metadata); export it with "
                         "`trifuse export` or export.to_onnx")
    return meta


def default_providers() -> List[str]:
    """CUDA when this ONNX Runtime build has it, then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def ort_session(onnx_path, providers=None, *, threads: Optional[int] = None):
    """An ``onnxruntime.InferenceSession`` on ``onnx_path`` with full graph optimization.

    ``providers``: ORT provider names (default :func:`default_providers`); ``threads``:
    intra-op threads (default: ORT's choice).
    """
    require("ONNX Runtime", "onnx", "onnxruntime")
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=so, providers=list(providers or default_providers()))


_ORT_NUMPY = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
              "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(bool)": "bool"}


def _to_numpy(t, ort_type: str):
    import numpy as np

    if isinstance(t, Tensor):
        if t.dtype == torch.bfloat16:
            raise ValueError("bf16 tensors cannot cross into ONNX Runtime through numpy; export in fp32 or fp16")
        t = t.detach().cpu().numpy()
    want = _ORT_NUMPY.get(ort_type)
    a = np.asarray(t)
    return a.astype(want, copy=False) if want is not None and a.dtype != want else np.ascontiguousarray(a)


class OrtRunner:
    """Runs an ONNX file (or session) on torch tensors and returns torch tensors.

    ``runner = OrtRunner("bert.onnx")``; ``runner(input_ids=..., attention_mask=...)`` or
    ``runner(ids, mask)`` (positional in graph order) -> ``{output name: Tensor}``, outputs on
    the device of the first input. Integer/bool inputs are cast to the graph's input types.
    """

    def __init__(self, onnx_or_session, providers=None, *, threads: Optional[int] = None):
        self.session = (onnx_or_session if hasattr(onnx_or_session, "run")
                        else ort_session(onnx_or_session, providers, threads=threads))
        self._inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def feed(self, *args, **inputs) -> dict:
        if len(args) > len(self.input_names):
            raise ValueError(f"{len(args)} positional inputs, but the graph takes {len(self.input_names)}")
        for name, a in zip(self.input_names, args):
            if name in inputs:
                raise ValueError(f"input {name} given twice")
            inputs[name] = a
        missing = [n for n in self.input_names if n not in inputs]
        extra = sorted(set(inputs) - set(self.input_names))
        if missing or extra:
            raise ValueError(f"graph inputs are {', '.join(self.input_names)}; missing {missing}, unknown {extra}")
        return {name: _to_numpy(inputs[name], self._inputs[name]) for name in self.input_names}

    def __call__(self, *args, **inputs) -> Dict[str, Tensor]:
        first = next((t for t in list(args) + list(inputs.values()) if isinstance(t, Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
        outs = self.session.run(self.output_names, self.feed(*args, **inputs))
        return {name: torch.from_numpy(o).to(device) for name, o in zip(self.output_names, outs)}


def onnx_paths(onnx) -> Tuple[Path, ...]:
    """The file(s) of one export: ``(path,)``, or T5's ``(encoder, decoder)`` from the path given to
    :func:`to_onnx` (``OUT.onnx`` -> ``OUT.encoder.onnx``, ``OUT.decoder.onnx``) or from either file."""
    if isinstance(onnx, (tuple, list)):
        return tuple(Path(p) for p in onnx)
    path = Path(onnx)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    for suffix in (".encoder", ".decoder"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    enc, dec = path.with_name(f"{stem}.encoder.onnx"), path.with_name(f"{stem}.decoder.onnx")
    if path.is_file() and path not in (enc, dec):
        return (path,)
    if enc.is_file():
        return (enc, dec) if dec.is_file() else (enc,)
    return (path,)


def _metadata(runner: OrtRunner) -> Dict[str, str]:
    meta = dict(runner.session.get_modelmeta().custom_metadata_map)
    if "trifuse.family" not in meta:
        raise ValueError("not a graph exported by trifuse (no trifuse.* metadata)")
    return meta


def empty_past(runner: OrtRunner, batch: int) -> Dict[str, Tensor]:
    """Zero-length ``past_key_values.*`` for a decoder's first call, shaped from the graph's inputs."""
    past = {}
    for i in runner.session.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, head_dim = i.shape
            dt = torch.float16 if i.type == "tensor(float16)" else torch.float32
            past[i.name] = torch.zeros(batch, heads, 0, head_dim, dtype=dt)
    return past


def ort_generate_greedy(onnx, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                        max_new_tokens: int = 20, eos_token_id=None, pad_token_id: Optional[int] = None,
                        decoder_start_token_id: Optional[int] = None, providers=None) -> Tensor:
    """Greedy decoding run entirely in ONNX Runtime, returning what ``model.generate`` returns.

    ``onnx``: GPT-2's file (or an :class:`OrtRunner` on it) -> ``[B, L + n]``, the prompt
    (left padding allowed, pass its mask) then the new tokens; or T5's two files (the path
    given to :func:`to_onnx`, or ``(encoder, decoder)`` paths or runners) -> ``[B, 1 + n]``, the decoder
    start token then the new tokens. Each step feeds the graph's ``present.*`` back as
    ``past_key_values.*``; rows stop at EOS and are padded as in ``model.generate``, whose
    defaults (EOS, pad, decoder start) come from the config recorded in the file.
    """
    from trifuse.engine import generation as gen

    if isinstance(onnx, OrtRunner):
        runners = (onnx,)
    elif isinstance(onnx, (tuple, list)) and onnx and all(isinstance(r, OrtRunner) for r in onnx):
        runners = tuple(onnx)  # T5's (encoder, decoder) sessions, opened once by the caller
    else:
        runners = tuple(OrtRunner(p, providers) for p in onnx_paths(onnx))
    meta = _metadata(runners[-1])
    family = meta.get("trifuse.family")
    if meta.get("trifuse.kind") not in ("decoder", "seq2seq") or meta.get("trifuse.graph") == "encoder":
        raise ValueError(f"ort_generate_greedy needs a decoder (GPT-2, or T5's encoder and decoder); got "
                         f"{family!r} ({meta.get('trifuse.kind')}, {meta.get('trifuse.graph')} graph)")
    dec = runners[-1]
    if "logits" not in dec.output_names:
        raise ValueError("this decoder was exported without its LM head (task feature-extraction): no logits")
    cj = json.loads(meta["trifuse.config"])
    seq2seq = meta.get("trifuse.kind") == "seq2seq"
    cfg = gen.GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=(cj.get("eos_token_id") or ()) if eos_token_id is None else eos_token_id,
        pad_token_id=cj.get("pad_token_id") if pad_token_id is None else pad_token_id,
        # the config's forced first/last tokens, as model.generate applies them (BART's checkpoints set them)
        forced_bos_token_id=cj.get("forced_bos_token_id"), forced_eos_token_id=cj.get("forced_eos_token_id"),
        max_length=(1 if seq2seq else input_ids.shape[1]) + max_new_tokens)
    if attention_mask is None:
        attention_mask = gen.default_attention_mask(input_ids, cfg)
    mask = attention_mask.ne(0).long().cpu()
    ids = input_ids.cpu()
    b = ids.shape[0]
    state = {"past": empty_past(dec, b)}
    if seq2seq:
        if len(runners) != 2:
            raise ValueError(f"{family} greedy decoding needs the encoder and the decoder files")
        enc = runners[0](input_ids=ids, attention_mask=mask)
        start_token = cj.get("decoder_start_token_id") if decoder_start_token_id is None else decoder_start_token_id
        if start_token is None:
            raise ValueError("decoder_start_token_id is not set in the config: pass decoder_start_token_id=")
        prompt = torch.full((b, 1), int(start_token), dtype=torch.long)
        state["mask"] = torch.ones(b, 1, dtype=torch.long)
        fixed = {"encoder_attention_mask": mask, "cross_key_values": enc["cross_key_values"]}
        names = ("decoder_input_ids", "decoder_attention_mask")
    else:
        prompt = ids
        state["mask"] = mask
        fixed = {}
        names = ("input_ids", "attention_mask")

    def run(step_ids: Tensor) -> Tensor:
        out = dec(**{names[0]: step_ids, names[1]: state["mask"]}, **fixed, **state["past"])
        state["past"] = {name: out["present." + name[len("past_key_values."):]] for name in state["past"]}
        return out["logits"][:, -1]

    first = run(prompt)

    def step(tokens: Tensor) -> Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones(b, 1, dtype=torch.long)], dim=1)
        return run(tokens[:, None].cpu())

    return gen.generate(first, step, prompt, cfg).to(input_ids.device)
