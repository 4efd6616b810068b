"""T5 against Hugging Face transformers: outputs, the in-kernel relative bias, the cache, generation."""

import dataclasses
import inspect
import json
import re

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from tests.helpers import HF_BEAM_SAMPLE
from trifuse import engine, kernels
from trifuse.engine import beam_search as bs
from trifuse.engine import generation as gen
from trifuse.engine.models.t5 import Seq2SeqOutput, T5Cache

FLAVOURS = ("relu", "gated-gelu")  # original T5 (tied, scaled head), T5 v1.1 / FLAN-T5 (untied flag)
SMALL = dict(vocab_size=99, d_model=64, d_kv=16, num_heads=4, d_ff=37, num_layers=2, num_decoder_layers=2,
             relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
             pad_token_id=0, eos_token_id=1)
CLASSES = {"T5ForConditionalGeneration": T.T5ForConditionalGeneration, "T5Model": T.T5Model,
           "T5EncoderModel": T.T5EncoderModel}


def hf_model(flavour="relu", cls="T5ForConditionalGeneration", scale=0.1, seed=0, **overrides):
    torch.manual_seed(seed)
    config = T.T5Config(**{**SMALL, "feed_forward_proj": flavour, "tie_word_embeddings": flavour == "relu",
                           **overrides})
    model = CLASSES[cls](config).eval()
    # Perturb every tensor (the norms start at exactly 1) so a swapped or dropped weight cannot
    # go unnoticed; the generation tests use a larger perturbation so the tiny model does not
    # just repeat one token.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def rel_err(ours, ref) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def real(x, mask):
    """The real tokens of a padded ``[B, L, ...]`` encoder output: padded batches run packed
    (engine.packing), which leaves zeros where Hugging Face computes padding tokens."""
    return x[mask.bool().to(x.device)]


