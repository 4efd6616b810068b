"""The native CPU path (``backend="native"``, what ``auto`` runs on CPU tensors without Triton's
interpreter) against float64: the ops, oneDNN's packed linear, and every family and head.

The suite runs with ``TRITON_INTERPRET=1``, so ``auto`` would take the interpreter here; these
tests force ``native`` (and, beside it, ``reference``) and hold both to the fp32 budget (bf16 to
the 2x-PyTorch rule). Nothing is timed.
"""

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from tests import test_bart, test_bert, test_gpt2, test_t5, test_vit
from tests.helpers import TOL, assert_matches_reference, rel_err
from tests.test_attention import CASES, _ref64, _visible
from trifuse import engine, kernels
from trifuse.engine.layers import (PackedEmbedding, PackedLinear, _onednn, lm_head, pack_linears, project,
                                   stored_transposed)
from trifuse.kernels import RelativeBias, attention, relative_position_bucket

cpu_mod = importlib.import_module("trifuse.kernels.cpu")


@pytest.fixture
def native():
    with kernels.use_backend("native"):
        yield


def _mask(B, Lk, g):
    lengths = [Lk, max(1, Lk // 2), 1][:B] + [Lk] * max(0, B - 3)
    m = torch.zeros(B, Lk, dtype=torch.long)
    for i, n in enumerate(lengths):
        m[i, :n] = 1
    return m


# ----------------------------------------------------------------------------
# The ops.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Lq,Lk,D,causal", CASES)
def test_attention_native(B, H, Lq, Lk, D, causal, dtype, native):
    g = torch.Generator().manual_seed(B * 1000 + Lq * 10 + Lk)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype) for L in (Lq, Lk, Lk))
    mask = _mask(B, Lk, g) if B > 1 else None
    bias = torch.randn(1, H, Lq, Lk, generator=g).to(dtype) if Lk % 2 else None
    kw = dict(causal=causal, attention_mask=mask, bias=bias)
    out = attention(q, k, v, **kw)
    ref = _ref64(q, k, v, **kw)
    assert torch.isfinite(out).all()
    lowp = None
    if dtype != torch.float32:  # PyTorch's own bf16 error, through the math it would do itself
        with kernels.use_backend("reference"):
            lowp = kernels.attention_reference(q, k, v, **kw)
    assert_matches_reference(out, ref, dtype, torch_lowp=lowp)
    vis = _visible(B, Lq, Lk, causal, mask, q.device).any(-1, keepdim=True).expand_as(out)
    assert (out[~vis] == 0).all(), "a row that sees no key returns zeros"


@pytest.mark.parametrize("bidirectional,Lq,Lk,offset", [(True, 50, 50, 0), (False, 7, 7, 0), (False, 1, 33, 32),
                                                       (True, 9, 130, 0)])
def test_t5_relative_bias_native(bidirectional, Lq, Lk, offset, native):
    g = torch.Generator().manual_seed(Lq + Lk)
    q, k, v = (torch.randn(2, 3, L, 16, generator=g) for L in (Lq, Lk, Lk))
    rb = RelativeBias(torch.randn(8, 3, generator=g), bidirectional, 8, 20, query_offset=offset)
    kw = dict(causal=not bidirectional and Lq == Lk, attention_mask=_mask(2, Lk, g), relative_bias=rb, scale=1.0)
    out = attention(q, k, v, **kw)
    assert_matches_reference(out, _ref64(q, k, v, **kw), torch.float32)
    # Built once per RelativeBias object: a model's layers share it.
    assert len(rb.__dict__["_dense"]) == 1
    attention(q, k, v, **kw)
    assert len(rb.__dict__["_dense"]) == 1


