"""Token classification (``ner``; transformers 5.x's ``TokenClassificationPipeline``): per-token
labels, aggregated into words and entity groups, long texts as ``stride``-overlapping windows."""

from __future__ import annotations

import numpy as np

from .base import Pipeline, Unit, softmax, text_input


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
        x = text_input(x, self.task)
        limit = self.max_tokens
        # transformers truncates at model_max_length; with `stride` the rest comes as overlapping windows
        windows, = self.tokenizer.encode([x], truncation=True, max_length=limit, stride=stride or 0,
                                         overflow=True)
        if stride is None:
            windows = windows[:1]
        return [Unit(i, e, {"window": k}) for k, e in enumerate(windows)]

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
            scores = softmax(u.out["logits"].numpy())
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