def encoder_batch(b=3, n=50, seed=1):
    """Mixed lengths, right-padded with the pad token (0). n=50 > 2 * max_distance."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for i, length in enumerate([n, n // 2 + 3, 4][:b]):
        mask[i, length:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def decoder_batch(b=3, n=45, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (b, n), generator=g)
    ids[:, 0] = 0  # the decoder start token
    return ids


@pytest.fixture(scope="module")
def pairs():
    """(hf, ours) per flavour, for the parity tests."""
    out = {}
    for flavour in FLAVOURS:
        hf = hf_model(flavour)
        out[flavour] = (hf, engine.from_pretrained(hf))
    return out


@pytest.fixture(scope="module")
def gen_pairs():
    """(hf, ours, prompts, mask) per flavour with non-degenerate greedy/beam outputs."""
    out = {}
    for flavour in FLAVOURS:
        hf = hf_model(flavour, scale=0.5)
        ids, mask = encoder_batch(b=4, n=9)
        mask[3, 7:] = 0
        out[flavour] = (hf, engine.from_pretrained(hf), ids.masked_fill(mask == 0, 0), mask)
    return out


# ----------------------------------------------------------------------------
# Outputs.


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_conditional_generation_matches_hf(flavour, pairs, tmp_path, reference_backend):
    hf, _ = pairs[flavour]
    hf.save_pretrained(tmp_path)
    ids, mask = encoder_batch()
    dec = decoder_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_hidden_states=True)
        for source in (tmp_path, hf):  # by path and by in-memory object
            model = engine.from_pretrained(source)
            assert model.task == "text2text-generation"
            out = model(ids, attention_mask=mask, decoder_input_ids=dec, output_hidden_states=True)
            assert rel_err(out.logits, ref.logits) < 1e-5
            assert rel_err(real(out.encoder_last_hidden_state, mask), real(ref.encoder_last_hidden_state, mask)) < 1e-5
            for name in ("encoder_hidden_states", "decoder_hidden_states"):
                assert len(out[name]) == len(ref[name]) == 3
                for i, (a, b) in enumerate(zip(out[name], ref[name])):
                    if name.startswith("encoder"):
                        a, b = real(a, mask), real(b, mask)
                    assert rel_err(a, b) < 1e-5, f"{name}[{i}]"
            assert out.past_key_values is None


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_t5model_and_encoder_model_match_hf(flavour, tmp_path, reference_backend):
    ids, mask = encoder_batch()
    dec = decoder_batch(n=12)
    for cls, task in (("T5Model", "feature-extraction"), ("T5EncoderModel", "encoder")):
        hf = hf_model(flavour, cls)
        hf.save_pretrained(tmp_path / cls)
        with torch.no_grad():
            if cls == "T5Model":
                ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
            else:
                ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            for source in (tmp_path / cls, hf):
                model = engine.from_pretrained(source)
                assert model.task == task
                if cls == "T5Model":
                    out = model(ids, attention_mask=mask, decoder_input_ids=dec)
                    assert out.logits is None and "logits" not in out.keys()
                    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-5
                    assert rel_err(real(out.encoder_last_hidden_state, mask),
                                   real(ref.encoder_last_hidden_state, mask)) < 1e-5
                else:
                    out = model(ids, attention_mask=mask, output_hidden_states=True)
                    assert rel_err(real(out.last_hidden_state, mask), real(ref.last_hidden_state, mask)) < 1e-5
                    assert len(out.hidden_states) == len(ref.hidden_states)
                    assert model.decoder is None
    # The encoder of a full checkpoint loads alone, and a backbone under "transformer." too.
    hf = hf_model(flavour, "T5ForConditionalGeneration")
    enc = engine.from_pretrained(hf, task="encoder")
    with torch.no_grad():
        assert rel_err(real(enc(ids, mask).last_hidden_state, mask),
                       real(hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)) < 1e-5
    torch.manual_seed(0)
    cls_model = T.T5ForSequenceClassification(hf.config).eval()
    backbone = engine.from_pretrained(cls_model, task="feature-extraction")
    with torch.no_grad():
        want = cls_model.transformer(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).last_hidden_state
        assert rel_err(backbone(ids, mask, decoder_input_ids=dec).last_hidden_state, want) < 1e-5


def test_untied_head_and_output_scaling(tmp_path, reference_backend):
    """transformers 5.x forces tie_word_embeddings=True into T5 configs: the tensors decide."""
    hf = hf_model("gated-gelu")
    hf.lm_head = torch.nn.Linear(64, 99, bias=False)  # a head of its own, as FLAN-T5 checkpoints have
    ids, mask = encoder_batch()
    dec = decoder_batch(n=7)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        ours = engine.from_pretrained(hf)
        assert ours.lm_head is not None and not ours.config.scale_decoder_outputs
        assert rel_err(ours(ids, mask, decoder_input_ids=dec).logits, ref) < 1e-5
    # On disk: an old-style config (tie_word_embeddings=false, no scale_decoder_outputs) and a stored head.
    tied = hf_model("gated-gelu")
    tied.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("scale_decoder_outputs", None)
    cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = hf.lm_head.weight.detach().clone()
    save_file(state, tmp_path / "model.safetensors")
    ours = engine.from_pretrained(tmp_path)
    assert ours.lm_head is not None and not ours.config.scale_decoder_outputs
    with torch.no_grad():
        tied.lm_head = hf.lm_head  # Hugging Face's model of that checkpoint
        assert rel_err(ours(ids, mask, decoder_input_ids=dec).logits,
                       tied(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits) < 1e-5
    # Original T5: the head is the embeddings and the decoder output is scaled.
    relu = engine.from_pretrained(hf_model("relu"))
    assert relu.lm_head is None and relu.config.scale_decoder_outputs


# ----------------------------------------------------------------------------
# The relative position bias, computed in the kernel (Triton under the interpreter on the CPU).


def _hf_bias(attn, lq: int, lk: int, start: int) -> torch.Tensor:
    params = inspect.signature(attn.compute_bias).parameters
    if "past_seen_tokens" in params:
        return attn.compute_bias(lq, lk, past_seen_tokens=start)
    if "cache_position" in params:
        return attn.compute_bias(lq, lk, cache_position=torch.arange(start, start + lq))
    assert start == lk - lq
    return attn.compute_bias(lk, lk)[:, :, -lq:]


def test_relative_bias_matches_hf_compute_bias(pairs, device):
    hf, ours = pairs["relu"]
    g = torch.Generator().manual_seed(3)
    enc_attn = hf.encoder.block[0].layer[0].SelfAttention
    dec_attn = hf.decoder.block[0].layer[0].SelfAttention
    # Encoder (bidirectional) at 50 positions, decoder (causal) with 0, 3 and 1 new queries
    # after a cache: distances well past max_distance=20 (and 2 * max_distance) both ways.
    cases = [(enc_attn, ours.encoder.rel(), 50, 50, 0, False),
             (dec_attn, ours.decoder.rel(0), 50, 50, 0, True),
             (dec_attn, ours.decoder.rel(44), 3, 47, 44, True),
             (dec_attn, ours.decoder.rel(60), 1, 61, 60, True)]
    for attn, rel, lq, lk, start, causal in cases:
        q = torch.randn(2, 4, lq, 16, generator=g)
        k = torch.randn(2, 4, lk, 16, generator=g)
        v = torch.randn(2, 4, lk, 16, generator=g)
        with torch.no_grad():
            bias = _hf_bias(attn, lq, lk, start).float()  # [1, H, Lq, Lk]
        scores = q @ k.transpose(-1, -2) + bias
        if causal:
            scores = scores.masked_fill(torch.arange(lk)[None, :] > torch.arange(lq)[:, None] + start, float("-inf"))
        want = scores.softmax(-1) @ v
        rel = dataclasses.replace(rel, table=rel.table.to(device))
        got = kernels.attention(q.to(device), k.to(device), v.to(device), causal=causal, relative_bias=rel,
                                scale=1.0)
        assert rel_err(got.cpu(), want) < 1e-5, (lq, lk, start)


# ----------------------------------------------------------------------------
# The cache.


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_cached_decoding_equals_full_pass(flavour, pairs, reference_backend):
    hf, ours = pairs[flavour]
    ids, mask = encoder_batch()
    dec = decoder_batch(n=45)
    dmask = torch.ones_like(dec)
    dmask[1, 30:] = 0  # a right-padded decoder row
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
        full = ours(ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
        # A padded decoder batch runs packed (engine.packing): zeros at its padded position.
        assert rel_err(real(full, dmask), real(ref, dmask)) < 1e-5 and not full[1, 30:].any()
        # A prefix, one token at a time, then a chunk; masks for the new tokens or the whole history.
        out = ours(ids, mask, decoder_input_ids=dec[:, :10], decoder_attention_mask=dmask[:, :10], use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, T5Cache) and cache.length == 10
        logits, enc = [out.logits], out.encoder_last_hidden_state
        for t in range(10, 24):
            out = ours(decoder_input_ids=dec[:, t:t + 1], decoder_attention_mask=dmask[:, t:t + 1],
                       past_key_values=cache)
            logits.append(out.logits)
        out = ours(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec[:, 24:],
                   decoder_attention_mask=dmask, past_key_values=cache)
        logits.append(out.logits)
        assert cache.length == 45 and out.encoder_last_hidden_state is enc
        assert rel_err(torch.cat(logits, 1), ref) < 1e-5
        # A cache of fixed capacity is written in place: no reallocation, no concatenation.
        cache = ours.new_cache(3, 8)
        ptr = cache.keys.data_ptr()
        out = ours(ids, mask, decoder_input_ids=dec[:, :4], past_key_values=cache)
        for t in range(4, 8):
            out = ours(decoder_input_ids=dec[:, t:t + 1], past_key_values=cache)
        assert cache.keys.data_ptr() == ptr and cache.length == 8
        assert rel_err(out.logits[:, -1], ref[:, 7]) < 1e-5


def test_cache_reorder_is_an_index_select(pairs, reference_backend):
    _, ours = pairs["relu"]
    ids, mask = encoder_batch(b=2)
    cache = ours.new_cache(4, 6)  # 2 beams per encoder row
    dec = decoder_batch(b=4, n=3)
    with torch.no_grad():
        ours(ids, mask, decoder_input_ids=dec, past_key_values=cache)
    keys, ptr = cache.keys.clone(), cache.keys.data_ptr()
    idx = torch.tensor([1, 1, 2, 3])
    cache.reorder(idx)
    assert cache.keys.data_ptr() == ptr
    assert torch.equal(cache.keys[:, :, :, :3], keys[:, idx, :, :3])
    # Beams share their encoder row's cross keys/values: row 2i and 2i+1 read encoder row i.
    assert cache.cross_kv.shape[0] == 2
    with torch.no_grad():
        grouped = ours(decoder_input_ids=dec[:, :1], past_key_values=ours.new_cache(4, 2), encoder_outputs=(
            ours.encode(ids, mask).last_hidden_state,), attention_mask=mask).logits
        expanded = ours(ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), decoder_input_ids=dec[:, :1]).logits
    assert rel_err(grouped, expanded) < 1e-5


# ----------------------------------------------------------------------------
# Generation against Hugging Face's generate.


def _eos_for(hf, ids, mask) -> int:
    """A token the model actually produces early on, so that EOS handling is exercised."""
    free = hf.generate(ids, attention_mask=mask, num_beams=3, max_new_tokens=6, do_sample=False, eos_token_id=None)
    tokens = free[:, 1:6].flatten()
    tokens = tokens[tokens != 0]
    return int(torch.mode(tokens).values)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_greedy_and_beam_search_match_hf(flavour, gen_pairs, reference_backend):
    hf, ours, ids, mask = gen_pairs[flavour]
    eos = _eos_for(hf, ids, mask)
    saw_eos = False
    cases = [dict(num_beams=1)]
    cases += [dict(num_beams=nb, early_stopping=es, length_penalty=lp)
              for nb in (2, 3) for es in (False, True, "never") for lp in (1.0, 2.0)]
    cases += [dict(num_beams=3, early_stopping=es, length_penalty=0.5) for es in (False, "never")]
    cases += [dict(num_beams=2, length_penalty=-1.0), dict(num_beams=3, eos_token_id=[eos, 5])]
    for kw in cases:
        kw = {"eos_token_id": eos, **kw}
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kw)
        got = ours.generate(ids, mask, max_new_tokens=10, **kw)
        assert got.shape == want.shape and torch.equal(got, want), kw
        saw_eos |= bool((got[:, 1:] == eos).any())
    assert saw_eos, "EOS never generated: the test does not exercise finished hypotheses"
    # Single prompts, unpadded and no mask given (Hugging Face builds it the same way).
    for row, nb in ((0, 1), (1, 3)):
        one = ids[row:row + 1, : int(mask[row].sum())]
        want = hf.generate(one, max_new_tokens=8, do_sample=False, num_beams=nb, eos_token_id=eos)
        assert torch.equal(ours.generate(one, max_new_tokens=8, num_beams=nb, eos_token_id=eos), want)


def test_sampling_matches_hf(gen_pairs, reference_backend):
    """Same seed, same draws: Hugging Face's warpers (top_k=0 disables its default of 50)."""
    hf, ours, ids, mask = gen_pairs["relu"]
    cases = [(1, dict(top_k=0)), (1, dict(top_k=10, temperature=0.7, top_p=0.9)),
             (2, dict(top_k=0, top_p=0.8, temperature=1.3)), (3, dict(top_k=5))]
    for nb, kw in cases if HF_BEAM_SAMPLE else cases[:2]:  # beam sampling: transformers >= 5.24
        torch.manual_seed(5)
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, num_beams=nb,
                           eos_token_id=14, **kw)
        torch.manual_seed(5)
        got = ours.generate(ids, mask, max_new_tokens=8, do_sample=True, num_beams=nb, eos_token_id=14, **kw)
        assert got.shape == want.shape and torch.equal(got, want), (nb, kw)
    g1, g2 = (torch.Generator().manual_seed(7) for _ in range(2))
    a = ours.generate(ids, mask, max_new_tokens=6, do_sample=True, generator=g1)
    assert torch.equal(a, ours.generate(ids, mask, max_new_tokens=6, do_sample=True, generator=g2))


