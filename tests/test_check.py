"""`trifuse check`: parity report against Hugging Face, and its verdict."""

import torch

from tests.test_bert import hf_model
from trifuse import engine
from trifuse.cli import main as trifuse_main
from trifuse.engine import check as check_mod


def _saved(tmp_path, family="bert", head="ForSequenceClassification"):
    hf_model(family, head).save_pretrained(tmp_path)
    return tmp_path


def test_check_passes_fp32_and_bf16(tmp_path):
    report = check_mod.check(_saved(tmp_path), dtype="bf16", device="cpu", seq=12)
    assert report.ok
    dtypes = {(r.dtype, r.output) for r in report.rows}
    assert dtypes == {("fp32", "logits"), ("bf16", "logits")}
    fp32 = next(r for r in report.rows if r.dtype == "fp32")
    assert fp32.rel < 1e-5
    bf16 = next(r for r in report.rows if r.dtype == "bf16")
    assert bf16.hf_rel is not None and bf16.budget > bf16.hf_rel
    assert report.first_bad_layer == {"fp32": None, "bf16": None}


def test_check_names_first_diverging_layer(tmp_path, monkeypatch, capsys):
    source = _saved(tmp_path, family="roberta", head="Model")
    real = engine.from_pretrained

    def broken(*args, **kwargs):  # trifuse with layer 2's FFN output bias knocked off
        model = real(*args, **kwargs)
        with torch.no_grad():  # not a constant shift: the LayerNorm after it would cancel that
            model.layers[1].ffn.down.bias.add_(torch.randn_like(model.layers[1].ffn.down.bias))
        return model

    monkeypatch.setattr(check_mod, "from_pretrained", broken)
    report = check_mod.check(source, dtype="fp32", device="cpu", seq=10)
    assert not report.ok
    assert report.first_bad_layer["fp32"][0] == 2  # hidden_states[2]: the output of layer 2
    rc = trifuse_main(["check", str(source), "--dtype", "fp32", "--device", "cpu", "--seq", "10"])
    out = capsys.readouterr().out
    assert rc == 1 and "first hidden state over budget: layer 2" in out and "FAIL" in out


def test_check_cli_passes(tmp_path, capsys):
    rc = trifuse_main(["check", str(_saved(tmp_path, "albert", "ForMaskedLM")), "--dtype", "bf16",
                       "--device", "cpu", "--seq", "9"])
    assert rc == 0 and "PASS" in capsys.readouterr().out


def test_check_gpt2_t5_vit(tmp_path, capsys):
    from tests.test_gpt2 import hf_model as gpt2_model
    from tests.test_t5 import hf_model as t5_model
    from tests.test_vit import CONFIGS as VIT_CONFIGS
    from tests.test_vit import hf_model as vit_model

    makers = {"gpt2": lambda: gpt2_model(), "t5": lambda: t5_model("gated-gelu"),
              "vit": lambda: vit_model(next(iter(VIT_CONFIGS)), "ForImageClassification")}
    for name, make in makers.items():
        make().save_pretrained(tmp_path / name)
        report = check_mod.check(tmp_path / name, dtype="bf16", device="cpu", seq=12)
        assert report.ok, (name, report)
        assert {r.dtype for r in report.rows} == {"fp32", "bf16"}
        assert all(r.rel < 1e-5 for r in report.rows if r.dtype == "fp32"), (name, report.rows)
    assert trifuse_main(["check", str(tmp_path / "t5"), "--dtype", "fp32", "--device", "cpu", "--seq", "8"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_check_compares_packed_batches_at_real_tokens(tmp_path, monkeypatch):
    """At the default size (batch 3, seq 32) the padded batch runs packed (engine.packing): per-token
    outputs hold zeros at padded positions, so check compares the real tokens."""
    from tests.test_gpt2 import hf_model as gpt2_model
    from trifuse import kernels

    packed = []
    varlen = kernels.attention_varlen
    monkeypatch.setattr(kernels, "attention_varlen", lambda *a, **k: packed.append(1) or varlen(*a, **k))
    gpt2_model().save_pretrained(tmp_path / "gpt2")
    _saved(tmp_path / "bert", head="ForTokenClassification")
    for name in ("gpt2", "bert"):
        packed.clear()
        report = check_mod.check(tmp_path / name, dtype="fp32", device="cpu")
        assert packed, f"{name}: the check's batch did not run packed"
        assert report.ok and report.first_bad_layer == {"fp32": None}, (name, report)
        assert all(r.rel < 1e-5 for r in report.rows), (name, report.rows)
