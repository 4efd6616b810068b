"""trifuse.kernels.attention_varlen against float64 attention run one sequence at a time.

Two code paths, each against the same float64 math: the Triton kernel (under the
interpreter here) and the native CPU path (SDPA per sequence), reached by taking the
kernel out of the dispatch.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import TOL
from trifuse.kernels import RelativeBias, attention_reference, attention_varlen

varlen_mod = importlib.import_module("trifuse.kernels.varlen")


@pytest.fixture(params=["triton", "native"])
def path(request, monkeypatch):
    if request.param == "native":
        monkeypatch.setattr(varlen_mod, "_kernel_takes", lambda q: False)
    return request.param


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def _ref64_per_sequence(q, k, v, lq, lk, causal, rb, scale):
    """float64 attention of each sequence on its own (padded-layout reference, B = 1)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    qs = ks = 0
    for a, b in zip(lq, lk):
        if a and b:
            rb64 = None if rb is None else RelativeBias(rb.table.double(), rb.bidirectional, rb.num_buckets,
                                                        rb.max_distance, rb.query_offset)
            seq = [t.double().transpose(0, 1)[None] for t in (q[qs:qs + a], k[ks:ks + b], v[ks:ks + b])]
            out[qs:qs + a] = attention_reference(*seq, causal=causal, relative_bias=rb64,
                                                 scale=scale)[0].transpose(0, 1)
        qs, ks = qs + a, ks + b
    return out


