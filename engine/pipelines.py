"""The users' workflows in one call: ``trifuse.pipeline(task, checkpoint)``.

    import trifuse

    classify = trifuse.pipeline("sentiment-analysis", "path/to/checkpoint", device="cuda", dtype="fp16")
    classify(["I love it", "meh"])    # [{'label': 'POSITIVE', 'score': 0.99...}, {'label': 'NEGATIVE', ...}]

Each pipeline takes the inputs and keyword arguments of ``transformers.pipeline(task,
model=same_directory)`` and returns the same structure (keys, labels, order; scores
computed the same way). The semantics are Hugging Face's, per task:

* ``feature-extraction`` (``FeatureExtractionPipeline``) and ``sentence-embedding``
  (``SentenceTransformer.encode``: the pooling of ``1_Pooling/config.json``, the
  ``Normalize`` module of ``modules.json``, ``max_seq_length`` of
  ``sentence_bert_config.json``);
* ``text-classification`` / ``sentiment-analysis``, ``zero-shot-classification``,
  ``fill-mask``, ``token-classification`` / ``ner``, ``text-generation``,
  ``image-classification``: transformers 5.x's pipelines;
* ``question-answering``, ``summarization``, ``translation_xx_to_yy`` /
  ``translation``, ``text2text-generation``: transformers 4.x's pipelines (removed in
  5.x): the QA span search of ``QuestionAnsweringPipeline`` (``select_starts_ends`` /
  ``decode_spans``, long contexts split into ``doc_stride``-overlapping windows), and
  ``Text2TextGenerationPipeline`` with T5's task prefixes and generation settings
  from ``task_specific_params``.

Tokenization runs through ``tokenizers`` (:mod:`engine.tokenization`); transformers is
not imported when the checkpoint has a ``tokenizer.json``. A list of inputs runs in
batches of ``batch_size``, sorted by length so a batch pads little, and comes back in
input order; a generator or other iterable streams (results are yielded as its
batches finish). Inputs longer than the model takes are truncated where Hugging Face
truncates (token classification, zero-shot, sentence embeddings, QA windows) and
otherwise raise a ``ValueError`` that says so and how to truncate.

``output_attentions=True`` on the encoder tasks (BERT family) turns each result into
``{"output": <the usual result>, "tokens": [...], "attentions": Tensor[layers, heads,
L, L]}``; :func:`plot_attention` draws one layer/head as a labelled heatmap.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .decoding import OPTIONS
from .family import DECODER, ENCODER, SEQ2SEQ, VISION
from .registry import families, family_of, from_pretrained, resolve_dtype
from .packing import token_batches
from .tokenization import Tokenizer

# Hugging Face's task names and aliases -> ours.
ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}
TASKS = ("feature-extraction", "sentence-embedding", "text-classification", "zero-shot-classification", "fill-mask",
         "token-classification", "question-answering", "text-generation", "image-classification", "summarization",
         "translation", "text2text-generation")




def _canonical_task(task: str) -> str:
    task = ALIASES.get(task, task)
    if task.startswith("translation_") and "_to_" in task:
        return "translation"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; trifuse's pipelines: {', '.join(TASKS + tuple(ALIASES))}, "
                         f"translation_xx_to_yy")
    return task


# ----------------------------------------------------------------------------
# One input's work: the encodings it needs run (QA windows, zero-shot pairs), then its result.


@dataclass
class _Unit:
    item: int  # which input this belongs to
    enc: Any  # tokenizers.Encoding (or image array for vision)
    extra: dict = field(default_factory=dict)
    out: dict = field(default_factory=dict)  # per-row model outputs, cut to this row's length
    length: int = 0  # tokens (0 for images): the batching sort key

    def __post_init__(self):
        ids = getattr(self.enc, "ids", None)
        self.length = 0 if ids is None else len(ids)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _is_single(inputs) -> bool:
    return isinstance(inputs, (str, dict, bytes, Path)) or not isinstance(inputs, Iterable) or _is_image(inputs)


def _is_image(x) -> bool:
    return isinstance(x, np.ndarray) or type(x).__module__.startswith("PIL.")


class Pipeline:
    """A task on a checkpoint: ``pipe(inputs, **options)``. Made by :func:`pipeline`."""

    task = ""
    model_task: Optional[str] = None  # trifuse's head for from_pretrained
    kinds: tuple = (ENCODER,)  # the kinds of family (engine.family) this task runs on
    default_batch_size = 32
    #: Encoder tasks batch by tokens (text-embeddings-inference's queue): as many inputs as fit this many
    #: real tokens run together, packed (engine.packing). None: batches of ``batch_size`` inputs.
    default_max_batch_tokens: Optional[int] = None
    text = True  # tokenized input

    def __init__(self, path: Path, config: dict, *, device=None, dtype=None, batch_size: Optional[int] = None,
                 defaults: Optional[dict] = None, task_name: Optional[str] = None, quantize: Optional[str] = None):
        self.path, self.config = path, config
        self.task_name = task_name or self.task
        model_types = [t for f in families() if f.kind in self.kinds for t in f.model_types]
        if config.get("model_type") not in model_types:
            raise ValueError(f"{self.task_name} runs on {', '.join(model_types)} checkpoints; {path} is "
                             f"{config.get('model_type')!r}")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size or self.default_batch_size
        self._sized = batch_size is not None  # an explicit batch_size keeps batches of that many inputs
        self.defaults = dict(defaults or {})
        self.model = from_pretrained(path, dtype=self.dtype, device=self.device, task=self.model_task,
                                     quantize=quantize)
        self.tokenizer = Tokenizer.from_pretrained(path) if self.text else None
        self.model_type = config.get("model_type")
        self.id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
        self._graphed = None
        self._check_defaults()

    def _check_defaults(self) -> None:
        self._options(self.defaults)  # unknown options fail at construction, not at the first call

    #: option name -> default; anything else passed to a call is an error that names it.
    options: Dict[str, Any] = {}

    def _options(self, kwargs: dict) -> dict:
        unknown = sorted(set(kwargs) - set(self.options) - {"batch_size", "max_batch_tokens", "progress"})
        if unknown:
            raise TypeError(f"{self.task_name} pipeline got unknown option(s) {', '.join(unknown)}; it takes "
                            f"{', '.join(sorted(self.options))}")
        return {**self.options, **self.defaults, **kwargs}

    def __repr__(self) -> str:
        return f"trifuse.pipeline({self.task_name!r}, {str(self.path)!r}, device={str(self.device)!r})"

    # -- the call -----------------------------------------------------------------

    def __call__(self, inputs=None, *args, **kwargs):
        inputs = self._gather_inputs(inputs, args, kwargs)
        opts = self._options(kwargs)
        if self.is_single(inputs):
            return self._single(self._run([inputs], opts)[0], inputs, opts)
        if isinstance(inputs, (list, tuple)):
            return self._run(list(inputs), opts)
        return self._stream(iter(inputs), opts)

    def _gather_inputs(self, inputs, args, kwargs):
        if args:
            raise TypeError(f"{self.task_name} pipeline takes one positional input (a str or a list), "
                            f"got {1 + len(args)}")
        if inputs is None:
            raise TypeError(f"{self.task_name} pipeline needs an input")
        return inputs

    def _single(self, result, inputs, opts):
        return result

    # -- for servers that gather many callers' inputs into one call (trifuse.serve) -------

    def is_single(self, inputs) -> bool:
        """Whether ``pipe(inputs)`` takes ``inputs`` as one input (a str, a QA dict, an image), not a list."""
        return _is_single(inputs)

    def single_result(self, result, inputs, **options):
        """``pipe(inputs, **options)`` for one input, from its entry of ``pipe([inputs], **options)``."""
        return self._single(result, inputs, self._options(options))

    def _stream(self, inputs: Iterator, opts: dict) -> Iterator:
        chunk = []
        for x in inputs:
            chunk.append(x)
            if len(chunk) == self.batch_size * 4:
                yield from self._run(chunk, opts)
                chunk = []
        if chunk:
            yield from self._run(chunk, opts)

    def _run(self, items: list, opts: dict) -> list:
        units = []
        for i, x in enumerate(items):
            units.extend(self._prepare(i, x, opts))
        order = sorted(range(len(units)), key=lambda j: -units[j].length)  # longest first: equal lengths batch
        budget = opts.get("max_batch_tokens")
        if budget is None and not (self._sized or opts.get("batch_size")):
            budget = self.default_max_batch_tokens
        if budget is not None:  # by tokens (longest first, so each batch also pads little when it does not pack)
            batches = [[units[j] for j in b] for b in token_batches(order, [units[j].length for j in order], budget)]
        else:
            bs = opts.get("batch_size") or self.batch_size
            batches = [[units[j] for j in order[k:k + bs]] for k in range(0, len(order), bs)]
        show = opts.get("progress")
        if show is None:
            show = len(units) >= 2000 and sys.stderr.isatty()
        if show:
            try:
                from tqdm.auto import tqdm

                batches = tqdm(batches, desc=self.task_name, unit="batch")
            except ImportError:
                pass
        with torch.inference_mode():
            for batch in batches:
                self._forward(batch, opts)
        by_item = [[] for _ in items]
        for u in units:
            by_item[u.item].append(u)
        return [self._finish(x, us, opts) for x, us in zip(items, by_item)]

    # -- per task -----------------------------------------------------------------

    def _prepare(self, i: int, x, opts: dict) -> List[_Unit]:
        raise NotImplementedError

    def _forward(self, batch: List[_Unit], opts: dict) -> None:
        raise NotImplementedError

    def _finish(self, x, units: List[_Unit], opts: dict):
        raise NotImplementedError

    # -- shared by the text encoders ----------------------------------------------

    @property
    def max_tokens(self) -> int:
        """The longest input the model takes: the position table, and the tokenizer's limit."""
        c = getattr(self.model, "config", None)
        limit = getattr(c, "max_length", None) or getattr(c, "n_positions", None) or 1 << 62
        return min(limit, self.tokenizer.model_max_length)

    def _check_length(self, enc, what: str = "input") -> None:
        if len(enc.ids) > self.max_tokens:
            raise ValueError(f"{what} is {len(enc.ids)} tokens but this model takes at most {self.max_tokens}; "
                             f"pass truncation=True to cut it as Hugging Face's tokenizer does")

    def _encode(self, texts, pairs=None, truncation=None, max_length=None, **kw):
        encs = self.tokenizer.encode(texts, pairs, truncation=truncation, max_length=max_length, **kw)
        for e in encs:
            self._check_length(e)
        return encs

    @property
    def _type_ids(self) -> bool:
        return getattr(self.model, "uses_token_type_ids", False)  # DistilBERT has none

    def _encoder_forward(self, batch: List[_Unit], opts: dict, fields: Sequence[str], token_level: Sequence[str]):
        """Run the encoder on ``batch`` (right-padded) and store each row's ``fields`` in its unit
        (fields in ``token_level`` cut to the row's length), plus its attentions when asked."""
        inputs = self.tokenizer.pad([u.enc for u in batch], side="right", device=self.device,
                                    type_ids=self._type_ids)
        attn = bool(opts.get("output_attentions"))
        if attn and family_of(self.model).kind != ENCODER:
            raise ValueError(f"output_attentions=True needs a text-encoder checkpoint (BERT family); this is "
                             f"{self.model_type!r}")
        model = self.model if attn else self._runner()
        out = model(**inputs, output_attentions=True) if attn else model(**inputs)
        for r, u in enumerate(batch):
            n = u.length
            for f in fields:
                t = out[f][r]
                u.out[f] = (t[:n] if f in token_level else t).float().cpu()
            if attn:
                u.out["attentions"] = torch.stack([a[r, :, :n, :n] for a in out.attentions]).float().cpu()

    def _runner(self):
        """The model, or on CUDA its CUDA-graph wrapper (padded shape buckets, one replay per call)."""
        if self._graphed is None and self.device.type != "cuda":
            return self.model
        if self._graphed is None:
            from .graphs import CUDAGraphModel

            self._graphed = CUDAGraphModel(self.model)
        return self._graphed

    def _with_attentions(self, result, units: List[_Unit], opts: dict):
        if not opts.get("output_attentions"):
            return result
        u = units[0]
        return {"output": result, "tokens": self.tokenizer.convert_ids_to_tokens(u.enc.ids),
                "attentions": u.out["attentions"]}


