"""kernels.paged_attention: the Triton kernel (under the interpreter on the CPU) and the CPU path, each
against the float64 reference, over block tables in shuffled pool order, mixed query counts per
sequence (prefill chunks beside decode tokens), T5's relative bias, forced key splits and odd head dims."""

import importlib
import math

import pytest
import torch

from tests.helpers import assert_matches_reference
from trifuse import kernels
pa = importlib.import_module("trifuse.kernels.paged_attention")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def problem(heads=3, head_dim=24, block_size=4, lens=((3, 7), (1, 33), (2, 2)), blocks=40, dtype=torch.float32,
            seed=0, device="cpu"):
    """A step: per sequence ``(query tokens this step, keys it holds)``; the queries are its last tokens
    (causal), block tables drawn from a shuffled pool."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for _, n in lens)
    assert sum(-(-n // block_size) for _, n in lens) <= blocks
    order = torch.randperm(blocks, generator=g)
    tables, used = [], 0
    for _, n in lens:
        k = -(-n // block_size)
        row = order[used:used + k].tolist()
        used += k
        tables.append(row + [0] * (width - k))
    token_seq, kv_lens = [], []
    for s, (q, n) in enumerate(lens):
        token_seq += [s] * q
        kv_lens += list(range(n - q + 1, n + 1))
    T = len(token_seq)
    k_pool = torch.randn(blocks, block_size, heads, head_dim, generator=g)
    v_pool = torch.randn(blocks, block_size, heads, head_dim, generator=g)
    q = torch.randn(T, heads, head_dim, generator=g)
    ints = dict(dtype=torch.int32, device=device)
    return (q.to(device, dtype), k_pool.to(device, dtype), v_pool.to(device, dtype), torch.tensor(tables, **ints),
            torch.tensor(token_seq, **ints), torch.tensor(kv_lens, **ints))


def t5_bias(heads, seed=1, dtype=torch.float32, device="cpu"):
    table = torch.randn(8, heads, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    return kernels.RelativeBias(table, bidirectional=False, num_buckets=8, max_distance=12)


def ref64(args, rel=None, scale=None):
    q, kp, vp, bt, seq, kl = args
    rel64 = None if rel is None else kernels.RelativeBias(rel.table.double(), rel.bidirectional, rel.num_buckets,
                                                          rel.max_distance)
    return kernels.paged_attention_reference(q.double(), kp.double(), vp.double(), bt, seq, kl, scale=scale,
                                             relative_bias=rel64)


def cpu_path(args, rel=None, scale=None):
    q = args[0]
    max_kv = int(args[5].max())
    lut = None if rel is None else pa._rel_lut(rel, q.shape[1])
    return pa._cpu(*args, max_kv, 1 / math.sqrt(q.shape[-1]) if scale is None else scale, lut,
                   0 if rel is None else rel.max_distance)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,heads", [(24, 3), (8, 2), (80, 1)])
@pytest.mark.parametrize("lens", [((3, 7), (1, 33), (2, 2)), ((1, 7), (1, 33), (1, 2), (1, 1))],
                         ids=["prefill+decode", "decode"])
def test_kernel_and_cpu_path_match_float64(device, dtype, head_dim, heads, lens):
    args = problem(heads=heads, head_dim=head_dim, lens=lens, dtype=dtype, device=device)
    want = ref64(args)
    lowp = cpu_path(args)
    assert_matches_reference(kernels.paged_attention(*args), want, dtype, torch_lowp=lowp)
    assert_matches_reference(lowp, want, dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_t5_relative_bias_in_kernel(device, dtype):
    # Keys from 1 to 40 around max_distance=12: exact buckets, log buckets and the saturated edge.
    args = problem(heads=2, head_dim=16, lens=((4, 40), (1, 1), (1, 13)), dtype=dtype, device=device, seed=3)
    rel = t5_bias(2, dtype=dtype, device=device)
    want = ref64(args, rel, scale=1.0)
    lowp = cpu_path(args, rel, scale=1.0)
    assert_matches_reference(kernels.paged_attention(*args, scale=1.0, relative_bias=rel), want, dtype,
                             torch_lowp=lowp)
    assert_matches_reference(lowp, want, dtype)


def test_bias_reference_is_the_dense_ops():
    # The paged reference's T5 bias and causality are kernels.attention_reference's: one sequence laid
    # out contiguously gives the same answer (bottom-right causal = query at kv_len - 1).
    args = problem(heads=2, head_dim=16, lens=((5, 30),), blocks=8, seed=4)
    q, kp, vp, bt, seq, kl = (a.double() if a.is_floating_point() else a for a in args)
    rel = t5_bias(2)
    rel = kernels.RelativeBias(rel.table.double(), False, 8, 12)
    keys = pa._gather_keys(kp, bt, torch.tensor([0]), 30)  # [1, 30, H, D]
    vals = pa._gather_keys(vp, bt, torch.tensor([0]), 30)
    dense = kernels.attention_reference(q.transpose(0, 1)[None], keys.transpose(1, 2), vals.transpose(1, 2),
                                        causal=True, relative_bias=rel, scale=0.5)
    paged = kernels.paged_attention_reference(q, kp, vp, bt, seq, kl, scale=0.5, relative_bias=rel)
    torch.testing.assert_close(paged, dense[0].transpose(0, 1))


def test_split_keys(device):
    # Long keys across several programs, merged by the second kernel; splits land mid-block-table.
    args = problem(heads=2, head_dim=16, block_size=8, lens=((1, 300), (2, 130), (1, 5)), blocks=60, seed=5,
                   device=device)
    want = ref64(args)
    for splits in (2, 3, 16):
        assert pa._split_plan(8, 300, splits, 132)[0] > 1
        assert_matches_reference(kernels.paged_attention(*args, _num_splits=splits), want, torch.float32)
    rel = t5_bias(2, device=device)
    assert_matches_reference(kernels.paged_attention(*args, relative_bias=rel, _num_splits=3),
                             ref64(args, rel), torch.float32)


def test_split_plan():
    assert pa._split_plan(4, 100, 0, 132) == (1, 100)  # short keys: one split
    assert pa._split_plan(10_000, 4096, 0, 132) == (1, 4096)  # enough programs already
    splits, per = pa._split_plan(8, 4096, 0, 132)
    assert 1 < splits <= pa.MAX_SPLITS and per % pa._SPLIT_ALIGN == 0 and splits * per >= 4096


def test_reference_backend_and_custom_op():
    args = problem(seed=6)
    want = ref64(args)
    with kernels.use_backend("reference"):
        assert_matches_reference(kernels.paged_attention(*args), want, torch.float32)
    torch.library.opcheck(torch.ops.trifuse.paged_attention.default,
                          (*args, 0.2, None, False, 32, 128, 0), test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs():
    q, kp, vp, bt, seq, kl = problem()
    call = kernels.paged_attention
    with pytest.raises(ValueError, match="q must be 3-D"):
        call(q[None], kp, vp, bt, seq, kl)
    with pytest.raises(TypeError, match="block_tables must be a 2-D int32"):
        call(q, kp, vp, bt.long(), seq, kl)
    with pytest.raises(TypeError, match="k_pool has dtype"):
        call(q, kp.half(), vp, bt, seq, kl)
    with pytest.raises(ValueError, match="one entry per query token"):
        call(q, kp, vp, bt, seq[:-1], kl)
    with pytest.raises(ValueError, match="at least one key"):
        call(q, kp, vp, bt, seq, kl * 0)
    with pytest.raises(ValueError, match="block_tables hold"):
        call(q, kp, vp, bt, seq, kl + 100)
    with pytest.raises(ValueError, match="block ids"):
        call(q, kp, vp, bt + 1000, seq, kl)
    with pytest.raises(ValueError, match="token_seq must index"):
        call(q, kp, vp, bt, seq + 5, kl)
    with pytest.raises(ValueError, match=r"\[blocks, block_size, H, D\]"):
        call(q, kp[..., :8], vp[..., :8], bt, seq, kl)
    with pytest.raises(TypeError, match="RelativeBias"):
        call(q, kp, vp, bt, seq, kl, relative_bias=torch.zeros(8, 3))


def test_property_hypothesis(device):
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=4, deadline=None, derandomize=True)
    @hyp.given(block_size=st.sampled_from([1, 2, 5, 16]), head_dim=st.sampled_from([4, 16, 33]),
               lens=st.lists(st.tuples(st.integers(1, 3), st.integers(3, 20)), min_size=1, max_size=3))
    def check(block_size, head_dim, lens):
        blocks = sum(-(-n // block_size) for _, n in lens) + 2
        args = problem(heads=1, head_dim=head_dim, block_size=block_size, lens=lens, blocks=blocks, device=device)
        assert_matches_reference(kernels.paged_attention(*args), ref64(args), torch.float32)

    check()
