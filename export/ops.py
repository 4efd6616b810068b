"""The trifuse custom ops in ONNX: :func:`translation_table` for ``torch.onnx.export(dynamo=True)``.

Our ``torch.library`` custom ops reach the exporter as single nodes; each is turned into
standard ONNX that ONNX Runtime runs fast:

* ``layer_norm`` / ``add_layer_norm``: ``LayerNormalization`` (after an ``Add``
  for the residual; the sum ``h`` is the op's second output);
* ``rms_norm`` / ``add_rms_norm``: ``RMSNormalization`` from opset 23, below it
  the ``Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul`` pattern ONNX Runtime
  fuses into its ``SimplifiedLayerNormalization``;
* ``gelu``: ``Add`` (bias) -> ``Gelu`` (opset 20, ``approximate`` kept) -> ``Mul`` (gate);
* ``attention``: ``MatMul -> Mul(scale) -> Add(bias) -> Where(masks) -> Softmax ->
  MatMul`` (fp16/bf16 scores in fp32); padding and bottom-right causal masks
  are built in the graph from the runtime shapes; query rows that see no key are
  zeroed (``Where`` on the row max) exactly like the kernel; T5's relative bias
  keeps its ``[num_buckets, H]`` table and computes the buckets in the graph.
"""

from __future__ import annotations

import math

import torch

from trifuse import kernels  # noqa: F401  (registers the torch.ops.trifuse ops translated below)

#: The default ONNX opset (``Gelu`` and ``LayerNormalization`` need >= 20 and >= 17); 23 adds
#: ``RMSNormalization``.
DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 20, 23

_FLOAT, _FLOAT16, _BFLOAT16, _BOOL, _INT64 = 1, 10, 16, 9, 7


def _is_low(value) -> bool:
    dt = getattr(value, "dtype", None)
    return dt is not None and int(dt) in (_FLOAT16, _BFLOAT16)


