"""Where a trifuse op runs: the Triton kernel or the pure-PyTorch reference.

The rule, applied at call time inside every custom op:

* backend ``reference`` (``TRIFUSE_BACKEND=reference`` or :func:`set_backend`)
  runs the reference everywhere, for A/B checks;
* otherwise CUDA tensors run the Triton kernel;
* CPU tensors run the Triton kernel through Triton's interpreter when
  ``TRITON_INTERPRET=1`` was set before trifuse was imported (Triton reads it
  when a kernel is decorated), and the reference otherwise;
* backend ``triton`` refuses to fall back: a tensor the Triton path cannot take
  is an error rather than a silent switch to the reference.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # macOS, Windows, or a torch build without Triton
    HAS_TRITON = False

#: Triton decides between compiling and interpreting when a kernel is decorated,
#: i.e. when trifuse's kernel modules are imported, so read the flag once here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("auto", "triton", "reference")


def _backend_from_env() -> str:
    value = os.environ.get("TRIFUSE_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"TRIFUSE_BACKEND={value!r}; expected one of {BACKENDS}")
    return value


_backend = _backend_from_env()


def get_backend() -> str:
    """The current backend: ``auto``, ``triton`` or ``reference``."""
    return _backend


def set_backend(name: str) -> None:
    """Force ``reference`` or ``triton`` everywhere, or go back to ``auto``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with kernels.use_backend("reference"): ...`` runs a block on one backend."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_runnable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device`` in this process."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRET


def use_triton(t: torch.Tensor) -> bool:
    """The dispatch decision for an op whose main input is ``t``."""
    if _backend == "reference":
        return False
    runnable = triton_runnable(t.device)
    if _backend == "triton" and not runnable:
        if not HAS_TRITON:
            why = "triton is not installed"
        elif t.device.type == "cpu":
            why = "CPU tensors need TRITON_INTERPRET=1 set before trifuse is imported"
        else:
            why = f"Triton does not run on {t.device.type} tensors"
        raise RuntimeError(f"backend 'triton' was forced but cannot run here: {why}")
    return runnable


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
