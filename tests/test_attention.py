"""trifuse.kernels.attention against its float64 reference, PyTorch SDPA, FlexAttention and HF's T5.

Without a GPU the Triton kernel runs under the interpreter, so shapes stay small
(B, H <= 2) and the cases form a table that covers each axis (odd lengths,
Lq != Lk, head dims, masks, bias shapes, T5 bias, strided views, split-K)
rather than their cross-product.
"""

from __future__ import annotations

import importlib
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import TOL, assert_matches_reference, bench_row_passed, max_err
from trifuse import kernels
from trifuse.kernels import RelativeBias, attention, attention_reference, relative_position_bucket

# ``kernels.attention`` is the function; the module is reached through sys.modules.
attn_mod = importlib.import_module("trifuse.kernels.attention")

LOWP_CPU = [torch.float32, torch.float16]


def _qkv(B, H, Lq, Lk, D, dtype, device):
    mk = lambda L: torch.randn(B, H, L, D, device=device, dtype=dtype)  # noqa: E731
    return mk(Lq), mk(Lk), mk(Lk)


def _ref64(q, k, v, **kw):
    kw = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()}
    if kw.get("relative_bias") is not None:
        rb = kw["relative_bias"]
        kw["relative_bias"] = RelativeBias(rb.table.double(), rb.bidirectional, rb.num_buckets,
                                           rb.max_distance, rb.query_offset)
    return attention_reference(q.double(), k.double(), v.double(), **kw)


def _visible(B, Lq, Lk, causal, mask, device):
    """[B, 1, Lq, Lk] bool: which keys each query sees (SDPA's attn_mask convention)."""
    vis = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        vis &= torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril(Lk - Lq)
    if mask is not None:
        vis &= mask.bool()[:, None, None, :]
    return vis


def _sdpa(q, k, v, *, causal=False, attention_mask=None, bias=None, scale=None):
    """PyTorch's SDPA on the same problem (bottom-right causal and the padding mask as attn_mask)."""
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    vis = _visible(B, Lq, Lk, causal, attention_mask, q.device)
    m = torch.zeros(vis.shape, dtype=q.dtype, device=q.device).masked_fill(~vis, float("-inf"))
    if bias is not None:
        m = m + bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)


def _check(out, q, k, v, *, sdpa=True, **kw):
    """``out`` vs the fp64 reference (2x PyTorch's own error for fp16) and vs SDPA on visible rows."""
    ref = _ref64(q, k, v, **kw)
    assert torch.isfinite(out).all()
    lowp = None
    if sdpa and kw.get("relative_bias") is None:
        sk = {n: kw[n] for n in ("causal", "attention_mask", "bias", "scale") if n in kw}
        lowp = _sdpa(q, k, v, **sk)
        vis = _visible(q.shape[0], q.shape[2], k.shape[2], kw.get("causal", False),
                       kw.get("attention_mask"), q.device).any(-1, keepdim=True)
        vis = vis.expand_as(out)
        atol, rtol = TOL[q.dtype]
        torch.testing.assert_close(out[vis].double(), lowp[vis].double(), atol=2 * atol, rtol=2 * rtol)
        lowp = torch.where(vis, lowp, ref.to(lowp.dtype))  # SDPA gives NaN on rows that see nothing
    assert_matches_reference(out, ref, q.dtype, torch_lowp=lowp)


def _check_paths(paths, q, k, v, **kw):
    """Several code paths for one problem (name -> output), each checked by :func:`_check`: against
    float64 within the dtype's budget, never against each other more tightly (tests/helpers.py)."""
    assert len(paths) > 1
    for name, out in paths.items():
        try:
            _check(out, q, k, v, **kw)
        except AssertionError as e:
            raise AssertionError(f"path {name!r}: {e}") from None


# ----------------------------------------------------------------------------
# Shapes: each axis (odd lengths, Lq != Lk, head dims, causal) appears somewhere.

CASES = [
    # B, H, Lq, Lk, D, causal
    (1, 2, 1, 1, 32, False),
    (1, 2, 7, 7, 64, True),
    (2, 1, 97, 97, 80, False),
    (1, 2, 97, 130, 96, True),  # Lq < Lk: bottom-right causal, as with a KV cache
    (1, 1, 130, 97, 128, True),  # Lq > Lk: the first rows see no key -> zeros
    (1, 2, 7, 130, 32, False),  # cross-attention
    (2, 2, 1, 257, 64, True),  # one-token decode
    (1, 1, 257, 257, 16, True),
]


@pytest.mark.parametrize("dtype", LOWP_CPU)
@pytest.mark.parametrize("B,H,Lq,Lk,D,causal", CASES)
def test_matches_reference(B, H, Lq, Lk, D, causal, dtype, device):
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, device)
    out = attention(q, k, v, causal=causal)
    assert out.shape == (B, H, Lq, D) and out.dtype == dtype and out.is_contiguous()
    _check(out, q, k, v, causal=causal)
    if causal and Lq > Lk:
        assert (out[:, :, : Lq - Lk] == 0).all()  # rows that see no key are defined as zeros