def _run(lq, lk, H, D, dtype, causal=False, rel=None, scale=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), H, D, generator=g).to(dtype)
    k = torch.randn(sum(lk), H, D, generator=g).to(dtype)
    v = torch.randn(sum(lk), H, D, generator=g).to(dtype)
    rb = None
    if rel is not None:
        bidirectional, offset = rel
        rb = RelativeBias(torch.randn(32, H, generator=g).to(dtype), bidirectional, 32, 20, offset)
    out = attention_varlen(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), causal=causal, relative_bias=rb,
                           scale=scale)
    ref = _ref64_per_sequence(q, k, v, lq, lk, causal, rb, scale if scale is not None else D ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    return out


CASES = [  # (query lengths, key lengths, H, D)
    ([5, 0, 1, 37, 12], [5, 0, 1, 37, 12], 2, 32),
    ([1, 19, 0, 40], [1, 19, 0, 40], 3, 64),
    ([7, 33, 2], [7, 33, 2], 2, 80),
    ([3, 1, 9, 0], [11, 4, 30, 6], 3, 32),  # queries shorter than keys (a cached prefix)
    ([6, 2], [3, 0], 2, 64),  # more queries than keys, and keys of length 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk,H,D", CASES)
def test_matches_float64_per_sequence(path, lq, lk, H, D, causal, dtype):
    _run(lq, lk, H, D, dtype, causal=causal)


@pytest.mark.parametrize("rel,causal", [((True, None), False), ((False, None), True), ((True, 0), False),
                                        ((False, 2), False)])
@pytest.mark.parametrize("lq,lk", [([9, 0, 45, 1], [9, 0, 45, 1]), ([2, 5], [30, 7])])
def test_t5_bias_local_to_each_sequence(path, lq, lk, rel, causal):
    # max_distance 20 < the longest sequence: the bucket saturates inside the batch.
    _run(lq, lk, 2, 32, torch.float32, causal=causal, rel=rel, scale=1.0)


def test_t5_bias_fp16(path):
    _run([13, 40, 1], [13, 40, 1], 3, 64, torch.float16, rel=(True, None), scale=1.0)


def test_same_as_padded_attention():
    # Packing a padded batch and back gives the padded kernel's result at real tokens.
    g = torch.Generator().manual_seed(1)
    lengths = [4, 17, 1, 9]
    B, L, H, D = len(lengths), max(lengths), 2, 32
    x = torch.randn(3, B, H, L, D, generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    padded = attention_reference(x[0].double(), x[1].double(), x[2].double(), attention_mask=mask)
    packed = [t.transpose(1, 2)[mask] for t in x]  # [T, H, D]
    out = attention_varlen(*packed, _cu(lengths), _cu(lengths), L, L)
    torch.testing.assert_close(out.double(), padded.transpose(1, 2)[mask], atol=2e-5, rtol=2e-5)


def test_strided_views_of_fused_qkv(path):
    g = torch.Generator().manual_seed(2)
    lengths, H, D = [5, 21, 3], 2, 32
    qkv = torch.randn(sum(lengths), 3, H, D, generator=g)
    q, k, v = qkv.unbind(1)  # [T, H, D] views with row stride 3*H*D
    out = attention_varlen(q, k, v, _cu(lengths), _cu(lengths), 21, 21, causal=True)
    ref = _ref64_per_sequence(q, k, v, lengths, lengths, True, None, D ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_property_hypothesis(path):
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=list(hyp.HealthCheck))
    @hyp.given(lq=st.lists(st.integers(0, 40), min_size=1, max_size=4), extra=st.integers(0, 9),
               d=st.sampled_from([16, 32, 48]), causal=st.booleans(), use_rel=st.booleans(),
               seed=st.integers(0, 2**16))
    def prop(lq, extra, d, causal, use_rel, seed):
        lk = [n + extra for n in lq]
        _run(lq, lk, 2, d, torch.float32, causal=causal, rel=(not causal, None) if use_rel else None,
             scale=1.0 if use_rel else None, seed=seed)

    prop()


def _args(lengths=(3, 4), H=2, D=16):
    t = torch.randn(sum(lengths), H, D)
    return [t, t.clone(), t.clone(), _cu(lengths), _cu(lengths), max(lengths), max(lengths)]


@pytest.mark.parametrize("change,match", [
    (lambda a: a.__setitem__(3, torch.tensor([0, 4, 3], dtype=torch.int32)), "must not decrease"),
    (lambda a: a.__setitem__(3, torch.tensor([1, 3, 7], dtype=torch.int32)), "must start at 0"),
    (lambda a: a.__setitem__(4, torch.tensor([0, 3, 9], dtype=torch.int32)), "past the 7 tokens"),
    (lambda a: a.__setitem__(3, torch.tensor([0, 3, 7])), "int32"),
    (lambda a: a.__setitem__(5, 3), "max_seqlen_q=3 is smaller than the longest sequence"),
    (lambda a: a.__setitem__(6, 2), "max_seqlen_k=2"),
    (lambda a: a.__setitem__(1, a[1].half()), "k has dtype"),
    (lambda a: a.__setitem__(0, a[0][None]), "3-D"),
    (lambda a: a.__setitem__(4, torch.tensor([0, 7], dtype=torch.int32)), "both are \\[B \\+ 1\\]"),
    (lambda a: a.__setitem__(1, a[1][:, :1]), "\\[H, D\\]"),
])
def test_bad_input_names_the_problem(change, match):
    a = _args()
    change(a)
    with pytest.raises((ValueError, TypeError), match=match):
        attention_varlen(*a)


def test_wrong_device_is_named():
    a = _args()
    a[3] = a[3].to("meta")
    with pytest.raises(ValueError, match="cu_seqlens_q is on meta"):
        attention_varlen(*a)


def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    a = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in _args()]
    with mode:
        out = attention_varlen(*a)
    assert out.shape == (7, 2, 16)


@pytest.mark.parametrize("rel,causal", [(None, False), (None, True), ((True, None), False), ((False, None), True)])
def test_bf16_native_runs_the_matmul_path(rel, causal, monkeypatch):
    """bf16 on the CPU: sequence groups of at least ``MATMUL_MIN`` tokens take kernels.cpu's matmul path
    (two batched GEMMs, fp32 scores and softmax), the others SDPA; both within bf16's budget of float64."""
    cpu_mod = importlib.import_module("trifuse.kernels.cpu")
    monkeypatch.setattr(varlen_mod, "_kernel_takes", lambda q: False)
    calls = []
    real = cpu_mod._sdpa_matmul
    monkeypatch.setattr(cpu_mod, "_sdpa_matmul", lambda q, *a: calls.append(q.shape[2]) or real(q, *a))
    lengths = [97, 0, 1, 100, 7, 40]
    _run(lengths, lengths, 3, 80, torch.bfloat16, causal=causal, rel=rel, scale=None if rel is None else 1.0)
    assert calls and min(calls) >= cpu_mod.MATMUL_MIN, calls  # groups padded to >= 96 tokens; the 1-token one: SDPA