def test_t5_bucket_index_cache_follows_the_table_and_modes():
    """Only the bucket index is cached (per setting and size): the bias follows the table's values,
    stays differentiable outside inference mode, and nothing fake is ever cached."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    table = torch.randn(8, 3)
    args = (True, 8, 20, 0, 7, 9, torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:  # first, so a leak would be cached
        assert isinstance(cpu_mod.relative_bias_dense(fake.from_tensor(table), *args), FakeTensor)
    with torch.inference_mode():
        first = cpu_mod.relative_bias_dense(table, *args)
    assert type(first) is torch.Tensor
    rp = torch.arange(9)[None, :] - torch.arange(7)[:, None]
    want = table.double()[relative_position_bucket(rp, True, 8, 20)].permute(2, 0, 1)[None]
    torch.testing.assert_close(first.double(), want)
    t = (table * 2).requires_grad_()
    again = cpu_mod.relative_bias_dense(t, *args)  # grad mode, a cache hit made under inference mode
    torch.testing.assert_close(again.detach().double(), 2 * want)
    again.sum().backward()
    assert t.grad is not None and t.grad.sum() == 7 * 9 * 3
    # Memory stays bounded: an index past BUCKETS_CACHE_MAX elements is rebuilt, never kept.
    cpu_mod._buckets_cached.cache_clear()
    n = int(cpu_mod.BUCKETS_CACHE_MAX ** 0.5) + 1
    with torch.inference_mode():
        long = cpu_mod.relative_bias_dense(table, True, 8, 20, 0, n, n, torch.float32)
    assert long.shape == (1, 3, n, n) and cpu_mod._buckets_cached.cache_info().currsize == 0
    cpu_mod.relative_bias_dense(table, *args)
    assert cpu_mod._buckets_cached.cache_info().currsize == 1


# ----------------------------------------------------------------------------
# bf16 attention's matmul path (kernels.cpu._sdpa_matmul): two batched GEMMs, fp32 scores and softmax.


@pytest.fixture
def matmul_calls(monkeypatch):
    """The matmul path's calls (the real function runs; each call's q shape is recorded)."""
    calls = []
    real = cpu_mod._sdpa_matmul
    monkeypatch.setattr(cpu_mod, "_sdpa_matmul", lambda q, *a: calls.append(tuple(q.shape)) or real(q, *a))
    return calls


def test_bf16_attention_kernel_choice():
    def plan(dtype, lq, lk, b=2):
        return cpu_mod.plan(torch.empty(b, 3, lq, 8, dtype=dtype), torch.empty(b, 3, lk, 8, dtype=dtype))

    assert plan(torch.bfloat16, 97, 97) == plan(torch.bfloat16, 128, 512) == "matmul"
    assert plan(torch.bfloat16, 1, 500) == plan(torch.bfloat16, 8, 8) == "fp32"  # decoding steps
    assert plan(torch.bfloat16, 1, 500, b=100) == "sdpa"  # 1.2M keys' elements: the fp32 copies cost more
    assert plan(torch.bfloat16, 32, 32) == plan(torch.bfloat16, 200, 64) == "sdpa"
    assert plan(torch.float32, 128, 128) == plan(torch.float16, 128, 128) == plan(torch.float32, 1, 128) == "sdpa"


BF16_CASES = [  # B, H, Lq, Lk, D, causal, bias shape ("" = none)
    (3, 2, 97, 97, 80, False, "1H"),  # batch row 1 sees no key at all
    (2, 3, 97, 130, 96, True, "B1"),  # Lq < Lk: bottom-right causal, as with a cache
    (2, 1, 130, 97, 8, True, ""),  # Lq > Lk: the first rows see no key
    (3, 2, 1, 97, 8, False, "BH"),
    (3, 2, 7, 7, 80, True, "1H"),
]


@pytest.mark.parametrize("chunks", ["whole", "heads", "rows"])
@pytest.mark.parametrize("B,H,Lq,Lk,D,causal,bias_shape", BF16_CASES)
def test_bf16_matmul_attention_against_float64(B, H, Lq, Lk, D, causal, bias_shape, chunks, native, matmul_calls,
                                               monkeypatch):
    monkeypatch.setattr(cpu_mod, "MATMUL_MIN", 1)  # every size through the matmul path, not only >= 96
    if chunks != "whole":  # chunked to one head's scores, or a few query rows: memory follows the chunk
        monkeypatch.setattr(cpu_mod, "SCORES_MAX", Lq * Lk if chunks == "heads" else 3 * Lk)
    g = torch.Generator().manual_seed(B * 1000 + Lq * 10 + D)
    q, k, v = ((2 * torch.randn(B, H, L, D, generator=g)).to(torch.bfloat16) for L in (Lq, Lk, Lk))
    mask = torch.ones(B, Lk, dtype=torch.long)
    mask[1] = 0
    mask[-1, Lk // 2:] = 0
    bias = None
    if bias_shape:
        shape = (B if bias_shape[0] == "B" else 1, H if bias_shape[1] == "H" else 1, Lq, Lk)
        bias = torch.randn(shape, generator=g).to(torch.bfloat16)
    kw = dict(causal=causal, attention_mask=mask, bias=bias)
    out = attention(q, k, v, **kw)
    assert matmul_calls, "the bf16 matmul path ran"
    assert torch.isfinite(out).all()
    with kernels.use_backend("reference"):
        lowp = kernels.attention_reference(q, k, v, **kw)  # fp32 math on the same bf16 inputs
    assert_matches_reference(out, _ref64(q, k, v, **kw), torch.bfloat16, torch_lowp=lowp)
    vis = _visible(B, Lq, Lk, causal, mask, q.device).any(-1, keepdim=True).expand_as(out)
    assert not vis.all() and (out[~vis] == 0).all(), "a row that sees no key returns zeros"


@pytest.mark.parametrize("bidirectional,Lq,Lk,offset", [(True, 97, 97, 0), (False, 1, 33, 32), (False, 7, 100, 93)])
def test_bf16_matmul_attention_t5_bias(bidirectional, Lq, Lk, offset, native, matmul_calls, monkeypatch):
    monkeypatch.setattr(cpu_mod, "MATMUL_MIN", 1)
    g = torch.Generator().manual_seed(Lq + Lk)
    q, k, v = (torch.randn(2, 3, L, 16, generator=g).to(torch.bfloat16) for L in (Lq, Lk, Lk))
    rb = RelativeBias(torch.randn(8, 3, generator=g).to(torch.bfloat16), bidirectional, 8, 20, query_offset=offset)
    kw = dict(causal=not bidirectional, attention_mask=_mask(2, Lk, g), relative_bias=rb, scale=1.0)
    out = attention(q, k, v, **kw)
    assert matmul_calls
    with kernels.use_backend("reference"):
        lowp = kernels.attention_reference(q, k, v, **kw)
    assert_matches_reference(out, _ref64(q, k, v, **kw), torch.bfloat16, torch_lowp=lowp)


def test_bf16_matmul_attention_rows_masked_by_the_bias(native, matmul_calls):
    """A row whose additive bias is -inf at every key returns zeros (the reference's rule); a NaN in the
    inputs is not hidden as such a row."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, 100, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    bias = torch.randn(2, 1, 100, 100, generator=g).to(torch.bfloat16)
    bias[0, :, 3] = float("-inf")
    out = attention(q, k, v, bias=bias)
    assert matmul_calls
    assert (out[0, :, 3] == 0).all() and torch.isfinite(out).all()
    with kernels.use_backend("reference"):
        lowp = kernels.attention_reference(q, k, v, bias=bias)
    assert_matches_reference(out, _ref64(q, k, v, bias=bias), torch.bfloat16, torch_lowp=lowp)
    q[1, 0, 5, 0] = float("nan")
    out = attention(q, k, v, bias=bias)
    assert out[1, 0, 5].isnan().all() and (out[0, :, 3] == 0).all()


def test_bf16_long_attention_takes_the_matmul_path_by_default(native, matmul_calls):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 130, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    out = attention(q, k, v, causal=True)
    assert matmul_calls == [(1, 2, 130, 64)]
    with kernels.use_backend("reference"):
        lowp = kernels.attention_reference(q, k, v, causal=True)
    assert_matches_reference(out, _ref64(q, k, v, causal=True), torch.bfloat16, torch_lowp=lowp)
    attention(q.float(), k.float(), v.float(), causal=True)  # fp32 keeps SDPA's kernel
    assert len(matmul_calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 97, 80), (2, 5, 768)])
