"""The BERT family on trifuse's kernels: BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA.

All five are post-LN encoders that differ in their embeddings and heads:

- RoBERTa counts positions from ``pad_token_id + 1``, skipping padding tokens;
- DistilBERT has no token types (and a fixed LayerNorm eps of 1e-12);
- ALBERT factorizes the embeddings (``E -> H`` projection) and shares the weights
  of each layer group across layers;
- ELECTRA projects ``E -> H`` when the two differ.

Reference semantics: Hugging Face transformers' ``modeling_{bert,roberta,
distilbert,albert,electra}.py``; the checkpoint names below are theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import inputs
from ..family import ENCODER, Family
from ..layers import LayerNorm, PostLNBlock, bias_act, check_activation, kernel_mask
from ..loading import assemble_state, load_into, module_keys
from ..outputs import EncoderOutput, LogitsOutput, QuestionAnsweringOutput
from ..packing import Packed, plan

FAMILIES = ("bert", "roberta", "distilbert", "albert", "electra")
TASKS = ("feature-extraction", "sequence-classification", "token-classification",
         "question-answering", "masked-lm")
_ARCH_TASKS = {
    "ForMaskedLM": "masked-lm", "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification", "ForQuestionAnswering": "question-answering",
    "Model": "feature-extraction", "ForPreTraining": "masked-lm",
}


@dataclass(frozen=True)
class EncoderConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_positions: int = 512
    type_vocab_size: int = 2  # 0: no token-type embeddings (DistilBERT)
    layer_norm_eps: float = 1e-12
    embedding_size: int = 0  # factorized embeddings (ALBERT, ELECTRA); 0: hidden_size
    pad_token_id: int = 0
    num_hidden_groups: int = 1  # ALBERT: layer i uses the weights of group i * groups // layers
    inner_group_num: int = 1  # ALBERT: layers per group, applied in turn
    num_labels: int = 2
    tie_word_embeddings: bool = True
    id2label: dict = field(default_factory=dict, compare=False)  # class index -> name (classifier heads)

    @property
    def embed_dim(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        """Longest sequence the position table covers."""
        if self.family == "roberta":  # positions start after the padding index
            return self.max_positions - self.pad_token_id - 1
        return self.max_positions

    @classmethod
    def from_hf(cls, cfg: dict) -> "EncoderConfig":
        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not a BERT-family model ({', '.join(FAMILIES)})")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type={cfg['position_embedding_type']!r} is not supported; "
                             "trifuse supports 'absolute'")
        if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
            raise ValueError("decoder / cross-attention BERT configs are not supported")
        num_labels = len(cfg["id2label"]) if cfg.get("id2label") else cfg.get("num_labels", 2)
        id2label = {int(k): v for k, v in (cfg.get("id2label") or {}).items()} or {
            i: f"LABEL_{i}" for i in range(num_labels)}  # Hugging Face's default names
        if family == "distilbert":
            c = cls(family, cfg["vocab_size"], cfg["dim"], cfg["n_layers"], cfg["n_heads"], cfg["hidden_dim"],
                    hidden_act=cfg.get("activation", "gelu"), max_positions=cfg["max_position_embeddings"],
                    type_vocab_size=0, layer_norm_eps=1e-12, pad_token_id=cfg.get("pad_token_id") or 0,
                    num_labels=num_labels, tie_word_embeddings=cfg.get("tie_word_embeddings", True),
                    id2label=id2label)
        else:
            c = cls(family, cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"],
                    cfg["num_attention_heads"], cfg["intermediate_size"], hidden_act=cfg.get("hidden_act", "gelu"),
                    max_positions=cfg["max_position_embeddings"], type_vocab_size=cfg.get("type_vocab_size", 2),
                    layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
                    embedding_size=cfg.get("embedding_size") or 0 if family in ("albert", "electra") else 0,
                    pad_token_id=_or(cfg.get("pad_token_id"), 1 if family == "roberta" else 0),  # HF's defaults
                    num_hidden_groups=cfg.get("num_hidden_groups", 1), inner_group_num=cfg.get("inner_group_num", 1),
                    num_labels=num_labels, tie_word_embeddings=cfg.get("tie_word_embeddings", True),
                    id2label=id2label)
        check_activation(c.hidden_act)
        if c.hidden_size % c.num_heads:
            raise ValueError(f"hidden size {c.hidden_size} is not divisible by {c.num_heads} heads")
        return c


def _or(value, default):
    return default if value is None else value


# ----------------------------------------------------------------------------
# The model.


class Embeddings(nn.Module):
    def __init__(self, c: EncoderConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.embed_dim)
        self.pos = nn.Embedding(c.max_positions, c.embed_dim)
        self.types = nn.Embedding(c.type_vocab_size, c.embed_dim) if c.type_vocab_size else None
        self.norm = LayerNorm(c.embed_dim, c.layer_norm_eps)
        project = c.family == "albert" or (c.family == "electra" and c.embed_dim != c.hidden_size)
        self.proj = nn.Linear(c.embed_dim, c.hidden_size) if project else None

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor], position_ids: Tensor) -> Tensor:
        extra = self.pos(position_ids)
        if self.types is not None:
            extra = extra + self.types(token_type_ids)
        x, _ = self.norm(self.word(input_ids), residual=extra)
        return self.proj(x) if self.proj is not None else x


class Head(nn.Module):
    """A task head. Masked-LM decodes with the word embeddings unless the checkpoint unties them."""

    def __init__(self, c: EncoderConfig, task: str):
        super().__init__()
        self.task = task
        h = c.hidden_size
        if task == "masked-lm":
            self.act = {"roberta": "gelu", "electra": "gelu"}.get(c.family, c.hidden_act)
            self.dense = nn.Linear(h, c.embed_dim)
            self.norm = LayerNorm(c.embed_dim, c.layer_norm_eps)
            self.bias = nn.Parameter(torch.empty(c.vocab_size))
            self.decoder = None if c.tie_word_embeddings else nn.Linear(c.embed_dim, c.vocab_size, bias=False)
        elif task == "sequence-classification" and c.family in ("roberta", "electra", "distilbert"):
            # Classify the first token through a hidden layer (no pooler in these heads).
            self.act = {"roberta": "tanh", "electra": "gelu", "distilbert": "relu"}[c.family]
            self.dense = nn.Linear(h, h)
            self.out = nn.Linear(h, c.num_labels)
        else:  # pooled (BERT, ALBERT) or per-token classification, QA spans
            self.dense = None
            self.out = nn.Linear(h, c.num_labels)

    def forward(self, x: Tensor, first: Tensor, pooled: Optional[Tensor], word_embeddings: Tensor) -> Tensor:
        """``x``: the tokens (``[B, L, H]``, or ``[T, H]`` packed), ``first``: each sequence's first token."""
        if self.task == "masked-lm":
            x = self.norm(bias_act(F.linear(x, self.dense.weight), self.dense.bias, self.act))
            w = word_embeddings if self.decoder is None else self.decoder.weight
            return F.linear(x, w, self.bias)
        if self.task == "sequence-classification":
            if self.dense is None:
                return self.out(pooled)
            x = bias_act(F.linear(first, self.dense.weight), self.dense.bias, self.act)
        return self.out(x)


