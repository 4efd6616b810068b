"""ONNX export: every family exports, passes the checker, and matches PyTorch in ONNX Runtime (CPU)."""

import argparse
import json

import numpy as np
import onnx
import pytest
import torch
import transformers as T

import trifuse
from tests import tiny_models as tiny
from tests.test_bert import hf_model as bert_hf
from tests.test_gpt2 import hf_model as gpt2_hf
from tests.test_vit import hf_model as vit_hf
from trifuse import engine, export, kernels
from trifuse.export.cli import add_export_arguments, add_verify_arguments

CPU = ["CPUExecutionProvider"]
# The exporter's own chatter (axis renaming, pytree deprecations) is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True)
def _reference():
    """PyTorch's side runs the reference ops (the Triton interpreter is slow and tested elsewhere)."""
    with kernels.use_backend("reference"):
        yield


def _graph(path):
    return onnx.load(str(path)).graph


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _check_file(path, family, inputs, outputs):
    onnx.checker.check_model(str(path), full_check=True)
    meta = export.read_metadata(path)
    assert set(export.onnx.METADATA_KEYS) <= set(meta)
    assert meta["trifuse.family"] == family
    assert meta["trifuse.dtype"] == "fp32" and meta["trifuse.opset"] == "20"
    assert meta["trifuse.version"] == trifuse.__version__
    g = _graph(path)
    assert [i.name for i in g.input] == inputs
    assert [o.name for o in g.output] == outputs
    ops = {n.op_type for n in g.node}
    assert {"LayerNormalization", "Softmax", "MatMul"} <= ops
    assert all(n.domain in ("", "ai.onnx") for n in g.node), "no custom-domain nodes: ORT's stock kernels run it"
    return meta, g


def _assert_passes(report, budget=1e-4):
    assert report.ok, str(report)
    for r in report.rows + report.layers:
        assert r.max_rel <= budget and r.mismatches == 0, str(report)


# ----------------------------------------------------------------------------
# The op translations on their own: every branch of the attention mask logic, T5's buckets.


class _Ops(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(32))
        self.enc_table = torch.nn.Parameter(torch.randn(16, 2))
        self.dec_table = torch.nn.Parameter(torch.randn(8, 2))

    def forward(self, x, r, q, k, v, mask, bias):
        rel_enc = kernels.RelativeBias(self.enc_table, True, 16, 20, query_offset=0)
        rel_dec = kernels.RelativeBias(self.dec_table, False, 8, 12)  # offset Lk - Lq: symbolic in the graph
        y2, h = kernels.rms_norm(x, None, 1e-5, residual=r)
        return (kernels.rms_norm(x, self.w, 1e-6), y2, h, kernels.layer_norm(x, None, None, 1e-5),
                kernels.layer_norm(x, self.w, self.w, 1e-5, residual=r)[0],
                kernels.gelu(x, self.w, approximate="tanh", gate=r), kernels.gelu(x),
                kernels.attention(q, k, v, attention_mask=mask, bias=bias, relative_bias=rel_enc, scale=1.0),
                kernels.attention(q, k, v, causal=True, attention_mask=mask, relative_bias=rel_dec),
                kernels.attention(q, k, v))


def _op_inputs(b, n, lq, lk, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, lk, dtype=torch.long)
    mask[0, :3] = 0
    mask[-1] = 0  # a row that sees no key: zeros, as the kernel
    return (torch.randn(b, n, 32, generator=g), torch.randn(b, n, 32, generator=g),
            torch.randn(b, 2, lq, 16, generator=g), torch.randn(b, 2, lk, 16, generator=g),
            torch.randn(b, 2, lk, 16, generator=g), mask, torch.randn(1, 2, lq, lk, generator=g))