def _text_input(x, task: str) -> str:
    if not isinstance(x, str):
        raise ValueError(f"{task} takes strings, got {type(x).__name__}")
    return x


# ----------------------------------------------------------------------------
# Feature extraction and sentence embeddings.


class FeatureExtraction(Pipeline):
    default_max_batch_tokens = 16384  # text-embeddings-inference's default budget
    task = "feature-extraction"
    model_task = "feature-extraction"
    kinds = (ENCODER, DECODER)
    options = {"truncation": None, "tokenize_kwargs": None, "return_tensors": False, "output_attentions": False}

    def _prepare(self, i, x, opts):
        tk = dict(opts.get("tokenize_kwargs") or {})
        trunc = tk.pop("truncation", opts.get("truncation"))
        enc, = self._encode([_text_input(x, self.task)], truncation=trunc, max_length=tk.pop("max_length", None),
                            add_special_tokens=tk.pop("add_special_tokens", True))
        if tk:
            raise TypeError(f"tokenize_kwargs {sorted(tk)} are not supported (truncation, max_length, "
                            f"add_special_tokens are)")
        return [_Unit(i, enc)]

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
        enc, = self.tokenizer.encode([_text_input(x, self.task)], truncation=True, max_length=self.max_seq_length)
        return [_Unit(i, enc)]

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


