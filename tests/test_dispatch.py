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


# ----------------------------------------------------------------------------
# The eager fast path (kernels._dispatch.eager_native): in plain eager inference on the native path the
# wrappers run kernels.cpu themselves. Same results and errors as the custom ops; never while tracing.


def _trifuse_ops_run(fn):
    """``fn()``'s result and the ``trifuse::`` ops the dispatcher saw while it ran (the profiler
    records every op that goes through ``torch.ops``; the fast path goes around them)."""
    with torch.autograd.profiler.profile() as prof:
        out = fn()
    return out, {e.name for e in prof.function_events if e.name.startswith("trifuse::")}


def _norm_case(b, n, h, dtype, g):
    x, r = (torch.randn(b, n, h, generator=g).to(dtype) for _ in range(2))
    w, bias = torch.randn(h, generator=g) + 1, torch.randn(h, generator=g)  # fp32 parameters, any activation dtype
    return x, r, w, bias


def _assert_both_within_budget(fast, op, ref64, dtype):
    from tests.helpers import TOL

    atol, rtol = TOL[dtype]
    for got in (fast, op):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref64, atol=atol * 4, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,h", [(1, 1, 8), (2, 7, 40), (1, 97, 96)])
def test_fast_path_norms_gelu_match_the_ops(b, n, h, dtype):
    g = torch.Generator().manual_seed(b * 100 + n)
    x, r, w, bias = _norm_case(b, n, h, dtype, g)
    t = torch.ops.trifuse
    ref = kernels.layer_norm_reference
    cases = [  # (fast path, custom op, float64 reference)
        (lambda: kernels.layer_norm(x, w, bias, 1e-5, residual=r), lambda: t.add_layer_norm(x, r, w, bias, 1e-5),
         lambda: ref(x.double(), w.double(), bias.double(), 1e-5, residual=r.double())),
        (lambda: kernels.layer_norm(x, w, None, 1e-5), lambda: t.layer_norm(x, w, None, 1e-5),
         lambda: ref(x.double(), w.double(), None, 1e-5)),
        (lambda: kernels.rms_norm(x, w, 1e-6, residual=r), lambda: t.add_rms_norm(x, r, w, 1e-6),
         lambda: kernels.rms_norm_reference(x.double(), w.double(), 1e-6, residual=r.double())),
        (lambda: kernels.rms_norm(x, None, 1e-6), lambda: t.rms_norm(x, None, 1e-6),
         lambda: kernels.rms_norm_reference(x.double(), None, 1e-6)),
        (lambda: kernels.gelu(x, bias, approximate="tanh", gate=r), lambda: t.gelu(x, bias, r, "tanh"),
         lambda: kernels.gelu_reference(x.double(), bias.double(), "tanh", r.double())),
        (lambda: kernels.gelu(x), lambda: t.gelu(x, None, None, "none"),
         lambda: kernels.gelu_reference(x.double())),
    ]
    with kernels.use_backend("native"), torch.inference_mode():
        for fast, op, ref64 in cases:
            got, ran = _trifuse_ops_run(fast)
            assert not ran, f"the fast path went through {ran}"
            want, ran = _trifuse_ops_run(op)
            assert ran
            r64 = ref64()
            for a, b_, c in zip(*(v if isinstance(v, tuple) else (v,) for v in (got, want, r64))):
                _assert_both_within_budget(a, b_, c, dtype)


