"""BART against Hugging Face transformers: every head, the cache, generation, and the family contract
(check, ONNX export and verify, static decoding, the summarization pipeline, the seq2seq bench)."""

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import trifuse
from tests.helpers import bench_row_passed
from trifuse import engine, export, kernels
from trifuse.cli import main as trifuse_main
from trifuse.engine import check as check_mod
from trifuse.engine.graphs import StaticDecoder
from trifuse.engine.models.bart import BartCache, Seq2SeqOutput

#: A bart-base-like and a bart-large-like body, scaled down (head dim 16).
SHAPES = {
    "base": dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=40),
    "large": dict(vocab_size=101, d_model=48, encoder_layers=3, decoder_layers=2, encoder_attention_heads=3,
                  decoder_attention_heads=3, encoder_ffn_dim=64, decoder_ffn_dim=56, max_position_embeddings=40,
                  scale_embedding=True, tie_word_embeddings=False),
}
CLASSES = {"BartForConditionalGeneration": T.BartForConditionalGeneration, "BartModel": T.BartModel,
           "BartForSequenceClassification": T.BartForSequenceClassification,
           "BartForQuestionAnswering": T.BartForQuestionAnswering}
TOL = 2e-5


def hf_model(shape="base", cls="BartForConditionalGeneration", scale=0.5, seed=0, **overrides):
    torch.manual_seed(seed)
    model = CLASSES[cls](T.BartConfig(**{**SHAPES[shape], **overrides})).eval()
    # Perturb every tensor (the norms start at exactly 1, final_logits_bias at 0) so a swapped or
    # dropped weight cannot go unnoticed, and the tiny model does not repeat one token.
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.add_(scale * torch.randn_like(t))
    return model