@pytest.mark.parametrize("rms", [False, True])
def test_norms_native(shape, rms, dtype, native):
    g = torch.Generator().manual_seed(shape[-1])
    x, r = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    w, b = torch.randn(shape[-1], generator=g), torch.randn(shape[-1], generator=g)
    if rms:
        y, h = kernels.rms_norm(x, w.to(dtype), 1e-6, residual=r)
        ry, rh = kernels.rms_norm_reference(x.double(), w.double(), 1e-6, residual=r.double())
        lowp = kernels.rms_norm_reference(x, w.to(dtype), 1e-6, residual=r)[0]
    else:
        y, h = kernels.layer_norm(x, w.to(dtype), b.to(dtype), 1e-5, residual=r)
        ry, rh = kernels.layer_norm_reference(x.double(), w.double(), b.double(), 1e-5, residual=r.double())
        lowp = F.layer_norm(x + r, (shape[-1],), w.to(dtype), b.to(dtype), 1e-5)
    # bf16: the native path normalizes the rounded sum, so its error is held to the table alone.
    assert_matches_reference(y, ry, dtype, torch_lowp=lowp if dtype == torch.float32 else None, scale=4.0)
    assert_matches_reference(h, rh, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias,with_gate", [(True, False), (False, False), (False, True)])
def test_gelu_native(approximate, with_bias, with_gate, dtype, native):
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(5, 37, generator=g)).to(dtype)
    bias = torch.randn(37, generator=g) if with_bias else None
    gate = torch.randn(5, 37, generator=g).to(dtype) if with_gate else None
    out = kernels.gelu(x, bias, approximate, gate)
    ref = kernels.gelu_reference(x.double(), None if bias is None else bias.double(), approximate,
                                 None if gate is None else gate.double())
    lowp = F.gelu(x if bias is None else x + bias.to(dtype), approximate=approximate)
    assert_matches_reference(out, ref, dtype, torch_lowp=None if gate is not None else lowp, scale=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", [None, "none", "tanh"])
@pytest.mark.parametrize("shape", [(1, 64), (2, 1, 64), (3, 64), (3, 7, 64), (2, 128, 96)])
@pytest.mark.parametrize("out", [48, 1100])  # fp32: a tiny GEMM (BLAS), and oneDNN's
def test_packed_linear(shape, out, gelu, dtype, native):
    g = torch.Generator().manual_seed(7)
    lin = PackedLinear(shape[-1], out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, shape[-1], generator=g) / 8)
        lin.bias.copy_(torch.randn(out, generator=g))
    lin = lin.to(dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    with torch.no_grad():
        out = lin(x, gelu=gelu)
        ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        lowp = F.linear(x, lin.weight, lin.bias)
        if gelu is not None:
            ref, lowp = F.gelu(ref, approximate=gelu), F.gelu(lowp, approximate=gelu)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, atol=TOL[dtype][0] * 8, rtol=TOL[dtype][1])
    else:
        assert_matches_reference(out, ref, dtype, torch_lowp=lowp, scale=8.0)
    assert lin.native(x) == _onednn(dtype)
    # A weight changed in place is repacked, not served stale.
    with torch.no_grad():
        lin.weight.mul_(2)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=TOL[dtype][0] * 8,
                                   rtol=TOL[dtype][1])


