"""trifuse: a transformer inference engine whose hot ops are fused Triton kernels.

    import trifuse

    model = trifuse.from_pretrained("path/to/checkpoint", dtype="fp16", device="cuda")
    from trifuse.kernels import attention, layer_norm
    trifuse.export.to_onnx(model, "model.onnx")

The subpackages (``trifuse.kernels``, ``trifuse.engine``, ``trifuse.export``,
``trifuse.bench``) load on first use: ``import trifuse`` imports no kernel, so a
program can still set ``TRITON_INTERPRET`` after importing it.
"""

from __future__ import annotations

import importlib
import os as _os

__version__ = "0.2.0"

# In a source checkout the subpackages sit beside this folder (engine/, kernels/, ...);
# installed, they are inside it. Let the same imports work from both.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "engine"))
        and _os.path.isfile(_os.path.join(_root, "engine", "__init__.py"))
        and _os.path.isfile(_os.path.join(_root, "pyproject.toml"))):
    __path__.append(_root)  # noqa: F821  (the package's own search path)

_SUBPACKAGES = ("kernels", "engine", "export", "bench")

#: public name -> the module that defines it (imported on first use)
_LAZY = {
    "from_pretrained": "trifuse.engine",
    "read_checkpoint": "trifuse.engine",
    "resolve_dtype": "trifuse.engine",
    "supported_model_types": "trifuse.engine",
    "mean_pool": "trifuse.engine",
    "ModelOutput": "trifuse.engine",
    "EncoderOutput": "trifuse.engine",
    "LogitsOutput": "trifuse.engine",
    "QuestionAnsweringOutput": "trifuse.engine",
    "pipeline": "trifuse.engine.pipelines",
    "plot_attention": "trifuse.engine.pipelines",
    "GenerationEngine": "trifuse.engine.continuous",
}


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is not None:
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'trifuse' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBPACKAGES) | set(_LAZY))


__all__ = ["__version__", *_SUBPACKAGES, *_LAZY]
