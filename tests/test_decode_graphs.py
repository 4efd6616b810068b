"""Decoding on static buffers (the CUDA-graph step) computes what eager decoding computes.

``StaticDecoder`` runs exactly the steps ``CUDAGraphDecoder`` captures, eagerly, so
on the CPU (the Triton kernels under the interpreter) it is checked against the
models' own ``generate``: tokens equal, per-step logits close, across cache-bucket
boundaries and prompt paddings; token-for-token runs use the PyTorch reference
ops (fast), the per-step logits the Triton kernels (masked cache slots
included). That the step is capturable (no value read back to the host) is
checked under ``FakeTensorMode``, where any such read raises. The graphs
themselves run in the ``gpu``-marked tests.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from tests import test_gpt2, test_t5
from tests.test_gpt2 import left_padded
from tests.test_t5 import encoder_batch
from trifuse import engine
from trifuse.engine.graphs import CUDAGraphDecoder, StaticDecoder


@pytest.fixture(scope="module")
def gpt2():
    return engine.from_pretrained(test_gpt2.hf_model())


@pytest.fixture(scope="module")
def t5():
    return {f: engine.from_pretrained(test_t5.hf_model(f, scale=0.5)) for f in test_t5.FLAVOURS}


def _no_host_reads(fn):
    """Run ``fn`` on fake tensors: reading a value back to the host (``bool``, ``.item()``,
    data-dependent shapes), which a CUDA graph cannot capture, raises."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        return fn()


# ----------------------------------------------------------------------------
# GPT-2


def test_gpt2_greedy_equals_generate_across_buckets(gpt2, reference_backend):
    ids, mask = left_padded([9, 4, 7])
    dec = StaticDecoder(gpt2, kv_buckets=(8, 16))  # buckets 8, 16 and max_len 64: two boundaries crossed
    assert dec.kv_buckets == [8, 16, 64]
    want = gpt2.generate(ids, mask, max_new_tokens=30, eos_token_id=[])
    torch.testing.assert_close(dec.generate(ids, mask, max_new_tokens=30, eos_token_id=[]), want, rtol=0, atol=0)
    # The same buffers again, shorter prompt: a fresh cache, nothing left over.
    ids2, mask2 = left_padded([3, 5, 2], seed=4)
    torch.testing.assert_close(dec.generate(ids2, mask2, max_new_tokens=6),
                               gpt2.generate(ids2, mask2, max_new_tokens=6), rtol=0, atol=0)
    assert list(dec.states) == [(3, 3, 0)]  # (rows, input rows, encoder bucket)