def rel_err(ours, ref) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def batch(b=3, n=13, vocab=99, seed=1, side="right"):
    """Mixed lengths padded with BART's pad token (1) on ``side``; no special tokens inside."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for i, length in enumerate([n, n // 2 + 2, 3, n - 1][:b]):
        if side == "right":
            mask[i, length:] = 0
        else:
            mask[i, : n - length] = 0
    return ids.masked_fill(mask == 0, 1), mask


def decoder_ids(b=3, n=7, vocab=99, seed=2):
    ids = torch.randint(3, vocab, (b, n), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 2  # decoder_start_token_id
    return ids


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """shape -> (hf, checkpoint dir, ours loaded from it): the generation head, saved once."""
    out = {}
    for shape in SHAPES:
        hf = hf_model(shape)
        d = tmp_path_factory.mktemp(f"bart-{shape}")
        hf.save_pretrained(d)
        out[shape] = (hf, d, engine.from_pretrained(d))
    return out


# ----------------------------------------------------------------------------
# Outputs.


@pytest.mark.parametrize("shape", SHAPES)
def test_conditional_generation_matches_hf(shape, saved, reference_backend):
    hf, d, ours = saved[shape]
    assert ours.task == "text2text-generation" and ours.model_type == "bart"
    assert (ours.lm_head is None) == SHAPES[shape].get("tie_word_embeddings", True)
    v = SHAPES[shape]["vocab_size"]
    for side in ("right", "left"):
        ids, mask = batch(vocab=v, side=side)
        dec = decoder_ids(vocab=v)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_hidden_states=True)
            for model in (ours, engine.from_pretrained(hf)):  # by path and by in-memory object
                out = model(ids, attention_mask=mask, decoder_input_ids=dec, output_hidden_states=True)
                assert isinstance(out, Seq2SeqOutput) and out.past_key_values is None
                assert rel_err(out.logits, ref.logits) < TOL
                assert rel_err(out.encoder_last_hidden_state, ref.encoder_last_hidden_state) < TOL
                for name in ("encoder_hidden_states", "decoder_hidden_states"):
                    stack = name.split("_")[0]
                    assert len(out[name]) == len(ref[name]) == model.num_hidden_states(stack)
                    for i, (a, b) in enumerate(zip(out[name], ref[name])):
                        assert rel_err(a, b) < TOL, f"{name}[{i}]"
    # Without decoder_input_ids both decode input_ids shifted right behind the start token.
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits,
                                   hf(input_ids=ids, attention_mask=mask).logits, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_bart_model_classification_and_qa_match_hf(shape, tmp_path, reference_backend):
    v = SHAPES[shape]["vocab_size"]
    ids, mask = batch(b=4, vocab=v)
    lengths = mask.sum(1)
    cls_ids = ids.clone()
    cls_ids[torch.arange(4), lengths - 1] = 2  # one EOS per row, where a tokenizer puts it
    cls_ids[:, 0] = 0
    dec = decoder_ids(b=4, vocab=v)
    labels = {0: "neg", 1: "neutral", 2: "pos", 3: "other"}
    for cls, task in (("BartModel", "feature-extraction"), ("BartForSequenceClassification", "sequence-classification"),
                      ("BartForQuestionAnswering", "question-answering")):
        extra = dict(id2label=labels, label2id={b: a for a, b in labels.items()}) if "Sequence" in cls else {}
        hf = hf_model(shape, cls, **extra)
        hf.save_pretrained(tmp_path / cls)
        ours = engine.from_pretrained(tmp_path / cls)
        assert ours.task == task
        with torch.no_grad():
            if cls == "BartModel":
                for kw in (dict(decoder_input_ids=dec), {}):
                    ref = hf(input_ids=ids, attention_mask=mask, **kw)
                    out = ours(ids, attention_mask=mask, **kw)
                    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < TOL
                    assert rel_err(out.encoder_last_hidden_state, ref.encoder_last_hidden_state) < TOL
                    assert out.logits is None
            elif task == "sequence-classification":
                ref = hf(input_ids=cls_ids, attention_mask=mask)
                out = ours(cls_ids, attention_mask=mask)
                assert out.logits.shape == (4, 4) and rel_err(out.logits, ref.logits) < TOL
                assert ours.id2label == labels
                with pytest.raises(ValueError, match="same number of <eos> tokens"):
                    bad = cls_ids.clone()
                    bad[0, 1] = 2
                    ours(bad, attention_mask=mask)
                with pytest.raises(ValueError, match=r"row\(s\) \[0, 1, 2, 3\] have none"):
                    ours(ids, attention_mask=mask)
            else:
                ref = hf(input_ids=ids, attention_mask=mask)
                out = ours(ids, attention_mask=mask)
                assert rel_err(out.start_logits, ref.start_logits) < TOL
                assert rel_err(out.end_logits, ref.end_logits) < TOL
                assert out.start_logits.shape == ids.shape
        with pytest.raises(ValueError, match="no LM head"):
            ours.generate(ids, mask)


def test_head_from_task_and_missing_final_logits_bias(saved, tmp_path, reference_backend):
    """A generation checkpoint's backbone (feature-extraction), and a checkpoint without
    final_logits_bias (Hugging Face then uses zeros)."""
    hf, d, _ = saved["base"]
    ids, mask = batch()
    dec = decoder_ids()
    backbone = engine.from_pretrained(d, task="feature-extraction")
    with torch.no_grad():
        ref = hf.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        assert rel_err(backbone(ids, mask, decoder_input_ids=dec).last_hidden_state, ref.last_hidden_state) < TOL
    state = load_file(d / "model.safetensors")
    del state["final_logits_bias"]
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    save_file(state, tmp_path / "model.safetensors")
    ours = engine.from_pretrained(tmp_path)
    want = T.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert float(want.final_logits_bias.abs().max()) == 0
    with torch.no_grad():
        assert rel_err(ours(ids, mask, decoder_input_ids=dec).logits,
                       want(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits) < TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_cached_decoding_equals_full_pass(shape, saved, reference_backend):
    hf, _, ours = saved[shape]
    v = SHAPES[shape]["vocab_size"]
    ids, mask = batch(vocab=v)
    dec = decoder_ids(n=9, vocab=v)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        out = ours(ids, mask, decoder_input_ids=dec[:, :3], use_cache=True)
        logits = [out.logits]
        for t in range(3, 9):  # the positions count the cached tokens (BART's learned positions, offset 2)
            out = ours(decoder_input_ids=dec[:, t:t + 1], past_key_values=out.past_key_values)
            logits.append(out.logits)
    assert isinstance(out.past_key_values, BartCache) and out.past_key_values.length == 9
    assert rel_err(torch.cat(logits, 1), ref) < TOL


# ----------------------------------------------------------------------------
# Generation: every feature from the shared front-end, token for token.


def _same(hf, ours, ids, mask, **kw):
    want = hf.generate(ids, attention_mask=mask, do_sample=False, **kw)
    got = ours.generate(ids, mask, **kw)
    assert got.shape == want.shape and torch.equal(got, want), kw
    return got


def _eos_for(ours, ids, mask) -> int:
    """The most frequent token of a free greedy run (the forced last token excluded): an EOS that
    these tiny models do produce, so hypotheses finish mid-search."""
    free = ours.generate(ids, mask, max_new_tokens=8, eos_token_id=[])[:, 1:-1].flatten()
    return int(torch.mode(free[free > 2]).values)


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_and_beam_search_match_hf(shape, saved, reference_backend):
    hf, _, ours = saved[shape]
    v = SHAPES[shape]["vocab_size"]
    ids, mask = batch(b=4, n=9, vocab=v)
    eos = _eos_for(ours, ids, mask)
    cases = [dict(num_beams=1), dict(num_beams=2, length_penalty=2.0, early_stopping=True),
             dict(num_beams=3, early_stopping="never", length_penalty=0.5), dict(num_beams=2, no_repeat_ngram_size=2)]
    if shape == "base":  # the rest of the matrix once
        cases += [dict(num_beams=3, early_stopping=True), dict(num_beams=3, num_return_sequences=2),
                  dict(num_beams=1, no_repeat_ngram_size=2), dict(num_beams=1, repetition_penalty=1.8),
                  dict(num_beams=2, min_length=8), dict(num_beams=3, eos_token_id=[eos, 5])]
    saw_eos = False
    for kw in cases:
        got = _same(hf, ours, ids, mask, **{"max_new_tokens": 10, "eos_token_id": eos, **kw})
        saw_eos |= bool((got[:, 1:-1] == eos).any())
    assert saw_eos, "EOS never generated: the test does not exercise finished hypotheses"
    # Left-padded sources (BART's positions ignore the padding, in both), and the checkpoint's own
    # defaults: EOS 2 and forced_eos_token_id 2 from its generation config.
    left, lmask = batch(b=4, n=9, vocab=v, side="left")
    for kw in (dict(num_beams=1, eos_token_id=eos), dict(num_beams=3, eos_token_id=eos), dict(num_beams=2)):
        got = _same(hf, ours, left, lmask, max_new_tokens=6, **kw)
    assert ((got[:, -1] == 2) | (got[:, -1] == 1)).all()
    one = ids[1:2, : int(mask[1].sum())]  # unpadded, no mask
    want = hf.generate(one, max_new_tokens=8, do_sample=False, num_beams=3)
    assert torch.equal(ours.generate(one, max_new_tokens=8, num_beams=3), want)


def test_sampling_matches_hf(saved, reference_backend):
    hf, _, ours = saved["large"]
    ids, mask = batch(b=3, n=9, vocab=101)
    for nb, kw in ((1, dict(top_k=10, temperature=0.7, top_p=0.9)), (2, dict(top_k=0, top_p=0.8, temperature=1.3)),
                   (1, dict(top_k=5, num_return_sequences=2))):
        torch.manual_seed(5)
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, num_beams=nb, **kw)
        torch.manual_seed(5)
        got = ours.generate(ids, mask, max_new_tokens=8, do_sample=True, num_beams=nb, **kw)
        assert got.shape == want.shape and torch.equal(got, want), (nb, kw)


def test_forced_bos_and_eos_match_hf(saved, reference_backend):
    hf, _, ours = saved["base"]
    ids, mask = batch(b=3, n=9)
    assert ours.config.forced_eos_token_id == 2 and ours.generation_config["forced_eos_token_id"] == 2
    for kw in (dict(forced_bos_token_id=0), dict(forced_eos_token_id=[9, 11]),
               dict(forced_bos_token_id=5, forced_eos_token_id=9, num_beams=2, no_repeat_ngram_size=2)):
        got = _same(hf, ours, ids, mask, max_new_tokens=6, eos_token_id=None, **kw)
        if "forced_bos_token_id" in kw:
            assert (got[:, 1] == kw["forced_bos_token_id"]).all()
    with pytest.raises(ValueError, match=r"forced_bos_token_id=999 is outside the vocabulary"):
        ours.generate(ids, mask, forced_bos_token_id=999)


def test_triton_kernels_under_interpreter():
    """Once with the Triton kernels (interpreted on the CPU): encoder, cached decode steps, beams."""
    hf = hf_model("base", decoder_layers=1, encoder_layers=1)
    ours = engine.from_pretrained(hf)
    ids, mask = batch(b=2, n=8)
    dec = decoder_ids(b=2, n=4)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        out = ours(ids, mask, decoder_input_ids=dec[:, :2], use_cache=True)
        logits = [out.logits]
        for t in range(2, 4):
            out = ours(decoder_input_ids=dec[:, t:t + 1], past_key_values=out.past_key_values)
            logits.append(out.logits)
    assert rel_err(out.encoder_last_hidden_state, ref.encoder_last_hidden_state) < TOL
    assert rel_err(torch.cat(logits, 1), ref.logits) < TOL
    want = hf.generate(ids, attention_mask=mask, num_beams=2, max_new_tokens=2, do_sample=False)
    assert torch.equal(ours.generate(ids, mask, num_beams=2, max_new_tokens=2), want)


# ----------------------------------------------------------------------------
# Through the family contract: check, export, static decoding, pipeline, bench.


def test_trifuse_check_passes(saved, tmp_path):
    _, d, _ = saved["large"]
    report = check_mod.check(d, dtype="bf16", device="cpu", seq=12)
    assert report.ok, report
    fp32 = [r for r in report.rows if r.dtype == "fp32"]
    assert [r.output for r in fp32] == ["logits", "encoder_last_hidden_state"], fp32
    assert all(r.rel < 1e-5 for r in fp32), fp32
    cls = hf_model("base", "BartForSequenceClassification")
    cls.save_pretrained(tmp_path / "cls")
    report = check_mod.check(tmp_path / "cls", dtype="fp32", device="cpu", seq=10)
    assert report.ok and [r.output for r in report.rows] == ["logits", "encoder_last_hidden_state"], report


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The base shape without forced EOS (ort_generate_greedy applies no forced tokens), exported."""
    with kernels.use_backend("reference"):
        model = engine.from_pretrained(hf_model("base", scale=0.2, forced_eos_token_id=None))
        base = tmp_path_factory.mktemp("bart-onnx") / "bart.onnx"
        paths = export.to_onnx(model, base)
    return model, base, paths