# ----------------------------------------------------------------------------
# Classification.


def _classification_function(name, config: dict, num_labels: int) -> str:
    if name is not None:
        name = str(getattr(name, "value", name)).lower()
        if name not in ("softmax", "sigmoid", "none"):
            raise ValueError(f"function_to_apply must be 'softmax', 'sigmoid' or 'none', got {name!r}")
        return name
    problem = config.get("problem_type")
    if problem == "regression":
        return "none"
    if problem == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    if problem == "single_label_classification" or num_labels > 1:
        return "softmax"
    return "none"


def _apply(fn: str, logits: np.ndarray) -> np.ndarray:
    return _softmax(logits) if fn == "softmax" else _sigmoid(logits) if fn == "sigmoid" else logits


class TextClassification(Pipeline):
    default_max_batch_tokens = 16384  # text-embeddings-inference's default budget
    task = "text-classification"
    model_task = "sequence-classification"
    options = {"top_k": "", "function_to_apply": None, "truncation": None, "max_length": None,
               "output_attentions": False}

    def _prepare(self, i, x, opts):
        if isinstance(x, dict):
            if set(x) - {"text", "text_pair"} or "text" not in x:
                raise ValueError('a text pair is a dict {"text": ..., "text_pair": ...}')
            texts, pairs = [x["text"]], [x["text_pair"]] if "text_pair" in x else None
        elif isinstance(x, (list, tuple)) and len(x) == 1 and isinstance(x[0], (list, tuple)) and len(x[0]) == 2:
            texts, pairs = [x[0][0]], [x[0][1]]
        elif isinstance(x, str):
            texts, pairs = [x], None
        else:
            raise ValueError('text-classification takes a str, a list of str, or {"text": ..., "text_pair": ...}')
        enc, = self._encode(texts, pairs, truncation=opts.get("truncation"), max_length=opts.get("max_length"))
        return [_Unit(i, enc)]

    def _forward(self, batch, opts):
        self._encoder_forward(batch, opts, ["logits"], [])

    def _label(self, i: int) -> str:
        return self.id2label.get(i, f"LABEL_{i}")

    def _finish(self, x, units, opts):
        logits = units[0].out["logits"].numpy()
        scores = _apply(_classification_function(opts.get("function_to_apply"), self.config, logits.shape[-1]), logits)
        top_k = opts.get("top_k")
        if top_k == "":  # not given: Hugging Face's legacy single best label
            i = int(scores.argmax())
            result = {"label": self._label(i), "score": float(scores[i])}
        else:
            result = sorted(({"label": self._label(i), "score": float(s)} for i, s in enumerate(scores)),
                            key=lambda d: d["score"], reverse=True)
            if top_k is not None:
                result = result[:top_k]
        return self._with_attentions(result, units, opts)

    def _single(self, result, inputs, opts):
        # transformers: one string without top_k still comes back as a one-element list
        return [result] if isinstance(inputs, str) and opts.get("top_k") == "" else result


class ZeroShotClassification(TextClassification):
    task = "zero-shot-classification"
    options = {"candidate_labels": None, "hypothesis_template": "This example is {}.", "multi_label": False,
               "output_attentions": False}

    def __init__(self, path, config, **kw):
        super().__init__(path, config, **kw)
        ids = [i for i, label in self.id2label.items() if label.lower().startswith("entail")]
        if not ids:
            raise ValueError(f"{path}: zero-shot classification needs an NLI model whose id2label names an "
                             f"'entailment' label; this one has {list(self.id2label.values())}")
        self.entailment_id = ids[0]

    def _gather_inputs(self, inputs, args, kwargs):
        if args:  # transformers: classifier(sequences, candidate_labels)
            if len(args) > 1 or "candidate_labels" in kwargs:
                raise TypeError("zero-shot-classification takes (sequences, candidate_labels)")
            kwargs["candidate_labels"] = args[0]
        return super()._gather_inputs(inputs, (), kwargs)

    @staticmethod
    def _labels(labels) -> List[str]:
        if isinstance(labels, str):
            labels = [label.strip() for label in labels.split(",") if label.strip()]
        return list(labels or [])

    def _prepare(self, i, x, opts):
        labels = self._labels(opts.get("candidate_labels"))
        template = opts["hypothesis_template"]
        if not labels:
            raise ValueError("You must include at least one label and at least one sequence.")
        if template.format(labels[0]) == template:
            raise ValueError(f'The provided hypothesis_template "{template}" was not able to be formatted with the '
                             f"target labels; put {{}} where the label goes")
        x = _text_input(x, self.task)
        encs = self.tokenizer.encode([x] * len(labels), [template.format(label) for label in labels],
                                     truncation="only_first")
        return [_Unit(i, e, {"label": label}) for e, label in zip(encs, labels)]

    def _finish(self, x, units, opts):
        logits = np.stack([u.out["logits"].numpy() for u in units])  # [n_labels, classes]
        labels = [u.extra["label"] for u in units]
        if opts.get("multi_label") or len(labels) == 1:
            e = self.entailment_id
            c = -1 if e == 0 else 0
            pair = logits[:, [c, e]]
            scores = (np.exp(pair) / np.exp(pair).sum(-1, keepdims=True))[:, 1]
        else:
            ent = logits[:, self.entailment_id]
            scores = np.exp(ent) / np.exp(ent).sum(-1, keepdims=True)
        top = list(reversed(scores.argsort()))
        result = {"sequence": x, "labels": [labels[i] for i in top], "scores": scores[top].tolist()}
        return self._with_attentions(result, units, opts)

    def _single(self, result, inputs, opts):
        return result


