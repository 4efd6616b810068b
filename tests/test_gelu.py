"""Bias + GELU (erf and tanh) with an optional gate, against a float64 reference."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import assert_matches_reference
from trifuse import kernels

ROWS = [1, 7, 1151]
WIDTHS = [1, 63, 384, 768, 1000, 4096, 5120]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _check(x, bias, gate, approximate, dtype):
    out = kernels.gelu(x, bias, approximate=approximate, gate=gate)
    ref = kernels.gelu_reference(x.double(), None if bias is None else bias.double(), approximate,
                                 None if gate is None else gate.double())
    h = x if bias is None else x + bias
    torch_lowp = F.gelu(h, approximate=approximate)
    if gate is not None:
        torch_lowp = torch_lowp * gate
    assert_matches_reference(out, ref, dtype, torch_lowp, scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_bias_gelu(rows, width, approximate, dtype, device):
    x = 3 * torch.randn(rows, width, device=device, dtype=dtype)
    b = torch.randn(width, device=device, dtype=dtype)
    _check(x, b, None, approximate, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rows,width", [(7, 63), (33, 1000), (2, 5120)])
def test_gated(rows, width, with_bias, approximate, dtype, device):
    x = 3 * torch.randn(rows, width, device=device, dtype=dtype)
    g = torch.randn(rows, width, device=device, dtype=dtype)
    b = torch.randn(width, device=device, dtype=dtype) if with_bias else None
    _check(x, b, g, approximate, dtype)


def test_saturation_is_finite(device):
    """Large |x| must saturate (tanh via exp overflows to inf internally), never NaN."""
    x = torch.tensor([[-1e4, -60.0, -10.0, 0.0, 10.0, 60.0, 1e4]], device=device)
    for approximate in ("none", "tanh"):
        y = kernels.gelu(x, approximate=approximate)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, F.gelu(x, approximate=approximate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_and_batched(dtype, device):
    x = torch.randn(3, 5, 900, device=device, dtype=dtype)[..., 50:818]  # row stride 900
    g = torch.randn(5, 3, 768, device=device, dtype=dtype).transpose(0, 1)  # leading dims do not flatten
    b = torch.randn(768, device=device)  # fp32 bias with fp16 activations
    _check(x, b, g, "tanh", dtype)
    _check(x, b, None, "none", dtype)


def test_opcheck(device):
    x = torch.randn(6, 50, device=device)
    b, g = torch.randn(50, device=device), torch.randn(6, 50, device=device)
    torch.library.opcheck(torch.ops.trifuse.gelu.default, (x, b, g, "tanh"))
    torch.library.opcheck(torch.ops.trifuse.gelu.default, (x, None, None, "none"))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), width=st.integers(1, 1500),
       dtype=st.sampled_from([torch.float32, torch.float16]),
       approximate=st.sampled_from(["none", "tanh"]), with_bias=st.booleans(), with_gate=st.booleans())
def test_property(rows, width, dtype, approximate, with_bias, with_gate):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = 2 * torch.randn(rows, width, device=device, dtype=dtype)
    b = torch.randn(width, device=device, dtype=dtype) if with_bias else None
    g = torch.randn(rows, width, device=device, dtype=dtype) if with_gate else None
    _check(x, b, g, approximate, dtype)


def test_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        kernels.gelu(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="approximate must be one of"):
        kernels.gelu(x, approximate="sigmoid")
    with pytest.raises(ValueError, match=r"bias has shape \(4,\), expected \(8,\)"):
        kernels.gelu(x, torch.ones(4))
    with pytest.raises(ValueError, match="gate has shape"):
        kernels.gelu(x, gate=torch.ones(4, 9))
    with pytest.raises(TypeError, match="gate has dtype"):
        kernels.gelu(x, gate=torch.ones(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="gate is on meta"):
        kernels.gelu(x, gate=torch.ones(4, 8, device="meta"))