def test_onnx_export_verify_and_greedy(exported, monkeypatch):
    from trifuse.export import runtime as ox

    model, base, (enc, dec) = exported
    assert enc.name == "bart.encoder.onnx" and dec.name == "bart.decoder.onnx"
    assert export.read_metadata(dec)["trifuse.graph"] == "decoder"
    report = export.verify(base, model)
    assert report.ok, str(report)
    assert {r.stage for r in report.rows} == {"encoder", "prefill", "step"}
    assert all(r.max_rel <= 1e-4 and r.mismatches == 0 for r in report.rows), str(report)
    ids, mask = batch(b=3, n=10)
    with kernels.use_backend("reference"):
        want = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    got = export.ort_generate_greedy(base, ids, mask, max_new_tokens=12, eos_token_id=[],
                                     providers=["CPUExecutionProvider"])
    assert torch.equal(got, want)
    assert len(set(want[:, 1:].flatten().tolist())) > 3, "a degenerate model would make this test weak"
    # The config's forced last token (BART's checkpoints set forced_eos_token_id=2) applies in ONNX
    # Runtime as in model.generate: the file's recorded config, here with forced_eos_token_id=7.
    real = ox._metadata

    def forced_meta(runner):
        meta = dict(real(runner))
        meta["trifuse.config"] = json.dumps({**json.loads(meta["trifuse.config"]), "forced_eos_token_id": 7})
        return meta

    with kernels.use_backend("reference"):
        want = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[], forced_eos_token_id=7)
    assert (want[:, -1] == 7).all()
    monkeypatch.setattr(ox, "_metadata", forced_meta)
    got = export.ort_generate_greedy(base, ids, mask, max_new_tokens=6, eos_token_id=[],
                                     providers=["CPUExecutionProvider"])
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", SHAPES)
def test_static_decoder_equals_generate(shape, saved, reference_backend):
    _, _, model = saved[shape]
    ids, mask = batch(b=3, n=11, vocab=SHAPES[shape]["vocab_size"])  # padded up to the 16 bucket
    dec = StaticDecoder(model, max_len=16, kv_buckets=(4, 8), encoder_lengths=(16, 32))
    kw = dict(max_new_tokens=12, eos_token_id=[])
    torch.testing.assert_close(dec.generate(ids, mask, **kw), model.generate(ids, mask, **kw), rtol=0, atol=0)
    for kw in (dict(max_new_tokens=9, num_beams=3, length_penalty=0.8),):
        torch.testing.assert_close(dec.generate(ids, mask, **kw), model.generate(ids, mask, **kw), rtol=0, atol=0)
    assert (3, 3, 16) in dec.states and (9, 3, 16) in dec.states
    with pytest.raises(ValueError, match="exceeds this decoder's max_len=16"):
        dec.generate(ids, mask, max_new_tokens=16)