def test_repetition_penalty_matches_hf(gen_pairs, reference_backend):
    """The shared decoding front-end gives T5 the repetition penalty: over the decoder ids (start token
    included), greedy, beams and sampling, as Hugging Face's encoder-decoder generate applies it."""
    hf, ours, ids, mask = gen_pairs["gated-gelu"]
    for kw in (dict(num_beams=1), dict(num_beams=3), dict(num_beams=2, no_repeat_ngram_size=2),
               dict(num_beams=1, repetition_penalty=0.7)):
        kw = {"repetition_penalty": 1.9, **kw}
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kw)
        got = ours.generate(ids, mask, max_new_tokens=10, **kw)
        assert got.shape == want.shape and torch.equal(got, want), kw
    torch.manual_seed(2)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0, repetition_penalty=1.5)
    torch.manual_seed(2)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=8, do_sample=True, repetition_penalty=1.5), want)


def test_forced_bos_and_eos_match_hf(gen_pairs, reference_backend):
    """Hugging Face's forced first and last tokens (BART's checkpoints set them), for every decoder."""
    hf, ours, ids, mask = gen_pairs["relu"]
    for kw in (dict(forced_bos_token_id=7), dict(forced_eos_token_id=9), dict(forced_eos_token_id=[9, 11]),
               dict(forced_bos_token_id=7, forced_eos_token_id=9, num_beams=3)):
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, **kw)
        got = ours.generate(ids, mask, max_new_tokens=6, eos_token_id=[], **kw)
        assert got.shape == want.shape and torch.equal(got, want), kw
    assert (got[:, 1] == 7).all()
    with pytest.raises(ValueError, match=r"forced_bos_token_id=999 is outside the vocabulary"):
        ours.generate(ids, mask, forced_bos_token_id=999)


