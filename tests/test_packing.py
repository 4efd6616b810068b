"""Padding-free execution (engine.packing): every encoder family run packed equals Hugging Face.

A padded batch of mixed lengths large enough to pack (engine.packing.plan) must give Hugging
Face's results at every real token (fp32 within 1e-4), the same pooled and classification
outputs, and zeros at padded positions; packed input (1-D ids + cu_seqlens) the same again.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers as T

from tests.helpers import rel_err
from tests.test_bert import CONFIGS as BERT_CONFIGS
from tests.test_bert import hf_model as bert_hf_model
from trifuse import engine, kernels
from trifuse.engine import packing

varlen_mod = importlib.import_module("trifuse.kernels.varlen")
LENGTHS = [29, 3, 17, 1, 30, 8, 12]  # 100 real tokens of 7 * 30 = 210 positions
TOL = 1e-4


def padded_batch(vocab: int, pad: int, lengths=LENGTHS, seed=3):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), n), generator=g)
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask


@pytest.fixture(params=["reference", "native", "triton"])
def backend(request, monkeypatch):
    """The reference ops; the native CPU path (SDPA per sequence); the Triton kernels (interpreted)."""
    if request.param == "native":
        monkeypatch.setattr(varlen_mod, "_kernel_takes", lambda q: False)
        with kernels.use_backend("reference"):
            monkeypatch.setattr(varlen_mod, "_path", lambda q: "native")
            yield request.param
        return
    with kernels.use_backend("auto" if request.param == "triton" else "reference"):
        yield request.param


@pytest.fixture
def count_packed(monkeypatch):
    """How many forwards were planned packed."""
    calls = []
    real = packing.plan

    def spy(*a, **k):
        p = real(*a, **k)
        calls.append(p is not None)
        return p

    for mod in ("bert", "t5", "bart"):
        monkeypatch.setattr(importlib.import_module(f"trifuse.engine.models.{mod}"), "plan", spy)
    return calls


def assert_real_tokens_match(ours, ref, mask, tol=TOL):
    keep = mask.bool()
    assert ours.shape == ref.shape
    assert rel_err(ours[keep], ref[keep]) < tol, rel_err(ours[keep], ref[keep])
    assert not ours[~keep].any(), "padded positions hold zeros"


HEADS = ["Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM"]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", list(BERT_CONFIGS))
def test_bert_family_packed_equals_hf(family, head, count_packed, reference_backend):
    cfg = BERT_CONFIGS[family]()
    hf = bert_hf_model(family, head, cfg)
    ids, mask = padded_batch(cfg.vocab_size, cfg.pad_token_id or 0)
    model = engine.from_pretrained(hf)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ours = model(ids, attention_mask=mask, output_hidden_states=True)
    assert count_packed == [True]
    if head == "Model":
        assert_real_tokens_match(ours.last_hidden_state, ref.last_hidden_state, mask)
        for a, b in zip(ours.hidden_states, ref.hidden_states, strict=True):
            assert_real_tokens_match(a, b, mask)
        if ref.get("pooler_output") is not None:
            assert rel_err(ours.pooler_output, ref.pooler_output) < TOL
    elif head == "ForSequenceClassification":
        assert rel_err(ours.logits, ref.logits) < TOL
    elif head == "ForQuestionAnswering":
        assert_real_tokens_match(ours.start_logits, ref.start_logits, mask)
        assert_real_tokens_match(ours.end_logits, ref.end_logits, mask)
    else:
        assert_real_tokens_match(ours.logits, ref.logits, mask)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_bert_packed_on_every_attention_path(family, backend, count_packed):
    cfg = BERT_CONFIGS[family]()
    hf = bert_hf_model(family, "Model", cfg)
    ids, mask = padded_batch(cfg.vocab_size, cfg.pad_token_id or 0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
        ours = engine.from_pretrained(hf)(ids, attention_mask=mask)
    assert count_packed == [True]
    assert_real_tokens_match(ours.last_hidden_state, ref.last_hidden_state, mask)
    assert rel_err(ours.pooler_output, ref.pooler_output) < TOL


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_packed_input_with_cu_seqlens(family, reference_backend):
    cfg = BERT_CONFIGS[family]()
    hf = bert_hf_model(family, "Model", cfg)
    ids, mask = padded_batch(cfg.vocab_size, cfg.pad_token_id or 0)
    keep = mask.bool()
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    model = engine.from_pretrained(hf)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
        ours = model(ids[keep], cu_seqlens=cu)  # 1-D [total_tokens], text-embeddings-inference style
    assert ours.last_hidden_state.shape == (int(keep.sum()), cfg.hidden_size if family != "distilbert" else cfg.dim)
    assert rel_err(ours.last_hidden_state, ref.last_hidden_state[keep]) < TOL
    if ref.get("pooler_output") is not None:
        assert rel_err(ours.pooler_output, ref.pooler_output) < TOL


def test_packed_input_checks(reference_backend):
    model = engine.from_pretrained(bert_hf_model("bert", "Model"))
    ids = torch.randint(3, 90, (10,))
    with pytest.raises(ValueError, match="ends at 9 but input_ids holds 10"):
        model(ids, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="increase strictly"):
        model(ids, cu_seqlens=torch.tensor([0, 4, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        model(ids[None], cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="exceeds the position table"):
        model(torch.randint(3, 90, (50,)), cu_seqlens=torch.tensor([0, 50], dtype=torch.int32))


def test_the_rule_skips_what_does_not_pay():
    full = torch.ones(8, 32, dtype=torch.long)
    assert packing.plan(full) is None  # no padding
    tiny = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert packing.plan(tiny) is None  # fewer positions than PACK_MIN_POSITIONS
    left = torch.ones(8, 32, dtype=torch.long)
    left[:, :20] = 0
    left[:, 0] = 0
    assert packing.plan(left) is None  # left padding: the first position is padding
    right = torch.ones(8, 32, dtype=torch.long)
    right[:, 20:] = 0
    p = packing.plan(right)
    assert p is not None and p.total == 160 and p.max_seqlen == 20 and p.cu_seqlens.tolist()[-1] == 160
    assert packing.plan(right, need_probs=True) is None


def test_pad_unpad_round_trip():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    p = packing.Packed.from_mask(mask)
    x = torch.randn(2, 4, 3)
    packed = p.unpad(x)
    assert packed.shape == (6, 3)
    back = p.pad(packed)
    assert torch.equal(back[mask.bool()], x[mask.bool()]) and not back[~mask.bool()].any()
    assert p.positions.tolist() == [0, 1, 2, 0, 2, 3]
    assert torch.equal(p.mask(), mask.bool())


def _seq2seq_case(hf, vocab, pad, count_packed):
    ids, mask = padded_batch(vocab, pad)
    g = torch.Generator().manual_seed(5)
    dec = torch.randint(3, vocab, (ids.shape[0], 6), generator=g)
    model = engine.from_pretrained(hf)
    with torch.no_grad():
        ref_enc = hf.get_encoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        enc = model.encode(ids, mask, output_hidden_states=True)
        assert count_packed == [True]
        assert_real_tokens_match(enc.last_hidden_state, ref_enc.last_hidden_state, mask)
        for a, b in zip(enc.hidden_states, ref_enc.hidden_states, strict=True):
            assert_real_tokens_match(a, b, mask)
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        ours = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        assert rel_err(ours.logits, ref.logits) < TOL
        ref_gen = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=1)
        ours_gen = model.generate(ids, mask, max_new_tokens=5)
        assert ours_gen.tolist() == ref_gen.tolist()


@pytest.mark.parametrize("flavour", ["relu", "gated-gelu"])
def test_t5_encoder_packed_equals_hf(flavour, count_packed, reference_backend):
    from tests.test_t5 import hf_model as t5_hf_model

    _seq2seq_case(t5_hf_model(flavour), 99, 0, count_packed)


def test_t5_encoder_packed_on_the_kernels(backend, count_packed):
    from tests.test_t5 import hf_model as t5_hf_model

    hf = t5_hf_model("relu")
    ids, mask = padded_batch(99, 0)
    with torch.no_grad():
        ref = hf.get_encoder()(input_ids=ids, attention_mask=mask)
        ours = engine.from_pretrained(hf).encode(ids, mask)
    assert count_packed == [True]
    assert_real_tokens_match(ours.last_hidden_state, ref.last_hidden_state, mask)


@pytest.mark.parametrize("shape", ["base", "large"])
def test_bart_encoder_packed_equals_hf(shape, count_packed, reference_backend):
    from tests.test_bart import hf_model as bart_hf_model

    hf = bart_hf_model(shape)
    _seq2seq_case(hf, hf.config.vocab_size, 1, count_packed)


# ----------------------------------------------------------------------------
# Decoders: GPT-2's padded forward and prefill, the T5 / BART decoders on padded decoder inputs.


@pytest.fixture
def count_varlen(monkeypatch):
    """Every varlen attention call the models make: ``"causal"`` (a decoder's self-attention), ``"cross"``
    (queries and keys laid out differently), ``"plain"`` (an encoder's self-attention)."""
    calls = []
    real = kernels.attention_varlen

    def spy(q, k, v, cu_q, cu_k, *args, causal=False, **kwargs):
        calls.append("causal" if causal else "plain" if cu_q is cu_k else "cross")
        return real(q, k, v, cu_q, cu_k, *args, causal=causal, **kwargs)

    monkeypatch.setattr(kernels, "attention_varlen", spy)
    return calls


def decoder_batch(vocab: int, pad: int, lengths, side: str, seed=7):
    """Mixed lengths padded on ``side`` (``left``: how decoder-only prompts come)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(3, vocab - 1, (len(lengths), n), generator=g)
    pos, lens = torch.arange(n)[None, :], torch.tensor(lengths)[:, None]
    keep = pos < lens if side == "right" else pos >= n - lens
    return ids.masked_fill(~keep, pad), keep.long()


def _gpt2(head="LMHead"):
    from tests.test_gpt2 import hf_model as gpt2_hf_model

    return gpt2_hf_model(head)


def _hf_positions(mask):  # Hugging Face's generate numbers a left-padded row's real tokens from 0
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("head", ["LMHead", "Model"])
def test_gpt2_padded_forward_runs_packed(side, head, count_varlen, reference_backend):
    hf = _gpt2(head)
    model = engine.from_pretrained(hf)
    ids, mask = decoder_batch(hf.config.vocab_size, 0, LENGTHS, side)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=_hf_positions(mask), output_hidden_states=True)
        ours = model(ids, mask, output_hidden_states=True)
    assert count_varlen == ["causal"] * hf.config.n_layer
    if head == "LMHead":
        assert_real_tokens_match(ours.logits, ref.logits, mask)
    assert_real_tokens_match(ours.last_hidden_state, ref.hidden_states[-1], mask)
    for a, b in zip(ours.hidden_states, ref.hidden_states, strict=True):
        assert_real_tokens_match(a, b, mask)


@pytest.mark.parametrize("side", ["left", "right"])
def test_gpt2_packed_prefill_fills_the_cache_as_padded(side, count_varlen, reference_backend):
    """The packed prefill's cache: decode steps after it give the padded prefill's logits."""
    model = engine.from_pretrained(_gpt2())
    ids, mask = decoder_batch(97, 0, LENGTHS, side)
    nxt = torch.randint(3, 90, (len(LENGTHS), 3), generator=torch.Generator().manual_seed(1))
    runs = []
    for packed in (True, False):
        with torch.no_grad(), packing.use_packing(packed):
            out = model(ids, mask, use_cache=True)
            steps = [model(nxt[:, i:i + 1], past_key_values=out.past_key_values).logits for i in range(3)]
        runs.append((out.logits, torch.cat(steps, 1)))
    assert count_varlen == ["causal"] * 2  # the packed run's prefill only
    assert_real_tokens_match(runs[0][0], runs[1][0], mask)
    assert rel_err(runs[0][1], runs[1][1]) < TOL


@pytest.mark.parametrize("num_beams", [1, 2])
def test_gpt2_generate_packed_is_token_identical_to_hf(num_beams, count_varlen, reference_backend):
    hf = _gpt2()
    hf.generation_config.eos_token_id = None
    model = engine.from_pretrained(hf)
    ids, mask = decoder_batch(97, 1, LENGTHS, "left")
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                          num_beams=num_beams, pad_token_id=1)
        ours = model.generate(ids, mask, max_new_tokens=8, num_beams=num_beams, eos_token_id=[], pad_token_id=1)
    assert count_varlen == ["causal"] * 2
    assert ours.tolist() == ref.tolist()


def test_gpt2_packed_on_every_attention_path(backend, count_varlen):
    hf = _gpt2()
    ids, mask = decoder_batch(97, 0, LENGTHS, "left")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=_hf_positions(mask)).logits
        ours = engine.from_pretrained(hf)(ids, mask).logits
    assert count_varlen == ["causal"] * 2
    assert_real_tokens_match(ours, ref, mask)


DEC_LENGTHS = [12, 1, 5, 9, 12, 2, 7]  # 48 real tokens of 7 * 12 = 84 positions


def _seq2seq_decoder_case(hf, vocab, pad, side, count_varlen, **extra):
    ids, mask = padded_batch(vocab, pad)
    dec, dmask = decoder_batch(vocab, pad, DEC_LENGTHS, side)
    model = engine.from_pretrained(hf)
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask, **extra)
    with torch.no_grad():
        ref, ours = hf(**kw), model(**kw)
    layers = hf.config.num_decoder_layers if hf.config.model_type == "t5" else hf.config.decoder_layers
    assert count_varlen.count("causal") == layers and count_varlen.count("cross") == layers
    return ref, ours, dmask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("flavour", ["relu", "gated-gelu"])
def test_t5_decoder_packed_equals_hf(flavour, side, count_varlen, reference_backend):
    from tests.test_t5 import hf_model as t5_hf_model

    ref, ours, dmask = _seq2seq_decoder_case(t5_hf_model(flavour), 99, 0, side, count_varlen,
                                             output_hidden_states=True)
    assert_real_tokens_match(ours.logits, ref.logits, dmask)
    for a, b in zip(ours.decoder_hidden_states, ref.decoder_hidden_states, strict=True):
        assert_real_tokens_match(a, b, dmask)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("cls", ["BartForConditionalGeneration", "BartModel", "BartForQuestionAnswering"])
def test_bart_decoder_packed_equals_hf(cls, side, count_varlen, reference_backend):
    from tests.test_bart import hf_model as bart_hf_model

    hf = bart_hf_model("base", cls)
    ref, ours, dmask = _seq2seq_decoder_case(hf, hf.config.vocab_size, 1, side, count_varlen,
                                             output_hidden_states=True)
    if cls == "BartForQuestionAnswering":
        assert_real_tokens_match(ours.start_logits, ref.start_logits, dmask)
        assert_real_tokens_match(ours.end_logits, ref.end_logits, dmask)
        return
    if cls == "BartForConditionalGeneration":
        assert_real_tokens_match(ours.logits, ref.logits, dmask)
    assert_real_tokens_match(ours.last_hidden_state, ref.decoder_hidden_states[-1], dmask)
    for a, b in zip(ours.decoder_hidden_states, ref.decoder_hidden_states, strict=True):
        assert_real_tokens_match(a, b, dmask)


def test_t5_decoder_packed_on_the_kernels(backend, count_varlen):
    from tests.test_t5 import hf_model as t5_hf_model

    ref, ours, dmask = _seq2seq_decoder_case(t5_hf_model("relu"), 99, 0, "left", count_varlen)
    assert_real_tokens_match(ours.logits, ref.logits, dmask)


def test_the_decoder_rules():
    left = torch.ones(8, 32, dtype=torch.long)
    left[:, :20] = 0
    assert packing.plan(left) is None  # an encoder keeps left padding padded (its pooler reads position 0)
    p = packing.plan(left, decoder=True)
    assert p is not None and p.total == 96 and p.positions[:3].tolist() == [20, 21, 22]
    holes = torch.ones(8, 32, dtype=torch.long)
    holes[:, 10:25] = 0
    assert packing.plan(holes) is not None and packing.plan(holes, relative=True) is None  # T5's positions
    empty = left.clone()
    empty[3] = 0
    assert packing.plan(empty, decoder=True, relative=True) is not None  # a row of length 0 is contiguous
    queries = packing.plan(left, decoder=True)
    enc = torch.ones(8, 10, dtype=torch.bool)
    kv = torch.randn(8, 10, 6)
    cross, packed_kv = packing.plan_decoder(left, 0, enc, kv)
    assert cross.keys.total == 80 and packed_kv.shape == (1, 80, 6)
    assert packing.plan_decoder(left, 3, enc, kv) is None  # something cached: the padded path
    assert packing.plan_cross(queries, enc[:4], (4, 10)) is None  # beams share an encoder row
    enc[5] = False
    assert packing.plan_cross(queries, enc, (8, 10)) is None  # an empty encoder row


def test_use_packing_always_packs_what_the_rule_would_not_and_refuses_other_values(tmp_path):
    """``use_packing("always")`` (the rule sweep's switch) packs a small, barely padded batch that
    ``plan``'s thresholds leave padded; values other than True/False/"always" are refused."""
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 7] = 0  # 15 of 16 real, 16 positions: under both thresholds
    assert packing.plan(mask) is None
    with packing.use_packing("always"):
        p = packing.plan(mask)
    assert p is not None and p.cu_seqlens.tolist() == [0, 8, 15]
    with pytest.raises(ValueError, match="always"):
        with packing.use_packing("yes"):
            pass


def test_packing_rule_sweep_checks_and_times_both_paths(monkeypatch):
    """bench/packing_rule.py on a tiny model and two shapes: every row is checked equal at the real tokens
    (inside the sweep) and carries both timings; the lengths hit the asked real fraction."""
    from transformers import BertConfig, BertModel

    from trifuse.bench import packing_rule

    g = torch.Generator().manual_seed(1)
    for frac in packing_rule.FRACTIONS:
        lens = packing_rule.batch_lengths(16, 64, frac, g)
        assert abs(sum(lens) / (16 * 64) - frac) < 0.08 and max(lens) == 64 and min(lens) >= 1
    torch.manual_seed(0)
    hf = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=37)).eval()
    model = engine.from_pretrained(hf, task="feature-extraction", device="cpu")
    monkeypatch.setattr(packing_rule, "SHAPES", ((2, 16), (4, 8)))
    monkeypatch.setattr(packing_rule, "FRACTIONS", (0.6,))
    rows = packing_rule.sweep(model, 99, threads=1, min_time_s=0.0)
    assert [(r["batch"], r["seqlen"]) for r in rows] == [(2, 16), (4, 8)]
    assert all(r["padded_ms"] > 0 and r["packed_ms"] > 0 and r["real_fraction"] < 1 for r in rows)