def _padded(b, lk):
    """Mixed padding: full, half, one key, and (with four rows) a row that sees no key."""
    m = torch.ones(b, lk, dtype=torch.long)
    for i, n in enumerate([lk, max(1, lk // 2), 1, 0][:b]):
        m[i, n:] = 0
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,lq,lk,causal,t5", [(1, 1, 1, False, False), (4, 7, 7, False, False),
                                               (3, 7, 7, True, True), (2, 97, 97, True, False),
                                               (4, 1, 97, False, True), (2, 5, 9, True, False)])
def test_fast_path_attention_matches_the_op(b, lq, lk, causal, t5, dtype):
    g = torch.Generator().manual_seed(lq * 1000 + lk)
    q = torch.randn(b, 2, lq, 16, generator=g).to(dtype)
    k, v = (torch.randn(b, 2, lk, 16, generator=g).to(dtype) for _ in range(2))
    mask = _padded(b, lk)
    rb = kernels.RelativeBias(torch.randn(32, 2, generator=g), not causal) if t5 else None
    kw = dict(causal=causal, attention_mask=mask, relative_bias=rb, scale=0.3 if t5 else None)
    with kernels.use_backend("native"), torch.inference_mode():
        got, ran = _trifuse_ops_run(lambda: kernels.attention(q, k, v, **kw))
        assert not ran, f"the fast path went through {ran}"
    with kernels.use_backend("native"):  # a tensor that requires grad: the op path, as before the fast path
        qg = q.clone().requires_grad_()
        want, ran = _trifuse_ops_run(lambda: kernels.attention(qg, k, v, **kw))
    assert ran == {"trifuse::attention"}
    ref64 = kernels.attention_reference(q.double(), k.double(), v.double(),
                                        **dict(kw, relative_bias=None if rb is None else kernels.RelativeBias(
                                            rb.table.double(), rb.bidirectional)))
    _assert_both_within_budget(got, want.detach(), ref64, dtype)


def test_fast_path_attention_varlen_matches_the_op():
    g = torch.Generator().manual_seed(7)
    lengths = [7, 1, 0, 97]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=g) for _ in range(3))
    rb = kernels.RelativeBias(torch.randn(32, 2, generator=g), True, query_offset=0)
    args = (q, k, v, cu, cu, max(lengths), max(lengths))
    with kernels.use_backend("native"), torch.inference_mode():
        got, ran = _trifuse_ops_run(lambda: kernels.attention_varlen(*args, relative_bias=rb))
        assert not ran
        with kernels.use_backend("reference"):
            ref, ran = _trifuse_ops_run(lambda: kernels.attention_varlen(*args, relative_bias=rb))
        assert ran == {"trifuse::attention_varlen"}
        ref64 = kernels.attention_varlen_reference(*(t.double() for t in args[:3]), *args[3:], relative_bias=(
            kernels.RelativeBias(rb.table.double(), True, query_offset=0)))
        _assert_both_within_budget(got, ref, ref64, torch.float32)
        with pytest.raises(ValueError, match="max_seqlen_q=5 is smaller than the longest sequence"):
            kernels.attention_varlen(q, k, v, cu, cu, 5, 97)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_paged_attention_matches_the_op(dtype):
    from tests.test_paged_attention import problem, ref64, t5_bias

    args = problem(lens=((3, 7), (1, 97), (1, 1)), dtype=dtype)
    rel = t5_bias(3)
    with kernels.use_backend("native"), torch.inference_mode():
        got, ran = _trifuse_ops_run(lambda: kernels.paged_attention(*args, relative_bias=rel))
        assert not ran
    with kernels.use_backend("native"):
        q = args[0].clone().requires_grad_()  # the op path
        want, ran = _trifuse_ops_run(lambda: kernels.paged_attention(q, *args[1:], relative_bias=rel))
        assert ran == {"trifuse::paged_attention"}
    _assert_both_within_budget(got, want.detach(), ref64(args, rel), dtype)
    with kernels.use_backend("native"), torch.inference_mode():
        bad = args[:5] + (args[5] + 200,)
        fast = _errors(lambda: kernels.paged_attention(*bad))
    with kernels.use_backend("reference"):
        assert _errors(lambda: kernels.paged_attention(*bad)) == fast


