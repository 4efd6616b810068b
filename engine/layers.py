"""Building blocks shared by the models, each a thin module over the fused kernels.

One fused QKV projection feeding ``kernels.attention`` through strided views
(no copies), LayerNorm with the residual add fused in, and the feed-forward's
bias folded into its activation.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trifuse import kernels

# Hugging Face activation names -> the GELU kernel's ``approximate``.
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
_OTHER = {"relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}
ACTIVATIONS = tuple(_GELU) + tuple(_OTHER)


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; trifuse supports {', '.join(ACTIVATIONS)}")
    return name


def bias_act(h: Tensor, bias: Optional[Tensor], name: str) -> Tensor:
    """``act(h + bias)``: one fused kernel for the GELU family."""
    if name in _GELU:
        return kernels.gelu(h, bias, approximate=_GELU[name])
    return _OTHER[name](h if bias is None else h + bias)


class LayerNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width))
        self.bias = nn.Parameter(torch.empty(width))
        self.eps = eps

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        """``norm(x)``, or ``(norm(x + residual), x + residual)`` in one pass."""
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)


def attention_with_probs(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                         scale: float) -> Tuple[Tensor, Tensor]:
    """Attention that also returns its probabilities (flash kernels keep none), in fp32.

    Masked keys get the dtype's most negative score, as in Hugging Face's eager path.
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1)
    return torch.matmul(probs, v.float()).to(q.dtype), probs.to(q.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused ``[3H, H]`` QKV projection."""

    def __init__(self, hidden: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, mask: Optional[Tensor], need_probs: bool = False):
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, L, D] strided views
        if need_probs:
            ctx, probs = attention_with_probs(q, k, v, mask, 1.0 / math.sqrt(self.head_dim))
        else:
            ctx, probs = kernels.attention(q, k, v, attention_mask=mask), None
        return self.out(ctx.transpose(1, 2).reshape(b, n, -1)), probs


class FeedForward(nn.Module):
    def __init__(self, hidden: int, inner: int, act: str):
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)
        self.act = check_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        # The up-projection's bias is added inside the fused activation.
        return self.down(bias_act(F.linear(x, self.up.weight), self.up.bias, self.act))


class PostLNBlock(nn.Module):
    """BERT's transformer layer: attention, add & norm, feed-forward, add & norm."""

    def __init__(self, hidden: int, heads: int, inner: int, act: str, eps: float):
        super().__init__()
        self.attn = SelfAttention(hidden, heads)
        self.norm1 = LayerNorm(hidden, eps)
        self.ffn = FeedForward(hidden, inner, act)
        self.norm2 = LayerNorm(hidden, eps)

    def forward(self, x: Tensor, mask: Optional[Tensor], need_probs: bool = False):
        a, probs = self.attn(x, mask, need_probs)
        x, _ = self.norm1(a, residual=x)
        x, _ = self.norm2(self.ffn(x), residual=x)
        return x, probs


class PreLNBlock(nn.Module):
    """A pre-LN transformer layer (GPT-2, ViT): ``h + attn(norm1(h))``, then ``h + ffn(norm2(h))``.

    The residual stream is carried as ``(h, pending)``: the block's last add is left
    pending and fused into the next LayerNorm, so every residual add rides along
    with a norm. Start with ``pending=None``; finish with ``final_norm(pending,
    residual=h)``. ``attn`` is any module returning ``(out, extra)``.
    """

    def __init__(self, hidden: int, inner: int, act: str, eps: float, attn: nn.Module):
        super().__init__()
        self.norm1 = LayerNorm(hidden, eps)
        self.attn = attn
        self.norm2 = LayerNorm(hidden, eps)
        self.ffn = FeedForward(hidden, inner, act)

    def forward(self, h: Tensor, pending: Optional[Tensor], *attn_args, **attn_kwargs):
        if pending is None:
            x = self.norm1(h)
        else:
            x, h = self.norm1(pending, residual=h)
        a, extra = self.attn(x, *attn_args, **attn_kwargs)
        x, h = self.norm2(a, residual=h)
        return h, self.ffn(x), extra
