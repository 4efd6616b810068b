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

from pathlib import Path
from typing import Optional, Union

from ..loading import read_json_object
from .base import Pipeline, Unit, jsonable
from .feature_extraction import FeatureExtraction, SentenceEmbedding
from .fill_mask import FillMask
from .image_classification import ImageClassification
from .plot import plot_attention
from .question_answering import QuestionAnswering, decode_spans, select_starts_ends
from .text2text_generation import Summarization, Text2TextGeneration, Translation
from .text_classification import TextClassification, ZeroShotClassification
from .text_generation import GenerationPipeline, TextGeneration
from .token_classification import TokenClassification

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


_PIPELINES = {cls.task: cls for cls in (FeatureExtraction, SentenceEmbedding, TextClassification,
                                        ZeroShotClassification, FillMask, TokenClassification, QuestionAnswering,
                                        TextGeneration, Text2TextGeneration, Summarization, Translation,
                                        ImageClassification)}


def pipeline(task: str, model: Union[str, Path], *, device=None, dtype=None, batch_size: Optional[int] = None,
             quantize: Optional[str] = None, prepack: bool = True, **task_defaults) -> Pipeline:
    """A callable for ``task`` on the checkpoint directory ``model``, as ``transformers.pipeline``.

    ``device`` (default: CUDA when available, else the CPU), ``dtype`` (``"fp16"``,
    ``"bf16"``, ``torch.float32``, ...; default: the checkpoint's), ``batch_size``
    (inputs per model call when given a list), ``quantize`` (``"int8"``: the CPU's int8 path,
    see ``docs/cpu.md``), ``prepack`` (``False``: one copy of each weight on the CPU, slower GEMMs; see
    ``from_pretrained``); ``task_defaults`` are options every call
    gets unless it passes its own (``top_k=3``, ``aggregation_strategy="simple"``,
    ``num_beams=4``, ...). Unknown options are a ``TypeError`` naming them.
    """
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    config = read_json_object(path / "config.json")
    cls = _PIPELINES[_canonical_task(task)]
    return cls(path, config, device=device, dtype=dtype, batch_size=batch_size, defaults=task_defaults,
               task_name=ALIASES.get(task, task), quantize=quantize, prepack=prepack)


__all__ = ["pipeline", "Pipeline", "plot_attention", "jsonable", "TASKS", "ALIASES", "FeatureExtraction",
           "SentenceEmbedding", "TextClassification", "ZeroShotClassification", "FillMask", "TokenClassification",
           "QuestionAnswering", "select_starts_ends", "decode_spans", "GenerationPipeline", "TextGeneration",
           "Text2TextGeneration", "Summarization", "Translation", "ImageClassification", "Unit"]
