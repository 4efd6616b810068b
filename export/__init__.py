"""ONNX export of trifuse models, verified in ONNX Runtime against PyTorch.

    import trifuse

    model = trifuse.from_pretrained("path/to/checkpoint")
    path = trifuse.export.to_onnx(model, "model.onnx")          # fused ops -> LayerNormalization, Gelu, ...
    report = trifuse.export.verify(path, model)                   # ORT vs PyTorch at other shapes, padded
    print(report.ok, report)
    runner = trifuse.export.OrtRunner(path)                       # torch tensors in, torch tensors out
    tokens = trifuse.export.ort_generate_greedy("gpt2.onnx", ids, mask, max_new_tokens=20)

See :mod:`trifuse.export.onnx` (export, metadata), :mod:`~trifuse.export.ops` (the op translations),
:mod:`~trifuse.export.graphs` (one graph spec per kind of model), :mod:`~trifuse.export.runtime` (ONNX Runtime)
and :mod:`trifuse.export.verify`.
"""

if __name__ != "trifuse.export":  # the source folder imported by its bare name
    from trifuse.sourcetree import stand_aside

    stand_aside(__name__, __file__)
else:
    from .onnx import (
        DEFAULT_OPSET,
        ExportError,
        OrtRunner,
        default_providers,
        ort_generate_greedy,
        ort_session,
        read_metadata,
        to_onnx,
        translation_table,
    )
    from .verify import BUDGETS, VerifyReport, print_report, verify

    __all__ = ["to_onnx", "verify", "VerifyReport", "print_report", "BUDGETS", "ExportError", "OrtRunner",
               "ort_session", "ort_generate_greedy", "read_metadata", "translation_table", "default_providers",
               "DEFAULT_OPSET"]