# ----------------------------------------------------------------------------
# Fill-mask.


class FillMask(Pipeline):
    default_max_batch_tokens = 16384  # text-embeddings-inference's default budget
    task = "fill-mask"
    model_task = "masked-lm"
    options = {"top_k": 5, "targets": None, "truncation": None, "max_length": None, "output_attentions": False}

    def _target_ids(self, targets) -> Optional[np.ndarray]:
        if targets is None:
            return None
        if isinstance(targets, str):
            targets = [targets]
        vocab = self.tokenizer.get_vocab()
        ids = []
        for t in targets:
            i = vocab.get(t)
            if i is None:  # as transformers: the first token of the target's own tokenization
                enc, = self.tokenizer.encode([t], add_special_tokens=False, truncation=True, max_length=1)
                if not enc.ids:
                    continue
                i = enc.ids[0]
            ids.append(i)
        ids = list(set(ids))  # transformers' order (a set's)
        if not ids:
            raise ValueError("At least one target must be provided when passed.")
        return np.array(ids)

    def _prepare(self, i, x, opts):
        enc, = self._encode([_text_input(x, self.task)], truncation=opts.get("truncation"),
                            max_length=opts.get("max_length"))
        mask_id = self.tokenizer.mask_token_id
        if mask_id is None or mask_id not in enc.ids:
            raise ValueError(f"No mask_token ({self.tokenizer.mask_token}) found on input {x!r}")
        return [_Unit(i, enc)]

    def _forward(self, batch, opts):
        inputs = self.tokenizer.pad([u.enc for u in batch], side="right", device=self.device, type_ids=self._type_ids)
        attn = bool(opts.get("output_attentions"))
        out = self.model(**inputs, output_attentions=attn)
        mask_id = self.tokenizer.mask_token_id
        for r, u in enumerate(batch):
            n = u.length
            where = inputs["input_ids"][r, :n].eq(mask_id)
            u.out["logits"] = out.logits[r, :n][where].float().cpu()  # only the masked rows leave the device
            if attn:
                u.out["attentions"] = torch.stack([a[r, :, :n, :n] for a in out.attentions]).float().cpu()

    def _finish(self, x, units, opts):
        u = units[0]
        target_ids = self._target_ids(opts.get("targets"))
        top_k = opts.get("top_k") or 5
        if target_ids is not None and len(target_ids) < top_k:
            top_k = len(target_ids)
        ids = np.array(u.enc.ids)
        masked = np.nonzero(ids == self.tokenizer.mask_token_id)[0]
        probs = u.out["logits"].softmax(dim=-1)
        if target_ids is not None:
            probs = probs[..., torch.as_tensor(target_ids)]
        values, predictions = probs.topk(top_k)
        single = values.shape[0] == 1
        pad = self.tokenizer.pad_token_id
        result = []
        for i, (vs, ps) in enumerate(zip(values.tolist(), predictions.tolist())):
            row = []
            for v, p in zip(vs, ps):
                tokens = ids.copy()
                if target_ids is not None:
                    p = int(target_ids[p])
                tokens[masked[i]] = p
                tokens = tokens[tokens != pad] if pad is not None else tokens
                row.append({"score": v, "token": p, "token_str": self.tokenizer.decode([p]),
                            "sequence": self.tokenizer.decode(tokens.tolist(), skip_special_tokens=single)})
            result.append(row)
        return self._with_attentions(result[0] if single else result, units, opts)


# ----------------------------------------------------------------------------
# Token classification.


_AGGREGATIONS = ("none", "simple", "first", "average", "max")


class TokenClassification(Pipeline):
    default_max_batch_tokens = 16384  # text-embeddings-inference's default budget
    task = "token-classification"
    model_task = "token-classification"
    options = {"aggregation_strategy": "none", "ignore_labels": None, "stride": None, "output_attentions": False}

    def _prepare(self, i, x, opts):
        strategy = str(getattr(opts.get("aggregation_strategy"), "value", opts.get("aggregation_strategy"))).lower()
        if strategy not in _AGGREGATIONS:
            raise ValueError(f"aggregation_strategy must be one of {', '.join(_AGGREGATIONS)}, got {strategy!r}")
        stride = opts.get("stride")
        if stride is not None and strategy == "none":
            raise ValueError("`stride` is only available with aggregation_strategy simple/first/average/max")
        x = _text_input(x, self.task)
        limit = self.max_tokens
        # transformers truncates at model_max_length; with `stride` the rest comes as overlapping windows
        windows, = self.tokenizer.encode([x], truncation=True, max_length=limit, stride=stride or 0,
                                         overflow=True)
        if stride is None:
            windows = windows[:1]
        return [_Unit(i, e, {"window": k}) for k, e in enumerate(windows)]

    def _forward(self, batch, opts):
        self._encoder_forward(batch, opts, ["logits"], ["logits"])

    def _label(self, i) -> str:
        return self.id2label.get(int(i), f"LABEL_{int(i)}")

    def _finish(self, x, units, opts):
        strategy = str(getattr(opts.get("aggregation_strategy"), "value", opts.get("aggregation_strategy"))).lower()
        ignore = opts.get("ignore_labels")
        ignore = ["O"] if ignore is None else ignore
        units = sorted(units, key=lambda u: u.extra["window"])
        entities = []
        for u in units:
            scores = _softmax(u.out["logits"].numpy())
            pre = self._pre_entities(x, u.enc, scores, strategy)
            grouped = self._aggregate(pre, strategy)
            entities += [e for e in grouped if e.get("entity") not in ignore and e.get("entity_group") not in ignore]
        if len(units) > 1:
            entities = _merge_overlapping(entities)
        return self._with_attentions(entities, units, opts)

    def _pre_entities(self, sentence, enc, scores, strategy):
        out = []
        unk = self.tokenizer.unk_token_id
        prefix = self.tokenizer.continuing_subword_prefix
        for idx, token_scores in enumerate(scores):
            if enc.special_tokens_mask[idx]:
                continue
            word = enc.tokens[idx]
            start, end = enc.offsets[idx]
            ref = sentence[start:end]
            if prefix:
                is_subword = len(word) != len(ref)
            else:  # transformers' heuristic for tokenizers without a subword prefix
                is_subword = start > 0 and " " not in sentence[start - 1:start + 1]
            if enc.ids[idx] == unk:
                word, is_subword = ref, False
            out.append({"word": word, "scores": token_scores, "start": start, "end": end, "index": idx,
                        "is_subword": is_subword})
        return out

    def _aggregate(self, pre, strategy):
        if strategy in ("none", "simple"):
            entities = []
            for p in pre:
                k = int(p["scores"].argmax())
                entities.append({"entity": self._label(k), "score": float(p["scores"][k]), "index": p["index"],
                                 "word": p["word"], "start": p["start"], "end": p["end"]})
        else:
            entities, group = [], None
            for p in pre:
                if group is None:
                    group = [p]
                elif p["is_subword"]:
                    group.append(p)
                else:
                    entities.append(self._aggregate_word(group, strategy))
                    group = [p]
            if group is not None:
                entities.append(self._aggregate_word(group, strategy))
        if strategy == "none":
            return entities
        return self._group(entities)

    def _aggregate_word(self, group, strategy):
        word = self.tokenizer.convert_tokens_to_string([p["word"] for p in group])
        if strategy == "first":
            scores = group[0]["scores"]
        elif strategy == "max":
            scores = max(group, key=lambda p: p["scores"].max())["scores"]
        else:
            scores = np.nanmean(np.stack([p["scores"] for p in group]), axis=0)
        k = int(scores.argmax())
        return {"entity": self._label(k), "score": float(scores[k]), "word": word, "start": group[0]["start"],
                "end": group[-1]["end"]}

    @staticmethod
    def _tag(name: str):
        if name.startswith("B-"):
            return "B", name[2:]
        if name.startswith("I-"):
            return "I", name[2:]
        return "I", name

    def _group(self, entities):
        groups, current = [], []
        for e in entities:
            if not current:
                current.append(e)
                continue
            bi, tag = self._tag(e["entity"])
            _, last_tag = self._tag(current[-1]["entity"])
            if tag == last_tag and bi != "B":
                current.append(e)
            else:
                groups.append(self._group_one(current))
                current = [e]
        if current:
            groups.append(self._group_one(current))
        return groups

    def _group_one(self, entities):
        return {"entity_group": entities[0]["entity"].split("-", 1)[-1],
                "score": float(np.mean(np.nanmean([e["score"] for e in entities]))),
                "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in entities]),
                "start": entities[0]["start"], "end": entities[-1]["end"]}