@pytest.mark.parametrize("dtype", LOWP_CPU)
@pytest.mark.parametrize("D", [1, 4, 8, 80, 96, 256])
def test_any_head_dim(D, dtype, device):
    """Head dims 1..256: under 16 (transformers' tiny test checkpoints have 4 and 8) the kernel pads
    to its smallest block and masks the rest; 80, 96 and 256 are not powers of two or the largest.
    Causal with a padding mask, T5's bias, and split-K, each against float64."""
    B, H, Lq, Lk = 2, 2, 9, 37
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, device)
    mask = torch.ones(B, Lk, dtype=torch.bool, device=device)
    mask[1, 20:] = False
    rb = RelativeBias(torch.randn(8, H, device=device, dtype=dtype), False, 8, 12)
    for kw in (dict(causal=True, attention_mask=mask), dict(causal=True, relative_bias=rb, scale=1.0)):
        _check(attention(q, k, v, **kw), q, k, v, **kw)
    qd = q[:, :, -1:]
    _check(attention(qd, k, v, _num_splits=2), qd, k, v)


def _tiny_checkpoint(family, path):
    """A random transformers checkpoint with tiny heads: BERT and GPT-2 at head dim 4 (hidden 16,
    4 heads), T5 and BART at head dim 8 (hidden 16, 2 heads)."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = {
        "bert": lambda: T.BertModel(T.BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=32)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=99, n_embd=16, n_layer=2, n_head=4,
                                                       n_positions=64, bos_token_id=0, eos_token_id=0)),
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=99, d_model=16, d_kv=8, d_ff=32,
                                                              num_layers=2, num_heads=2, decoder_start_token_id=0)),
        "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=99, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)),
    }[family]().eval()
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("backend", ["auto", "native", "reference"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "bart"])
def test_tiny_head_dim_models_match_transformers(family, backend, device, tmp_path, monkeypatch):
    """Checkpoints with head dim 4 or 8 load and match transformers, through the Triton kernel
    (compiled, or under the interpreter on the CPU), the native CPU path and the reference."""
    if backend == "native" and device != "cpu":
        pytest.skip("the native path is the CPU's")
    from tests.helpers import OUTPUT_FIELDS, assert_same_outputs
    from trifuse import engine

    hf = _tiny_checkpoint(family, tmp_path)
    model = engine.from_pretrained(tmp_path, device=device)
    launches = []
    real = attn_mod._launch
    monkeypatch.setattr(attn_mod, "_launch", lambda q, *a: launches.append(q.shape[-1]) or real(q, *a))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    kw = {}
    if family == "gpt2":
        mask = None  # HF's positions ignore right padding; left padding has its own tests
    else:
        mask[1, 6:] = 0
    if family in ("t5", "bart"):
        kw["decoder_input_ids"] = ids[:, :5]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, **kw)
        with kernels.use_backend(backend):
            ours = model(ids.to(device), None if mask is None else mask.to(device),
                         **{n: t.to(device) for n, t in kw.items()})
    fields = [f for f in OUTPUT_FIELDS if f in ref.keys()]
    assert_same_outputs({f: ours[f].cpu() for f in fields}, ref, fields=fields)
    assert bool(launches) == (backend == "auto" and kernels.triton_runnable(torch.device(device)))
    assert set(launches) <= {4, 8}


def _tight_poisoned_lut(monkeypatch, blocks):
    """Shrink the T5 lookup to exactly the reach the kernel claims (BLOCK_M + BLOCK_N past
    max_distance) and surround it with NaN, so any read outside it poisons the output."""
    monkeypatch.setattr(attn_mod, "_REL_PAD", sum(blocks))
    real = attn_mod._relative_lut

    def poisoned(*args):
        lut = real(*args)
        H, n = lut.shape
        store = torch.full((H + 2, n + 2 * 4096), float("nan"), device=lut.device)
        store[1:-1, 4096:-4096] = lut
        return store[1:-1, 4096:-4096]

    monkeypatch.setattr(attn_mod, "_relative_lut", poisoned)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), (32, 32)])
def test_block_shapes(blocks, device, monkeypatch):
    """BLOCK_M != BLOCK_N both ways: the causal split and the T5 band logic at block edges."""
    if device != "cpu":
        pytest.skip("the fixed block shape only applies under the interpreter")
    monkeypatch.setattr(attn_mod, "_INTERPRET_BLOCKS", blocks)
    _tight_poisoned_lut(monkeypatch, blocks)
    for Lq, Lk, causal, bidirectional, offset in [(45, 77, True, False, None), (77, 45, True, False, None),
                                                 (70, 130, False, True, None), (50, 140, False, True, 37)]:
        q, k, v = _qkv(1, 2, Lq, Lk, 32, torch.float32, device)
        rb = RelativeBias(torch.randn(8, 2, device=device), bidirectional, 8, 20, offset)
        mask = torch.arange(Lk, device=device)[None] < Lk - 3
        kw = dict(causal=causal, relative_bias=rb, attention_mask=mask)
        _check(attention(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 7), (7, 7), (7, 97), (97, 7), (97, 97)])
def test_t5_band_odd_sizes(Lq, Lk, blocks, device, monkeypatch):
    """The T5 bias is staged per tile as one contiguous band of BLOCK_M + BLOCK_N - 1 distances
    (then gathered into the Toeplitz tile): odd sizes, both block shapes, reads kept inside the
    claimed reach (NaN around it), encoder (bidirectional) and decoder (causal, cached offset)."""
    if device != "cpu":
        pytest.skip("the fixed block shape only applies under the interpreter")
    monkeypatch.setattr(attn_mod, "_INTERPRET_BLOCKS", blocks)
    _tight_poisoned_lut(monkeypatch, blocks)
    table = torch.randn(8, 2, device=device)
    for bidirectional, causal, offset in [(True, False, None), (True, False, 0), (False, True, None)]:
        q, k, v = _qkv(1, 2, Lq, Lk, 32, torch.float32, device)
        kw = dict(causal=causal, relative_bias=RelativeBias(table, bidirectional, 8, 12, offset), scale=1.0)
        _check(attention(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.parametrize("offset", [None, 0, 5, 96, 250, 299])
def test_t5_decode_one_query_with_offsets(offset, device):
    """KV-cache decoding: Lq == 1 at position ``offset`` (rel_off) of a 300-key cache, the causal
    horizon and split-K (each split reads its own band) all agree with one split and the reference."""
    q, k, v = _qkv(2, 2, 1, 300, 64, torch.float32, device)
    rb = RelativeBias(torch.randn(32, 2, device=device), False, 32, 40, offset)
    kw = dict(causal=True, relative_bias=rb, scale=1.0)
    _check_paths({f"{n} splits": attention(q, k, v, _num_splits=n, **kw) for n in (1, 3)}, q, k, v, **kw)


@pytest.mark.parametrize("causal,t5", [(False, False), (True, False), (False, True), (True, True)])
def test_mask_all_ones_equals_none(causal, t5, device):
    """An all-ones padding mask (bool or int64) changes nothing: with it and without it, each
    output matches the float64 reference of the unmasked problem within fp16's budget."""
    q, k, v = _qkv(2, 2, 37, 70, 32, torch.float16, device)
    kw = dict(causal=causal)
    if t5:
        kw.update(relative_bias=RelativeBias(torch.randn(8, 2, device=device), not causal, 8, 20), scale=1.0)
    paths = {"no mask": attention(q, k, v, **kw)}
    for dtype in (torch.bool, torch.long):
        mask = torch.ones(2, 70, dtype=dtype, device=device)
        paths[f"all-ones {dtype} mask"] = attention(q, k, v, attention_mask=mask, **kw)
    _check_paths(paths, q, k, v, **kw)


