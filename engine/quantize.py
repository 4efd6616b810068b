"""int8 on the CPU: dynamic per-token activations x per-channel weights on the layers' linears.

``from_pretrained(path, quantize="int8")`` swaps the transformer layers' linear projections
(attention ``qkv``/``q``/``out``, the feed-forward's up and down projections: whatever a module
lists in its ``quantizable`` attribute) for :class:`Int8Linear`. Embeddings, norms, attention
itself, poolers and task heads stay in the model's float dtype.

* Weights: symmetric int8 per output channel, ``scale = max|w_row| / 127``, quantized once.
* Activations: symmetric int8 per token (per row of ``x``), scaled from the row's own
  ``max|x|`` at every call, so an outlier token costs only its own row's precision.
* The GEMM is ``torch._int_mm`` (int8 x int8 -> int32): PyTorch's core op, backed by oneDNN on
  x86 (AVX512_VNNI / AVX-VNNI where the CPU has them, AVX2 otherwise). The int32 sums are
  rescaled by ``scale_x[token] * scale_w[channel]`` and the bias added, in fp32.

Why this and not a library's wrapper: torch's eager quantized engines
(``torch.ao.nn.quantized.dynamic``, ``quantized::linear_dynamic``) quantize activations per
tensor and their quantized tensors are deprecated; torchao 0.18's
``Int8DynamicActivationInt8WeightConfig`` computes the same scheme on the same ``_int_mm`` but, in
eager mode on the CPU, spends more time choosing its parameters than in the GEMM (measured ~2.5x
slower than this module on one Zen 4 core, under load).

On a GPU ``quantize="int8"`` is refused with a clear error: there is no Triton int8 GEMM yet.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

QUANTIZATIONS = ("int8",)

#: oneDNN's int8 linear (``onednn::qlinear_pointwise``, what Inductor's x86 int8 path emits) is in
#: this torch build; without it (non-x86 builds) :class:`Int8Linear` runs ``torch._int_mm``.
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
#: ``v + _ROUND`` (``|v| <= 127``) rounds ``v`` to the nearest integer, ties to even, in fp32's last bits:
#: at ``1.5 * 2**23`` the float's spacing is 1, so its int32 bits are those of ``1.5 * 2**23`` plus
#: ``round(v) + 128``, whose low byte is the uint8 ``round(v) + 128`` (zero point 128).
_ROUND = 1.5 * 2**23 + 128


def _quantize_rows(x: Tensor, inv_scale: Tensor) -> Tensor:
    """``round(x * inv_scale) + 128`` as uint8: a multiply, an add and one int32 -> uint8 narrowing (vectorized;
    a float -> uint8 conversion is a scalar loop on the CPU, and ``torch.round`` would be a pass of its own)."""
    return torch.mul(x, inv_scale).add_(_ROUND).view(torch.int32).to(torch.uint8)


class Int8Linear(nn.Module):
    """``y = (q(x) @ q(W)^T) * scale_x * scale_w + b``: per-token int8 activations, per-channel int8 weights."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        super().__init__()
        w = weight.detach().float()  # [N, K]
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)  # [N] fp32
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    _packed: Optional[Tensor] = None  # oneDNN's prepacked qweight, built on first use

    def __getstate__(self):  # copies leave the packed weight behind (oneDNN's cannot be copied)
        return {k: v for k, v in self.__dict__.items() if k != "_packed"}

    def forward(self, x: Tensor, gelu: Optional[str] = None) -> Tensor:
        """``linear(x)``, or ``gelu(linear(x))`` with ``gelu`` the approximation (``"none"``/``"tanh"``),
        in place on the output (PyTorch's GELU, fp32 inside)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()  # [M, K]
        # max|x| per row as max(amax, -amin): vectorized, unlike vector_norm(inf) or aminmax on the CPU.
        amax = torch.maximum(x2.amax(1, keepdim=True), x2.amin(1, keepdim=True).neg_()).clamp_min_(1e-12)  # [M, 1]
        xu = _quantize_rows(x2, 127 / amax)  # [M, K] uint8, zero point 128
        if x.device.type == "cpu" and ONEDNN:
            # oneDNN's u8 x s8 kernel (VNNI's native form) on a prepacked weight, the per-channel
            # weight scale applied in the kernel.
            if self._packed is None:
                self._packed = torch.ops.onednn.qlinear_prepack(self.qweight, None)
            y = torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, self._packed, self.scale, self._zero_points(),
                                                   None, 1.0, 0, torch.float32, "none", [], "")
        else:
            xq = xu.to(torch.int16).sub_(128).to(torch.int8)
            y = torch._int_mm(xq, self.qweight.t()).mul(self.scale)  # int32 [M, N] -> fp32
        sx = amax.mul_(1 / 127)
        # The per-token scale and the bias in fp32, written straight in the model's dtype (one pass).
        out = y if x.dtype == torch.float32 else torch.empty(y.shape, dtype=x.dtype, device=y.device)
        if self.bias is None:
            torch.mul(y, sx, out=out)
        else:
            torch.addcmul(self.bias, y, sx, out=out)
        if gelu is not None:
            torch.ops.aten.gelu_(out, approximate=gelu)
        return out.view(*lead, self.out_features)

    def _zero_points(self) -> Tensor:
        zp = self.__dict__.get("_zp")
        if zp is None or zp.shape[0] != self.out_features:
            zp = self.__dict__["_zp"] = torch.zeros(self.out_features, dtype=torch.int32)
        return zp


def check_quantize(quantize: Optional[str], device: torch.device, dtype: Optional[torch.dtype]) -> None:
    """Refuse what int8 cannot serve, before anything is loaded."""
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; expected one of {QUANTIZATIONS} or None")
    if device.type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on the CPU only for now (device={device}); "
                         "load without quantize on a GPU, or pass device='cpu'")
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"quantize={quantize!r} takes float32 or bfloat16 for the unquantized parts, got {dtype}")


def quantize_linears(model: nn.Module, quantize: str = "int8") -> nn.Module:
    """Swap, in place, the linears that the model's layers mark ``quantizable`` for :class:`Int8Linear`."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; expected one of {QUANTIZATIONS}")
    swapped = 0
    for module in list(model.modules()):
        for name in getattr(module, "quantizable", ()):
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child))
                swapped += 1
    if not swapped:
        raise ValueError(f"{type(model).__name__} has no quantizable linear layers")
    model.quantization = quantize
    return model