def _linear_inputs(rows: int, k: int, n: int, odd_strides: bool, seed: int):
    """``x`` with ``rows`` rows of width ``k`` (3-D; with ``odd_strides`` the last position of a longer
    batch, the slice a decoder's LM head reads), a weight ``[n, k]`` and a bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 5 if odd_strides else 1, k, generator=g)
    x = x[:, -1:] if odd_strides else x
    return x, torch.randn(n, k, generator=g) / 8, torch.randn(n, generator=g)


@pytest.mark.parametrize("rows", [1, 2, 7])
@pytest.mark.parametrize("n,k", [(97, 64), (64, 80), (1, 8), (301, 256)])
@pytest.mark.parametrize("gelu", [None, "tanh"])
@pytest.mark.parametrize("odd_strides", [False, True])
def test_project_on_either_layout(rows, n, k, gelu, odd_strides, native):
    """fp32 ``x @ w^T + b`` (and GELU) with the weight stored ``[N, K]``, ``[K, N]`` (read through a
    transposed view, one row taking BLAS's GEMV) and prepacked (fewer than four rows padded): each
    within fp32's budget of float64."""
    if not _onednn(torch.float32):
        pytest.skip("no oneDNN in this PyTorch build")
    x, w, b = _linear_inputs(rows, k, n, odd_strides, seed=rows * 100 + n)
    ref = F.linear(x.double(), w.double(), b.double())
    ref = ref if gelu is None else F.gelu(ref, approximate=gelu)
    wt = w.t().contiguous().t()
    assert stored_transposed(wt) == (n > 1) and not stored_transposed(w)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 128)
    for weight in (w, wt, packed):
        for bias in (b, None):
            out = project(x, weight, bias, gelu)
            want = ref if bias is not None else F.linear(x.double(), w.double())
            want = want if gelu is None or bias is not None else F.gelu(want, approximate=gelu)
            assert out.shape == (rows, 1, n) and out.dtype == torch.float32
            torch.testing.assert_close(out.double(), want, atol=TOL[torch.float32][0] * 8,
                                       rtol=TOL[torch.float32][1])


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_on_a_sliced_row(rows, dtype, native):
    """An LM head on the last position of a batch (a 3-D slice with odd strides, which made ``F.linear``
    copy the whole table per call), read from a plain embedding table and from a packed one (the
    prepacked copy; fp32 one row: BLAS on the ``[K, N]`` layout; fewer than four rows padded), within
    the dtype's budget of float64."""
    x, w, _ = _linear_inputs(rows, 64, 301, True, seed=rows)
    x, w = x.to(dtype), w.to(dtype)
    plain = torch.nn.Embedding(301, 64, _weight=w.clone()).to(dtype)
    packed = torch.nn.Module()
    packed.tied_lm_embedding = torch.nn.Embedding(301, 64, _weight=w.clone()).to(dtype)
    pack_linears(packed)
    assert isinstance(packed.tied_lm_embedding, PackedEmbedding)
    ref = F.linear(x.double(), w.double())
    for head in (plain, packed.tied_lm_embedding):
        with torch.no_grad():
            out = lm_head(x, head)
        assert out.shape == (rows, 1, 301) and out.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), ref, atol=TOL[dtype][0] * 8, rtol=TOL[dtype][1])
        else:
            assert_matches_reference(out, ref, dtype, torch_lowp=F.linear(x, w), scale=8.0)