@pytest.mark.parametrize("offset", [-33, -1, 0, 1, 14, 15, 30, 31, 33])
def test_causal_diagonal_offsets(offset, device):
    """Lk - Lq around block-size multiples: where a key block turns from masked to fully visible."""
    Lq = 37
    q, k, v = _qkv(1, 1, Lq, Lq + offset, 16, torch.float32, device)
    _check(attention(q, k, v, causal=True), q, k, v, causal=True)


def test_scale(device):
    q, k, v = _qkv(1, 2, 9, 11, 64, torch.float32, device)
    _check(attention(q, k, v, scale=1.0), q, k, v, scale=1.0)
    _check(attention(q, k, v, scale=0.02), q, k, v, scale=0.02)


# ----------------------------------------------------------------------------
# Padding mask and additive bias.


@pytest.mark.parametrize("dtype", LOWP_CPU)
@pytest.mark.parametrize("causal", [False, True])
def test_padding_mask(causal, dtype, device):
    B, H, Lq, Lk, D = 3, 2, 19, 45, 64
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, device)
    lengths = torch.tensor([45, 13, 0], device=device)  # full, short, and one batch with no key at all
    mask = (torch.arange(Lk, device=device)[None] < lengths[:, None]).long()  # HF's int64 0/1
    out = attention(q, k, v, causal=causal, attention_mask=mask)
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all()
    as_bool = attention(q, k, v, causal=causal, attention_mask=mask.bool())
    _check_paths({"int64 mask": out, "bool mask": as_bool}, q, k, v, causal=causal, attention_mask=mask)


BIAS_SHAPES = [
    lambda B, H, Lq, Lk: (Lq, Lk),
    lambda B, H, Lq, Lk: (1, H, 1, Lk),
    lambda B, H, Lq, Lk: (B, 1, Lq, Lk),
    lambda B, H, Lq, Lk: (H, Lq, 1),
    lambda B, H, Lq, Lk: (B, H, Lq, Lk),
    lambda B, H, Lq, Lk: (Lk,),
]


@pytest.mark.parametrize("shape_fn", BIAS_SHAPES, ids=["LqLk", "1H1Lk", "B1LqLk", "HLq1", "full", "Lk"])
def test_bias_broadcast(shape_fn, device):
    B, H, Lq, Lk, D = 2, 2, 37, 70, 32
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.float32, device)
    bias = torch.randn(shape_fn(B, H, Lq, Lk), device=device)
    _check(attention(q, k, v, bias=bias), q, k, v, bias=bias)


def test_bias_fp16_causal_and_neg_inf(device):
    B, H, Lq, Lk, D = 2, 2, 33, 33, 64
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.float16, device)
    bias = torch.randn(B, 1, Lq, Lk, device=device, dtype=torch.float16)
    bias[1, :, 5] = float("-inf")  # a whole row killed by the bias itself -> zeros, not NaN
    out = attention(q, k, v, bias=bias, causal=True)
    assert (out[1, :, 5] == 0).all()
    _check(out, q, k, v, bias=bias, causal=True, sdpa=False)