def test_gpt2_sampling_eos_and_penalty_equal_generate(gpt2, reference_backend):
    ids, mask = left_padded([6, 2])
    kw = dict(max_new_tokens=20, do_sample=True, temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.3,
              eos_token_id=[5, 7], pad_token_id=0)
    want = gpt2.generate(ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    got = StaticDecoder(gpt2, max_len=32).generate(ids, mask, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    stream = StaticDecoder(gpt2).stream(ids, mask, max_new_tokens=3)
    assert [t.shape for t in stream] == [(2,)] * 3


def test_gpt2_step_logits_match_eager(gpt2):
    ids, mask = left_padded([5, 8, 1])
    g = torch.Generator().manual_seed(2)
    forced = torch.randint(1, 96, (12, 3), generator=g)  # teacher forcing: the same tokens into both
    dec = StaticDecoder(gpt2, kv_buckets=(8, 16))
    bmask = mask.ne(0)
    with torch.no_grad():
        eager = gpt2.start_decoding(ids, bmask, num_beams=1, max_new_tokens=12)
        static = dec._session(ids, bmask, num_beams=1, max_new_tokens=12)
        torch.testing.assert_close(static.logits, eager.logits, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(static.positions, eager.positions)
        for tokens in forced:
            torch.testing.assert_close(static.step(tokens, None), eager.step(tokens, None), atol=2e-5, rtol=2e-5)


def test_gpt2_step_reads_nothing_back():
    model = engine.from_pretrained(test_gpt2.hf_model())
    dec = StaticDecoder(model)
    state = dec._state((2, 2, 0), 2, 0)
    logits = _no_host_reads(lambda: dec._decode_step(state, 16))
    assert tuple(logits.shape) == (2, model.config.vocab_size)
    # The check bites: the model's own input validation reads the token ids back.
    with pytest.raises(DataDependentOutputException):
        _no_host_reads(lambda: model._check(state.tokens, None, None, None))


def test_gpt2_static_decoder_limits(gpt2):
    ids, mask = left_padded([6, 6])
    with pytest.raises(ValueError, match="exceeds this decoder's max_len=8"):
        StaticDecoder(gpt2, max_len=8).generate(ids, mask, max_new_tokens=3)
    with pytest.raises(ValueError, match="max_len must be an int in"):
        StaticDecoder(gpt2, max_len=65)
    with pytest.raises(TypeError, match="needs a trifuse decoder"):
        StaticDecoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        CUDAGraphDecoder(gpt2)


# ----------------------------------------------------------------------------
# T5


@pytest.mark.parametrize("flavour", test_t5.FLAVOURS)
def test_t5_greedy_and_beams_equal_generate(t5, flavour, reference_backend):
    model = t5[flavour]
    ids, mask = encoder_batch(b=3, n=23)  # encoder padded up to the 32 bucket, rows padded inside it
    dec = StaticDecoder(model, max_len=24, kv_buckets=(4, 8), encoder_lengths=(16, 32))
    torch.testing.assert_close(dec.generate(ids, mask, max_new_tokens=20, eos_token_id=[]),
                               model.generate(ids, mask, max_new_tokens=20, eos_token_id=[]), rtol=0, atol=0)
    kw = dict(max_new_tokens=9, num_beams=3, length_penalty=0.8)
    torch.testing.assert_close(dec.generate(ids, mask, **kw), model.generate(ids, mask, **kw), rtol=0, atol=0)
    assert sorted(dec.states) == [(3, 3, 32), (9, 3, 32)]  # (rows, encoder rows, encoder bucket)


def test_t5_sampling_and_long_prompt(t5, reference_backend):
    model = t5["relu"]
    ids, mask = encoder_batch(b=2, n=40)  # longer than every encoder bucket: buffers of its own length
    dec = StaticDecoder(model, max_len=16, encoder_lengths=(8,))
    kw = dict(max_new_tokens=12, do_sample=True, top_k=20, temperature=1.2)
    want = model.generate(ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(dec.generate(ids, mask, generator=torch.Generator().manual_seed(5), **kw), want,
                               rtol=0, atol=0)
    assert list(dec.states) == [(2, 2, 40)]
    with pytest.raises(ValueError, match="exceeds this decoder's max_len=16"):
        dec.generate(ids, mask, max_new_tokens=16)


def test_t5_step_logits_match_eager(t5):
    model = t5["gated-gelu"]
    ids, mask = encoder_batch(b=2, n=13)
    dec = StaticDecoder(model, max_len=16, kv_buckets=(2, 4, 8), encoder_lengths=(16,))
    forced = torch.randint(2, 98, (10, 2), generator=torch.Generator().manual_seed(3))
    kw = dict(num_beams=1, max_new_tokens=10, start_token=0)
    with torch.no_grad():
        eager = model.start_decoding(ids, mask.ne(0), **kw)
        static = dec._session(ids, mask.ne(0), **kw)
        torch.testing.assert_close(static.ids, eager.ids)
        torch.testing.assert_close(static.logits, eager.logits, atol=2e-5, rtol=2e-5)
        for tokens in forced:  # past max_distance-free buckets: the dense bias must match the in-kernel one
            torch.testing.assert_close(static.step(tokens, None), eager.step(tokens, None), atol=2e-5, rtol=2e-5)


def test_t5_step_reads_nothing_back(t5):
    model = t5["relu"]
    dec = StaticDecoder(model, max_len=16)
    ids, mask = encoder_batch(b=2, n=9)
    with torch.no_grad():  # fills the encoder buffers of a 2-beam state
        dec._session(ids, mask.ne(0), num_beams=2, max_new_tokens=4, start_token=0)
    state = dec.states[(4, 2, 16)]
    logits = _no_host_reads(lambda: dec._decode_step(state, 8))
    assert tuple(logits.shape) == (4, model.config.vocab_size)


# ----------------------------------------------------------------------------
# The graphs themselves (GPU).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_gpt2_equals_generate(dtype):
    model = engine.from_pretrained(test_gpt2.hf_model(), dtype=dtype, device="cuda")
    dec = CUDAGraphDecoder(model, kv_buckets=(16, 32))
    for seed in range(2):  # new prompts through the same captured graphs
        ids, mask = left_padded([9, 4, 7], seed=seed)
        ids, mask = ids.cuda(), mask.cuda()
        want = model.generate(ids, mask, max_new_tokens=40, eos_token_id=[])
        got = dec.generate(ids, mask, max_new_tokens=40, eos_token_id=[])
        # Masked keys change the low bits (split plans differ); greedy ties may then break
        # differently, so compare the prefix up to the first difference and require most of it.
        same = (got == want).all(dim=0).long().cumprod(0).sum().item()
        assert same >= ids.shape[1] + 20, (got, want)
    assert sorted(dec.states[(3,)].graphs) == [16, 32, 64]


@pytest.mark.gpu
def test_cuda_graph_t5_equals_generate():
    model = engine.from_pretrained(test_t5.hf_model("gated-gelu", scale=0.5), dtype=torch.bfloat16, device="cuda")
    dec = CUDAGraphDecoder(model, max_len=32, kv_buckets=(8, 16))
    ids, mask = (t.cuda() for t in encoder_batch(b=3, n=23))
    for kw in (dict(max_new_tokens=24, eos_token_id=[]), dict(max_new_tokens=10, num_beams=3)):
        want = model.generate(ids, mask, **kw)
        got = dec.generate(ids, mask, **kw)
        assert got.shape == want.shape
        assert (got == want).float().mean() > 0.9, (got, want)
    assert sorted(dec.states[(3, 3, 32)].graphs) == [8, 16, 32]