def test_gpt2_weights_laid_out_for_decoding_one_copy_each():
    """``from_pretrained`` on the CPU stores fp32 QKV, up-projection and the tied embedding ``[K, N]``
    (transposed views, one copy each; the state dict still holds Hugging Face's values), the narrow
    projections as they were; bf16 keeps the checkpoint layout."""
    hf = test_gpt2.hf_model()
    ours = engine.from_pretrained(hf)
    layer = ours.layers[0]
    for lin in (layer.attn.qkv, layer.ffn.up):
        assert isinstance(lin, PackedLinear) and stored_transposed(lin.weight)
    for lin in (layer.attn.out, layer.ffn.down):
        assert lin.weight.is_contiguous()
    wte = ours.wte.weight
    assert stored_transposed(wte) and wte.untyped_storage().nbytes() == wte.numel() * wte.element_size()
    assert ours.tied_lm_embedding is ours.wte
    torch.testing.assert_close(wte, hf.transformer.wte.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.attn.qkv.weight, hf.transformer.h[0].attn.c_attn.weight.t(), rtol=0, atol=0)
    bf16 = engine.from_pretrained(hf, dtype=torch.bfloat16)
    assert all(p.is_contiguous() for p in bf16.parameters())
    assert engine.from_pretrained(hf, task="feature-extraction").wte.weight.is_contiguous()  # a lookup only
    # Only where it pays: not K a multiple of 1024, nor N a multiple of 4096 (engine.layers._store_transposed).
    seq = pack_linears(torch.nn.Sequential(torch.nn.Linear(1024, 3000), torch.nn.Linear(64, 4096),
                                           torch.nn.Linear(96, 200), torch.nn.Linear(96, 200).double()))
    assert [stored_transposed(m.weight) for m in seq] == [False, False, True, False]


