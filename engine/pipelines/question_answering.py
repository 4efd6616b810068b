"""Question answering (transformers 4.x's ``QuestionAnsweringPipeline``): the context in
``doc_stride``-overlapping windows of ``max_seq_len`` tokens, and the span search
(:func:`select_starts_ends`, :func:`decode_spans`) over each window's start/end logits."""

from __future__ import annotations

import numpy as np

from .base import Pipeline, Unit, check_int


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
        max_seq_len = opts.get("max_seq_len")
        if max_seq_len is None:
            max_seq_len = min(self.tokenizer.model_max_length, 384, self.max_tokens)
        elif check_int("max_seq_len", max_seq_len, 1) > self.max_tokens:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the {self.max_tokens} tokens this model takes")
        doc_stride = opts.get("doc_stride")
        doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else check_int("doc_stride", doc_stride, 0)
        if doc_stride > max_seq_len:
            raise ValueError(f"`doc_stride` ({doc_stride}) is larger than `max_seq_len` ({max_seq_len})")
        if check_int("top_k", opts.get("top_k", 1), 0) < 1:
            raise ValueError(f"top_k parameter should be >= 1 (got {opts['top_k']})")
        if check_int("max_answer_len", opts.get("max_answer_len", 15), 0) < 1:
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
            units.append(Unit(i, enc, {"window": k, "p_mask": np.array(p_mask, dtype=np.int64)}))
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