class EncoderModel(nn.Module):
    """A BERT-family encoder with an optional task head; call it like the Hugging Face model."""

    def __init__(self, c: EncoderConfig, task: str, pooler: bool):
        super().__init__()
        self.config, self.task = c, task
        self.embed = Embeddings(c)
        n_unique = c.num_hidden_groups * c.inner_group_num if c.family == "albert" else c.num_layers
        self.layers = nn.ModuleList(
            PostLNBlock(c.hidden_size, c.num_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps)
            for _ in range(n_unique))
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size) if pooler else None
        self.head = Head(c, task) if task != "feature-extraction" else None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.word.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.word.weight.device

    @property
    def id2label(self) -> Optional[dict]:
        """Class names of a sequence- or token-classification head (``None`` for other tasks)."""
        return dict(self.config.id2label) if self.task in ("sequence-classification", "token-classification") else None

    @property
    def model_type(self) -> str:
        return self.config.family

    @property
    def uses_token_type_ids(self) -> bool:
        return self.embed.types is not None

    def num_hidden_states(self, stack: str = "model") -> int:
        return len(self.layer_order()) + 1

    def layer_order(self) -> list[int]:
        """Which unique layer runs at each depth (ALBERT repeats its groups)."""
        c = self.config
        if c.family != "albert":
            return list(range(c.num_layers))
        order = []
        for i in range(c.num_layers):
            group = int(i / (c.num_layers / c.num_hidden_groups))
            order += [group * c.inner_group_num + j for j in range(c.inner_group_num)]
        return order

    def _position_ids(self, input_ids: Tensor) -> Tensor:
        if self.config.family == "roberta":
            pad = self.config.pad_token_id
            keep = input_ids.ne(pad).int()
            return (torch.cumsum(keep, dim=1) * keep).long() + pad
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def _check(self, input_ids, attention_mask, token_type_ids, position_ids) -> None:
        c = self.config
        if (not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point()
                or input_ids.dtype == torch.bool):
            got = (f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"input_ids must be an integer tensor of shape [batch, seq], got {got}")
        b, n = input_ids.shape
        if b == 0 or n == 0:
            raise ValueError(f"input_ids is empty (shape {(b, n)}): batch size and sequence length must be >= 1")
        if n > c.max_length:
            raise ValueError(f"sequence length {n} exceeds the position table ({c.max_length} positions "
                             f"for this {c.family} checkpoint)")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("position_ids", position_ids)):
            if t is not None and tuple(t.shape) != (b, n):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(b, n)} like input_ids")
        if token_type_ids is not None and self.embed.types is None:
            raise ValueError(f"{c.family} has no token types; pass token_type_ids=None")
        self._check_values(input_ids, token_type_ids, position_ids)

    def _check_values(self, input_ids, token_type_ids, position_ids) -> None:
        c = self.config
        if torch.compiler.is_compiling() or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            return  # the value checks below would synchronize or break the graph
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= c.vocab_size):
            raise ValueError(f"token ids must lie in [0, {c.vocab_size}); got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if token_type_ids is not None and token_type_ids.numel() and (
                token_type_ids.min() < 0 or token_type_ids.max() >= c.type_vocab_size):
            raise ValueError(f"token_type_ids must lie in [0, {c.type_vocab_size})")
        if position_ids is not None and position_ids.numel() and (
                position_ids.min() < 0 or position_ids.max() >= c.max_positions):
            raise ValueError(f"position_ids must lie in [0, {c.max_positions})")

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                output_hidden_states: bool = False, output_attentions: bool = False,
                cu_seqlens: Optional[Tensor] = None):
        """Hugging Face's call. A padded batch runs packed when that pays (engine.packing.plan):
        real tokens as Hugging Face computes them, zeros at padded positions of per-token outputs.
        Packed input: 1-D ``input_ids`` ``[T]`` with ``cu_seqlens`` int32 ``[B + 1]`` (no mask);
        per-token outputs are then ``[T, ...]``, per-sequence ones ``[B, ...]``."""
        if cu_seqlens is not None:
            return self._forward_packed_input(input_ids, cu_seqlens, token_type_ids, output_hidden_states)
        self._check(input_ids, attention_mask, token_type_ids, position_ids)
        if position_ids is None:
            position_ids = self._position_ids(input_ids)
        if token_type_ids is None and self.embed.types is not None:
            token_type_ids = torch.zeros_like(input_ids)
        packed = plan(attention_mask, need_probs=output_attentions)
        if packed is None:
            return self._run(input_ids, token_type_ids, position_ids, kernel_mask(attention_mask),
                             output_hidden_states, output_attentions)
        ids, types, pos = (None if t is None else packed.unpad(t) for t in (input_ids, token_type_ids, position_ids))
        return self._run(ids, types, pos, packed, output_hidden_states, False, pad=True)

    def _forward_packed_input(self, input_ids, cu_seqlens, token_type_ids, output_hidden_states):
        if (not isinstance(input_ids, Tensor) or input_ids.dim() != 1 or input_ids.is_floating_point()
                or input_ids.dtype == torch.bool):
            raise ValueError("with cu_seqlens, input_ids must be a 1-D integer tensor [total_tokens]")
        packed = Packed.from_cu_seqlens(cu_seqlens.to(input_ids.device), input_ids.numel())
        if packed.max_seqlen > self.config.max_length:
            raise ValueError(f"a sequence of {packed.max_seqlen} tokens exceeds the position table "
                             f"({self.config.max_length} positions for this {self.config.family} checkpoint)")
        if token_type_ids is not None and tuple(token_type_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}, expected "
                             f"{tuple(input_ids.shape)} like input_ids")
        if token_type_ids is not None and self.embed.types is None:
            raise ValueError(f"{self.config.family} has no token types; pass token_type_ids=None")
        self._check_values(input_ids, token_type_ids, None)
        pos = packed.positions
        if self.config.family == "roberta":
            pos = pos + self.config.pad_token_id + 1  # HF's positions for a sequence without padding
        if token_type_ids is None and self.embed.types is not None:
            token_type_ids = torch.zeros_like(input_ids)
        return self._run(input_ids, token_type_ids, pos, packed, output_hidden_states, False, pad=False)

    def _run(self, input_ids, token_type_ids, position_ids, mask, output_hidden_states, output_attentions,
             pad: bool = False):
        """The stack on padded ``[B, L]`` inputs (``mask``: the kernel's mask) or packed ``[T]`` ones
        (``mask``: the :class:`Packed`; ``pad``: return per-token outputs padded back to ``[B, L]``)."""
        packed = mask if isinstance(mask, Packed) else None
        x = self.embed(input_ids, token_type_ids, position_ids)
        hidden, attns = [x], []
        for i in self.layer_order():
            x, probs = self.layers[i](x, mask, output_attentions)
            hidden.append(x)
            attns.append(probs)
        first = x[:, 0] if packed is None else packed.first_tokens(x)
        pooled = torch.tanh(self.pooler(first)) if self.pooler is not None else None
        back = packed.pad if packed is not None and pad else (lambda t: t)
        extra = dict(hidden_states=tuple(back(h) for h in hidden) if output_hidden_states else None,
                     attentions=tuple(attns) if output_attentions else None)
        if self.head is None:
            return EncoderOutput(last_hidden_state=back(x), pooler_output=pooled, **extra)
        logits = self.head(x, first, pooled, self.embed.word.weight)
        if self.task != "sequence-classification":
            logits = back(logits)
        if self.task == "question-answering":
            start, end = logits.split(1, dim=-1)
            return QuestionAnsweringOutput(start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous(), **extra)
        return LogitsOutput(logits=logits, **extra)