@pytest.mark.parametrize("lengths", [[9], [9, 4]])
def test_gpt2_greedy_native_equals_hf(lengths, native):
    """Greedy decoding on the native path (one row: the GEMV on the ``[K, N]`` weights; two rows: oneDNN
    on the transposed views) gives Hugging Face's tokens, and every step's logits match float64."""
    hf = test_gpt2.hf_model()
    ours = engine.from_pretrained(hf)
    ids, mask = test_gpt2.left_padded(lengths)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        got = ours.generate(ids, mask, max_new_tokens=6)
        assert torch.equal(got, want)
        full = torch.cat([mask, torch.ones_like(got[:, ids.shape[1]:])], dim=1)
        pos = (full.cumsum(-1) - 1).clamp(min=0)
        ref = hf.double()(got, attention_mask=full, position_ids=pos).logits
        cache, logits = ours.new_cache(len(lengths), got.shape[1]), []
        logits.append(ours(got[:, :ids.shape[1]], full[:, :ids.shape[1]], past_key_values=cache).logits)
        for i in range(ids.shape[1], got.shape[1]):
            logits.append(ours(got[:, i:i + 1], full[:, :i + 1], past_key_values=cache).logits)
    real = full.bool()
    assert rel_err(torch.cat(logits, 1)[real], ref[real]) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepack_off_keeps_one_copy_and_the_same_logits(dtype, native):
    """``from_pretrained(prepack=False)`` builds no blocked copies (one copy of each weight); its logits and
    the prepacked model's (one row, two rows: padded, a batch) each match float64 within the dtype's
    budget; ``prepack`` must be a bool."""
    if not _onednn(dtype):
        pytest.skip("no oneDNN for this dtype here")
    hf = test_gpt2.hf_model(n_embd=192, n_head=3, vocab_size=600)  # wide enough for oneDNN (not tiny GEMMs)
    models = {p: engine.from_pretrained(hf, dtype=dtype, prepack=p) for p in (True, False)}
    ids = torch.randint(0, 600, (3, 7), generator=torch.Generator().manual_seed(5))
    hf64, hf_lowp = copy.deepcopy(hf).double(), hf.to(dtype)
    with torch.no_grad():
        for rows in (ids[:1, :1], ids[:2, -1:], ids):
            ref = hf64(rows).logits
            budget = 2e-5 if dtype == torch.float32 else 2 * rel_err(hf_lowp(rows).logits, ref)
            for p, m in models.items():
                assert rel_err(m(rows).logits, ref) < budget, (p, rows.shape)
    copies = {p: [m.__dict__.get("_packed") is not None for m in models[p].modules()
                  if isinstance(m, engine.layers.Prepacked)] for p in models}
    assert any(copies[True]) and not any(copies[False])
    with pytest.raises(TypeError, match="prepack must be True or False"):
        engine.from_pretrained(hf, prepack="no")


def test_gpt2_beam_search_native_equals_hf(native):
    """Beam search on the native path (3 beams: oneDNN on the transposed views each step) gives Hugging
    Face's sequences."""
    hf = test_gpt2.hf_model()
    ours = engine.from_pretrained(hf)
    ids, mask = test_gpt2.left_padded([7, 4])
    kw = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)
        assert torch.equal(ours.generate(ids, mask, **kw), want)


def test_auto_picks_native_without_the_interpreter(monkeypatch):
    from trifuse.kernels import _dispatch

    monkeypatch.setattr(_dispatch, "INTERPRET", False)
    assert kernels.runs_native(torch.zeros(1))
    with kernels.use_backend("reference"):
        assert not kernels.runs_native(torch.zeros(1))


# ----------------------------------------------------------------------------
# Every family and head, native and reference, against Hugging Face in float64.


def _bert_cases():
    for family in test_bert.CONFIGS:
        for head in test_bert.HEADS:
            yield f"{family}-{head}", lambda f=family, h=head: _bert(f, h)


def _bert(family, head):
    hf = test_bert.hf_model(family, head)
    ids, mask = test_bert.batch(hf.config)
    return hf, dict(input_ids=ids, attention_mask=mask)


def _gpt2(head):
    hf = test_gpt2.hf_model(head)
    return hf, dict(input_ids=torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1)))


def _t5(flavour, cls):
    hf = test_t5.hf_model(flavour, cls)
    ids, mask = test_t5.encoder_batch()
    kw = dict(input_ids=ids, attention_mask=mask)
    if cls != "T5EncoderModel":
        kw["decoder_input_ids"] = test_t5.decoder_batch(n=12)
    return hf, kw


def _bart(cls):
    hf = test_bart.hf_model("base", cls)
    ids, mask = test_bart.batch(b=3)
    ids[torch.arange(3), mask.sum(1) - 1] = 2  # one EOS per row (the classification head reads it)
    kw = dict(input_ids=ids, attention_mask=mask)
    if cls in ("BartForConditionalGeneration", "BartModel"):
        kw["decoder_input_ids"] = test_bart.decoder_ids()
    return hf, kw


def _vit(name, head):
    hf = test_vit.hf_model(name, head)
    return hf, dict(pixel_values=test_vit.pixels(hf.config))


