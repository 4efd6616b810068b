"""The tutorial-06-style peer kernel (bench/static/peer_flash.py) computes attention: PyTorch SDPA agrees.

The peer is only a baseline for the static Hopper report, but a baseline that computed
something else would make the side-by-side meaningless. Without a GPU it runs under
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET before any kernel module
is imported), so shapes stay small; fp32 and fp16 (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import TOL, assert_matches_reference

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "static"))  # the tool's folder
from peer_flash import peer_attention  # noqa: E402 - after conftest chose interpreter or compiler


def _runs(device: str) -> None:
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is off: the peer kernel cannot run here")


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_peer_matches_sdpa(blocks, causal, dtype, device):
    _runs(device)
    B, H, L, D = 2, 2, 64, 32  # 2-4 query blocks; at 16x32 the diagonal falls mid key block
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype) for _ in range(3))
    out = peer_attention(q, k, v, causal, BLOCK_M=blocks[0], BLOCK_N=blocks[1], num_warps=4, num_stages=2)
    assert out.shape == q.shape and out.dtype == dtype
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    if dtype == torch.float32:
        atol, rtol = TOL[dtype] if device == "cpu" else (3e-3, 3e-3)  # the GPU's fp32 dot is TF32
        torch.testing.assert_close(out.double(), ref64, atol=atol, rtol=rtol)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                   atol=atol, rtol=rtol)
    else:
        lowp = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert_matches_reference(out, ref64, dtype, torch_lowp=lowp)


def test_peer_scale_and_head_dim_64(device):
    _runs(device)
    q, k, v = (torch.randn(1, 2, 64, 64, device=device) for _ in range(3))
    out = peer_attention(q, k, v, True, BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, scale=0.3)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, scale=0.3)
    atol = TOL[torch.float32][0] if device == "cpu" else 3e-3
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)


def test_peer_rejects_what_it_does_not_do():
    q = torch.randn(1, 1, 48, 32)
    with pytest.raises(ValueError, match="multiple"):
        peer_attention(q, q, q, BLOCK_M=32, BLOCK_N=32)
    with pytest.raises(ValueError, match="contiguous"):
        t = torch.randn(1, 64, 2, 32).transpose(1, 2)  # [1, 2, 64, 32], a view
        peer_attention(t, t, t, BLOCK_M=32, BLOCK_N=32)