# ----------------------------------------------------------------------------
# Checkpoint names.

# Our layer module -> the checkpoint's, per family; a list is fused along dim 0.
_LAYER = {
    "bert": ("encoder.layer.{}.", {
        "attn.qkv": ["attention.self.query", "attention.self.key", "attention.self.value"],
        "attn.out": ["attention.output.dense"], "norm1": ["attention.output.LayerNorm"],
        "ffn.up": ["intermediate.dense"], "ffn.down": ["output.dense"], "norm2": ["output.LayerNorm"]}),
    "distilbert": ("transformer.layer.{}.", {
        "attn.qkv": ["attention.q_lin", "attention.k_lin", "attention.v_lin"],
        "attn.out": ["attention.out_lin"], "norm1": ["sa_layer_norm"],
        "ffn.up": ["ffn.lin1"], "ffn.down": ["ffn.lin2"], "norm2": ["output_layer_norm"]}),
    "albert": ("encoder.albert_layer_groups.{}.albert_layers.{}.", {
        "attn.qkv": ["attention.query", "attention.key", "attention.value"],
        "attn.out": ["attention.dense"], "norm1": ["attention.LayerNorm"],
        "ffn.up": ["ffn"], "ffn.down": ["ffn_output"], "norm2": ["full_layer_layer_norm"]}),
}
_LAYER["roberta"] = _LAYER["electra"] = _LAYER["bert"]