def _merge_overlapping(entities):
    """transformers' ``aggregate_overlapping_entities``: of overlapping entities keep the longest (then best)."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    merged, prev = [], entities[0]
    for e in entities:
        if prev["start"] <= e["start"] < prev["end"]:
            n, m = e["end"] - e["start"], prev["end"] - prev["start"]
            if n > m or (n == m and e["score"] > prev["score"]):
                prev = e
        else:
            merged.append(prev)
            prev = e
    merged.append(prev)
    return merged


# ----------------------------------------------------------------------------
# Question answering (transformers 4.x's QuestionAnsweringPipeline).


class QuestionAnswering(Pipeline):
    task = "question-answering"
    model_task = "question-answering"
    options = {"top_k": 1, "doc_stride": None, "max_answer_len": 15, "max_seq_len": None, "max_question_len": 64,
               "handle_impossible_answer": False, "align_to_words": True, "question": None, "context": None,
               "output_attentions": False}

    def __call__(self, *args, **kwargs):
        question, context = kwargs.pop("question", None), kwargs.pop("context", None)
        if args and len(args) == 2 and all(isinstance(a, str) for a in args):
            inputs = {"question": args[0], "context": args[1]}
        elif len(args) == 1:
            inputs = args[0]
        elif args:
            raise TypeError("question-answering takes {'question', 'context'} dicts, or question= and context=")
        elif question is not None and context is not None:
            if isinstance(question, list) and isinstance(context, str):
                inputs = [{"question": q, "context": context} for q in question]
            elif isinstance(question, list) and isinstance(context, list):
                if len(question) != len(context):
                    raise ValueError("Questions and contexts don't have the same lengths")
                inputs = [{"question": q, "context": c} for q, c in zip(question, context)]
            elif isinstance(question, str) and isinstance(context, str):
                inputs = {"question": question, "context": context}
            else:
                raise ValueError("Arguments can't be understood")
        else:
            raise ValueError("question-answering needs {'question': ..., 'context': ...} or question= and context=")
        return super().__call__(inputs, **kwargs)

    def _settings(self, opts):
        max_seq_len = opts.get("max_seq_len") or min(self.tokenizer.model_max_length, 384, self.max_tokens)
        doc_stride = opts.get("doc_stride")
        doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
        if doc_stride > max_seq_len:
            raise ValueError(f"`doc_stride` ({doc_stride}) is larger than `max_seq_len` ({max_seq_len})")
        if opts.get("top_k", 1) < 1:
            raise ValueError(f"top_k parameter should be >= 1 (got {opts['top_k']})")
        if opts.get("max_answer_len", 15) < 1:
            raise ValueError(f"max_answer_len parameter should be >= 1 (got {opts['max_answer_len']})")
        return max_seq_len, doc_stride

    def _prepare(self, i, x, opts):
        if not isinstance(x, dict):
            raise ValueError(f"{x!r} argument needs to be of type dict with keys question and context")
        for k in ("question", "context"):
            if k not in x:
                raise KeyError("You need to provide a dictionary with keys {question:..., context:...}")
            if x[k] is None:
                raise ValueError(f"`{k}` cannot be None")
            if isinstance(x[k], str) and len(x[k]) == 0:
                raise ValueError(f"`{k}` cannot be empty")
        max_seq_len, doc_stride = self._settings(opts)
        question_first = self.tokenizer.padding_side == "right"
        a, b = (x["question"], x["context"]) if question_first else (x["context"], x["question"])
        try:
            windows, = self.tokenizer.encode([a], [b], truncation="only_second" if question_first else "only_first",
                                             max_length=max_seq_len, stride=doc_stride, overflow=True)
        except Exception as e:  # the question alone does not fit a window
            raise ValueError(f"question-answering: could not split the context into windows of {max_seq_len} "
                             f"tokens with stride {doc_stride}: {e}") from e
        units = []
        cls = self.tokenizer.cls_token_id
        for k, enc in enumerate(windows):
            p_mask = [(s != 1) if question_first else 0 for s in enc.sequence_ids]
            if cls is not None:
                p_mask = [0 if t == cls else m for t, m in zip(enc.ids, p_mask)]
            units.append(_Unit(i, enc, {"window": k, "p_mask": np.array(p_mask, dtype=np.int64)}))
        return units

    def _forward(self, batch, opts):
        self._encoder_forward(batch, opts, ["start_logits", "end_logits"], ["start_logits", "end_logits"])

    def _finish(self, x, units, opts):
        top_k, max_answer_len = opts.get("top_k", 1), opts.get("max_answer_len", 15)
        impossible = bool(opts.get("handle_impossible_answer"))
        align = opts.get("align_to_words", True)
        question_first = self.tokenizer.padding_side == "right"
        min_null_score = 1000000
        answers = []
        units = sorted(units, key=lambda u: u.extra["window"])
        for u in units:
            start = u.out["start_logits"].numpy()[None]
            end = u.out["end_logits"].numpy()[None]
            p_mask = u.extra["p_mask"][None]
            attention = np.ones_like(p_mask)
            starts, ends, scores, min_null_score = select_starts_ends(start, end, p_mask, attention, min_null_score,
                                                                      top_k, impossible, max_answer_len)
            seq = 1 if question_first else 0
            for s, e, score in zip(starts, ends, scores):
                a, b = _char_span(u.enc, int(s), int(e), seq, align)
                answers.append({"score": score.item(), "start": a, "end": b, "answer": x["context"][a:b]})
        if impossible:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda d: d["score"], reverse=True)[:top_k]
        result = answers[0] if len(answers) == 1 else answers
        return self._with_attentions(result, units, opts)


def _char_span(enc, s: int, e: int, sequence_index: int, align_to_words: bool):
    """transformers' ``QuestionAnsweringPipeline.get_indices``."""
    if align_to_words:
        try:
            start_word, end_word = enc.token_to_word(s), enc.token_to_word(e)
            return (enc.word_to_chars(start_word, sequence_index)[0], enc.word_to_chars(end_word, sequence_index)[1])
        except Exception:
            pass
    return enc.offsets[s][0], enc.offsets[e][1]


