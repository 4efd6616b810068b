"""Optional dependencies: what the core install leaves out, and the error that names the extra.

The core install (``pip install trifuse``) brings what the run path needs: torch, Triton,
numpy, safetensors, Pillow. ONNX export, Hugging Face as a reference and the benchmark
harness are extras; a feature that needs one checks for it before it starts.
"""

from __future__ import annotations

import importlib.util

#: extra -> the modules it provides (the names in pyproject.toml's optional-dependencies)
EXTRAS = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "hf": ("transformers", "tokenizers", "rich"),
    "bench": ("matplotlib", "rich", "transformers", "onnx", "onnxscript", "onnxruntime"),
    "serve": ("ray", "starlette", "prometheus_client"),
}


def missing(*modules: str) -> list[str]:
    """The modules among ``modules`` that cannot be imported here."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(what: str, extra: str, *modules: str) -> None:
    """Raise ``ImportError`` naming the missing modules and the extra that installs them."""
    absent = missing(*(modules or EXTRAS[extra]))
    if absent:
        hint = f"pip install 'trifuse[{extra}]'"
        if extra == "onnx":
            hint += " (or 'trifuse[onnx-gpu]' for ONNX Runtime's CUDA build)"
        raise ImportError(f"{what} needs {', '.join(absent)}, not installed here: {hint}")
