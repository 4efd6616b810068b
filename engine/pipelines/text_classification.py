"""Text classification (``sentiment-analysis``) and zero-shot classification over an NLI model
(transformers 5.x's ``TextClassificationPipeline`` and ``ZeroShotClassificationPipeline``)."""

from __future__ import annotations

from typing import List

import numpy as np

from .base import Pipeline, Unit, apply_function, classification_function, text_input


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
        return [Unit(i, enc)]

    def _forward(self, batch, opts):
        self._encoder_forward(batch, opts, ["logits"], [])

    def _label(self, i: int) -> str:
        return self.id2label.get(i, f"LABEL_{i}")

    def _finish(self, x, units, opts):
        logits = units[0].out["logits"].numpy()
        fn = classification_function(opts.get("function_to_apply"), self.config, logits.shape[-1])
        scores = apply_function(fn, logits)
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
        x = text_input(x, self.task)
        encs = self.tokenizer.encode([x] * len(labels), [template.format(label) for label in labels],
                                     truncation="only_first")
        return [Unit(i, e, {"label": label}) for e, label in zip(encs, labels)]

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


