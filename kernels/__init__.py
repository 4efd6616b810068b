"""trifuse kernels: fused Triton ops with a pure-PyTorch reference beside each.

Every public op is a ``torch.library.custom_op`` in the ``trifuse`` namespace, so
torch.export, torch.compile and the ONNX exporter see one opaque node. Where an
op runs (Triton, Triton's interpreter, or the reference) is decided at call
time; see :mod:`kernels._dispatch`.
"""

from ._dispatch import BACKENDS, INTERPRET, get_backend, set_backend, use_backend
from .gelu import gelu, gelu_reference
from .norm import MAX_FUSED_WIDTH, layer_norm, layer_norm_reference, rms_norm, rms_norm_reference

__all__ = [
    "BACKENDS", "INTERPRET", "get_backend", "set_backend", "use_backend",
    "gelu", "gelu_reference",
    "layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference", "MAX_FUSED_WIDTH",
]