MODELS = dict(_bert_cases())
MODELS.update({f"gpt2-{h}": (lambda h=h: _gpt2(h)) for h in ("LMHead", "Model")})
MODELS.update({f"t5-{f}-{c}": (lambda f=f, c=c: _t5(f, c)) for f in test_t5.FLAVOURS for c in test_t5.CLASSES})
MODELS.update({f"bart-{c}": (lambda c=c: _bart(c)) for c in test_bart.CLASSES})
MODELS.update({f"{n}-{h}": (lambda n=n, h=h: _vit(n, h)) for n, h in test_vit.CASES})
FIELDS = ("logits", "start_logits", "end_logits", "last_hidden_state", "pooler_output", "encoder_last_hidden_state")


def _real(f: str, t: torch.Tensor, ref, kw: dict) -> torch.Tensor:
    """``t`` at the real tokens where ``f`` is per encoder token: padded batches run packed and padded
    positions hold zeros there (docs/padding-free.md), where Hugging Face computes them anyway."""
    mask = kw.get("attention_mask")
    encoder_side = f == "encoder_last_hidden_state" or "encoder_last_hidden_state" not in ref.keys()
    if mask is None or not encoder_side or t.shape[:2] != mask.shape:
        return t
    return t[mask.bool()]


@pytest.mark.parametrize("name", list(MODELS))
def test_family_native_and_reference_match_float64(name, monkeypatch):
    import sys

    from trifuse.kernels import cpu

    varlen = sys.modules["trifuse.kernels.varlen"]  # kernels.attention_varlen is the function
    ran = []
    # attention: the padded op's native path, or the packed (varlen) op's when the batch runs packed
    for mod, op, kind in ((cpu, "attention", "attention"), (cpu, "norm", "norm"), (varlen, "_sdpa", "attention")):
        real = getattr(mod, op)
        monkeypatch.setattr(mod, op, lambda *a, _real=real, _op=kind, **k: ran.append(_op) or _real(*a, **k))
    hf, kw = MODELS[name]()
    ours = engine.from_pretrained(hf)
    hf64 = hf.double()
    with torch.no_grad():
        ref = hf64(**{k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()})
        for backend in ("native", "reference"):
            with kernels.use_backend(backend):
                out = ours(*kw.values()) if "pixel_values" in kw else ours(**kw)
            checked = [f for f in FIELDS if f in out.keys() and out[f] is not None and f in ref.keys()]
            assert checked
            for f in checked:
                err = rel_err(_real(f, out[f], ref, kw), _real(f, ref[f], ref, kw))
                assert err < 2e-5, f"{backend} {f}: relative error {err:.2e} against float64"
            assert (set(ran) == {"attention", "norm"}) == (backend == "native"), ran
            ran.clear()


@pytest.mark.parametrize("name", list(MODELS))
def test_family_bf16_native_within_twice_hf_bf16_error(name):
    """bf16 (oneDNN's AVX512_BF16 GEMMs where the CPU has them, fp32 softmax and norm statistics): the
    error against float64 is at most twice Hugging Face's own bf16 error, plus 0.4% of the output's
    range. Measured (2-core Zen 4): ours 0.6-1.7x Hugging Face's error across these models."""
    import copy

    hf, kw = MODELS[name]()
    ours = engine.from_pretrained(hf, dtype=torch.bfloat16)
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    cast = lambda dt: {k: (v.to(dt) if v.is_floating_point() else v) for k, v in kw.items()}  # noqa: E731
    with torch.no_grad():
        ref = hf.double()(**cast(torch.float64))
        theirs = hf_bf16(**cast(torch.bfloat16))
        with kernels.use_backend("native"):
            out = ours(*cast(torch.bfloat16).values()) if "pixel_values" in kw else ours(**cast(torch.bfloat16))
    for f in [f for f in FIELDS if f in out.keys() and out[f] is not None and f in ref.keys()]:
        assert out[f].dtype == torch.bfloat16
        real = lambda t: _real(f, t, ref, kw)  # noqa: E731
        ours_err, hf_err = rel_err(real(out[f]), real(ref[f])), rel_err(real(theirs[f]), real(ref[f]))
        assert ours_err <= 2 * hf_err + 4e-3, f"{f}: bf16 error {ours_err:.2e}, Hugging Face's {hf_err:.2e}"
