"""Where a trifuse op runs: the Triton kernel, the native CPU path, or the pure-PyTorch reference.

The rule, applied at call time inside every custom op (:func:`path`):

* backend ``reference`` (``TRIFUSE_BACKEND=reference`` or :func:`set_backend`)
  runs the reference everywhere, for A/B checks;
* backend ``native`` runs :mod:`kernels.cpu` (PyTorch's fused native kernels: SDPA,
  ``layer_norm``, ``gelu``) on any device: how tests reach the CPU fast path while
  ``TRITON_INTERPRET=1`` is set;
* backend ``auto`` (the default): CUDA tensors run the Triton kernel; CPU tensors run
  the Triton kernel through Triton's interpreter when ``TRITON_INTERPRET=1`` was set
  before trifuse was imported (Triton reads it when a kernel is decorated: a debugging
  and testing mode), and the native path otherwise;
* backend ``triton`` refuses to fall back: a tensor the Triton path cannot take
  is an error rather than a silent switch to another path.

:func:`set_backend` (and ``TRIFUSE_BACKEND``) sets the process-wide default;
:func:`use_backend` overrides it for the calling thread (or asyncio task) only,
through a :mod:`contextvars` variable, so threads serving one model do not
switch each other's backend.

:func:`eager_native` is the eager fast path's guard: in plain eager inference on the
native path the public wrappers call :mod:`kernels.cpu` themselves (after the same input
checks) instead of going through ``torch.ops.trifuse`` (``torch.library``'s dispatch costs
microseconds a call, which small models pay dozens of times a forward). Under
``torch.compile``, ``torch.export``, ONNX export, ``jit.trace`` and every other tracing or
mode the wrappers keep calling the custom ops, so graphs see one opaque node as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional

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

BACKENDS = ("auto", "triton", "native", "reference")


def _backend_from_env() -> str:
    value = os.environ.get("TRIFUSE_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"TRIFUSE_BACKEND={value!r}; expected one of {BACKENDS}")
    return value


_backend = _backend_from_env()  # the process-wide default
_scoped: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("trifuse_backend", default=None)


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend in force here: this thread's :func:`use_backend`, else the process-wide one."""
    scoped = _scoped.get()
    return _backend if scoped is None else scoped


def set_backend(name: str) -> None:
    """Force ``reference``, ``native`` or ``triton`` in every thread, or go back to ``auto``.

    A :func:`use_backend` block in progress keeps its own backend until it ends.
    """
    global _backend
    _backend = _checked(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with kernels.use_backend("reference"): ...`` runs a block on one backend.

    Scoped to the calling thread (or asyncio task): other threads keep theirs.
    Threads started inside the block start from the process-wide backend, as
    every new thread starts with a fresh :mod:`contextvars` context.
    """
    previous = _scoped.get()
    _scoped.set(_checked(name))
    try:
        yield
    finally:
        _scoped.set(previous)


def triton_runnable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device`` in this process."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRET


def path(t: torch.Tensor) -> str:
    """The dispatch decision for an op whose main input is ``t``: ``triton``, ``native`` or ``reference``."""
    backend = get_backend()
    if backend in ("reference", "native"):
        return backend
    if backend == "auto" and t.device.type == "cpu" and not triton_runnable(t.device):
        return "native"
    return "triton" if use_triton(t) else "reference"


_C = torch._C
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager() -> bool:
    """Whether this call runs in plain eager mode: not compiling or exporting (``torch.compiler.is_compiling``,
    which dynamo also folds to ``True`` while it traces the caller), not ``jit``-tracing (legacy ONNX
    export), no ``__torch_dispatch__`` mode (FakeTensor, ``make_fx``, non-strict export, a user's mode),
    no ``__torch_function__`` mode (``with torch.device(...)`` included), no functorch transform and no
    autocast. Each test is one C call."""
    return not (torch.compiler.is_compiling() or _C._is_tracing() or _C._len_torch_dispatch_stack()
                or _C._is_torch_function_mode_enabled() or _C._are_functorch_transforms_active()
                or _C._is_any_autocast_enabled())


def eager_native(x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether an op on ``x`` (its main input) and ``others`` (its other tensors, ``None`` allowed) may
    call :mod:`kernels.cpu` directly, skipping ``torch.ops.trifuse``: the call runs the native path
    (:func:`path`) on a float dtype other than fp64 (which runs the reference), in plain eager mode.

    Plain eager means :func:`plain_eager` (autocast included: the ops do not autocast, PyTorch's
    native kernels would), plain tensors only (no subclass: FakeTensor, functional or user tensors go
    through dispatch; parameters are fine) and nothing that would record autograd history (the ops
    have no autograd formula, so a backward through them fails; the native kernels would silently
    differentiate): grad mode off (``no_grad``, ``inference_mode``) or no tensor requiring grad. The
    whole guard costs about a microsecond in Python.
    """
    if type(x) is not torch.Tensor or x.dtype is torch.float64 or not plain_eager():
        return False
    grad = _C.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    for t in others:
        if t is not None and (type(t) not in _PLAIN or grad and t.requires_grad):
            return False
    backend = _scoped.get()
    if backend is None:
        backend = _backend
    # path()'s rule for the auto backend (one source of truth: a tool that lets Triton "run" on CPU
    # tensors by patching triton_runnable sees the ops take Triton here too).
    return backend == "native" or (backend == "auto" and x.is_cpu and not triton_runnable(x.device))


def runs_native(t: torch.Tensor) -> bool:
    """Whether ops on ``t`` take the native path (the layers then pick the shapes it runs fastest)."""
    return path(t) == "native"


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op whose main input is ``t`` runs the Triton kernel (``False``: see :func:`path`)."""
    backend = get_backend()
    if backend in ("reference", "native"):
        return False
    runnable = triton_runnable(t.device)
    if backend == "triton" and not runnable:
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
