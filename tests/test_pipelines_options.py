"""Options and files the pipelines check before any work (issue 26 items 7 and 8): a named
TypeError / ValueError, never a tokenizer panic, a KeyError or a silent default."""

import json
import random
import re
import shutil

import pytest

import trifuse
from tests.test_pipelines import ckpt  # noqa: F401  (the checkpoint fixture: small models, real tokenizers)
from trifuse import engine

LONG = "The quick brown fox jumps over the lazy dog near the river bank. " * 12


def test_question_answering_windows_too_small_are_value_errors(ckpt):  # noqa: F811
    qa = trifuse.pipeline("question-answering", ckpt("qa"), device="cpu")
    question = "Where does the quick brown fox jump over the lazy dog?"
    for kw, needle in (({"max_seq_len": 10}, "leaves no room for the second sequence"),
                       ({"max_seq_len": 24, "doc_stride": 10}, r"stride 10 must be smaller than the \d+ tokens"),
                       ({"max_seq_len": 24, "doc_stride": 24}, r"stride 24 must be smaller"),
                       ({"max_seq_len": 0}, "max_seq_len must be an int >= 1"),
                       ({"max_seq_len": 10**6}, "exceeds the 64 tokens this model takes")):
        try:
            qa(question=question, context=LONG, **kw)
        except ValueError as e:  # a tokenizers panic is a BaseException: it would escape this
            assert re.search(needle, str(e)), (kw, str(e))
        else:
            raise AssertionError(f"{kw}: no error")
    for kw, needle in (({"doc_stride": "8"}, "doc_stride must be an int"), ({"max_seq_len": 20.0}, "max_seq_len"),
                       ({"top_k": "2"}, "top_k must be an int")):
        with pytest.raises(TypeError, match=needle):
            qa(question=question, context=LONG, **kw)
    # a short context that fits one window needs no room for a stride: it answers
    assert set(qa(question="Who jumps?", context="The fox jumps.", max_seq_len=16, doc_stride=12)) == {
        "score", "start", "end", "answer"}


def test_tokenizer_options_that_made_tokenizers_panic(ckpt):  # noqa: F811
    tok = trifuse.pipeline("zero-shot-classification", ckpt("nli"), device="cpu").tokenizer
    long_pair = ["a hypothesis that goes on " * 20]
    with pytest.raises(ValueError, match="leaves no room for the first sequence"):
        tok.encode(["short text here"], long_pair, truncation="only_first", max_length=12)
    with pytest.raises(ValueError, match="stride 6 must be smaller"):
        tok.encode([LONG], ["a short one"], truncation="only_first", max_length=12, stride=6, overflow=True)
    with pytest.raises(ValueError, match="max_length must be an int >= 1, got -1"):
        tok.encode([LONG], truncation=True, max_length=-1)
    with pytest.raises(TypeError, match="stride must be an int"):
        tok.encode([LONG], truncation=True, max_length=8, stride="2")
    with pytest.raises(ValueError, match=r"stride 8 must be smaller than the 8 tokens each window holds"):
        tok.encode([LONG], truncation=True, max_length=10, stride=8, overflow=True)  # [CLS] ... [SEP]
    with pytest.raises(ValueError, match=r"stride 28 must be smaller than the \d+ tokens the (first|second) seq"):
        tok.encode([LONG], [LONG], truncation=True, max_length=35, stride=28, overflow=True)
    # Sizes drawn at random: every refusal is a ValueError or TypeError, never a panic (a BaseException).
    rng = random.Random(0)
    words = LONG.split()
    for _ in range(300):
        a, b = (" ".join(rng.choices(words, k=rng.randint(0, 30))) for _ in range(2))
        kw = dict(truncation=rng.choice([True, "longest_first", "only_first", "only_second"]),
                  max_length=rng.randint(1, 40), stride=rng.randint(0, 40), overflow=True)
        try:
            tok.encode([a], [b] if rng.random() < 0.7 else None, **kw)
        except (ValueError, TypeError) as e:
            assert "could not encode" not in str(e), (kw, str(e))  # refused before the library was called
    ner = trifuse.pipeline("ner", ckpt("ner"), device="cpu")
    with pytest.raises(ValueError, match="stride"):
        ner(LONG, aggregation_strategy="simple", stride=64)  # not smaller than the 64-token window
    with pytest.raises(ValueError, match="max_length must be an int >= 1"):
        trifuse.pipeline("text-classification", ckpt("cls"), device="cpu")(LONG, truncation=True, max_length=-3)