_PROJ = {"albert": "encoder.embedding_hidden_mapping_in", "electra": "embeddings_project"}
_POOLER = {"bert": "pooler.dense", "roberta": "pooler.dense", "albert": "pooler"}

# Head modules (unprefixed in the checkpoint): dense, norm, decoder bias, decoder weight.
_MLM = {
    "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
             ("cls.predictions.bias", "cls.predictions.decoder.bias"), "cls.predictions.decoder.weight"),
    "roberta": ("lm_head.dense", "lm_head.layer_norm", ("lm_head.bias", "lm_head.decoder.bias"),
                "lm_head.decoder.weight"),
    "distilbert": ("vocab_transform", "vocab_layer_norm", ("vocab_projector.bias",), "vocab_projector.weight"),
    "albert": ("predictions.dense", "predictions.LayerNorm", ("predictions.bias", "predictions.decoder.bias"),
               "predictions.decoder.weight"),
    "electra": ("generator_predictions.dense", "generator_predictions.LayerNorm", ("generator_lm_head.bias",),
                "generator_lm_head.weight"),
}
_CLS_DENSE = {"roberta": ("classifier.dense", "classifier.out_proj"),
              "electra": ("classifier.dense", "classifier.out_proj"),
              "distilbert": ("pre_classifier", "classifier")}