# ----------------------------------------------------------------------------
# T5 relative position bias.


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (64, 300)])
def test_bucket_matches_hf(bidirectional, num_buckets, max_distance):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rp = torch.arange(-4 * max_distance - 7, 4 * max_distance + 8)
    ours = relative_position_bucket(rp, bidirectional, num_buckets, max_distance)
    hf = t5.T5Attention._relative_position_bucket(rp, bidirectional, num_buckets, max_distance)
    assert ours.dtype == torch.long
    assert torch.equal(ours, hf)
    grid = rp[None, :] - rp[:50, None]  # 2-D input (the [Lq, Lk] shape HF uses)
    assert torch.equal(relative_position_bucket(grid, bidirectional, num_buckets, max_distance),
                       t5.T5Attention._relative_position_bucket(grid, bidirectional, num_buckets, max_distance))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (64, 300), (16, 9)])
def test_bucket_saturates(bidirectional, num_buckets, max_distance):
    """The in-kernel lookup clamps distances to +-max_distance: valid only if buckets saturate there."""
    far = torch.arange(max_distance, 50 * max_distance)
    for sign in (1, -1):
        got = relative_position_bucket(sign * far, bidirectional, num_buckets, max_distance)
        edge = relative_position_bucket(torch.tensor([sign * max_distance]), bidirectional, num_buckets, max_distance)
        assert (got == edge).all()


def _hf_t5_bias(table, bidirectional, max_distance, Lq, Lk, past):
    """[1, H, Lq, Lk] from Hugging Face's own T5Attention.compute_bias."""
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    from transformers import T5Config

    nb, H = table.shape
    cfg = T5Config(d_model=8, d_kv=4, num_heads=H, relative_attention_num_buckets=nb,
                   relative_attention_max_distance=max_distance, is_decoder=not bidirectional)
    layer = t5.T5Attention(cfg, has_relative_attention_bias=True, layer_idx=0)
    with torch.no_grad():
        layer.relative_attention_bias.weight.copy_(table)
        return layer.compute_bias(Lq, Lk, device=table.device, past_seen_tokens=past)


T5_CASES = [
    # bidirectional, causal, Lq, Lk, query_offset (None = Lk - Lq), max_distance
    (True, False, 97, 97, None, 32),  # encoder self-attention
    (True, False, 300, 300, 0, 128),  # long enough that whole blocks saturate both ways
    (False, True, 41, 41, None, 16),  # decoder prefill
    (False, True, 3, 200, None, 64),  # decoder with a cache: query i at position i + 197
    (False, True, 5, 60, 20, 16),  # explicit offset
]


