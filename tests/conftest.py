"""Test setup: Triton's interpreter on machines without a GPU, and the ``gpu`` marker.

``TRITON_INTERPRET`` must be set before any trifuse kernel module is imported,
because Triton chooses between compiling and interpreting when a kernel is
decorated. Without CUDA we turn the interpreter on, so the CPU suite exercises
the real Triton kernels; with CUDA they compile for real.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU when there is one, else the CPU (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def reference_backend():
    """Model parity runs the PyTorch reference ops; the interpreter tests run the kernels."""
    from trifuse import kernels

    with kernels.use_backend("reference"):
        yield