_HEAD_PREFIXES = ("cls.", "lm_head.", "classifier.", "qa_outputs.", "pre_classifier.", "vocab_",
                  "predictions.", "sop_classifier.", "generator_", "discriminator_predictions.")


def key_map(model: EncoderModel, prefix: str) -> dict:
    """Our parameter name -> checkpoint name(s), for this model and backbone prefix."""
    c, spec = model.config, {}
    p = prefix
    spec["embed.word.weight"] = [f"{p}embeddings.word_embeddings.weight"]
    spec["embed.pos.weight"] = [f"{p}embeddings.position_embeddings.weight"]
    if model.embed.types is not None:
        spec["embed.types.weight"] = [f"{p}embeddings.token_type_embeddings.weight"]
    module_keys(spec, "embed.norm", f"{p}embeddings.LayerNorm")
    if model.embed.proj is not None:
        module_keys(spec, "embed.proj", p + _PROJ[c.family])
    layer_fmt, modules = _LAYER[c.family]
    for u in range(len(model.layers)):
        where = layer_fmt.format(*divmod(u, c.inner_group_num)) if c.family == "albert" else layer_fmt.format(u)
        for ours, theirs in modules.items():
            module_keys(spec, f"layers.{u}.{ours}", [p + where + t for t in theirs])
    if model.pooler is not None:
        module_keys(spec, "pooler", p + _POOLER[c.family])
    if model.head is not None:
        task = model.task
        if task == "masked-lm":
            dense, norm, bias, decoder = _MLM[c.family]
            module_keys(spec, "head.dense", dense)
            module_keys(spec, "head.norm", norm)
            spec["head.bias"] = [bias]
            if model.head.decoder is not None:
                spec["head.decoder.weight"] = [decoder]
        elif task == "sequence-classification" and model.head.dense is not None:
            dense, out = _CLS_DENSE[c.family]
            module_keys(spec, "head.dense", dense)
            module_keys(spec, "head.out", out)
        else:
            module_keys(spec, "head.out", "qa_outputs" if task == "question-answering" else "classifier")
    return spec


def _task_from_architectures(cfg: dict) -> str:
    for arch in cfg.get("architectures") or []:
        for suffix, task in _ARCH_TASKS.items():
            if arch.endswith(suffix):
                # ELECTRA's pre-training head is the discriminator, not a masked-LM.
                return "feature-extraction" if (suffix == "ForPreTraining" and "Electra" in arch) else task
    return "feature-extraction"