def _tokenizer():
    from tokenizers import ByteLevelBPETokenizer

    corpus = ["studies have shown that owning a dog is good for you", "the cat sat on the mat",
              "a quick brown fox jumps over the lazy dog", "summaries are short texts about long ones"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                            show_progress=False)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return T.BartTokenizer(vocab=model["vocab"], merges=merges, model_max_length=40)  # GPT-2's byte-level BPE


def test_summarization_pipeline_matches_hf(tmp_path, reference_backend):
    tok = _tokenizer()
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    params = {"summarization": {"num_beams": 3, "max_length": 12, "min_length": 4, "no_repeat_ngram_size": 3,
                                "length_penalty": 2.0, "early_stopping": True}}
    hf = hf_model("base", vocab_size=len(tok), forced_bos_token_id=0, task_specific_params=params)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    hf = T.BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    text = ["studies have shown that owning a dog is good for you", "the cat sat on the mat", "naïve café ☕"]
    summ = trifuse.pipeline("summarization", tmp_path, device="cpu", batch_size=2)
    for kw in ({}, dict(num_beams=1, max_length=9)):
        want = []
        for x in text:
            out = hf.generate(**tok(x, return_tensors="pt"), **{**params["summarization"], **kw})
            want.append({"summary_text": tok.decode(out[0], skip_special_tokens=True,
                                                    clean_up_tokenization_spaces=False)})
        assert summ(text, **kw) == want, kw
    assert any(w["summary_text"] for w in want)


