"""CPU micro-benchmarks of the reference paths, under pytest-benchmark.

In the normal suite (``--benchmark-disable`` in pyproject) each runs once as a
correctness test. To time them: ``pytest tests/test_microbench.py --benchmark-enable``
(add ``--benchmark-autosave`` / ``--benchmark-compare`` to track them over commits).
"""

import pytest
import torch
import torch.nn.functional as F

from trifuse import kernels

ROWS, WIDTH = 512, 768


@pytest.fixture(autouse=True)
def _reference():
    with kernels.use_backend("reference"):
        yield


def _x(*shape):
    return torch.randn(*shape)


def test_layer_norm_residual(benchmark):
    x, r, w, b = _x(ROWS, WIDTH), _x(ROWS, WIDTH), _x(WIDTH), _x(WIDTH)
    y, h = benchmark(kernels.layer_norm, x, w, b, 1e-5, r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (WIDTH,), w, b), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(h, x + r)


def test_rms_norm_residual(benchmark):
    x, r, w = _x(ROWS, WIDTH), _x(ROWS, WIDTH), _x(WIDTH)
    y, _ = benchmark(kernels.rms_norm, x, w, 1e-6, r)
    torch.testing.assert_close(y, F.rms_norm(x + r, (WIDTH,), w, 1e-6), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu(benchmark, approximate):
    x, b = _x(ROWS, 4 * WIDTH), _x(4 * WIDTH)
    y = benchmark(kernels.gelu, x, b, approximate)
    torch.testing.assert_close(y, F.gelu(x + b, approximate=approximate), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention(benchmark, causal):
    q, k, v = (_x(2, 12, 128, 64) for _ in range(3))
    out = benchmark(kernels.attention, q, k, v, causal=causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=2e-5, rtol=2e-5)