def _errors(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type and the words are what is compared
        return type(e), str(e)
    pytest.fail("bad input was accepted")


def test_fast_path_gives_the_ops_errors():
    """Every bad input of the kernel tests: the same error type and words on the fast path (inference
    mode) as through the custom op (the reference backend, which never takes the fast path)."""
    from tests.test_attention import _bad_cases

    x = torch.randn(4, 8)
    calls = [
        lambda: kernels.layer_norm(torch.ones(4, 8, dtype=torch.int32)),
        lambda: kernels.layer_norm(x, torch.ones(7)),
        lambda: kernels.layer_norm(x, None, torch.ones(9)),
        lambda: kernels.rms_norm(x, residual=torch.randn(4, 9)),
        lambda: kernels.layer_norm(x, residual=x.half()),
        lambda: kernels.rms_norm(x, torch.ones(8, device="meta")),
        lambda: kernels.rms_norm(x, torch.ones(8, dtype=torch.long)),
        lambda: kernels.layer_norm(x, eps=-1.0),
        lambda: kernels.layer_norm(torch.tensor(1.0)),
        lambda: kernels.gelu(x, approximate="sigmoid"),
        lambda: kernels.gelu(x, torch.ones(4)),
        lambda: kernels.gelu(x, gate=torch.ones(4, 9)),
        lambda: kernels.gelu(x, gate=x.half()),
    ]
    for args, kw, _, _ in _bad_cases("cpu"):
        calls.append(lambda args=args, kw=kw: kernels.attention(args["q"], args["k"], args["v"], **kw))
    for i, call in enumerate(calls):
        with kernels.use_backend("native"), torch.inference_mode():
            fast = _errors(call)
        with kernels.use_backend("reference"):
            op = _errors(call)
        assert fast == op, f"case {i}"


@pytest.fixture
def native_calls(monkeypatch):
    """How many times each kernels.cpu function ran (the fast path calls them outside any op)."""
    import importlib

    cpu_mod = importlib.import_module("trifuse.kernels.cpu")
    calls = []
    for name in ("norm", "gelu", "attention"):
        fn = getattr(cpu_mod, name)
        monkeypatch.setattr(cpu_mod, name, lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    with kernels.use_backend("native"):
        yield calls


class _Attn(torch.nn.Module):
    def forward(self, q, mask):
        return kernels.attention(q, q, q, attention_mask=mask, causal=True)


def _block_inputs():
    return torch.randn(4, 32), torch.randn(4, 32)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_fast_path_is_off_under_export_and_tracing(native_calls):
    m = _Block(32)
    x, r = _block_inputs()
    q, mask = torch.randn(2, 2, 5, 16), _padded(2, 5)
    with torch.no_grad():
        want = m(x, r)
        ep = torch.export.export(m, (x, r))
        ep_attn = torch.export.export(_Attn(), (q, mask))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"trifuse.add_layer_norm.default", "trifuse.gelu.default", "trifuse.rms_norm.default"} <= targets
    assert "trifuse.attention.default" in {str(n.target) for n in ep_attn.graph.nodes}
    with torch.no_grad():
        traced = torch.jit.trace(m, (x, r), check_trace=False)
    graph = str(traced.graph)
    assert "trifuse::add_layer_norm" in graph and "trifuse::gelu" in graph and "trifuse::rms_norm" in graph
    native_calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(traced(x, r), want)
        _, ran = _trifuse_ops_run(lambda: ep.module()(x, r))
    assert {"trifuse::add_layer_norm", "trifuse::gelu", "trifuse::rms_norm"} <= ran


def test_fast_path_is_off_under_compile(native_calls):
    m = _Block(48)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x, r = torch.randn(3, 48), torch.randn(3, 48)
    with torch.no_grad():
        want = m(x, r)
        got, ran = _trifuse_ops_run(lambda: compiled(x, r))
    torch.testing.assert_close(got, want)
    assert {"trifuse::add_layer_norm", "trifuse::gelu", "trifuse::rms_norm"} <= ran


def test_fast_path_is_off_under_modes_subclasses_autocast_and_grad(native_calls):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    m = _Block(16)
    x, r = torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        gm = make_fx(m)(x, r)  # real tensors: the op's real implementation runs, inside the op
        assert "trifuse.add_layer_norm" in str(gm.graph)
        native_calls.clear()
        with FakeTensorMode(allow_non_fake_inputs=True) as fake:
            out = m(fake.from_tensor(x), fake.from_tensor(r))
        assert out.shape == x.shape and not native_calls  # the fake implementations ran

        class Count(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        class Seen(TorchDispatchMode):  # a user's dispatch mode (a FLOP counter, a debug log) sees the ops
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.add(str(func))
                return func(*args, **(kwargs or {}))

        seen = set()
        with Seen():
            m(x, r)
        assert "trifuse.add_layer_norm.default" in seen
        for ctx in (Count(), torch.autocast("cpu", dtype=torch.bfloat16)):
            with ctx:
                _, ran = _trifuse_ops_run(lambda: m(x, r))
            assert "trifuse::add_layer_norm" in ran
    # Grad mode with a parameter that requires grad: the op (no autograd formula: backward fails, as before).
    _, ran = _trifuse_ops_run(lambda: m(x, r))
    assert "trifuse::add_layer_norm" in ran
    # Plain eager inference: the fast path, and the kernels.cpu functions ran.
    native_calls.clear()
    with torch.inference_mode():
        _, ran = _trifuse_ops_run(lambda: m(x, r))
    assert not ran and native_calls == ["norm", "gelu", "norm"]


def test_reference_backend_still_runs_the_reference(monkeypatch):
    import importlib

    cpu_mod = importlib.import_module("trifuse.kernels.cpu")
    for name in ("norm", "gelu", "attention"):
        monkeypatch.setattr(cpu_mod, name, None)  # any native call now fails
    m = _Block(24)
    x, r = torch.randn(3, 24), torch.randn(3, 24)
    q = torch.randn(1, 2, 7, 8)
    with kernels.use_backend("reference"), torch.inference_mode():
        got, ran = _trifuse_ops_run(lambda: m(x, r))
        assert "trifuse::add_layer_norm" in ran
        y = kernels.attention(q, q, q, causal=True)
    ref = kernels.attention_reference(q.double(), q.double(), q.double(), causal=True)
    torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=2e-5)
    h = x.double() + r.double()
    y64 = kernels.layer_norm_reference(h, m.w.double(), m.b.double())
    want = kernels.gelu_reference(y64, m.b.double()) + kernels.rms_norm_reference(h, m.w.double())
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_onnx_export_on_the_native_backend_keeps_the_ops(tmp_path):
    """ONNX export (torch.export underneath) on the native backend: the translated ops, and ONNX
    Runtime's result equals the eager fast path's."""
    import onnxruntime as ort

    from trifuse import export

    m = _Block(32)
    x, r = _block_inputs()
    with kernels.use_backend("native"), torch.no_grad():
        prog = torch.onnx.export(m, (x, r), dynamo=True, opset_version=20, verbose=False,
                                 custom_translation_table=export.translation_table(20))
        with torch.inference_mode():
            want, ran = _trifuse_ops_run(lambda: m(x, r))
    assert not ran
    path = tmp_path / "block.onnx"
    prog.save(str(path))
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"LayerNormalization", "Gelu"} <= ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), (x, r))})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, atol=2e-5, rtol=2e-5)