def test_encoder_and_cross_projection_run_once(gen_pairs, reference_backend, monkeypatch):
    _, ours, ids, mask = gen_pairs["gated-gelu"]
    calls = {"encoder": 0, "cross": 0}
    enc_fwd, proj = ours.encoder.forward, ours.decoder.project_encoder

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(ours.encoder, "forward", counting("encoder", enc_fwd))
    monkeypatch.setattr(ours.decoder, "project_encoder", counting("cross", proj))
    out = ours.generate(ids, mask, max_new_tokens=6, num_beams=3, eos_token_id=[])
    assert out.shape == (4, 7) and calls == {"encoder": 1, "cross": 1}


def test_triton_kernels_under_interpreter(device):
    """Once with the Triton kernels (interpreted on the CPU): encoder, cached decode steps, beams."""
    hf = hf_model("gated-gelu")
    ours = engine.from_pretrained(hf, device=device)
    ids, mask = encoder_batch(b=2, n=45)
    dec = decoder_batch(b=2, n=5)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        out = ours(ids.to(device), mask.to(device), decoder_input_ids=dec[:, :2].to(device), use_cache=True)
        logits = [out.logits]
        for t in range(2, 5):
            out = ours(decoder_input_ids=dec[:, t:t + 1].to(device), past_key_values=out.past_key_values)
            logits.append(out.logits)
    assert rel_err(real(out.encoder_last_hidden_state.cpu(), mask), real(ref.encoder_last_hidden_state, mask)) < 2e-5
    assert rel_err(torch.cat(logits, 1).cpu(), ref.logits) < 2e-5
    want = hf.generate(ids, attention_mask=mask, num_beams=2, max_new_tokens=2, do_sample=False)
    assert torch.equal(ours.generate(ids.to(device), mask.to(device), num_beams=2, max_new_tokens=2).cpu(), want)


