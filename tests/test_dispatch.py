"""Dispatch between Triton and the reference, and the ops as opaque graph nodes."""

import os
import subprocess
import sys

import pytest
import torch

from trifuse import kernels
from trifuse.kernels import _dispatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": REPO, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env)


def test_env_forces_reference():
    out = _python("from trifuse import kernels; print(kernels.get_backend())", TRIFUSE_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_env_rejects_unknown_backend():
    out = _python("import trifuse.kernels", TRIFUSE_BACKEND="cuda-magic")
    assert out.returncode != 0
    assert "TRIFUSE_BACKEND='cuda-magic'" in out.stderr


def test_cpu_without_interpreter_runs_native():
    code = ("import torch; from trifuse import kernels; from trifuse.kernels import norm\n"
            "norm._launch = None  # any Triton launch would now fail\n"
            "x = torch.randn(3, 8)\n"
            "torch.testing.assert_close(kernels.layer_norm(x), kernels.layer_norm_reference(x))\n"
            "print('ok')")
    out = _python(code, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_set_backend_and_context():
    assert kernels.get_backend() == "auto"
    with kernels.use_backend("reference"):
        assert kernels.get_backend() == "reference"
        with kernels.use_backend("triton"):
            assert kernels.get_backend() == "triton"
        assert kernels.get_backend() == "reference"
    assert kernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.set_backend("fast")


def test_forced_triton_refuses_to_fall_back(monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRET", False)
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.gelu(torch.randn(2, 4))


def test_reference_and_triton_agree(device):
    """The A/B check the switch exists for."""
    x, r = torch.randn(2, 5, 96, device=device), torch.randn(2, 5, 96, device=device)
    w, b = torch.randn(96, device=device), torch.randn(96, device=device)

    def block():
        y, h = kernels.layer_norm(x, w, b, residual=r)
        return kernels.gelu(y, b, approximate="tanh", gate=kernels.rms_norm(h, w))

    with kernels.use_backend("reference"):
        ref = block()
    torch.testing.assert_close(block(), ref, atol=2e-5, rtol=2e-5)


class _Block(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n))
        self.b = torch.nn.Parameter(torch.randn(n))

    def forward(self, x, r):
        y, h = kernels.layer_norm(x, self.w, self.b, residual=r)
        return kernels.gelu(y, self.b) + kernels.rms_norm(h, self.w)


def test_torch_export_sees_opaque_ops(device):
    m = _Block(32).to(device)
    x, r = torch.randn(4, 32, device=device), torch.randn(4, 32, device=device)
    with torch.no_grad():
        ep = torch.export.export(m, (x, r))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"trifuse.add_layer_norm.default", "trifuse.gelu.default", "trifuse.rms_norm.default"} <= targets
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, r), m(x, r))


def test_export_reports_bad_input_while_tracing():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return kernels.layer_norm(x, torch.ones(x.shape[-1] + 1))

    with pytest.raises(Exception, match="weight has shape"):
        torch.export.export(Bad(), (torch.randn(2, 8),))


def test_torch_compile_fullgraph_dynamic(device):
    m = _Block(48).to(device)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for rows in (3, 9):
            x, r = torch.randn(rows, 48, device=device), torch.randn(rows, 48, device=device)
            torch.testing.assert_close(compiled(x, r), m(x, r))
