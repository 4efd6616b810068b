"""trifuse kernels: fused Triton ops with a pure-PyTorch reference beside each.

Every public op is a ``torch.library.custom_op`` in the ``trifuse`` namespace, so
torch.export, torch.compile and the ONNX exporter see one opaque node. Where an
op runs (Triton, Triton's interpreter, or the reference) is decided at call
time; see :mod:`kernels._dispatch`.
"""

if __name__ != "trifuse.kernels":  # the source folder imported by its bare name
    from trifuse.sourcetree import stand_aside

    stand_aside(__name__, __file__)
else:
    from ._dispatch import BACKENDS, INTERPRET, get_backend, runs_native, set_backend, triton_runnable, use_backend
    from .attention import (
        MAX_HEAD_DIM,
        MIN_HEAD_DIM,
        RelativeBias,
        attention,
        attention_reference,
        attention_tma,
        relative_position_bucket,
    )
    from .gelu import gelu, gelu_reference
    from .paged_attention import paged_attention, paged_attention_reference
    from .norm import MAX_FUSED_WIDTH, layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
    from .varlen import attention_varlen, attention_varlen_reference

    __all__ = [
        "BACKENDS", "INTERPRET", "get_backend", "set_backend", "use_backend", "triton_runnable", "runs_native",
        "attention", "attention_reference", "attention_tma", "RelativeBias", "relative_position_bucket",
        "MIN_HEAD_DIM", "MAX_HEAD_DIM", "attention_varlen", "attention_varlen_reference",
        "gelu", "gelu_reference", "paged_attention", "paged_attention_reference",
        "layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference", "MAX_FUSED_WIDTH",
    ]