# ----------------------------------------------------------------------------
# Low precision.


def test_fp16_and_bf16(reference_backend):
    hf = hf_model("gated-gelu")
    ids, mask = encoder_batch(n=20)
    dec = decoder_batch(n=8)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 8e-2)):
            ours = engine.from_pretrained(hf, dtype=dtype)
            out = ours(ids, mask, decoder_input_ids=dec).logits
            assert out.dtype == dtype and rel_err(out, ref) < tol
            wo = ours.decoder.layers[0].ffn.wo.weight.dtype
            assert wo == (torch.float32 if dtype == torch.float16 else dtype)
        # A feed-forward output past fp16's range (65504): the fp32 residual stream carries it.
        hf.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(2e4)
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        ours = engine.from_pretrained(hf, dtype="fp16")
        out = ours(ids, mask, decoder_input_ids=dec).logits
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-2


# ----------------------------------------------------------------------------
# Errors.


def test_bad_generation_arguments(gen_pairs, reference_backend):
    _, ours, ids, mask = gen_pairs["relu"]
    bad = [(dict(num_beams=0), "num_beams must be an int >= 1"),
           (dict(num_beams=2.0), "num_beams must be an int >= 1"),
           (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
           (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
           (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
           (dict(do_sample=True, temperature=0.0), "temperature=0 is not valid for sampling"),
           (dict(do_sample=True, top_p=1.5), r"top_p must lie in \(0, 1\]"),
           (dict(do_sample=True, top_k=-1), "top_k must be an int >= 0"),
           (dict(decoder_start_token_id=99), r"decoder_start_token_id must be a token id in \[0, 99\)"),
           (dict(eos_token_id=-3), "eos_token_id must be a non-negative int")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            ours.generate(ids, mask, **kw)
    no_start = engine.from_pretrained(hf_model("relu", decoder_start_token_id=None))
    with pytest.raises(ValueError, match="decoder_start_token_id is not set"):
        no_start.generate(ids, mask, max_new_tokens=2)
    assert no_start.generate(ids, mask, max_new_tokens=2, decoder_start_token_id=0).shape[1] <= 3
    encoder = engine.from_pretrained(hf_model("relu"), task="encoder")
    with pytest.raises(ValueError, match="loaded for 'encoder'"):
        encoder.generate(ids, mask)
    with pytest.raises(ValueError, match="loaded as an encoder"):
        encoder(ids, mask, decoder_input_ids=ids[:, :1])


def test_bad_forward_inputs(pairs, reference_backend):
    _, ours = pairs["relu"]
    ids, mask = encoder_batch(b=2, n=10)
    dec = decoder_batch(b=2, n=5)
    with pytest.raises(ValueError, match="decoder_input_ids is required"):
        ours(ids, mask)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 99\); got \[.*, 99\]"):
        ours(ids.masked_fill(ids == ids.max(), 99), mask, decoder_input_ids=dec)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 9\), expected \(2, 10\)"):
        ours(ids, mask[:, :9], decoder_input_ids=dec)
    with pytest.raises(ValueError, match="decoder_input_ids must be an integer tensor"):
        ours(ids, mask, decoder_input_ids=dec.float())
    with pytest.raises(ValueError, match="pass input_ids, encoder_outputs"):
        ours(decoder_input_ids=dec)
    cache = ours.new_cache(2, 4)
    with pytest.raises(ValueError, match=r"5 positions \(0 cached \+ 5 new\) exceed the cache's capacity of 4"):
        ours(ids, mask, decoder_input_ids=dec, past_key_values=cache)
    with pytest.raises(ValueError, match="past_key_values holds 2 rows but decoder_input_ids has 1"):
        ours(ids[:1], mask[:1], decoder_input_ids=dec[:1], past_key_values=cache)
    with pytest.raises(TypeError, match="past_key_values must be a trifuse T5Cache"):
        ours(ids, mask, decoder_input_ids=dec, past_key_values=((1, 2),))
    with pytest.raises(ValueError, match=r"decoder batch \(3\) must be a multiple of the encoder batch \(2\)"):
        ours(ids, mask, decoder_input_ids=decoder_batch(b=3, n=2))
    # A cache the model starts itself grows.
    with torch.no_grad():
        out = ours(ids, mask, decoder_input_ids=dec[:, :1], use_cache=True)
        for _ in range(70):
            out = ours(decoder_input_ids=dec[:, :1], past_key_values=out.past_key_values)
    assert out.past_key_values.length == 71


def test_bad_checkpoints(tmp_path):
    hf = hf_model("gated-gelu")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "decoder.block.1.layer.1.EncDecAttention.v.weight"
    save_file({k: v for k, v in state.items() if k != key}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensors: " + re.escape(key)):
        engine.from_pretrained(tmp_path)
    save_file({**state, "encoder.block.0.layer.9.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensors: encoder\.block\.0\.layer\.9\.extra\.weight"):
        engine.from_pretrained(tmp_path)
    cfg = hf.config.to_dict()
    with pytest.raises(ValueError, match="feed_forward_proj='gated-gelu-x' is not"):
        engine.models.t5.from_checkpoint({**cfg, "feed_forward_proj": "gated-gelu-x"}, state)
    with pytest.raises(ValueError, match="d_kv=512 is unsupported"):
        engine.models.t5.from_checkpoint({**cfg, "d_kv": 512}, state)
    with pytest.raises(ValueError, match="T5 head T5ForQuestionAnswering is not supported"):
        engine.models.t5.from_checkpoint({**cfg, "architectures": ["T5ForQuestionAnswering"]}, state)
    with pytest.raises(ValueError, match="unknown task 'summarization'"):
        engine.models.t5.from_checkpoint(cfg, state, task="summarization")


def test_output_object_and_beam_config():
    out = Seq2SeqOutput(logits=torch.zeros(1))
    assert out.keys() == ["logits"] and out["logits"] is out.logits
    with pytest.raises(KeyError):
        out["past_key_values"]
    cfg = gen.GenerationConfig(eos_token_id=5, pad_token_id=0)
    assert bs.fill_value(cfg) == 5  # transformers' `pad or eos[0]`: pad id 0 pads beams with EOS
    assert bs.fill_value(gen.GenerationConfig(eos_token_id=5, pad_token_id=3)) == 3
    assert bs.fill_value(gen.GenerationConfig()) == -1
