"""Generation options: generation_config.json sets the defaults (arguments win), options trifuse does
not implement are named, bad pad ids are refused before the loop, right padding warns as in Hugging
Face, and memory follows the tokens decoded, not ``max_new_tokens``."""

import json
import warnings

import pytest
import torch
import transformers as T

from tests import tiny_models as tiny
from trifuse import engine


def _first_token(hf, ids, **kw):
    return int(hf.generate(ids, max_new_tokens=1, do_sample=False, **kw)[0, -1])


def test_gpt2_generation_config_json_sets_defaults(tmp_path, reference_backend):
    hf = tiny.gpt2()
    ids = torch.randint(0, 99, (1, 5), generator=torch.Generator().manual_seed(1))
    eos = int(hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)[0, -1])
    hf.generation_config = T.GenerationConfig(eos_token_id=eos, pad_token_id=3, bos_token_id=98, max_new_tokens=9,
                                              no_repeat_ngram_size=2, repetition_penalty=1.3)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_new_tokens"] == 9
    hf = T.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ours = engine.from_pretrained(tmp_path)
    assert ours.generation_config["eos_token_id"] == eos and ours.config.eos_token_id == (eos,)
    want = hf.generate(ids, attention_mask=torch.ones_like(ids))
    assert torch.equal(ours.generate(ids), want)
    assert torch.equal(torch.stack(list(ours.stream(ids)), 1), want[:, 5:])
    # Arguments passed explicitly win. An explicit max_length replaces the file's max_new_tokens (Hugging Face
    # keeps the file's max_new_tokens then, with a warning; here the caller's limit holds).
    for kw, hf_kw in ((dict(max_new_tokens=3), None), (dict(max_length=8), dict(max_new_tokens=3)),
                      (dict(repetition_penalty=1.0, no_repeat_ngram_size=0), None)):
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), **(hf_kw or kw))
        assert torch.equal(ours.generate(ids, **kw), want), kw


def test_t5_generation_config_json_sets_defaults(tmp_path, reference_backend):
    hf = tiny.t5(0)
    ids, mask, _ = tiny.t5_inputs()
    hf.generation_config = T.GenerationConfig(decoder_start_token_id=5, eos_token_id=7, pad_token_id=0,
                                              max_length=6, num_beams=2)
    hf.save_pretrained(tmp_path)
    hf = T.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ours = engine.from_pretrained(tmp_path)
    assert ours.config.decoder_start_token_id == 5
    want = hf.generate(ids, attention_mask=mask)
    assert want.shape[1] == 6 and (want[:, 0] == 5).all()
    assert torch.equal(ours.generate(ids, mask), want)
    want = hf.generate(ids, attention_mask=mask, num_beams=1, max_new_tokens=4, decoder_start_token_id=0)
    assert torch.equal(ours.generate(ids, mask, num_beams=1, max_new_tokens=4, decoder_start_token_id=0), want)


def test_unsupported_generation_options_are_named(tmp_path):
    hf = tiny.gpt2()
    hf.generation_config = T.GenerationConfig(eos_token_id=98, suppress_tokens=[4, 5])
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="sets suppress_tokens, which trifuse's generate does not implement"):
        engine.from_pretrained(tmp_path)


def test_pad_id_outside_the_vocabulary_is_rejected_before_the_loop(tmp_path, reference_backend, monkeypatch):
    ids = torch.randint(2, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    gpt2, t5 = engine.from_pretrained(tiny.gpt2()), engine.from_pretrained(tiny.t5(0))
    steps = []
    for model in (gpt2, t5):
        monkeypatch.setattr(model, "forward", lambda *a, **k: steps.append(1))  # no forward may run
        for call in (model.generate, model.stream):
            with pytest.raises(ValueError, match=r"pad_token_id=500 is outside the vocabulary \[0, 99\)"):
                call(ids, max_new_tokens=5, pad_token_id=500, eos_token_id=[3])
    assert not steps
    hf = tiny.gpt2()
    hf.generation_config = T.GenerationConfig(eos_token_id=98, pad_token_id=1000)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pad_token_id=1000 is outside the vocabulary"):
        engine.from_pretrained(tmp_path).generate(ids)


def test_right_padded_decoder_prompt_warns_as_hugging_face_does(reference_backend):
    model = engine.from_pretrained(tiny.gpt2())
    ids = torch.randint(2, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with pytest.warns(UserWarning, match="right-padding detected"):
        model.generate(ids, right, max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, right.flip(1), max_new_tokens=2)  # left padding: no warning


def test_t5_cache_grows_with_the_work_done(reference_backend, monkeypatch):
    """max_new_tokens=10**8 with an early EOS allocates for the tokens decoded, not for 10**8 (51 GB here);
    decoding past the first chunk grows the cache and matches Hugging Face (greedy and beams)."""
    from trifuse.engine.cache import KVCache

    hf = tiny.t5(0)
    ours = engine.from_pretrained(hf)
    ids, mask, _ = tiny.t5_inputs()
    eos = _first_token(hf, ids[:1], attention_mask=mask[:1])
    capacities = []
    real_init = KVCache.__init__

    def recording_init(self, batch, layers, heads, max_len, *args, **kwargs):
        capacities.append(max_len)
        real_init(self, batch, layers, heads, max_len, *args, **kwargs)

    monkeypatch.setattr(KVCache, "__init__", recording_init)
    out = ours.generate(ids[:1], mask[:1], max_new_tokens=10**8, eos_token_id=eos)
    assert out.shape == (1, 2) and int(out[0, 1]) == eos
    assert capacities and max(capacities) <= 64
    hf.generation_config.eos_token_id = None
    for beams in (1, 2):
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=150, num_beams=beams, do_sample=False)
        assert torch.equal(ours.generate(ids, mask, max_new_tokens=150, num_beams=beams, eos_token_id=[]), want)


def test_sequence_buffers_follow_the_tokens_decoded(monkeypatch):
    """Beam search and the n-gram ban keep the sequences decoded so far; with max_new_tokens=10**8 and
    an early EOS they hold a few dozen positions, never 10**8 (which would be GBs per row)."""
    from trifuse.engine import beam_search as bs
    from trifuse.engine import generation as gen

    vocab, eos, steps = 11, 3, []
    widths = []
    real_full = torch.full

    def recording_full(size, *args, **kwargs):
        widths.append(size[-1] if isinstance(size, (tuple, list)) else size)
        return real_full(size, *args, **kwargs)

    def logits_for(rows: int) -> torch.Tensor:  # EOS certain from the fourth step on
        out = torch.randn(rows, vocab)
        if len(steps) >= 3:
            out[:, eos] = 100.0
        return out

    def step(tokens, beam_idx=None):
        steps.append(tokens.clone())
        return logits_for(tokens.shape[0])

    monkeypatch.setattr(torch, "full", recording_full)
    cfg = gen.GenerationConfig(max_new_tokens=10**8, eos_token_id=(eos,), pad_token_id=0)
    prompt = torch.randint(4, vocab, (4, 5))
    out = bs.beam_search(logits_for(4), step, prompt, cfg, bs.BeamConfig(num_beams=2, early_stopping=True))
    assert out.shape[0] == 2 and out.shape[1] <= 5 + 8 and (out == eos).any(dim=1).all()
    assert widths and max(widths) <= 5 + 64
    steps.clear()
    ngram = gen.GenerationConfig(max_new_tokens=10**8, eos_token_id=(eos,), pad_token_id=0, no_repeat_ngram_size=2)
    out = gen.generate(logits_for(4), step, prompt, ngram)
    assert out.shape[1] <= 5 + 8 and (out[:, 5:] == eos).any(dim=1).all()