@pytest.mark.parametrize("dtype", LOWP_CPU)
@pytest.mark.parametrize("bidirectional,causal,Lq,Lk,offset,max_distance", T5_CASES)
def test_t5_bias(bidirectional, causal, Lq, Lk, offset, max_distance, dtype, device):
    B, H, D, nb = 2, 2, 64, 32 if max_distance > 32 else 8
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, device)
    q = q * 0.125  # T5 runs with scale 1.0; keep the logits in a sane range
    table = torch.randn(nb, H, device=device, dtype=dtype)
    rb = RelativeBias(table, bidirectional, nb, max_distance, offset)
    mask = torch.ones(B, Lk, dtype=torch.bool, device=device)
    mask[1, Lk // 2:] = False
    out = attention(q, k, v, causal=causal, attention_mask=mask, relative_bias=rb, scale=1.0)
    _check(out, q, k, v, causal=causal, attention_mask=mask, relative_bias=rb, scale=1.0)
    # The same problem with HF's dense bias through SDPA: an independent construction.
    dense = _hf_t5_bias(table.float(), bidirectional, max_distance, Lq, Lk, Lk - Lq if offset is None else offset)
    sd = _sdpa(q.float(), k.float(), v.float(), causal=causal, attention_mask=mask, bias=dense, scale=1.0)
    assert max_err(out, sd) <= 2 * TOL[dtype][0]  # two paths, each within the budget of float64


def test_t5_flex_attention(device):
    """FlexAttention with a score_mod doing the bucket lookup, where it runs eagerly."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        pytest.skip("FlexAttention is not in this torch")
    B, H, Lq, Lk, D, nb, md = 1, 2, 24, 40, 32, 8, 12
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.float32, device)
    table = torch.randn(nb, H, device=device)
    off = Lk - Lq

    def score_mod(score, b, h, qi, ki):
        bucket = relative_position_bucket(ki - (qi + off), True, nb, md)
        return score + table[bucket, h]

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": eager is the point here
            flex = flex_attention(q, k, v, score_mod=score_mod, scale=1.0)
    except Exception as e:  # eager FlexAttention not available on this device/build
        pytest.skip(f"FlexAttention does not run here: {type(e).__name__}: {e}")
    rb = RelativeBias(table, True, nb, md)
    _check_paths({"trifuse": attention(q, k, v, relative_bias=rb, scale=1.0), "FlexAttention": flex},
                 q, k, v, relative_bias=rb, scale=1.0)


# ----------------------------------------------------------------------------
# Layout: a view of a fused QKV projection needs no copy.


@pytest.mark.parametrize("dtype", LOWP_CPU)
def test_strided_qkv_views(dtype, device, monkeypatch):
    B, L, H, D = 2, 53, 2, 64
    qkv = torch.randn(B, L, 3 * H * D, device=device, dtype=dtype)
    q, k, v = qkv.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    seen = []
    real = attn_mod._launch
    monkeypatch.setattr(attn_mod, "_launch", lambda q_, k_, v_, *a: seen.append((q_, k_, v_)) or real(q_, k_, v_, *a))
    out = attention(q, k, v, causal=True)
    if device == "cpu" or seen:  # the kernel received the views themselves, no copy
        assert seen and all(t.data_ptr() == u.data_ptr() and t.stride() == u.stride()
                            for t, u in zip(seen[0], (q, k, v)))
    _check(out, q, k, v, causal=True)
    kt = torch.randn(B, H, D, L, device=device, dtype=dtype).transpose(-1, -2)  # unit stride on L, not D
    _check(attention(q, kt, v), q, kt, v)


# ----------------------------------------------------------------------------
# Split-K decoding.

SPLIT_CASES = [
    # Lq, Lk, causal, mask, bias, rel
    (1, 257, False, False, False, False),
    (1, 300, True, True, False, False),
    (3, 200, True, False, True, False),
    (2, 333, True, True, False, True),
    (40, 100, True, False, False, True),  # several query blocks; the causal horizon cuts splits
]


@pytest.mark.parametrize("Lq,Lk,causal,use_mask,use_bias,use_rel", SPLIT_CASES)
def test_split_k(Lq, Lk, causal, use_mask, use_bias, use_rel, device):
    B, H, D = 2, 2, 64
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.float32, device)
    kw = dict(causal=causal)
    if use_mask:
        mask = torch.ones(B, Lk, dtype=torch.long, device=device)
        mask[0, 7:] = 0
        mask[1, : Lk - 3] = 0  # only the last keys: most splits see nothing
        kw["attention_mask"] = mask
    if use_bias:
        kw["bias"] = torch.randn(1, H, Lq, Lk, device=device)
    if use_rel:
        kw["relative_bias"] = RelativeBias(torch.randn(16, H, device=device), not causal, 16, 40)
    _check_paths({f"{n} splits": attention(q, k, v, _num_splits=n, **kw) for n in (1, 3, 5)}, q, k, v, **kw)


def test_split_plan():
    plan = attn_mod._split_plan
    align = attn_mod._split_align()
    splits, per = plan(1 * 32, 1, 16384, 0, 132)  # batch-1 decode: split
    assert splits > 1 and per % align == 0 and (splits - 1) * per < 16384 <= splits * per
    assert plan(64 * 32, 1, 16384, 0, 132) == (1, 16384)  # enough programs already
    assert plan(1 * 32, 1, 300, 0, 132) == (1, 300)  # too few keys to be worth it
    assert plan(8, 2048, 2048, 0, 132)[0] == 1  # prefill: many query blocks
    assert plan(1, 1, 1000, 1, 132) == (1, 1000)
    s, per = plan(1, 1, 1000, 4, 132)
    assert 1 < s <= 4 and (s - 1) * per < 1000 <= s * per


def test_split_k_automatic(device):
    """The heuristic picks split-K for batch-1 decode over a long cache (interpreter too)."""
    q, k, v = _qkv(1, 2, 1, 700, 32, torch.float32, device)
    n_sm = 132 if device == "cpu" else torch.cuda.get_device_properties(0).multi_processor_count
    assert attn_mod._split_plan(2, 1, 700, 0, n_sm)[0] > 1
    _check(attention(q, k, v, causal=True), q, k, v, causal=True)


# ----------------------------------------------------------------------------
# The op: opcheck, dispatch, fake-tensor validation, dtypes.


def test_opcheck(device):
    q, k, v = _qkv(1, 2, 5, 9, 32, torch.float32, device)
    mask = torch.ones(1, 9, dtype=torch.bool, device=device)
    bias = torch.randn(5, 9, device=device)
    table = torch.randn(8, 2, device=device)
    torch.library.opcheck(torch.ops.trifuse.attention.default,
                          (q, k, v, mask, bias, table, True, 8, 12, 4, True, 0.3, 0))
    torch.library.opcheck(torch.ops.trifuse.attention.default,
                          (q, k, v, None, None, None, True, 32, 128, 0, False, 0.1, 2))


def test_fake_tensor_validates():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (torch.empty(1, 2, 4, 32) for _ in range(3))
        assert attention(q, k, v).shape == (1, 2, 4, 32)
        with pytest.raises(ValueError, match="attention_mask"):
            attention(q, k, v, attention_mask=torch.ones(1, 5, dtype=torch.bool))


def test_reference_backend_and_fp64(device):
    q, k, v = _qkv(1, 2, 9, 20, 32, torch.float32, device)
    with kernels.use_backend("reference"):
        ref = attention(q, k, v, causal=True)
    _check_paths({"reference backend": ref, "auto": attention(q, k, v, causal=True)}, q, k, v, causal=True)
    q64, k64, v64 = q.double(), k.double(), v.double()
    out = attention(q64, k64, v64, causal=True)  # fp64 runs the reference
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, attention_reference(q64, k64, v64, causal=True), atol=0, rtol=0)
    if device == "cpu":  # the interpreter has no correct bf16 dot: bf16 on the CPU runs the reference
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        torch.testing.assert_close(attention(qb, kb, vb), attention_reference(qb, kb, vb), atol=0, rtol=0)


def test_empty(device):
    q, k, v = _qkv(0, 2, 4, 5, 32, torch.float32, device)
    assert attention(q, k, v).shape == (0, 2, 4, 32)
    q, k, v = _qkv(1, 2, 0, 5, 32, torch.float32, device)
    assert attention(q, k, v).shape == (1, 2, 0, 32)


def test_property_hypothesis(device):
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=6, deadline=None, derandomize=True,
                  suppress_health_check=list(hyp.HealthCheck))
    @hyp.given(
        lq=st.integers(1, 70), lk=st.integers(1, 70), d=st.sampled_from([16, 24, 48, 64]),
        causal=st.booleans(), use_mask=st.booleans(), bias_kind=st.sampled_from([None, "row", "full"]),
        use_rel=st.booleans(), splits=st.sampled_from([0, 1, 3]), seed=st.integers(0, 2**16),
    )
    def prop(lq, lk, d, causal, use_mask, bias_kind, use_rel, splits, seed):
        g = torch.Generator().manual_seed(seed)
        B, H = 2, 2
        q, k, v = (torch.randn(B, H, L, d, generator=g).to(device) for L in (lq, lk, lk))
        kw = dict(causal=causal)
        if use_mask:
            kw["attention_mask"] = (torch.rand(B, lk, generator=g) > 0.3).to(device)
        if bias_kind == "row":
            kw["bias"] = torch.randn(1, H, 1, lk, generator=g).to(device)
        elif bias_kind == "full":
            kw["bias"] = torch.randn(B, H, lq, lk, generator=g).to(device)
        if use_rel:
            kw["relative_bias"] = RelativeBias(torch.randn(8, H, generator=g).to(device), not causal, 8, 10)
        out = attention(q, k, v, _num_splits=splits, **kw)
        assert torch.isfinite(out).all()
        assert_matches_reference(out, _ref64(q, k, v, **kw), torch.float32)

    prop()


# ----------------------------------------------------------------------------
# Bad input: each names the problem.


def _bad_cases(device):
    q, k, v = _qkv(2, 2, 5, 7, 32, torch.float32, device)
    ok = dict(q=q, k=k, v=v)
    rb = lambda t, nb=8, md=16: RelativeBias(t, True, nb, md)  # noqa: E731
    return [
        (dict(ok, k=k[:, :1]), {}, ValueError, "number of heads"),
        (dict(ok, v=v[:1]), {}, ValueError, "batch size"),
        (dict(ok, k=torch.randn(2, 2, 7, 16, device=device)), {}, ValueError, "head dim"),
        (dict(ok, v=v[:, :, :6]), {}, ValueError, "6 values"),
        (dict(ok, k=k.half()), {}, TypeError, "dtype"),
        (dict(ok, q=q[0]), {}, ValueError, "4-D"),
        (dict(ok, q=q.long(), k=k.long(), v=v.long()), {}, TypeError, "floating-point"),
        (dict(q=torch.randn(1, 1, 3, 0), k=torch.randn(1, 1, 3, 0), v=torch.randn(1, 1, 3, 0)), {},
         ValueError, r"head dim 0 is unsupported; expected 1\.\.256"),
        (dict(q=torch.randn(1, 1, 3, 320), k=torch.randn(1, 1, 3, 320), v=torch.randn(1, 1, 3, 320)), {},
         ValueError, r"head dim 320 is unsupported; expected 1\.\.256"),
        (dict(ok, k=k[:, :, :0], v=v[:, :, :0]), {}, ValueError, "at least one key"),
        (ok, dict(attention_mask=torch.ones(2, 5, dtype=torch.bool, device=device)), ValueError, "attention_mask has shape"),
        (ok, dict(attention_mask=torch.ones(2, 7, device=device)), TypeError, "bool or integer"),
        (ok, dict(bias=torch.randn(3, 5, 7, device=device)), ValueError, "does not broadcast"),
        (ok, dict(bias=torch.randn(5, 6, device=device)), ValueError, "does not broadcast"),
        (ok, dict(bias=torch.randn(1, 2, 2, 5, 7, device=device)), ValueError, "does not broadcast"),
        (ok, dict(bias=torch.ones(5, 7, dtype=torch.long, device=device)), TypeError, "bias"),
        (ok, dict(relative_bias=rb(torch.randn(8, 3, device=device))), ValueError, "num_buckets, H"),
        (ok, dict(relative_bias=rb(torch.randn(6, 2, device=device))), ValueError, "num_buckets, H"),
        (ok, dict(relative_bias=rb(torch.randn(8, 2, device=device), md=3)), ValueError, "max_distance"),
        (ok, dict(relative_bias=torch.randn(8, 2)), TypeError, "RelativeBias"),
        (ok, dict(scale=float("nan")), ValueError, "scale"),
    ]


def test_bad_input(device):
    """Every row of the table, on the op and on the reference: the error type and its words."""
    for i, (args, kw, exc, match) in enumerate(_bad_cases(device)):
        for op in (attention, attention_reference):
            with pytest.raises(exc, match=match):
                op(args["q"], args["k"], args["v"], **kw)
                pytest.fail(f"case {i} ({match!r}) was accepted by {op.__name__}")


def test_device_mismatch():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    q, k, v = _qkv(1, 1, 3, 3, 32, torch.float32, "cuda")
    with pytest.raises(ValueError, match="is on"):
        attention(q, k.cpu(), v)


# ----------------------------------------------------------------------------
# GPU only: bf16 (the interpreter has no bf16 dot), compiled shapes, memory.


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Lq,Lk,D,causal", CASES + [(2, 4, 1024, 1024, 128, True), (1, 8, 1, 8192, 128, True)])
def test_bf16(B, H, Lq, Lk, D, causal):
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.bfloat16, "cuda")
    _check(attention(q, k, v, causal=causal), q, k, v, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Lq,Lk,D,causal", [(2048, 2048, 128, False), (2048, 2048, 64, True),
                                              (1000, 3000, 80, True), (1, 16384, 128, True),
                                              (4, 4096, 96, False)])
def test_large_compiled(Lq, Lk, D, causal, dtype):
    q, k, v = _qkv(2, 4, Lq, Lk, D, dtype, "cuda")
    mask = torch.ones(2, Lk, dtype=torch.bool, device="cuda")
    mask[1, Lk // 3:] = False
    rb = RelativeBias(torch.randn(32, 4, device="cuda", dtype=dtype), not causal, 32, 128)
    _check(attention(q, k, v, causal=causal), q, k, v, causal=causal)
    kw = dict(causal=causal, attention_mask=mask, relative_bias=rb, scale=1.0 / math.sqrt(D))
    _check(attention(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tma_compiled(dtype, monkeypatch):
    """On the GPU: TMA loads where the layout allows (Hopper and newer), pointer loads otherwise,
    both against the reference; a padded-row view falls back."""
    hopper = torch.cuda.get_device_capability()[0] >= 9
    spy = _FlagSpy(attn_mod._attn_fwd_tuned)
    monkeypatch.setattr(attn_mod, "_attn_fwd_tuned", spy)
    q, k, v = _qkv(2, 4, 1000, 3000, 80, dtype, "cuda")
    mask = torch.ones(2, 3000, dtype=torch.bool, device="cuda")
    mask[1, 1000:] = False
    rb = RelativeBias(torch.randn(32, 4, device="cuda", dtype=dtype), False, 32, 128)
    kw = dict(causal=True, attention_mask=mask, relative_bias=rb, scale=1.0 / math.sqrt(80))
    _check(attention(q, k, v, **kw), q, k, v, **kw)
    assert spy.tma[-1] == hopper
    with kernels.attention_tma(False):
        _check(attention(q, k, v, **kw), q, k, v, **kw)
    assert spy.tma[-1] is False
    qd = q[:, :, -1:]
    _check(attention(qd, k, v, causal=True), qd, k, v, causal=True)  # split-K decode
    assert spy.tma[-1] == hopper
    padded = torch.randn(2, 4, 3000, 81, device="cuda", dtype=dtype)[..., :80]
    _check(attention(q, padded, v), q, padded, v)
    assert spy.tma[-1] is False


@pytest.mark.gpu
def test_t5_bias_memory():
    """The T5 path allocates nothing of size B*H*Lq*Lk."""
    B, H, L, D = 1, 8, 4096, 64
    q, k, v = _qkv(B, H, L, L, D, torch.float16, "cuda")
    rb = RelativeBias(torch.randn(32, H, device="cuda", dtype=torch.float16), True, 32, 128)
    attention(q, k, v, relative_bias=rb, scale=1.0)  # autotune and warm up first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attention(q, k, v, relative_bias=rb, scale=1.0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < B * H * L * L * 4 / 50, f"T5 path allocated {extra} bytes"
    del out


def test_bench_attention_smoke(device):
    """`trifuse bench attention --quick`: every backend checked against float64, ours included."""
    from trifuse.bench import attention as bench_attention
    from trifuse.bench.suite import Options

    opts = Options(device=torch.device(device), dtype=torch.float32, quick=True, seq=[64], head_dims=[32],
                   backends=["trifuse", "reference", "sdpa", "sdpa-dense-bias"])
    result = bench_attention.run(opts)
    ops = {r["op"] for r in result.rows}
    assert ops == {"attn", "attn-causal", "attn-t5", "attn-t5-causal", "decode"}
    assert all(bench_row_passed(r) for r in result.rows), result.rows
    assert all(r["max_abs_err"] < 1e-4 for r in result.rows)
    assert any(r["backend"] == "sdpa-dense-bias" for r in result.rows)
    assert "copy_gbps" in result.ceilings


def test_relative_lookup_index_is_cached_per_settings(device):
    """Only the settings' gather index is cached; the lookup follows the weights (in-place change here,
    every other way weights change in tests/test_weight_changes.py)."""
    attn_mod = sys.modules["trifuse.kernels.attention"]  # kernels.attention is the function
    if not kernels._dispatch.triton_runnable(torch.device(device)):
        pytest.skip("Triton cannot run here")
    index = attn_mod._relative_lut_index
    index.cache_clear()
    q, k, v = (torch.randn(1, 2, 5, 16, device=device) for _ in range(3))
    table = torch.randn(8, 2, device=device)
    rb = kernels.RelativeBias(table, bidirectional=True, num_buckets=8, max_distance=20)
    first = kernels.attention(q, k, v, relative_bias=rb, scale=1.0)
    torch.testing.assert_close(kernels.attention(q, k, v, relative_bias=rb, scale=1.0), first)
    assert (index.cache_info().misses, index.cache_info().hits) == (1, 1)
    kernels.attention(q, k, v, relative_bias=kernels.RelativeBias(table, False, 8, 20), scale=1.0)
    assert index.cache_info().misses == 2  # other settings, another index
    table.mul_(2)  # in-place change of the weights
    out = kernels.attention(q, k, v, relative_bias=rb, scale=1.0)
    assert index.cache_info().misses == 2
    ref = kernels.attention_reference(q.double(), k.double(), v.double(), scale=1.0,
                                      relative_bias=kernels.RelativeBias(table.double(), True, 8, 20))
    assert_matches_reference(out, ref, torch.float32)


def test_gpu_config_pruning():
    """The autotuner's pruning (GPU only, checked here as plain Python): fp32 (3xTF32 dots) keeps only
    the tiles that do not spill on Hopper, fp16/bf16 never get fp32's 16x32 decode tile, and a T5
    launch keeps its measured tiles."""
    tri = pytest.importorskip("trifuse.kernels._attention_triton", reason="needs Triton")
    cfgs = tri.GPU_CONFIGS
    tiles = lambda kept: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept}  # noqa: E731
    base = dict(BLOCK_D=64, HAS_REL=False, HAS_BIAS=False, HAS_MASK=False)
    assert tiles(tri.prune_configs(cfgs, {}, LQ_KEY=512, DOT_PREC="tf32x3", **base)) == {(64, 32)}
    assert tiles(tri.prune_configs(cfgs, {}, LQ_KEY=1, DOT_PREC="tf32x3", **base)) == {(16, 32)}
    hd128 = {**base, "BLOCK_D": 128}  # 64x32 spills there in fp32: 16x32 for prefill too
    assert tiles(tri.prune_configs(cfgs, {}, LQ_KEY=512, DOT_PREC="tf32x3", **hd128)) == {(16, 32)}
    assert (16, 32) not in tiles(tri.prune_configs(cfgs, {}, LQ_KEY=1, DOT_PREC=None, **base))
    t5 = tri.prune_configs(cfgs, {}, LQ_KEY=512, DOT_PREC=None, **{**base, "HAS_REL": True})
    assert tiles(t5) == {(64, 32), (64, 64), (128, 64)}


# ----------------------------------------------------------------------------
# K/V loads: Hopper's tensor-memory accelerator (device-side descriptors) or pointers.


class _FlagSpy:
    """Stands in for the kernel: records each launch's TMA flag, then runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.tma = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tma.append(kwargs["TMA"])
            return self.kernel[grid](*args, **kwargs)
        return launch