def test_call_time_batch_size_and_device(ckpt):  # noqa: F811
    cls = trifuse.pipeline("text-classification", ckpt("cls"), device="cpu")
    texts = ["one", "two words", "three words here"]
    want = cls(texts)
    for got in (cls(texts, batch_size=1), cls(texts, batch_size=2)):
        # Batches of other shapes may take other GEMM kernels (engine/layers.py: one or two rows on BLAS's
        # GEMV): the same labels, scores within fp32's budget, not bit for bit.
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], rel=1e-5, abs=1e-6)
    for bad, error in ((-1, ValueError), (0, ValueError), (True, TypeError), (2.0, TypeError), ("2", TypeError)):
        with pytest.raises(error, match="batch_size must be a positive int"):
            cls(texts, batch_size=bad)
    with pytest.raises(TypeError, match="progress must be"):
        cls(texts, progress="yes")
    with pytest.raises(TypeError, match="batch_size must be a positive int"):
        trifuse.pipeline("text-classification", ckpt("cls"), batch_size=True)
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        trifuse.pipeline("text-classification", ckpt("cls"), device="gpu")


def test_generation_options_of_the_wrong_type_are_named(ckpt):  # noqa: F811
    gen = trifuse.pipeline("text-generation", ckpt("gpt2"), device="cpu")
    for kw, needle in (({"max_new_tokens": "3"}, "max_new_tokens must be a number, got str '3'"),
                       ({"do_sample": "false"}, "do_sample must be True or False, got str 'false'"),
                       ({"temperature": "0.7", "do_sample": True}, "temperature must be a number"),
                       ({"eos_token_id": "2"}, "eos_token_id must be a token id or a list of them"),
                       ({"num_beams": [2]}, "num_beams must be a number")):
        with pytest.raises(TypeError, match=needle):
            gen("Hello", **kw)
    with pytest.raises(ValueError, match=r"eos_token_id=\(1000000000000000000000000000000,\) is outside the vocab"):
        gen("Hello", max_new_tokens=2, eos_token_id=10**30)
    out = gen("Hello", max_new_tokens=2, do_sample=None, num_beams=None)  # None: the default, as JSON's null
    assert len(out) == 1 and out[0]["generated_text"].startswith("Hello")


@pytest.mark.parametrize("field,value,error", [
    ("hidden_size", "32", r"'hidden_size' must be a number, got str '32'"),
    ("num_attention_heads", True, r"'num_attention_heads' must be a number, got bool True"),
    ("eos_token_id", 10**30, r"'eos_token_id' = 10+ is not a token id"),
    ("pad_token_id", "0", r"'pad_token_id' must be a token id"),
])
def test_config_json_values_are_named(ckpt, tmp_path, field, value, error):  # noqa: F811
    d = tmp_path / "bad"
    shutil.copytree(ckpt("cls"), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ValueError, match=error):
        engine.from_pretrained(d)
    with pytest.raises(ValueError, match=error):
        trifuse.pipeline("text-classification", d, device="cpu")


def test_config_json_token_id_beyond_int64_for_a_decoder(ckpt, tmp_path):  # noqa: F811
    d = tmp_path / "gpt2"
    shutil.copytree(ckpt("gpt2"), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 10**30}))
    (d / "generation_config.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="'eos_token_id' = 10+ is not a token id"):
        trifuse.pipeline("text-generation", d, device="cpu")