def select_starts_ends(start, end, p_mask, attention_mask, min_null_score=1000000, top_k=1,
                       handle_impossible_answer=False, max_answer_len=15):
    """transformers 4.x's span scoring over one window's start/end logits ``[1, L]``:
    ``(starts, ends, scores, min_null_score)``."""
    undesired = np.abs(np.array(p_mask) - 1)
    if attention_mask is not None:
        undesired = undesired & attention_mask
    undesired_mask = undesired == 0.0
    start = np.where(undesired_mask, -10000.0, start)
    end = np.where(undesired_mask, -10000.0, end)
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0  # the CLS position
    starts, ends, scores = decode_spans(start, end, top_k, max_answer_len, undesired)
    return starts, ends, scores, min_null_score


def decode_spans(start, end, topk, max_answer_len, undesired_tokens):
    """transformers 4.x's ``decode_spans``: the ``topk`` best ``start <= end < start + max_answer_len``."""
    outer = np.matmul(np.expand_dims(start, -1), np.expand_dims(end, 1))
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    flat = candidates.flatten()
    if topk == 1:
        idx_sort = [np.argmax(flat)]
    elif len(flat) < topk:
        idx_sort = np.argsort(-flat)
    else:
        idx = np.argpartition(-flat, topk)[0:topk]
        idx_sort = idx[np.argsort(-flat[idx])]
    starts, ends = np.unravel_index(idx_sort, candidates.shape)[1:]
    # (transformers tests membership in the flattened (row, column) nonzero indices; the row
    # indices are all 0, so position 0 always passes: kept as is)
    desired = np.isin(starts, undesired_tokens.nonzero()) & np.isin(ends, undesired_tokens.nonzero())
    starts, ends = starts[desired], ends[desired]
    return starts, ends, candidates[0, starts, ends]


# ----------------------------------------------------------------------------
# Generation: GPT-2 text generation, T5 summarization / translation / text2text.


#: generate()'s options the pipelines pass through (Hugging Face's names).
_GENERATE = ("max_new_tokens", "max_length", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k",
             "top_p", "repetition_penalty", "no_repeat_ngram_size", "num_return_sequences", "eos_token_id",
             "pad_token_id", "num_beams", "length_penalty", "early_stopping", "generator")


def _generation_defaults(path: Path) -> dict:
    f = path / "generation_config.json"
    if not f.is_file():
        return {}
    cfg = json.loads(f.read_text())
    return {k: v for k, v in cfg.items() if k in _GENERATE}


class _Generation(Pipeline):
    default_batch_size = 8

    def _generate_kwargs(self, opts: dict, base: dict) -> dict:
        asked = {k: v for k, v in opts.items() if k in _GENERATE and v is not None}
        kw = {**base, **asked}
        if opts.get("max_length") is not None and opts.get("max_new_tokens") is None:
            kw.pop("max_new_tokens", None)  # a total length asked for: the default new-token count gives way
        return {k: v for k, v in kw.items() if k in OPTIONS}  # every decoder takes engine.decoding's options