def from_checkpoint(cfg: dict, state: dict, *, task: Optional[str] = None, dtype=None,
                    device=None) -> EncoderModel:
    c = EncoderConfig.from_hf(cfg)
    task = task or _task_from_architectures(cfg)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    prefix = f"{c.family}." if any(k.startswith(f"{c.family}.") for k in state) else ""
    has_pooler = any(k.startswith(prefix + _POOLER.get(c.family, "-") + ".") for k in state)
    needs_pooler = task == "sequence-classification" and c.family in ("bert", "albert")
    with torch.device("meta"):
        model = EncoderModel(c, task, pooler=needs_pooler or (task == "feature-extraction" and has_pooler))

    def skip(name: str) -> bool:
        bare = name[len(prefix):] if name.startswith(prefix) else name
        return (name.endswith(("position_ids", "token_type_ids"))  # buffers, not weights
                or name.startswith(_HEAD_PREFIXES)  # heads of other tasks; tied decoder copies
                or (model.pooler is None and bare.startswith(_POOLER.get(c.family, "-") + ".")))

    weights = assemble_state(model, state, key_map(model, prefix), skip=skip, dtype=dtype, device=device,
                             what=f"{c.family} checkpoint for {task}")
    return load_into(model, weights)


# ----------------------------------------------------------------------------
# The family's contract (engine.family).


def example_inputs(model: EncoderModel, batch: int, seq: int, seed: int = 0) -> dict:
    c = model.config
    inputs.check_length(seq, c.max_length)
    ids, mask = inputs.token_batch(c.vocab_size, c.pad_token_id, batch, seq, model.device, seed)
    return {"input_ids": ids, "attention_mask": mask}


#: Hugging Face's config-class defaults (transformers 5.24, ``AutoConfig.for_model(t)``).
_BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                      layer_norm_eps=1e-12, pad_token_id=0, tie_word_embeddings=True)
_DEFAULTS = {
    "bert": _BERT_DEFAULTS,
    "roberta": {**_BERT_DEFAULTS, "vocab_size": 50265, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    "distilbert": dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072, activation="gelu",
                       max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=True),
    "albert": {**_BERT_DEFAULTS, "vocab_size": 30000, "embedding_size": 128, "hidden_size": 4096,
               "num_attention_heads": 64, "intermediate_size": 16384, "hidden_act": "gelu_new",
               "num_hidden_groups": 1, "inner_group_num": 1},
    "electra": {**_BERT_DEFAULTS, "embedding_size": 128, "hidden_size": 256, "num_attention_heads": 4,
                "intermediate_size": 1024},
}

_BASE = dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu")
_SIZES = {
    "bert-base": _BASE,
    "bert-large": {**_BASE, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "intermediate_size": 4096},
    "roberta-base": {**_BASE, "model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514,
                     "type_vocab_size": 1, "pad_token_id": 1},
    "distilbert-base": dict(model_type="distilbert", vocab_size=30522, dim=768, n_layers=6, n_heads=12,
                            hidden_dim=3072, max_position_embeddings=512),
    "albert-base": {**_BASE, "model_type": "albert", "vocab_size": 30000, "embedding_size": 128,
                    "hidden_act": "gelu_new"},
    "electra-base": {**_BASE, "model_type": "electra", "embedding_size": 768},
}
# Small sizes (4 layers, width 512), as in the compact BERTs (Turc et al. 2019), and ELECTRA-small.
_SMALL = {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048}
_SIZES.update({
    "bert-small": {**_BASE, **_SMALL},
    "roberta-small": {**_SIZES["roberta-base"], **_SMALL},
    "distilbert-small": {**_SIZES["distilbert-base"], "dim": 512, "n_layers": 4, "n_heads": 8, "hidden_dim": 2048},
    "albert-small": {**_SIZES["albert-base"], **_SMALL},
    "electra-small": {**_SIZES["electra-base"], "hidden_size": 256, "num_attention_heads": 4,
                      "intermediate_size": 1024, "embedding_size": 128},
})

FAMILY = Family(
    name="bert", kind=ENCODER, model_types=FAMILIES, model_classes=(EncoderModel,), from_checkpoint=from_checkpoint,
    hf_classes={"feature-extraction": "AutoModel", "masked-lm": "AutoModelForMaskedLM",
                "sequence-classification": "AutoModelForSequenceClassification",
                "token-classification": "AutoModelForTokenClassification",
                "question-answering": "AutoModelForQuestionAnswering"},
    config_defaults=_DEFAULTS, example_inputs=example_inputs,
    config_aliases={"distilbert": {"dim": "hidden_size", "n_layers": "num_hidden_layers",
                                   "n_heads": "num_attention_heads"}},
    named_sizes=_SIZES,
)