def test_bench_seq2seq_suite_runs_bart_tiny(tmp_path):
    rc = trifuse_main(["bench", "bart-tiny", "--quick", "--backends", "trifuse", "reference", "hf-eager",
                       "--out", str(tmp_path)])
    assert rc == 0
    (result,) = list(tmp_path.glob("seq2seq-*.json"))
    rows = json.loads(result.read_text())["rows"]
    assert rows and all(bench_row_passed(r) for r in rows), rows
    assert {r["op"] for r in rows} == {"bart-tiny encoder", "bart-tiny decode"}


# ----------------------------------------------------------------------------
# Bad input: clear errors before any work.


def test_bad_inputs(saved, reference_backend):
    _, _, ours = saved["base"]
    ids, mask = batch()
    dec = decoder_ids()
    cases = [
        (lambda: ours(ids.float(), mask, decoder_input_ids=dec), "input_ids must be an integer tensor"),
        (lambda: ours(ids, mask, decoder_input_ids=dec + 200), r"token ids must lie in \[0, 99\)"),
        (lambda: ours(ids, mask[:, :5], decoder_input_ids=dec), "attention_mask has shape"),
        (lambda: ours(ids, mask, decoder_input_ids=dec, decoder_attention_mask=mask), "decoder_attention_mask"),
        (lambda: ours(torch.randint(3, 99, (1, 41)), decoder_input_ids=dec[:1]), "position table holds 40"),
        (lambda: ours(ids, mask, decoder_input_ids=dec[:2]), "multiple of the encoder batch"),
        (lambda: ours(decoder_input_ids=dec), "pass input_ids, encoder_outputs"),
        (lambda: ours(ids, mask, decoder_input_ids=dec, past_key_values=object()), "trifuse BartCache"),
        (lambda: ours.generate(ids, mask, max_new_tokens=40), "exceeds the position table"),
        (lambda: ours.generate(ids, mask, decoder_start_token_id=500), "decoder_start_token_id must be"),
        (lambda: ours.new_cache(2, 0), "max_len must be a positive int"),
    ]
    for call, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            call()