class TextGeneration(_Generation):
    """transformers 5.x's ``TextGenerationPipeline`` for GPT-2 (plain prompts, no chat templates)."""

    task = "text-generation"
    model_task = "causal-lm"
    kinds = (DECODER,)
    options = {**{k: None for k in _GENERATE}, "return_full_text": True, "return_text": None,
               "return_tensors": False, "prefix": "", "clean_up_tokenization_spaces": None,
               "skip_special_tokens": True, "handle_long_generation": None}

    def _base(self) -> dict:
        base = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7, "top_k": 50}  # transformers' pipeline
        base.update(_generation_defaults(self.path))
        if self.tokenizer.pad_token_id is not None:
            base["pad_token_id"] = self.tokenizer.pad_token_id
        elif self.config.get("eos_token_id") is not None:
            base.setdefault("pad_token_id", self.config["eos_token_id"])
        return base

    def stream(self, text: str, **options) -> Iterator[str]:
        """The generated text of one prompt, piece by piece as tokens are decoded (what ``trifuse
        serve`` streams); the pieces joined equal ``pipe(text, return_full_text=False, **options)``'s
        ``generated_text`` for the same draws. One sequence: no beams, ``num_return_sequences`` 1."""
        opts = self._options(options)
        if (opts.get("num_beams") or 1) != 1 or (opts.get("num_return_sequences") or 1) != 1:
            raise ValueError("streaming decodes one sequence: num_beams and num_return_sequences must be 1")
        (unit,) = self._prepare(0, text, opts)
        if not unit.enc.ids:
            raise ValueError("streaming needs a non-empty prompt")
        kw = self._generate_kwargs(opts, self._base())
        ids = torch.tensor([unit.enc.ids], dtype=torch.long, device=self.device)
        skip = opts.get("skip_special_tokens", True)
        clean = opts.get("clean_up_tokenization_spaces")
        clean = self.tokenizer.clean_up_tokenization_spaces if clean is None else bool(clean)
        eos = kw.get("eos_token_id", self.config.get("eos_token_id"))
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        tokens: list[int] = []
        said = ""

        def text() -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)

        with torch.inference_mode():
            for step in self.model.stream(ids, torch.ones_like(ids), **kw):
                tokens.append(int(step[0]))
                text_now = text()
                if text_now.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                    continue
                if clean:
                    # Hugging Face's clean-up deletes a space before punctuation and contractions
                    # (" ." -> ".", " n't" -> "n't"), so the next tokens may still rewrite the text
                    # from the last space on: hold that back (a word at most).
                    text_now = text_now[: max(text_now.rfind(" "), 0)]
                if len(text_now) > len(said) and text_now.startswith(said):
                    yield text_now[len(said):]
                    said = text_now
                if tokens[-1] in eos:
                    break
        final = text()
        if not final.startswith(said):  # cannot happen with Hugging Face's clean-up rules; say so if it does
            raise RuntimeError(f"streamed text {said!r} is not a prefix of the decoded text {final!r}")
        if final[len(said):]:
            yield final[len(said):]

    def _prepare(self, i, x, opts):
        x = _text_input(x, self.task)
        enc, = self.tokenizer.encode([(opts.get("prefix") or "") + x])
        mode = opts.get("handle_long_generation")
        if mode not in (None, "hole"):
            raise ValueError(f"handle_long_generation must be None or 'hole', got {mode!r}")
        if mode == "hole":  # transformers: keep the end of the prompt so that it and the new tokens fit
            kw = {**self._base(), **{k: v for k, v in opts.items() if k in _GENERATE and v is not None}}
            new = opts.get("max_new_tokens") or (kw["max_length"] - len(enc.ids) if opts.get("max_length")
                                                 else kw.get("max_new_tokens", 20))
            if new < 0:
                raise ValueError("We cannot infer how many new tokens are expected")
            limit = min(self.tokenizer.model_max_length, self.max_tokens)
            if len(enc.ids) + new > limit:
                keep = limit - new
                if keep <= 0:
                    raise ValueError(f"handle_long_generation='hole': {new} new tokens do not fit the model's "
                                     f"{limit} positions")
                enc = SimpleNamespace(ids=enc.ids[-keep:], type_ids=enc.type_ids[-keep:])
        return [_Unit(i, enc)]

    def _forward(self, batch, opts):
        kw = self._generate_kwargs(opts, self._base())
        bos = self.config.get("bos_token_id")
        empty = [u for u in batch if not u.enc.ids]
        full = [u for u in batch if u.enc.ids]
        if empty and bos is None:
            raise ValueError("an empty prompt needs the config's bos_token_id to start from")
        for group, prompt_len in ((full, None), (empty, 0)):
            if not group:
                continue
            if prompt_len == 0:  # transformers generates from BOS and decodes it as part of the output
                inputs = {"input_ids": torch.full((len(group), 1), bos, dtype=torch.long, device=self.device),
                          "attention_mask": torch.ones(len(group), 1, dtype=torch.long, device=self.device)}
            else:
                # transformers pads GPT-2's batches with the pad (or EOS) id, which n-gram bans count
                inputs = self.tokenizer.pad([u.enc for u in group], side="left", device=self.device, type_ids=False,
                                            pad_id=kw.get("pad_token_id"))
            out = self.model.generate(inputs["input_ids"], inputs["attention_mask"], **kw).cpu()
            r = out.shape[0] // len(group)
            n = inputs["input_ids"].shape[1]
            for j, u in enumerate(group):
                rows = out[j * r:(j + 1) * r]
                u.out["prompt_len"] = prompt_len if prompt_len is not None else u.length
                # drop this row's left padding: the sequence as an unbatched call returns it
                u.out["sequences"] = rows[:, n - u.length:] if prompt_len is None else rows

    def _finish(self, x, units, opts):
        u = units[0]
        records = []
        return_full = opts.get("return_full_text", True)
        if opts.get("return_text") is False:
            opts = {**opts, "return_tensors": True}
        for seq in u.out["sequences"].tolist():
            if opts.get("return_tensors"):
                records.append({"generated_token_ids": seq})
                continue
            text = self.tokenizer.decode(seq[u.out["prompt_len"]:],
                                         skip_special_tokens=opts.get("skip_special_tokens", True),
                                         clean_up_tokenization_spaces=opts.get("clean_up_tokenization_spaces"))
            records.append({"generated_text": x + text if return_full else text})
        return records


class Text2TextGeneration(_Generation):
    """transformers 4.x's ``Text2TextGenerationPipeline`` (and its summarization/translation
    subclasses) for T5: the task's prefix and generation settings from the config's
    ``task_specific_params``, overridden by the call's options."""

    task = "text2text-generation"
    model_task = "text2text-generation"
    kinds = (SEQ2SEQ,)
    return_name = "generated"
    options = {**{k: None for k in _GENERATE}, "return_text": True, "return_tensors": False,
               "clean_up_tokenization_spaces": False, "truncation": None, "src_lang": None, "tgt_lang": None}

    def _task_params(self, opts) -> dict:
        params = self.config.get("task_specific_params") or {}
        key = self.task_name
        if self.task == "translation" and key == "translation":
            src, tgt = opts.get("src_lang"), opts.get("tgt_lang")
            keys = [k for k in params if k.startswith("translation_")]
            if src and tgt:
                key = f"translation_{src}_to_{tgt}"
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise ValueError(f"translation needs src_lang= and tgt_lang= (or a task name translation_xx_to_yy); "
                                 f"this checkpoint knows {keys or 'no translation tasks'}")
            if key not in params:
                raise ValueError(f"{self.path}: no task_specific_params for {key}; it knows {keys}")
        return dict(params.get(key, {}))

    def _base(self, opts) -> dict:
        base = {**_generation_defaults(self.path)}
        params = self._task_params(opts)
        base.update({k: v for k, v in params.items() if k in _GENERATE})
        return base

    def _prefix(self, opts) -> str:
        p = self._task_params(opts).get("prefix", self.config.get("prefix"))
        return p or ""

    def _prepare(self, i, x, opts):
        x = _text_input(x, self.task_name)
        enc, = self.tokenizer.encode([self._prefix(opts) + x], truncation=opts.get("truncation"))
        return [_Unit(i, enc)]

    def _forward(self, batch, opts):
        kw = self._generate_kwargs(opts, self._base(opts))
        inputs = self.tokenizer.pad([u.enc for u in batch], side="right", device=self.device, type_ids=False)
        out = self.model.generate(inputs["input_ids"], inputs["attention_mask"], **kw).cpu()
        r = out.shape[0] // len(batch)
        for j, u in enumerate(batch):
            u.out["sequences"] = out[j * r:(j + 1) * r]

    def _finish(self, x, units, opts):
        records = []
        for seq in units[0].out["sequences"].tolist():
            if opts.get("return_tensors") or opts.get("return_text") is False:
                records.append({f"{self.return_name}_token_ids": seq})
            else:
                records.append({f"{self.return_name}_text": self.tokenizer.decode(
                    seq, skip_special_tokens=True,
                    clean_up_tokenization_spaces=opts.get("clean_up_tokenization_spaces", False))})
        return records

    def _run(self, items, opts):
        results = super()._run(items, opts)
        # transformers 4.x: a list of strings with one sequence each comes back flat
        if all(len(r) == 1 for r in results):
            return [r[0] for r in results]
        return results

    def _single(self, result, inputs, opts):
        return [result] if isinstance(result, dict) else result


