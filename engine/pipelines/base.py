"""What every pipeline shares: the unit of work, batching, progress, streaming, the call's options.

A call turns each input into one or more :class:`Unit` (a text's encoding, a QA window,
a zero-shot (text, hypothesis) pair, an image's pixels), sorts the units by length so a
batch pads little, runs them ``batch_size`` at a time (:meth:`Pipeline._forward`), and
gathers each input's units back into its result (:meth:`Pipeline._finish`), in input
order. A task module subclasses :class:`Pipeline` with ``_prepare`` / ``_forward`` /
``_finish``, the way transformers' ``preprocess`` / ``_forward`` / ``postprocess`` split.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from ..family import ENCODER
from ..packing import token_batches
from ..registry import families, family_of, from_pretrained, resolve_device, resolve_dtype
from ..tokenization import Tokenizer


# One input's work: the encodings it needs run (QA windows, zero-shot pairs), then its result.


@dataclass
class Unit:
    item: int  # which input this belongs to
    enc: Any  # tokenizers.Encoding (or image array for vision)
    extra: dict = field(default_factory=dict)
    out: dict = field(default_factory=dict)  # per-row model outputs, cut to this row's length
    length: int = 0  # tokens (0 for images): the batching sort key

    def __post_init__(self):
        ids = getattr(self.enc, "ids", None)
        self.length = 0 if ids is None else len(ids)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def is_single_input(inputs) -> bool:
    return isinstance(inputs, (str, dict, bytes, Path)) or not isinstance(inputs, Iterable) or is_image(inputs)


def is_image(x) -> bool:
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
                 defaults: Optional[dict] = None, task_name: Optional[str] = None, quantize: Optional[str] = None,
                 prepack: bool = True):
        self.path, self.config = path, config
        self.task_name = task_name or self.task
        model_types = [t for f in families() if f.kind in self.kinds for t in f.model_types]
        if config.get("model_type") not in model_types:
            raise ValueError(f"{self.task_name} runs on {', '.join(model_types)} checkpoints; {path} is "
                             f"{config.get('model_type')!r}")
        # before anything loads: "gpu" or a missing CUDA device is a ValueError naming it
        self.device = resolve_device(device if device is not None else
                                     "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = resolve_dtype(dtype)
        self.batch_size = self.default_batch_size if batch_size is None else _batch_size(batch_size)
        self._sized = batch_size is not None  # an explicit batch_size keeps batches of that many inputs
        self.defaults = dict(defaults or {})
        self.model = from_pretrained(path, dtype=self.dtype, device=self.device, task=self.model_task,
                                     quantize=quantize, prepack=prepack)
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
        if kwargs.get("batch_size") is not None:
            _batch_size(kwargs["batch_size"])
        if kwargs.get("progress") not in (None, True, False):
            raise TypeError(f"progress must be True, False or None, got {kwargs['progress']!r}")
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
        return is_single_input(inputs)

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

    def _prepare(self, i: int, x, opts: dict) -> List[Unit]:
        raise NotImplementedError

    def _forward(self, batch: List[Unit], opts: dict) -> None:
        raise NotImplementedError

    def _finish(self, x, units: List[Unit], opts: dict):
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

    def _encoder_forward(self, batch: List[Unit], opts: dict, fields: Sequence[str], token_level: Sequence[str]):
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
            from ..graphs import CUDAGraphModel

            self._graphed = CUDAGraphModel(self.model)
        return self._graphed

    def _with_attentions(self, result, units: List[Unit], opts: dict):
        if not opts.get("output_attentions"):
            return result
        u = units[0]
        return {"output": result, "tokens": self.tokenizer.convert_ids_to_tokens(u.enc.ids),
                "attentions": u.out["attentions"]}


def _batch_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"batch_size must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"batch_size must be a positive int, got {value!r}")
    return value


def check_int(name: str, value, minimum: int) -> int:
    """An option that must be an int >= ``minimum``: a ``TypeError`` naming it for another type (a JSON
    string, a bool), a ``ValueError`` below the minimum; checked before any work."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def text_input(x, task: str) -> str:
    if not isinstance(x, str):
        raise ValueError(f"{task} takes strings, got {type(x).__name__}")
    return x


def classification_function(name, config: dict, num_labels: int) -> str:
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


def apply_function(fn: str, logits: np.ndarray) -> np.ndarray:
    return softmax(logits) if fn == "softmax" else sigmoid(logits) if fn == "sigmoid" else logits


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
