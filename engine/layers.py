"""Building blocks shared by the models, each a thin module over the fused kernels.

One fused QKV projection feeding ``kernels.attention`` through strided views
(no copies), LayerNorm with the residual add fused in, and the feed-forward's
bias folded into its activation.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trifuse import kernels

from .packing import Packed, PackedCross
from .quantize import Int8Linear

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


def _onednn(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, what Inductor's CPU freezing emits)
    takes ``dtype`` on this CPU: fp32 on any x86-64, bf16 where oneDNN has a bf16 path (AVX-512 and up)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


#: One row against an fp32 weight stored ``[K, N]`` goes to BLAS's GEMV (see :func:`project`).
_BLAS_ROWS = 1
#: fp32 GEMMs this small (the weight's elements, and rows x the weight's elements) go to BLAS too (see
#: :func:`project`).
_TINY_WEIGHT = 1 << 16
_TINY_MACS = 1 << 22
#: Fewer rows than this are padded with zero rows to it before oneDNN's GEMM on a prepacked weight
#: (see :func:`project`).
_MIN_PACKED_ROWS = 4


def stored_transposed(w: Tensor) -> bool:
    """Whether ``w`` ``[N, K]`` is a transposed view of a contiguous ``[K, N]`` tensor (:func:`pack_linears`)."""
    return w.dim() == 2 and w.shape[0] > 1 and w.stride() == (1, w.shape[0])


def _blas(rows: int, w: Tensor) -> bool:
    """Whether ``rows`` rows against the fp32 weight ``w`` (not prepacked) run BLAS (``torch.addmm``)."""
    if w.dtype != torch.float32 or w.is_mkldnn:
        return False
    n = w.numel()
    return (rows <= _BLAS_ROWS and stored_transposed(w)) or (n <= _TINY_WEIGHT and rows * n <= _TINY_MACS)


def project(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, gelu: Optional[str] = None) -> Tensor:
    """``x @ w^T (+ bias)``, then ``gelu(.)`` with ``gelu`` the approximation, on the native CPU path,
    by the layout ``w`` is stored in (any leading dims on ``x``; ``w`` in ``x``'s dtype, or oneDNN's
    prepacked copy: :class:`Prepacked`).

    * One row (a decoding step) against an fp32 weight stored ``[K, N]`` (:func:`pack_linears`) streams
      the weight once through BLAS's GEMV (``torch.addmm``). So do tiny fp32 GEMMs (a weight of at
      most :data:`_TINY_WEIGHT` elements, at most :data:`_TINY_MACS` multiply-adds: the small models'
      projections), where oneDNN's call costs about 10 us more than BLAS's, more than either computes
      (measured on one Zen 4 thread: 128 x 64 x 192, 36 vs 45 us; 32 x 128 x 384, 38 vs 45 us).
    * Every other case is oneDNN's GEMM (``torch.ops.mkldnn._linear_pointwise``, what Inductor's CPU
      freezing emits) on the strides as they are, the bias and the GELU in its epilogue. On a prepacked
      weight, fewer than :data:`_MIN_PACKED_ROWS` rows are padded with zero rows to that many first:
      oneDNN's kernels for one or two rows mostly read the blocked weight slower than its four-row
      kernel does, by up to 60% (measured on one Zen 4 thread, the weights out of cache; docs/cpu.md). Rows do not
      mix in a GEMM, so the padding changes no real row's sums.

    ``x`` is read as a 2-D matrix: a 3-D input with odd strides would make ``matmul`` copy the weight.
    """
    k, n = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    if x.dtype == torch.float32 and _blas(rows, w):
        y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
        if gelu is not None:
            y = torch.ops.aten.gelu_(y, approximate=gelu)
        return y.view(*x.shape[:-1], n)
    post = ("none", "") if gelu is None else ("gelu", gelu)
    if 0 < rows < _MIN_PACKED_ROWS and w.is_mkldnn:
        x2 = torch.cat([x2, x2.new_zeros(_MIN_PACKED_ROWS - rows, k)])
        y = torch.ops.mkldnn._linear_pointwise(x2, w, bias, post[0], [], post[1])[:rows]
    else:
        y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), w, bias, post[0], [], post[1])
    return y.view(*x.shape[:-1], n)


def _native(x: Tensor, w: Tensor) -> bool:
    """Whether ``x @ w^T`` runs :func:`project` (the native CPU path, a dtype oneDNN takes, not compiling)."""
    return (x.device.type == "cpu" and x.dtype == w.dtype and _onednn(x.dtype) and kernels.runs_native(x)
            and not torch.compiler.is_compiling())


class Prepacked:
    """A mixin for a module with a 2-D ``weight`` ``[N, K]`` that :func:`project` reads: oneDNN's blocked
    copy of it (``torch.ops.mkldnn._reorder_linear_weight``, what Inductor's CPU freezing emits), made
    on first use and rebuilt whenever the weight changes.

    The copy is a second one, as large as the weight (docs/cpu.md: how much that is, and
    ``pack_linears(prepack=False)``, which keeps only the checkpoint's); oneDNN's GEMM reads it 5-10%
    faster than the plain layout at 128 rows and 1.5-3x faster at 2-8 rows (a few decoding sequences,
    an LM head; one Zen 4 thread). It is keyed on the weight's storage, strides and version, and
    ``load_state_dict`` drops it; a write through ``.data``, which bumps no version, is not seen.
    Copies and pickles of the module leave it behind (oneDNN's tensors cannot be copied).
    """

    _packed: Optional[Tuple[tuple, Tensor]] = None
    prepack: bool = True

    def weight_for(self, x: Tensor) -> Tensor:
        """The weight :func:`project` reads for ``x``: the plain one for one fp32 row (BLAS on a weight stored
        ``[K, N]``, oneDNN's one-row kernel on ``[N, K]``: both stream the weight faster than the padded
        GEMM on the blocked copy, measured on one Zen 4 thread), for a tiny fp32 GEMM (BLAS), or with
        ``prepack`` off, else the prepacked copy."""
        w = self.weight.detach()
        rows = x.numel() // max(1, x.shape[-1])
        if not self.prepack or (w.dtype == torch.float32 and (rows <= _BLAS_ROWS or _blas(rows, w))):
            return w
        try:
            key = (w.data_ptr(), self.weight._version, tuple(w.shape), w.stride())
        except RuntimeError:  # an inference tensor has no version counter: its data cannot change in place
            key = (w.data_ptr(), None, tuple(w.shape), w.stride())
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # free the stale copy before building the new one
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 128))
        return self._packed[1]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_packed"}

    def _load_from_state_dict(self, *args, **kwargs):
        # load_state_dict copies in place; under inference mode no version counter records it.
        self.__dict__.pop("_packed", None)
        super()._load_from_state_dict(*args, **kwargs)


class PackedLinear(Prepacked, nn.Linear):
    """``nn.Linear`` that, on the native CPU path, runs :func:`project` on its :class:`Prepacked` weight:
    oneDNN's GEMM with the bias (and a GELU) fused in, or BLAS for one fp32 row against a weight stored
    ``[K, N]``. Elsewhere (CUDA, the interpreter, the reference backend, fp16/fp64) it is ``nn.Linear``.
    :func:`pack_linears` swaps a model's ``nn.Linear`` modules for it (same parameters, same state dict).
    """

    def native(self, x: Tensor) -> bool:
        return _native(x, self.weight)

    def forward(self, x: Tensor, gelu: Optional[str] = None) -> Tensor:
        """``linear(x)``, or ``gelu(linear(x))`` with ``gelu`` the approximation (``"none"``/``"tanh"``)."""
        if not self.native(x):
            y = F.linear(x, self.weight, self.bias)
            return y if gelu is None else kernels.gelu(y, approximate=gelu)
        return project(x, self.weight_for(x), None if self.bias is None else self.bias.detach(), gelu)


class PackedEmbedding(Prepacked, nn.Embedding):
    """``nn.Embedding`` whose table is also an LM head (a model's ``tied_lm_embedding``): the lookup is
    ``nn.Embedding``'s, the head (:func:`lm_head`) reads the table's :class:`Prepacked` copy."""


def lm_head(x: Tensor, head: nn.Module) -> Tensor:
    """Logits ``x @ head.weight^T`` for an LM head (its own linear, or an embedding table read as the
    head): :func:`project` on the native CPU path, on the :class:`Prepacked` weight where ``head`` keeps
    one (:func:`pack_linears`), ``F.linear`` elsewhere."""
    w = head.weight
    if not _native(x, w):
        return F.linear(x, w)
    return project(x, head.weight_for(x) if isinstance(head, Prepacked) else w.detach())


def _store_transposed(p: nn.Parameter) -> None:
    """Keep an fp32 ``p`` ``[N, K]`` as a transposed view of a contiguous ``[K, N]`` copy (the old storage
    is freed) where that pays: more outputs than inputs (``N > K``), and neither ``K`` a multiple of 1024
    (oneDNN streams ``[N, K]`` as fast there) nor ``N`` a multiple of 4096 (oneDNN's GEMM over several
    rows of such a transposed view runs 15-35% slower). Measured on one Zen 4 thread."""
    n, k = p.shape
    if p.dtype == torch.float32 and p.is_contiguous() and n > k and k % 1024 and n % 4096:
        p.data = p.detach().t().contiguous().t()


def pack_linears(model: nn.Module, prepack: bool = True) -> nn.Module:
    """Make every plain ``nn.Linear`` in ``model`` a :class:`PackedLinear`, and the embedding table a
    model's ``tied_lm_embedding`` names as its LM head a :class:`PackedEmbedding`, in place (parameters
    shared). With ``prepack`` (the default) they read oneDNN's :class:`Prepacked` copies of their weights,
    made on first use; without, only the checkpoint's weights are kept (one copy, slower GEMMs).
    fp32 weights are also laid out for one-row decoding: a weight with more outputs than inputs (QKV,
    the feed-forward's up-projection, an LM head) is stored ``[K, N]`` and read through a transposed
    view, still one copy, where that pays (:func:`_store_transposed`; :func:`project` says why; the
    embedding lookup reads the view's rows)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                child.__class__ = PackedLinear
    for module in model.modules():
        tied = getattr(module, "tied_lm_embedding", None)
        if type(tied) is nn.Embedding:
            tied.__class__ = PackedEmbedding
    for module in model.modules():
        if isinstance(module, Prepacked):
            module.prepack = prepack
            module.__dict__.pop("_packed", None)
            _store_transposed(module.weight)
    return model


class LayerNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width))
        self.bias = nn.Parameter(torch.empty(width))
        self.eps = eps

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        """``norm(x)``, or ``(norm(x + residual), x + residual)`` in one pass."""
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)


def kernel_mask(attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """A Hugging Face ``attention_mask`` (1/True = attend; any integer or bool dtype) as the attention
    kernel's bool key mask, or ``None`` when nothing is masked: the kernel then loads no mask at all.
    The all-ones test reads one value back to the host, so under CUDA-graph capture or
    ``torch.compile`` the mask is kept as it is (the kernel's result is the same)."""
    if attention_mask is None:
        return None
    if not (torch.compiler.is_compiling() or (attention_mask.is_cuda and torch.cuda.is_current_stream_capturing())):
        if attention_mask.all().item():  # any dtype: all() tests nonzero
            return None
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask.ne(0)


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


class Attention(nn.Module):
    """Multi-head attention on ``kernels.attention``: every family's self-, causal-with-cache and cross-attention.

    * Self-attention projects ``x`` with one fused ``[3*inner, hidden]`` ``qkv`` projection and splits
      it by strided views (no copies). With a ``cache`` (:class:`engine.cache.KVCache`), the new keys
      and values are written at ``start`` (an int; or, static decoding, a one-element device tensor with
      the keys read up to ``mask``'s length) and attention runs over everything cached.
    * ``cross=True``: a ``q`` projection only; ``kv=(k, v)`` ``[B_enc, H, L_enc, D]`` come precomputed
      (an encoder-decoder projects its encoder output once for every layer). The ``g = B / B_enc``
      decoder rows of one encoder row (its beams) become ``g*n`` query rows of one batch item: no
      per-beam copy of the keys and values.
    * ``cache`` may be an :class:`engine.paged.PackedStep` (``cache.packed``): ``x`` ``[1, T, hidden]``
      holds the tokens of many sequences, and the step does their attention over its paged cache.
    * ``out``: the output projection. ``scale``: ``None`` is ``1/sqrt(head_dim)``; ``causal``: queries
      see keys up to their own position, bottom-right aligned (a query's position counts the cache).
      ``bias`` (dense, additive) and ``relative_bias`` (``kernels.RelativeBias``, computed in the
      kernel) go to the kernel as they are; ``need_probs`` returns the probabilities too (eager, fp32).
    * ``mask`` may be an :class:`engine.packing.Packed` instead: ``x`` is then ``[total_tokens, hidden]``
      (a packed batch, no padding) and self-attention runs within each sequence
      (``kernels.attention_varlen``; ``causal`` and ``relative_bias`` per sequence). With a ``cache``
      (a decoder's packed prefill, ``start`` 0) each real token's keys and values go to the slot the
      padded batch would fill, zeros to the padded slots. Cross-attention takes an
      :class:`engine.packing.PackedCross` and ``kv`` views ``[1, H, T_enc, D]`` of the encoder's packed
      keys/values.

    ``forward`` returns ``(output, probabilities or None)``.
    """

    quantizable = ("qkv", "q", "out")  # for engine.quantize

    def __init__(self, hidden: int, heads: int, head_dim: Optional[int] = None, *, qkv_bias: bool = True,
                 out_bias: bool = True, cross: bool = False, causal: bool = False, scale: Optional[float] = None,
                 layer: int = 0):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim or hidden // heads
        self.inner = self.heads * self.head_dim
        self.causal, self.layer, self.cross = causal, layer, cross
        self.scale = 1.0 / math.sqrt(self.head_dim) if scale is None else scale
        if cross:
            self.q = nn.Linear(hidden, self.inner, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(hidden, 3 * self.inner, bias=qkv_bias)
        self.out = nn.Linear(self.inner, hidden, bias=out_bias)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, *, cache=None, start: Union[int, Tensor] = 0,
                kv: Optional[Tuple[Tensor, Tensor]] = None, bias: Optional[Tensor] = None,
                relative_bias: Optional[kernels.RelativeBias] = None, need_probs: bool = False):
        if isinstance(mask, (Packed, PackedCross)):
            return self._varlen(x, mask, relative_bias, kv, cache, start), None
        if getattr(cache, "packed", False):  # engine.paged.PackedStep: many sequences' tokens in one row
            return self.out(cache.attention(self, x, relative_bias)), None
        b, n, _ = x.shape
        if self.cross:
            k, v = kv
            be = k.shape[0]
            q = self.q(x).view(be, (b // be) * n, self.heads, self.head_dim).transpose(1, 2)
        else:
            # [B, H, n, D] strided views, in two view ops (three slices and transposes cost twice as much)
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            if isinstance(start, Tensor):  # static decoding: slot on the device, keys up to the mask's length
                k, v = cache.update_at(self.layer, start, k, v, mask.shape[1])
            elif cache is not None:
                k, v = cache.update(self.layer, start, k, v)  # [B, H, start + n, D] views of the cache
        if need_probs:
            if self.causal or bias is not None or relative_bias is not None:
                raise ValueError("attention probabilities are returned for plain (non-causal, unbiased) attention")
            ctx, probs = attention_with_probs(q, k, v, mask, self.scale)
        else:
            ctx = kernels.attention(q, k, v, causal=self.causal, attention_mask=mask, scale=self.scale, bias=bias,
                                    relative_bias=relative_bias)
            probs = None
        return self.out(ctx.transpose(1, 2).reshape(b, n, -1)), probs

    def _varlen(self, x: Tensor, p: Union[Packed, PackedCross], relative_bias: Optional[kernels.RelativeBias],
                kv=None, cache=None, start: int = 0) -> Tensor:
        t = x.shape[0]
        if isinstance(p, PackedCross):
            q = self.q(x).view(t, self.heads, self.head_dim)
            k, v = (y[0].transpose(0, 1) for y in kv)  # [T_enc, H, D] views
            p, pk = p.queries, p.keys
        else:
            q, k, v = self.qkv(x).view(t, 3, self.heads, self.head_dim).unbind(1)  # [T, H, D] strided views
            pk = p
            if cache is not None:  # [B, H, L, D], zeros at the padded slots
                cache.update(self.layer, start, p.pad(k).transpose(1, 2), p.pad(v).transpose(1, 2))
        ctx = kernels.attention_varlen(q, k, v, p.cu_seqlens, pk.cu_seqlens, p.max_seqlen, pk.max_seqlen,
                                       causal=self.causal, relative_bias=relative_bias, scale=self.scale,
                                       _validated=True)  # Packed builds them consistent
        return self.out(ctx.reshape(t, -1))


class RMSNorm(nn.Module):
    """T5's LayerNorm: scale only, no mean removed, no bias; the residual add fused in as in :class:`LayerNorm`."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width))
        self.eps = eps

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        """``norm(x)``, or ``(norm(x + residual), x + residual)`` in one pass."""
        return kernels.rms_norm(x, self.weight, self.eps, residual=residual)


class FeedForward(nn.Module):
    quantizable = ("up", "down")

    def __init__(self, hidden: int, inner: int, act: str):
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)
        self.act = check_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        up = self.up
        if self.act in _GELU and (up.native(x) if isinstance(up, PackedLinear) else
                                  isinstance(up, Int8Linear) and kernels.runs_native(x)):
            # The GELU fused into the linear: oneDNN's GEMM epilogue, or in place on int8's rescaled output.
            return self.down(up(x, gelu=_GELU[self.act]))
        if isinstance(up, nn.Linear) and not kernels.runs_native(x):
            # The up-projection's bias is added inside the fused activation.
            return self.down(bias_act(F.linear(x, up.weight), up.bias, self.act))
        # The native path (the bias in the GEMM, one pass for the activation), or a quantized linear.
        return self.down(bias_act(up(x), None, self.act))


class PostLNBlock(nn.Module):
    """BERT's transformer layer: attention, add & norm, feed-forward, add & norm."""

    def __init__(self, hidden: int, heads: int, inner: int, act: str, eps: float):
        super().__init__()
        self.attn = Attention(hidden, heads)
        self.norm1 = LayerNorm(hidden, eps)
        self.ffn = FeedForward(hidden, inner, act)
        self.norm2 = LayerNorm(hidden, eps)

    def forward(self, x: Tensor, mask: Optional[Tensor], need_probs: bool = False):
        a, probs = self.attn(x, mask, need_probs=need_probs)
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
