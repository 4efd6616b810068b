"""LayerNorm and RMSNorm kernels against a float64 reference (and PyTorch's own low precision)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import assert_matches_reference
from trifuse import kernels
from trifuse.kernels import norm as norm_mod

ROWS = [1, 7, 1151]
WIDTHS = [1, 63, 384, 768, 1000, 4096, 5120]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _inputs(rows, width, dtype, device, residual=True, affine=True):
    x = torch.randn(rows, width, device=device, dtype=dtype)
    r = torch.randn(rows, width, device=device, dtype=dtype) if residual else None
    # Weights away from 1 and biases away from 0, so a kernel that drops them fails.
    w = (1 + 0.5 * torch.randn(width, device=device)).to(dtype) if affine else None
    b = (0.5 * torch.randn(width, device=device)).to(dtype) if affine else None
    return x, r, w, b


def _d(t):
    return None if t is None else t.double()


def _torch_layer_norm(x, r, w, b, eps=1e-5):
    h = x if r is None else x + r  # what a user writes today, in the low dtype
    return F.layer_norm(h, (x.shape[-1],), w, b, eps)


def _torch_rms_norm(x, r, w, eps=1e-6):
    h = x if r is None else x + r
    return F.rms_norm(h, (x.shape[-1],), w, eps)


def _check_layer_norm(x, r, w, b, dtype):
    out = kernels.layer_norm(x, w, b, residual=r)
    ref = kernels.layer_norm_reference(_d(x), _d(w), _d(b), residual=_d(r))
    if r is None:
        out, ref = (out,), (ref,)
    assert_matches_reference(out[0], ref[0], dtype, _torch_layer_norm(x, r, w, b), scale=4)
    if r is not None:
        assert_matches_reference(out[1], ref[1], dtype, x + r)


def _check_rms_norm(x, r, w, dtype):
    out = kernels.rms_norm(x, w, residual=r)
    ref = kernels.rms_norm_reference(_d(x), _d(w), residual=_d(r))
    if r is None:
        out, ref = (out,), (ref,)
    assert_matches_reference(out[0], ref[0], dtype, _torch_rms_norm(x, r, w), scale=4)
    if r is not None:
        assert_matches_reference(out[1], ref[1], dtype, x + r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_layer_norm_residual(rows, width, dtype, device):
    _check_layer_norm(*_inputs(rows, width, dtype, device), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_residual(rows, width, dtype, device):
    x, r, w, _ = _inputs(rows, width, dtype, device)
    _check_rms_norm(x, r, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("rows,width", [(7, 63), (33, 768)])
def test_options(rows, width, affine, residual, dtype, device):
    x, r, w, b = _inputs(rows, width, dtype, device, residual=residual, affine=affine)
    _check_layer_norm(x, r, w, b, dtype)
    _check_rms_norm(x, r, w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bias_without_weight_and_mixed_param_dtype(dtype, device):
    x, r, _, _ = _inputs(5, 100, dtype, device)
    b = torch.randn(100, device=device)  # fp32 parameters with low-precision activations
    _check_layer_norm(x, r, None, b, dtype)
    w = torch.randn(100, device=device)
    _check_layer_norm(x, r, w, None, dtype)
    _check_rms_norm(x, r, w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wider_than_one_program(dtype, device):
    width = kernels.MAX_FUSED_WIDTH + 3000  # takes the looped kernel
    x, r, w, b = _inputs(3, width, dtype, device)
    _check_layer_norm(x, r, w, b, dtype)
    _check_layer_norm(x, None, w, b, dtype)
    _check_rms_norm(x, r, w, dtype)
    _check_rms_norm(x, None, w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_and_batched_input(dtype, device):
    # A slice of a wider buffer (row stride 1000, no copy) and a 3-D activation.
    big = torch.randn(2, 9, 1000, device=device, dtype=dtype)
    x = big[..., 100:868]
    r = torch.randn(2, 9, 1000, device=device, dtype=dtype)[..., :768]
    w, b = torch.randn(768, device=device, dtype=dtype), torch.randn(768, device=device, dtype=dtype)
    _check_layer_norm(x, r, w, b, dtype)
    _check_rms_norm(x, r, w, dtype)
    # Leading dims that do not flatten into one row stride, and a column stride.
    xt = torch.randn(9, 2, 768, device=device, dtype=dtype).transpose(0, 1)
    _check_layer_norm(xt, r, w, b, dtype)
    xc = torch.randn(768, 4, device=device, dtype=dtype).t()
    _check_rms_norm(xc, None, w, dtype)


def test_outputs_are_fresh_contiguous_tensors(device):
    x, r, w, b = _inputs(4, 32, torch.float32, device)
    y, h = kernels.layer_norm(x[:, :16], w[:16], b[:16], residual=r[:, :16])
    assert y.is_contiguous() and h.is_contiguous()
    assert y.data_ptr() != x.data_ptr() and h.data_ptr() != r.data_ptr()


def test_triton_path_is_taken_under_interpreter(monkeypatch, device):
    """Under the interpreter (or on CUDA) the op launches Triton; the reference backend does not."""
    if not kernels._dispatch.triton_runnable(torch.device(device)):
        pytest.skip("Triton cannot run here")
    calls = []
    real = norm_mod._launch
    monkeypatch.setattr(norm_mod, "_launch", lambda *a: calls.append(1) or real(*a))
    x, r, w, b = _inputs(3, 16, torch.float32, device)
    kernels.layer_norm(x, w, b, residual=r)
    assert calls == [1]
    with kernels.use_backend("reference"):
        y_ref = kernels.layer_norm(x, w, b)
    assert calls == [1]
    # the reference backend runs PyTorch's fused norm on the specification's fp32 contract
    torch.testing.assert_close(y_ref, kernels.layer_norm_reference(x, w, b), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual, device):
    x, r, w, b = _inputs(5, 40, torch.float32, device)
    if residual:
        torch.library.opcheck(torch.ops.trifuse.add_layer_norm.default, (x, r, w, b, 1e-5))
        torch.library.opcheck(torch.ops.trifuse.add_rms_norm.default, (x, r, w, 1e-6))
    else:
        torch.library.opcheck(torch.ops.trifuse.layer_norm.default, (x, w, None, 1e-5))
        torch.library.opcheck(torch.ops.trifuse.rms_norm.default, (x, None, 1e-6))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), width=st.integers(1, 700),
       dtype=st.sampled_from([torch.float32, torch.float16]),
       residual=st.booleans(), affine=st.booleans(), rms=st.booleans(), row_pad=st.integers(0, 5))
def test_property(rows, width, dtype, residual, affine, rms, row_pad):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, r, w, b = _inputs(rows, width + row_pad, dtype, device, residual=residual, affine=affine)
    x = x[:, :width]  # row_pad > 0: rows are a strided view
    r = r[:, :width] if r is not None else None
    w = w[:width] if w is not None else None
    b = b[:width] if b is not None else None
    if rms:
        _check_rms_norm(x, r, w, dtype)
    else:
        _check_layer_norm(x, r, w, b, dtype)


def test_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        kernels.layer_norm(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8,\)"):
        kernels.layer_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="bias has shape"):
        kernels.layer_norm(x, None, torch.ones(9))
    with pytest.raises(ValueError, match="residual has shape"):
        kernels.rms_norm(x, residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual has dtype torch.float16"):
        kernels.layer_norm(x, residual=x.half())
    with pytest.raises(ValueError, match="weight is on meta"):
        kernels.rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        kernels.rms_norm(x, torch.ones(8, dtype=torch.long))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        kernels.layer_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="at least one dimension"):
        kernels.layer_norm(torch.tensor(1.0))


def test_empty_rows(device):
    x = torch.randn(0, 16, device=device)
    assert kernels.layer_norm(x).shape == (0, 16)
    y, h = kernels.rms_norm(x, residual=x)
    assert y.shape == h.shape == (0, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 63, 768, 5120])
def test_reference_backend_matches_the_specification(width, dtype):
    """Where Triton does not run, the ops take PyTorch's fused norms on the references' contract
    (fp32 math): checked against the float64 specification like the kernels are."""
    x, r, w, b = _inputs(7, width, dtype, "cpu")
    with kernels.use_backend("reference"):
        y, h = kernels.layer_norm(x, w, b, residual=r)
        z, g = kernels.rms_norm(x, w, residual=r)
        plain = kernels.layer_norm(x, None, None)
    y64, h64 = kernels.layer_norm_reference(x.double(), w.double(), b.double(), residual=r.double())
    z64, _ = kernels.rms_norm_reference(x.double(), w.double(), residual=r.double())
    assert_matches_reference(y, y64, dtype, F.layer_norm((x.float() + r.float()).to(dtype), (width,), w, b), scale=4)
    assert_matches_reference(z, z64, dtype, scale=4)
    assert_matches_reference(plain, kernels.layer_norm_reference(x.double()), dtype, scale=4)
    assert torch.equal(h, g) and torch.equal(h, (x.float() + r.float()).to(dtype))
    assert y.dtype == z.dtype == h.dtype == dtype