TMA_CASES = [
    # Lq, Lk, D, causal, mask, t5, splits
    (7, 97, 80, False, True, False, 0),  # D < BLOCK_D: the descriptor zero-fills columns
    (33, 33, 64, True, False, True, 0),
    (1, 130, 32, True, True, False, 3),  # split-K decode, a ragged last block
    (40, 100, 64, True, False, True, 2),
]


@pytest.mark.parametrize("Lq,Lk,D,causal,use_mask,t5,splits", TMA_CASES)
def test_tma_and_pointer_loads_agree(Lq, Lk, D, causal, use_mask, t5, splits, device, monkeypatch):
    if not hasattr(attn_mod, "_attn_fwd") or not kernels.triton_runnable(torch.device(device)):
        pytest.skip("needs the Triton kernel")
    B, H = 2, 2
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.float32, device)
    kw = dict(causal=causal, _num_splits=splits)
    if use_mask:
        mask = torch.ones(B, Lk, dtype=torch.bool, device=device)
        mask[1, Lk // 2:] = False
        kw["attention_mask"] = mask
    if t5:
        kw.update(relative_bias=RelativeBias(torch.randn(16, H, device=device), not causal, 16, 40), scale=1.0)
    spy = _FlagSpy(attn_mod._attn_fwd)
    monkeypatch.setattr(attn_mod, "_attn_fwd", spy)
    with_tma = attention(q, k, v, **kw)
    with kernels.attention_tma(False):
        without = attention(q, k, v, **kw)
    assert spy.tma == [True, False]
    kw.pop("_num_splits")
    _check_paths({"TMA": with_tma, "pointer loads": without}, q, k, v, sdpa=False, **kw)


def test_tma_only_where_the_layout_allows(device, monkeypatch):
    if not hasattr(attn_mod, "_attn_fwd") or not kernels.triton_runnable(torch.device(device)):
        pytest.skip("needs the Triton kernel")
    B, H, L, D = 1, 2, 20, 32
    spy = _FlagSpy(attn_mod._attn_fwd)
    monkeypatch.setattr(attn_mod, "_attn_fwd", spy)
    q, k, v = _qkv(B, H, L, L, D, torch.float32, device)
    padded = torch.randn(B, H, L, D + 1, device=device)[..., :D]  # rows 132 bytes apart: not 16-byte aligned
    kt = torch.randn(B, H, D, L, device=device).transpose(-1, -2)  # unit stride on L, not D
    t5_step = RelativeBias(torch.randn(8, H, device=device), False, 8, 20)
    for case, (kk, vv, kw) in {
        "aligned": (k, v, {}),
        "misaligned rows": (padded, v, {}),
        "transposed": (kt, v, {}),
        "T5 decode step": (k, v, dict(relative_bias=t5_step, causal=True, scale=1.0)),
    }.items():
        qq = q[:, :, -1:] if "decode" in case else q
        out = attention(qq, kk, vv, **kw)
        _check(out, qq, kk, vv, sdpa=False, **kw)
        assert spy.tma[-1] == (case == "aligned"), case
    monkeypatch.setenv("TRIFUSE_ATTENTION_TMA", "0")
    attention(q, k, v)
    assert spy.tma[-1] is False
    with kernels.attention_tma(True):  # the scoped setting wins over the environment
        attention(q, k, v)
    assert spy.tma[-1] is True