@pytest.mark.parametrize("opset", [20, 23])
def test_translations_match_the_reference(tmp_path, opset):
    import onnxruntime as ort

    torch.manual_seed(0)
    m = _Ops()
    d = {n: torch.export.Dim(n) for n in ("b", "n", "lq", "lk")}
    dyn = ({0: d["b"], 1: d["n"]}, {0: d["b"], 1: d["n"]}, {0: d["b"], 2: d["lq"]}, {0: d["b"], 2: d["lk"]},
           {0: d["b"], 2: d["lk"]}, {0: d["b"], 1: d["lk"]}, {2: d["lq"], 3: d["lk"]})
    prog = torch.onnx.export(m, _op_inputs(2, 5, 4, 6, 0), dynamo=True, opset_version=opset, verbose=False,
                             custom_translation_table=export.translation_table(opset), dynamic_shapes=dyn)
    path = tmp_path / "ops.onnx"
    prog.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    ops = {n.op_type for n in _graph(path).node}
    assert {"Gelu", "LayerNormalization", "Softmax"} <= ops
    assert ("RMSNormalization" in ops) == (opset >= 23)
    sess = ort.InferenceSession(str(path), providers=CPU)
    # Keys far beyond max_distance (saturated buckets), more queries than keys (causal rows with no key).
    for shape in [(3, 7, 9, 300), (1, 2, 300, 5), (2, 3, 40, 40)]:
        xs = _op_inputs(*shape, seed=1)
        got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), xs)})
        for a, b in zip(got, m(*xs)):
            assert not np.isnan(a).any()
            torch.testing.assert_close(torch.from_numpy(a), b, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------
# Encoders: the BERT family.

ENCODERS = [  # family, head, graph outputs
    ("bert", "Model", ["last_hidden_state", "pooler_output"]),
    ("roberta", "ForSequenceClassification", ["logits"]),
    ("albert", "ForQuestionAnswering", ["start_logits", "end_logits"]),
    ("electra", "ForMaskedLM", ["logits"]),
]


@pytest.mark.parametrize("family,head,outputs", ENCODERS, ids=[e[0] for e in ENCODERS])
def test_encoder_exports_and_verifies(tmp_path, family, head, outputs):
    model = engine.from_pretrained(bert_hf(family, head))
    path = export.to_onnx(model, tmp_path / "m.onnx")
    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    meta, g = _check_file(path, family, inputs, outputs)
    assert "Gelu" in {n.op_type for n in g.node}
    want = ["batch"] if head == "ForSequenceClassification" else ["batch", "sequence"]
    assert _dims(g.input[0]) == ["batch", "sequence"] and _dims(g.output[0])[:len(want)] == want
    report = export.verify(path, model)
    _assert_passes(report)
    example = json.loads(meta["trifuse.example_shapes"])["input_ids"]
    shape = report.inputs["forward"]["input_ids"]
    assert shape[0] != example[0] and shape[1] != example[1], "verified at other shapes than the export's"
    assert {r.output for r in report.rows} == set(outputs)

    # Given inputs: batch 1, a fully padded row (zeros from the kernel and from the graph alike).
    ids = torch.randint(5, 99, (2, 3))
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    _assert_passes(export.verify(path, model, inputs={"input_ids": ids, "attention_mask": mask}))
    _assert_passes(export.verify(path, model, inputs={"input_ids": ids[:1], "attention_mask": mask[:1]}))


def test_cli_exports_and_verifies_distilbert(tmp_path, capsys):
    hf = bert_hf("distilbert", "ForTokenClassification")
    hf.save_pretrained(tmp_path / "ckpt")
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    add_export_arguments(sub.add_parser("export"))
    add_verify_arguments(sub.add_parser("verify"))
    out = tmp_path / "d.onnx"
    args = p.parse_args(["export", str(tmp_path / "ckpt"), str(out), "--layer-outputs"])
    assert args.func(args) == 0
    _check_file(out, "distilbert", ["input_ids", "attention_mask"], ["logits"] + [f"hidden_states.{i}" for i in range(3)])
    args = p.parse_args(["verify", str(out), str(tmp_path / "ckpt"), "--layerwise", "--batch", "2", "--seq", "9"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "hidden_states.2" in text and "every block output within budget" in text
    args = p.parse_args(["verify", str(tmp_path / "missing.onnx"), str(tmp_path / "ckpt")])
    assert args.func(args) == 2
    assert "no such ONNX file" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# ViT / DeiT: dynamic batch and image size.


def test_vision_exports_any_image_size(tmp_path):
    model = engine.from_pretrained(vit_hf("deit-32-p8", "ForImageClassificationWithTeacher"))
    path = export.to_onnx(model, tmp_path / "deit.onnx")
    _, g = _check_file(path, "deit", ["pixel_values"], ["logits", "cls_logits", "distillation_logits"])
    assert _dims(g.input[0]) == ["batch", 3, "height", "width"]
    _assert_passes(export.verify(path, model))  # the checkpoint's 32x32, batch 3
    px = torch.randn(1, 3, 16, 48)  # another size: positions interpolated in the graph as in PyTorch
    _assert_passes(export.verify(path, model, inputs={"pixel_values": px}))


# ----------------------------------------------------------------------------
# GPT-2: past key/values, generation, layer by layer.


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    with kernels.use_backend("reference"):
        model = engine.from_pretrained(gpt2_hf())
        path = export.to_onnx(model, tmp_path_factory.mktemp("gpt2") / "gpt2.onnx", layer_outputs=True)
    return model, path


def test_gpt2_graph_layout(gpt2):
    model, path = gpt2
    L = model.config.n_layer
    kv = [f"{i}.{t}" for i in range(L) for t in ("key", "value")]
    hidden = [f"hidden_states.{i}" for i in range(L + 1)]
    _, g = _check_file(path, "gpt2", ["input_ids", "attention_mask"] + [f"past_key_values.{n}" for n in kv],
                       ["logits"] + [f"present.{n}" for n in kv] + hidden)
    dims = {v.name: _dims(v) for v in list(g.input) + list(g.output)}
    assert dims["attention_mask"] == ["batch", "past_sequence + sequence"]
    assert dims["past_key_values.0.key"] == ["batch", 4, "past_sequence", 16]
    assert dims["present.1.value"] == ["batch", 4, "past_sequence + sequence", 16]
    assert dims["logits"] == ["batch", "sequence", 97]


def test_gpt2_prefill_then_step_with_past(gpt2):
    model, path = gpt2
    report = export.verify(path, model, layerwise=True)
    _assert_passes(report)
    assert {r.stage for r in report.rows} == {"prefill", "step"}
    assert report.inputs["prefill"]["past_key_values.0.key"][2] == 0  # the first call has an empty past
    assert report.inputs["step"]["past_key_values.0.key"][2] == report.inputs["prefill"]["input_ids"][1]
    assert report.first_bad_layer is None

    # One token on a past of PyTorch's own, left padding inside the past.
    runner = export.OrtRunner(path, CPU)
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = model(ids, attention_mask=mask, use_cache=True)
    cache = out.past_key_values
    past = {f"past_key_values.{i}.{t}": getattr(cache, t + "s")[i, :, :, :4] for i in range(2) for t in ("key", "value")}
    step = torch.tensor([[11], [12]])
    full = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    got = runner(input_ids=step, attention_mask=full, **past)
    ref = model(step, attention_mask=full, past_key_values=cache)
    torch.testing.assert_close(got["logits"], ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["present.1.value"], cache.values[1, :, :, :5], atol=2e-5, rtol=2e-5)


def test_gpt2_greedy_tokens_equal(gpt2):
    model, path = gpt2
    ids = torch.randint(1, 96, (3, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    want = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    got = export.ort_generate_greedy(path, ids, mask, max_new_tokens=12, eos_token_id=[], providers=CPU)
    assert torch.equal(got, want)
    # Stopping at EOS and padding finished rows follows model.generate too.
    eos = int(want[0, 7])
    assert torch.equal(export.ort_generate_greedy(path, ids, mask, max_new_tokens=12, eos_token_id=eos, providers=CPU),
                       model.generate(ids, mask, max_new_tokens=12, eos_token_id=eos))


def test_layerwise_names_the_first_diverging_block(gpt2):
    model, path = gpt2
    broken = engine.from_pretrained(gpt2_hf())
    with torch.no_grad():
        broken.layers[1].ffn.up.weight.mul_(1.5)  # the second block diverges, the first does not
    report = export.verify(path, broken, layerwise=True)
    assert not report.ok
    stage, index, rel = report.first_bad_layer
    assert (stage, index) == ("prefill", 2) and rel > 1e-4  # hidden_states.2 is layer 2's output
    assert all(r.ok for r in report.layers if r.stage == "prefill" and r.output in ("hidden_states.0",
                                                                                     "hidden_states.1"))


def test_ort_runner_takes_torch_inputs(gpt2):
    model, path = gpt2
    runner = export.OrtRunner(path, CPU)
    ids = torch.tensor([[3, 4, 5]], dtype=torch.int32)  # cast to the graph's int64
    empty = torch.zeros(1, 4, 0, 16)
    out = runner(ids, torch.ones(1, 3, dtype=torch.bool), empty, empty, empty, empty)
    assert set(out) == set(runner.output_names) and isinstance(out["logits"], torch.Tensor)
    torch.testing.assert_close(out["logits"], model(ids.long()).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="missing"):
        runner(input_ids=ids)


def test_graph_specs_declare_every_input_and_output(reference_backend):
    """Every family's kind has its graph specs (``export.graphs.SPECS``, one class per kind as optimum's
    OnnxConfig); each graph they make has one example and one dynamic-shape entry per input and an
    axis label for every input and output, layer outputs included."""
    from trifuse.engine.registry import families
    from trifuse.export.graphs import SPECS, graphs_for, model_kind

    assert {f.kind for f in families()} <= set(SPECS)
    models = (tiny.bert(), tiny.gpt2(), tiny.t5(0), vit_hf("deit-32-p8", "ForImageClassificationWithTeacher"))
    seen = set()
    for hf in models:
        model = engine.from_pretrained(hf)
        graphs = graphs_for(model, layer_outputs=True)
        kind = model_kind(model)[1]
        assert [g.name for g in graphs] == [spec.name for spec in SPECS[kind]], model.model_type
        for graph in graphs:
            flat = [t for a in graph.example for t in (a if isinstance(a, list) else [a])]
            dyn = [d for a in graph.dynamic for d in (a if isinstance(a, list) else [a])]
            assert len(flat) == len(dyn) == len(graph.inputs), (model.model_type, graph.name)
            assert set(graph.inputs) | set(graph.outputs) <= set(graph.dims), (model.model_type, graph.name)
            assert any(name.startswith("hidden_states.") for name in graph.outputs)
        seen.add(kind)
    assert seen == set(SPECS)


# ----------------------------------------------------------------------------
# Bad input.


def test_errors(tmp_path, gpt2):
    model, path = gpt2
    with pytest.raises(export.ExportError, match="trifuse model"):
        export.to_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(export.ExportError, match="opset"):
        export.to_onnx(model, tmp_path / "x.onnx", opset=17)
    with pytest.raises(export.ExportError, match=".onnx"):
        export.to_onnx(model, tmp_path / "x.bin")
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        export.verify(tmp_path / "missing.onnx", model)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf \xff\xff")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        export.verify(tmp_path / "junk.onnx", model)
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), str(plain))
    with pytest.raises(ValueError, match="not exported by trifuse"):
        export.verify(plain, model)
    bert = engine.from_pretrained(bert_hf("bert", "Model"))
    with pytest.raises(ValueError, match="holds a gpt2 model, the model is bert"):
        export.verify(path, bert)
    other = engine.from_pretrained(gpt2_hf(n_layer=3))
    with pytest.raises(ValueError, match="n_layer"):
        export.verify(path, other)
    with pytest.raises(ValueError, match="not inputs of"):
        export.verify(path, model, inputs={"input_ids": torch.ones(1, 2, dtype=torch.long),
                                           "attention_mask": torch.ones(1, 2), "pixel_values": torch.ones(1)})
    static = export.to_onnx(bert, tmp_path / "b.onnx", dynamic=False)
    assert _dims(_graph(static).input[0]) == [2, 7]
    _assert_passes(export.verify(static, bert))  # at the example's shapes, the only ones it takes
    with pytest.raises(ValueError, match="no block outputs"):
        export.verify(static, bert, layerwise=True)


# ----------------------------------------------------------------------------
# T5: encoder + decoder with past, the relative bias computed in the graph.


def _t5_hf(**overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=99, d_model=32, d_kv=16, d_ff=40, num_layers=2, num_decoder_layers=2, num_heads=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=7,  # sequences pass max_distance
               feed_forward_proj="gated-gelu", decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    hf = T.T5ForConditionalGeneration(T.T5Config(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    pytest.importorskip("trifuse.engine.models.t5")
    with kernels.use_backend("reference"):
        model = engine.from_pretrained(_t5_hf())
        base = tmp_path_factory.mktemp("t5") / "t5.onnx"
        paths = export.to_onnx(model, base)
    return model, base, paths


def test_t5_exports_encoder_and_decoder(t5):
    model, base, (enc, dec) = t5
    assert enc.name == "t5.encoder.onnx" and dec.name == "t5.decoder.onnx"
    c = model.config
    kv = [f"{i}.{t}" for i in range(c.num_decoder_layers) for t in ("key", "value")]
    onnx.checker.check_model(str(enc), full_check=True)
    onnx.checker.check_model(str(dec), full_check=True)
    ge, gd = _graph(enc), _graph(dec)
    assert [i.name for i in ge.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in ge.output] == ["last_hidden_state", "cross_key_values"]
    assert [i.name for i in gd.input] == ["decoder_input_ids", "decoder_attention_mask", "encoder_attention_mask",
                                          "cross_key_values"] + [f"past_key_values.{n}" for n in kv]
    assert [o.name for o in gd.output] == ["logits"] + [f"present.{n}" for n in kv]
    assert export.read_metadata(dec)["trifuse.graph"] == "decoder"
    for g in (ge, gd):
        ops = {n.op_type for n in g.node}
        assert {"Gelu", "Log", "Softmax"} <= ops  # gated GELU; the buckets computed in the graph
        assert "LayerNormalization" not in ops and "ReduceMean" in ops  # RMSNorm decomposed for opset 20
        # The bias stays its [num_buckets, H] table: no constant of rank 3 ([H, L, L] or the like).
        consts = [list(t.dims) for t in g.initializer]
        consts += [list(a.t.dims) for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        assert [c.num_buckets, c.num_heads] in consts
        assert all(len(d) <= 2 for d in consts), [d for d in consts if len(d) > 2]


def test_t5_verifies_encoder_prefill_and_step(t5):
    model, base, paths = t5
    report = export.verify(base, model)
    _assert_passes(report)
    assert [r.stage for r in report.rows][:2] == ["encoder", "encoder"]
    assert {r.stage for r in report.rows} == {"encoder", "prefill", "step"}
    assert report.inputs["encoder"]["input_ids"][1] > model.config.max_distance  # saturated buckets too
    # Either file, or the pair, names the same export.
    _assert_passes(export.verify(paths, model, inputs={"input_ids": torch.tensor([[5, 6, 7, 1]])}))


def test_t5_greedy_tokens_equal(t5):
    model, base, paths = t5
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 99, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    want = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    got = export.ort_generate_greedy(paths[1], ids, mask, max_new_tokens=12, eos_token_id=[], providers=CPU)
    assert torch.equal(got, want)
    assert len(set(want[:, 1:].flatten().tolist())) > 3, "a degenerate model would make this test weak"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_failed_t5_export_leaves_nothing_behind(tmp_path, monkeypatch, reference_backend):
    """The encoder exports, the decoder fails: neither file is left, and earlier files stay as they were."""
    model = engine.from_pretrained(tiny.t5(0))
    (tmp_path / "t5.decoder.onnx").write_bytes(b"an earlier export")
    real, calls = torch.onnx.export, []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("exporter failed on the decoder")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", failing_second)
    with pytest.raises(RuntimeError, match="failed on the decoder"):
        export.to_onnx(model, tmp_path / "t5.onnx")
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5.decoder.onnx"]
    assert (tmp_path / "t5.decoder.onnx").read_bytes() == b"an earlier export"