class Summarization(Text2TextGeneration):
    task = "summarization"
    return_name = "summary"


class Translation(Text2TextGeneration):
    task = "translation"
    return_name = "translation"


# ----------------------------------------------------------------------------
# Image classification.


class ImageClassification(Pipeline):
    task = "image-classification"
    model_task = "image-classification"
    kinds = (VISION,)
    text = False
    options = {"top_k": 5, "function_to_apply": None, "timeout": None}

    def __init__(self, path, config, **kw):
        super().__init__(path, config, **kw)
        from .images import ImageProcessor

        self.processor = ImageProcessor.from_pretrained(path)

    def _prepare(self, i, x, opts):
        return [_Unit(i, self.processor.process(x))]

    def _forward(self, batch, opts):
        pixels = torch.from_numpy(np.stack([u.enc for u in batch])).to(self.device, self.model_dtype)
        logits = self._runner()(pixels).logits.float().cpu()
        for r, u in enumerate(batch):
            u.out["logits"] = logits[r]

    @property
    def model_dtype(self):
        return next(self.model.parameters()).dtype

    def _finish(self, x, units, opts):
        logits = units[0].out["logits"].numpy()
        n = logits.shape[-1]
        scores = _apply(_classification_function(opts.get("function_to_apply"), self.config, n), logits)
        top_k = min(opts.get("top_k") or 5, n)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [{"label": self.id2label.get(int(i), f"LABEL_{int(i)}"), "score": float(scores[i])} for i in order]


_PIPELINES = {cls.task: cls for cls in (FeatureExtraction, SentenceEmbedding, TextClassification,
                                        ZeroShotClassification, FillMask, TokenClassification, QuestionAnswering,
                                        TextGeneration, Text2TextGeneration, Summarization, Translation,
                                        ImageClassification)}


def pipeline(task: str, model: Union[str, Path], *, device=None, dtype=None, batch_size: Optional[int] = None,
             quantize: Optional[str] = None, **task_defaults) -> Pipeline:
    """A callable for ``task`` on the checkpoint directory ``model``, as ``transformers.pipeline``.

    ``device`` (default: CUDA when available, else the CPU), ``dtype`` (``"fp16"``,
    ``"bf16"``, ``torch.float32``, ...; default: the checkpoint's), ``batch_size``
    (inputs per model call when given a list), ``quantize`` (``"int8"``: the CPU's int8 path,
    see ``docs/cpu.md``); ``task_defaults`` are options every call
    gets unless it passes its own (``top_k=3``, ``aggregation_strategy="simple"``,
    ``num_beams=4``, ...). Unknown options are a ``TypeError`` naming them.
    """
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    cls = _PIPELINES[_canonical_task(task)]
    return cls(path, config, device=device, dtype=dtype, batch_size=batch_size, defaults=task_defaults,
               task_name=ALIASES.get(task, task), quantize=quantize)


# ----------------------------------------------------------------------------
# Attention maps.


def plot_attention(result, layer: int = -1, head: Optional[int] = None, path: Union[str, Path, None] = None,
                   title: Optional[str] = None):
    """Draw one layer's attention (one head, or the mean over heads when ``head`` is None)
    as a heatmap with the tokens on both axes; save it as a PNG at ``path`` (default
    ``attention.png``) and return the path.

    ``result``: what a pipeline returns with ``output_attentions=True`` (one input's
    ``{"output", "tokens", "attentions"}``, or a list of them: the first is drawn).
    """
    if isinstance(result, list) and result and isinstance(result[0], dict) and "attentions" in result[0]:
        result = result[0]
    if not isinstance(result, dict) or "attentions" not in result or "tokens" not in result:
        raise ValueError("plot_attention takes a pipeline result made with output_attentions=True")
    att = result["attentions"]  # [layers, H, L, L]
    layers, heads = att.shape[0], att.shape[1]
    if not -layers <= layer < layers:
        raise ValueError(f"layer {layer} out of range: the model has {layers} layers")
    if head is not None and not -heads <= head < heads:
        raise ValueError(f"head {head} out of range: the model has {heads} heads")
    m = att[layer].mean(0) if head is None else att[layer, head]
    tokens = result["tokens"]

    from .extras import require

    require("trifuse.plot_attention", "bench", "matplotlib")
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    n = len(tokens)
    size = max(4.0, min(0.35 * n + 2, 30.0))
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(m.numpy(), cmap="viridis", vmin=0.0)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(tokens, rotation=90, fontsize=8)
    ax.set_yticklabels(tokens, fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    which = "mean over heads" if head is None else f"head {head % heads}"
    ax.set_title(title or f"attention, layer {layer % layers}, {which}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path or "attention.png")
    fig.savefig(path, dpi=100)
    return path


def jsonable(value: Any) -> Any:
    """Pipeline results as JSON: tensors and arrays become (nested) lists, numbers plain floats/ints."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().tolist() if value.is_floating_point() else value.cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