def test_bad_checkpoints(saved, tmp_path):
    _, d, _ = saved["base"]
    config = json.loads((d / "config.json").read_text())
    state = load_file(d / "model.safetensors")

    def write(cfg, st):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        save_file(st, tmp_path / "model.safetensors")
        return tmp_path

    missing = {k: v for k, v in state.items() if "layers.1.encoder_attn.k_proj.weight" not in k}
    with pytest.raises(ValueError, match=r"missing tensors: model\.decoder\.layers\.1\.encoder_attn\.k_proj\.weight"):
        engine.from_pretrained(write(config, missing))
    shaped = {**state, "model.encoder.layers.0.fc1.weight": torch.zeros(41, 32)}
    with pytest.raises(ValueError, match=r"mis-shaped tensors: model\.encoder\.layers\.0\.fc1\.weight"):
        engine.from_pretrained(write(config, shaped))
    with pytest.raises(ValueError, match="unexpected tensors: model.extra"):
        engine.from_pretrained(write(config, {**state, "model.extra": torch.zeros(1)}))
    with pytest.raises(ValueError, match="BART head BartForCausalLM is not supported"):
        engine.from_pretrained(write({**config, "architectures": ["BartForCausalLM"]}, state))
    with pytest.raises(ValueError, match="not divisible by decoder_attention_heads"):
        engine.from_pretrained(write({**config, "decoder_attention_heads": 3}, state))
    with pytest.raises(ValueError, match="unsupported activation"):
        engine.from_pretrained(write({**config, "activation_function": "mish"}, state))
    with pytest.raises(ValueError, match="unknown task 'nope' for bart"):
        engine.from_pretrained(d, task="nope")
