"""Feature extraction (transformers' ``FeatureExtractionPipeline``) and sentence embeddings
(sentence-transformers' ``SentenceTransformer.encode``: Transformer -> Pooling (-> Normalize))."""

from __future__ import annotations

import json
import math

import torch
from torch import Tensor

from ..family import DECODER, ENCODER
from .base import Pipeline, Unit, text_input


class FeatureExtraction(Pipeline):
    default_max_batch_tokens = 16384  # text-embeddings-inference's default budget
    task = "feature-extraction"
    model_task = "feature-extraction"
    kinds = (ENCODER, DECODER)
    options = {"truncation": None, "tokenize_kwargs": None, "return_tensors": False, "output_attentions": False}

    def _prepare(self, i, x, opts):
        tk = dict(opts.get("tokenize_kwargs") or {})
        trunc = tk.pop("truncation", opts.get("truncation"))
        enc, = self._encode([text_input(x, self.task)], truncation=trunc, max_length=tk.pop("max_length", None),
                            add_special_tokens=tk.pop("add_special_tokens", True))
        if tk:
            raise TypeError(f"tokenize_kwargs {sorted(tk)} are not supported (truncation, max_length, "
                            f"add_special_tokens are)")
        return [Unit(i, enc)]

    def _forward(self, batch, opts):
        self._encoder_forward(batch, opts, ["last_hidden_state"], ["last_hidden_state"])

    def _finish(self, x, units, opts):
        h = units[0].out["last_hidden_state"][None]  # [1, L, H], as Hugging Face returns it
        return self._with_attentions(h if opts.get("return_tensors") else h.tolist(), units, opts)


class SentenceEmbedding(Pipeline):
    default_max_batch_tokens = 16384  # text-embeddings-inference's default budget
    """sentence-transformers' ``encode``: Transformer -> Pooling (-> Normalize)."""

    task = "sentence-embedding"
    model_task = "feature-extraction"
    options = {"normalize_embeddings": None, "convert_to_tensor": False, "return_tensors": False,
               "output_attentions": False}

    def __init__(self, path, config, **kw):
        super().__init__(path, config, **kw)
        modules = json.loads((path / "modules.json").read_text()) if (path / "modules.json").is_file() else []
        types = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
        pooling = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
        cfg = {}
        if pooling is not None and (path / pooling["path"] / "config.json").is_file():
            cfg = json.loads((path / pooling["path"] / "config.json").read_text())
        modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
                 if cfg.get(f"pooling_mode_{m}")] or ["mean_tokens"]  # no Pooling module: mean, as ST defaults
        unknown = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v
                         and k[len("pooling_mode_"):] not in modes)
        if unknown:
            raise ValueError(f"{path}: pooling modes {unknown} are not supported (cls/mean/max/mean_sqrt_len are)")
        unsupported = [t for t in types if t not in ("Transformer", "Pooling", "Normalize")]
        if unsupported:
            raise ValueError(f"{path}: sentence-transformers modules {unsupported} are not supported "
                             f"(Transformer, Pooling, Normalize are)")
        self.pooling_modes = modes
        self.normalize = "Normalize" in types
        st = path / "sentence_bert_config.json"
        max_seq = json.loads(st.read_text()).get("max_seq_length") if st.is_file() else None
        self.max_seq_length = min(max_seq or self.max_tokens, self.max_tokens)

    def __call__(self, inputs=None, *args, **kwargs):
        out = super().__call__(inputs, *args, **kwargs)
        opts = self._options(kwargs)
        if (isinstance(out, list) and out and isinstance(out[0], Tensor) and not opts.get("output_attentions")):
            return torch.stack(out)  # [N, D], as SentenceTransformer.encode(..., convert_to_tensor=True)
        return out

    def _prepare(self, i, x, opts):
        enc, = self.tokenizer.encode([text_input(x, self.task)], truncation=True, max_length=self.max_seq_length)
        return [Unit(i, enc)]

    def _forward(self, batch, opts):
        self._encoder_forward(batch, opts, ["last_hidden_state"], ["last_hidden_state"])

    def _finish(self, x, units, opts):
        h = units[0].out["last_hidden_state"]  # [L, H]
        parts = []
        for m in self.pooling_modes:
            if m == "cls_token":
                parts.append(h[0])
            elif m == "mean_tokens":
                parts.append(h.mean(0))
            elif m == "max_tokens":
                parts.append(h.max(0).values)
            else:
                parts.append(h.sum(0) / math.sqrt(h.shape[0]))
        emb = torch.cat(parts)
        normalize = self.normalize if opts.get("normalize_embeddings") is None else opts["normalize_embeddings"]
        if normalize:
            emb = torch.nn.functional.normalize(emb, p=2, dim=0)
        tensor = opts.get("convert_to_tensor") or opts.get("return_tensors")
        return self._with_attentions(emb if tensor else emb.tolist(), units, opts)