def translation_table(opset: int = DEFAULT_OPSET) -> dict:
    """``{torch.ops.trifuse.<op>.default: onnxscript function}`` for ``custom_translation_table``."""
    from onnxscript import opset20 as op

    rms_op = None
    if opset >= 23:
        from onnxscript import opset23

        rms_op = opset23.RMSNormalization

    def _ones_like_last(x):
        return op.Expand(op.CastLike(op.Constant(value_float=1.0), x), op.Shape(x, start=-1))

    def _layer_norm(h, weight, bias, eps):
        w = _ones_like_last(h) if weight is None else op.CastLike(weight, h)
        b = None if bias is None else op.CastLike(bias, h)
        y = op.LayerNormalization(h, w, b, axis=-1, epsilon=eps)
        # Exporters of this era hand back all three outputs (Y, Mean, InvStdDev); older ones only Y.
        return y[0] if isinstance(y, (tuple, list)) else y

    def layer_norm(x, weight=None, bias=None, eps=1e-5):
        return _layer_norm(x, weight, bias, eps)

    def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
        h = op.Add(x, residual)
        return _layer_norm(h, weight, bias, eps), h

    def _rms_norm(h, weight, eps):
        if rms_op is not None:
            w = _ones_like_last(h) if weight is None else op.CastLike(weight, h)
            return rms_op(h, w, axis=-1, epsilon=eps)
        low = _is_low(h)
        hf = op.Cast(h, to=_FLOAT) if low else h
        var = op.ReduceMean(op.Pow(hf, op.Constant(value_float=2.0)), op.Constant(value_ints=[-1]), keepdims=1)
        y = op.Div(hf, op.Sqrt(op.Add(var, op.Constant(value_float=float(eps)))))
        if weight is not None:
            y = op.Mul(y, op.CastLike(weight, y))
        return op.CastLike(y, h) if low else y

    def rms_norm(x, weight=None, eps=1e-6):
        return _rms_norm(x, weight, eps)

    def add_rms_norm(x, residual, weight=None, eps=1e-6):
        h = op.Add(x, residual)
        return _rms_norm(h, weight, eps), h

    def gelu(x, bias=None, gate=None, approximate="none"):
        h = x if bias is None else op.Add(x, op.CastLike(bias, x))
        y = op.Gelu(h, approximate=approximate)
        return y if gate is None else op.Mul(y, gate)

    def attention(q, k, v, attention_mask=None, bias=None, rel_table=None, rel_bidirectional=True,
                  rel_num_buckets=32, rel_max_distance=128, rel_query_offset=0, causal=False, scale=1.0,
                  num_splits=0):
        low = _is_low(q)
        if low:
            qc, kc, vc = op.Cast(q, to=_FLOAT), op.Cast(k, to=_FLOAT), op.Cast(v, to=_FLOAT)
        else:
            qc, kc, vc = q, k, v
        s = op.MatMul(qc, op.Transpose(kc, perm=[0, 1, 3, 2]))  # [B, H, Lq, Lk]
        s = op.Mul(s, op.CastLike(op.Constant(value_float=float(scale)), s))
        if bias is not None:
            s = op.Add(s, op.CastLike(bias, s))
        lq = op.Shape(q, start=2, end=3)
        lk = op.Shape(k, start=2, end=3)
        if rel_table is not None or causal:
            zero = op.Constant(value_int=0)
            one = op.Constant(value_int=1)
            qpos = op.Range(zero, op.Squeeze(lq, op.Constant(value_ints=[0])), one)  # [Lq]
            kpos = op.Range(zero, op.Squeeze(lk, op.Constant(value_ints=[0])), one)  # [Lk]
            qcol = op.Unsqueeze(qpos, op.Constant(value_ints=[1]))  # [Lq, 1]
            krow = op.Unsqueeze(kpos, op.Constant(value_ints=[0]))  # [1, Lk]
        if rel_table is not None:
            if isinstance(rel_query_offset, int):
                offset = op.Constant(value_int=rel_query_offset)
            else:  # a symbolic size (e.g. Lk - Lq) computed in the graph; broadcasts either way
                offset = op.Cast(rel_query_offset, to=_INT64)
            rp = op.Sub(krow, op.Add(qcol, offset))  # [Lq, Lk] key - query
            buckets = _relative_bucket(op, rp, bool(rel_bidirectional), int(rel_num_buckets),
                                       int(rel_max_distance))
            table = op.CastLike(rel_table, s)  # [num_buckets, H]
            rel = op.Transpose(op.Gather(table, buckets, axis=0), perm=[2, 0, 1])  # [H, Lq, Lk]
            s = op.Add(s, op.Unsqueeze(rel, op.Constant(value_ints=[0])))
        keep = None
        if causal:
            keep = op.LessOrEqual(krow, op.Add(qcol, op.Sub(lk, lq)))  # [Lq, Lk] bottom-right aligned
        if attention_mask is not None:
            m = op.Unsqueeze(op.Cast(attention_mask, to=_BOOL), op.Constant(value_ints=[1, 2]))  # [B, 1, 1, Lk]
            keep = m if keep is None else op.And(m, keep)
        if keep is not None:
            s = op.Where(keep, s, op.CastLike(op.Constant(value_float=-math.inf), s))
        p = op.Softmax(s, axis=-1)
        out = op.MatMul(p, vc)
        if keep is not None or bias is not None:
            # A row that sees no key: the kernel returns zeros (Softmax alone gives NaN).
            row_max = op.ReduceMax(s, op.Constant(value_ints=[-1]), keepdims=1)
            seen = op.Not(op.IsInf(row_max, detect_positive=0, detect_negative=1))
            out = op.Where(seen, out, op.CastLike(op.Constant(value_float=0.0), out))
        return op.CastLike(out, q) if low else out

    t = torch.ops.trifuse
    return {
        t.layer_norm.default: layer_norm, t.add_layer_norm.default: add_layer_norm,
        t.rms_norm.default: rms_norm, t.add_rms_norm.default: add_rms_norm,
        t.gelu.default: gelu, t.attention.default: attention,
    }


def _relative_bucket(op, rp, bidirectional: bool, num_buckets: int, max_distance: int):
    """``kernels.relative_position_bucket`` in ONNX: int64 ``rp`` (key - query) -> int64 buckets."""
    zero = op.Constant(value_int=0)
    if bidirectional:
        num_buckets //= 2
        buckets = op.Mul(op.Cast(op.Greater(rp, zero), to=_INT64), op.Constant(value_int=num_buckets))
        distance = op.Abs(rp)
    else:
        buckets = None
        distance = op.Neg(op.Min(rp, zero))
    max_exact = num_buckets // 2
    is_small = op.Less(distance, op.Constant(value_int=max_exact))
    # HF's float32 expression; distances below max_exact are replaced by the Where, so clamp them
    # up first to keep log(0) = -inf out of the integer cast.
    d = op.Cast(op.Max(distance, op.Constant(value_int=max_exact)), to=_FLOAT)
    large = op.Mul(op.Div(op.Log(op.Div(d, op.Constant(value_float=float(max_exact)))),
                          op.Constant(value_float=math.log(max_distance / max_exact))),
                   op.Constant(value_float=float(num_buckets - max_exact)))
    if_large = op.Add(op.Constant(value_int=max_exact), op.Cast(large, to=_INT64))  # Cast truncates toward 0
    if_large = op.Min(if_large, op.Constant(value_int=num_buckets - 1))
    b = op.Where(is_small, distance, if_large)
    return b if buckets is None else op.Add(buckets, b)
