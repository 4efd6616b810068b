"""Comparison rules shared by the kernel tests.

fp32 results are compared to a float64 reference within fp32's budget (``TOL``). Low
precision follows flash-attention's rule: our error against the float64
reference is at most twice PyTorch's own error in that dtype (plus a floor of a
few ulps, so an exact PyTorch result does not demand an exact kernel).

Two code paths for one problem (TMA and pointer loads, one key split and several,
the kernel and the reference, a cached step and a full forward) are each compared
to the float64 reference within the dtype's budget (``test_attention._check_paths``),
never to each other more tightly: paths round differently (block order, which
numpy/BLAS kernel the CPU picks under Triton's interpreter, AVX-512 or not), so
agreement to a few ulps holds on one machine and fails on the next. Where no
float64 reference exists (whole models, ONNX Runtime), paths are compared to each
other with at least ``TOL``.
"""

from __future__ import annotations

import torch

# (atol, rtol) of a result in this dtype against a float64 reference.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# A few units in the last place, the slack granted on top of "2x PyTorch's error".
ULP_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_matches_reference(ours: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype,
                             torch_lowp: torch.Tensor | None = None, scale: float = 1.0) -> None:
    """``ours`` (in ``dtype``) against the float64 reference ``ref64``.

    ``torch_lowp`` is PyTorch's own result computed in ``dtype``; when given, the
    2x rule applies on top of the absolute tolerance table. ``scale`` widens the
    table for ops whose outputs are large (e.g. a norm followed by a big weight).
    """
    assert ours.dtype == dtype, f"output dtype {ours.dtype}, expected {dtype}"
    assert ours.shape == ref64.shape, f"output shape {tuple(ours.shape)}, expected {tuple(ref64.shape)}"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(ours.double(), ref64, atol=atol * scale, rtol=rtol)
    if torch_lowp is not None and dtype != torch.float32:
        ours_err = max_err(ours, ref64)
        torch_err = max_err(torch_lowp, ref64)
        bound = 2 * torch_err + ULP_FLOOR[dtype] * scale
        assert ours_err <= bound, (
            f"{dtype} error {ours_err:.3g} exceeds 2x PyTorch's own error {torch_err:.3g} (+floor)"
        )


# ----------------------------------------------------------------------------
# Whole models against Hugging Face.


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|ours - ref| / max|ref|``: element-wise relative error means nothing next to zeros."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# Tensor outputs compared by default (Hugging Face's names); hidden states on request.
OUTPUT_FIELDS = ("last_hidden_state", "pooler_output", "logits", "start_logits", "end_logits",
                 "cls_logits", "distillation_logits")


def assert_same_outputs(ours, ref, tol: float = 1e-5, hidden: bool = False, fields=OUTPUT_FIELDS) -> None:
    """Every field of ``fields`` that ``ours`` has matches ``ref`` (and the hidden states, if asked)."""
    names = [f for f in fields if f in ours.keys()]
    assert names, "no output fields"
    for name in names:
        assert ours[name].shape == ref[name].shape, name
        assert rel_err(ours[name], ref[name]) < tol, f"{name}: relative error {rel_err(ours[name], ref[name]):.2e}"
    if hidden:
        assert len(ours.hidden_states) == len(ref.hidden_states)
        for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
            assert rel_err(a, b) < tol, f"hidden state {i}: {rel_err(a, b):.2e}"


def bench_row_passed(row: dict) -> bool:
    """A benchmark row whose output matched: checked (not timed), timed, or timed but flagged
    noisy. Whether a timing is clean depends on the machine's load, so no test asserts it."""
    status = row["status"]
    return status in ("ok", "checked") or status.startswith("noisy")


def hf_at_least(version: str) -> bool:
    """Whether the installed transformers is ``version`` or newer (False without transformers)."""
    import re

    try:
        import transformers
    except ImportError:
        return False

    def parts(v: str) -> tuple:
        return tuple(int(x) for x in re.findall(r"\d+", v)[:3])
    return parts(transformers.__version__) >= parts(version)


#: The transformers whose beam sampling (``do_sample`` with ``num_beams > 1``) trifuse matches draw for
#: draw: the pinned 5.24. The GPU image's 5.17 draws differently in the last tokens (rehearsed on a
#: torch 2.11 / transformers 5.17 venv), so the comparison runs only from 5.24 on.
HF_BEAM_SAMPLE = hf_at_least("5.24")
