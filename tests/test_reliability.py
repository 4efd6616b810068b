"""Production usage patterns and hostile inputs (issue 15): nothing silently wrong, nothing unbounded.

Each class of the issue has its section: the T5 bias lookup under every way weights change (on the
Triton path, where a stale cache used to hide), backends scoped per thread, Hugging Face's config
defaults, checkpoint safety, clear errors up front, the CLI, and generation's bounded resources.
"""

import json
import threading
import warnings

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file
from torch import nn

from tests.helpers import rel_err
from trifuse import engine, kernels


def _needs_triton(device):
    if not kernels._dispatch.triton_runnable(torch.device(device)):
        pytest.skip("Triton cannot run here")


# ----------------------------------------------------------------------------
# The T5 relative-bias lookup follows the weights, however they change.


class _BiasHolder(nn.Module):
    """What T5's stacks hold: a ``[num_buckets, H]`` table used through kernels.RelativeBias."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, q, k, v):
        rb = kernels.RelativeBias(self.table, bidirectional=True, num_buckets=8, max_distance=20)
        return kernels.attention(q, k, v, relative_bias=rb, scale=1.0)


def _assert_follows_table(holder: _BiasHolder, device, seed=0):
    """The Triton path's output equals the float64 reference computed from the table as it is now."""
    g = torch.Generator().manual_seed(seed)
    dtype = holder.table.dtype
    q, k, v = (torch.randn(2, 2, 30, 16, generator=g).to(device, dtype) for _ in range(3))
    got = holder(q, k, v)
    rb = kernels.RelativeBias(holder.table.double(), bidirectional=True, num_buckets=8, max_distance=20)
    want = kernels.attention_reference(q.double(), k.double(), v.double(), relative_bias=rb, scale=1.0)
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def _other_table(device):
    return (3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(7))).to(device)


WEIGHT_CHANGES = {
    ".data =": lambda h, d: setattr(h.table, "data", _other_table(d)),
    ".data in place": lambda h, d: h.table.data.copy_(_other_table(d)),  # bypasses the version counter
    "load_state_dict": lambda h, d: h.load_state_dict({"table": _other_table(d)}),
    "load_state_dict(assign=True)": lambda h, d: h.load_state_dict({"table": _other_table(d)}, assign=True),
    ".to(dtype) and back": lambda h, d: h.to(torch.float16).to(torch.float32),  # rounds every entry
    ".half()": lambda h, d: h.half(),
    ".to(device)": lambda h, d: h.to(d),
}


@pytest.mark.parametrize("change", list(WEIGHT_CHANGES))
def test_relative_bias_follows_every_weight_change(change, device):
    _needs_triton(device)
    holder = _BiasHolder(3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(1))).to(device)
    _assert_follows_table(holder, device)  # the first call: anything cached is now from these weights
    WEIGHT_CHANGES[change](holder, device)
    _assert_follows_table(holder, device, seed=1)
    _assert_follows_table(holder, device, seed=1)


@pytest.mark.gpu
def test_relative_bias_follows_a_move_between_devices():
    holder = _BiasHolder(3 * torch.randn(8, 2)).cuda()
    _assert_follows_table(holder, "cuda")
    holder.cpu()
    with torch.no_grad():
        holder.table.mul_(-1)
    holder.cuda()
    _assert_follows_table(holder, "cuda")


def _t5(seed, **overrides):
    torch.manual_seed(seed)
    config = T.T5Config(vocab_size=99, d_model=32, d_kv=16, num_heads=2, d_ff=37, num_layers=2,
                        relative_attention_num_buckets=8, relative_attention_max_distance=20,
                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **overrides)
    model = T.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def _t5_inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 99, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    return ids.masked_fill(mask == 0, 0), mask, torch.randint(2, 99, (2, 4), generator=g)


def test_t5_hot_swap_by_data_on_triton_path(device):
    """Hot-swapping every weight by ``.data =`` (what nn.Module._apply does) switches the whole model."""
    _needs_triton(device)
    hf_a, hf_b = _t5(0), _t5(1)
    ours = engine.from_pretrained(hf_a, device=device)
    other = engine.from_pretrained(hf_b, device=device)
    ids, mask, dec = (t.to(device) for t in _t5_inputs())
    with torch.no_grad():
        before = ours(ids, mask, decoder_input_ids=dec).logits
        for p, q in zip(ours.parameters(), other.parameters()):
            p.data = q.data.clone()
        after = ours(ids, mask, decoder_input_ids=dec).logits
        want = hf_b(input_ids=ids.cpu(), attention_mask=mask.cpu(), decoder_input_ids=dec.cpu()).logits
    assert rel_err(before.cpu(), want) > 1e-2  # the two models differ ...
    assert rel_err(after.cpu(), want) < 2e-5  # ... and the swapped one is all B, bias included


def test_t5_loaded_and_run_in_inference_mode_on_triton_path(device, tmp_path):
    """The usual serving pattern: load (from disk: the weights are inference tensors, with no
    version counter) and run inside torch.inference_mode()."""
    _needs_triton(device)
    hf = _t5(0)
    hf.save_pretrained(tmp_path)
    ids, mask, dec = _t5_inputs()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        want_tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    with torch.inference_mode():
        ours = engine.from_pretrained(tmp_path, device=device)
        assert ours.encoder.relative_bias.is_inference()
        got = ours(ids.to(device), mask.to(device), decoder_input_ids=dec.to(device)).logits
        tokens = ours.generate(ids.to(device), mask.to(device), max_new_tokens=3)
        ours.load_state_dict(engine.from_pretrained(_t5(1), device=device).state_dict())  # in place, no versions
        swapped = ours(ids.to(device), mask.to(device), decoder_input_ids=dec.to(device)).logits
    assert rel_err(got.cpu(), want) < 2e-5
    assert torch.equal(tokens.cpu(), want_tokens)
    with torch.no_grad():
        want_b = _t5(1)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert rel_err(swapped.cpu(), want_b) < 2e-5


# ----------------------------------------------------------------------------
# Backends are scoped to the calling thread.


def test_use_backend_is_scoped_to_the_thread():
    """Two threads inside use_backend blocks at the same time each see their own backend; blocks that
    end in the other order than they began leave the process-wide backend as it was."""
    both_inside, first_done = threading.Barrier(2), threading.Event()
    seen = {}

    def run(name, backend):
        with kernels.use_backend(backend):
            both_inside.wait(timeout=60)
            seen[name] = kernels.get_backend()
            if name == "b":
                first_done.set()  # b leaves first although it entered second
            else:
                first_done.wait(timeout=60)
        seen[name + "-after"] = kernels.get_backend()

    threads = [threading.Thread(target=run, args=("a", "reference")),
               threading.Thread(target=run, args=("b", "triton"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert seen == {"a": "reference", "b": "triton", "a-after": "auto", "b-after": "auto"}
    assert kernels.get_backend() == "auto"
    with kernels.use_backend("reference"):  # a thread started inside a block gets the process-wide backend
        inner = []
        t = threading.Thread(target=lambda: inner.append(kernels.get_backend()))
        t.start()
        t.join(timeout=60)
        assert inner == ["auto"] and kernels.get_backend() == "reference"


def test_set_backend_stays_process_wide():
    try:
        done = []
        t = threading.Thread(target=lambda: (kernels.set_backend("reference"), done.append(1)))
        t.start()
        t.join(timeout=60)
        assert done and kernels.get_backend() == "reference"
    finally:
        kernels.set_backend("auto")


def test_threads_sharing_one_model_match_sequential_calls():
    """Eight threads, one GPT-2, each generating for its own prompt on the reference path."""
    torch.manual_seed(0)
    hf = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    model = engine.from_pretrained(hf)
    prompts = [torch.randint(0, 99, (1 + i % 3, 3 + i)) for i in range(8)]

    def work(p):
        with kernels.use_backend("reference"):
            return model(p).logits, model.generate(p, max_new_tokens=6, eos_token_id=[])

    sequential = [work(p) for p in prompts]
    results = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def run(i):
        start.wait(timeout=60)
        for _ in range(3):
            results[i] = work(prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for (logits, tokens), (want_logits, want_tokens) in zip(results, sequential):
        torch.testing.assert_close(logits, want_logits, atol=0, rtol=0)
        assert torch.equal(tokens, want_tokens)
    assert kernels.get_backend() == "auto"


# ----------------------------------------------------------------------------
# Hugging Face's semantics for configs: missing keys take its defaults.


def test_config_defaults_are_hugging_faces():
    from trifuse.engine.registry import families, with_hf_defaults

    for fam in families():  # each family's contract carries its model types' defaults
        assert set(fam.config_defaults) == set(fam.model_types), fam.name
        for model_type, defaults in fam.config_defaults.items():
            hf = T.AutoConfig.for_model(model_type).to_dict()
            assert {k: hf.get(k) for k in defaults} == defaults, model_type
    # Hugging Face's attribute_map: GPT-2's hidden_size is its n_embd.
    assert with_hf_defaults({"model_type": "gpt2", "hidden_size": 64})["n_embd"] == T.GPT2Config(hidden_size=64).n_embd


def _without_config_keys(path, *keys):
    cfg = json.loads((path / "config.json").read_text())
    for k in keys:
        cfg.pop(k, None)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("family", ["roberta", "gpt2", "t5"])
def test_missing_config_keys_take_hugging_faces_defaults(family, tmp_path, reference_backend):
    """A RoBERTa config without pad_token_id means 1 (its positions count from it), not 0."""
    torch.manual_seed(0)
    if family == "roberta":
        hf = T.RobertaModel(T.RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=37, max_position_embeddings=40)).eval()
        drop = ("pad_token_id", "layer_norm_eps", "type_vocab_size", "hidden_act")
    elif family == "gpt2":
        hf = T.GPT2Model(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=2)).eval()
        drop = ("n_positions", "layer_norm_epsilon", "activation_function", "n_inner")
    else:
        hf = T.T5Model(T.T5Config(vocab_size=99, d_model=32, d_kv=16, num_heads=2, d_ff=37, num_layers=1)).eval()
        drop = ("relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
                "feed_forward_proj", "pad_token_id")
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    _without_config_keys(tmp_path, *drop)
    hf = type(hf).from_pretrained(tmp_path).eval()  # Hugging Face reads the same stripped config
    ids = torch.tensor([[5, 1, 1, 7, 9, 1, 12, 30], [1, 4, 4, 1, 1, 2, 3, 1]])  # 1: RoBERTa's pad
    ours = engine.from_pretrained(tmp_path)
    with torch.no_grad():
        if family == "t5":
            want, got = hf(input_ids=ids, decoder_input_ids=ids[:, :3]), ours(ids, decoder_input_ids=ids[:, :3])
        else:
            want, got = hf(input_ids=ids), ours(ids)
    assert rel_err(got.last_hidden_state, want.last_hidden_state) < 1e-5


# ----------------------------------------------------------------------------
# Checkpoint safety: sharded indexes, mixed dtypes, configs that are not configs.


def _sharded(tmp_path):
    torch.manual_seed(0)
    hf = T.BertModel(T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=40)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "ckpt"
    hf.save_pretrained(path, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3 and not (path / "model.safetensors").exists()
    return hf, path, index


def _write_index(path, index):
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_checkpoint_loads_as_indexed(tmp_path, reference_backend):
    hf, path, _ = _sharded(tmp_path)
    ids = torch.randint(0, 99, (2, 9))
    with torch.no_grad():
        assert rel_err(engine.from_pretrained(path)(ids).last_hidden_state, hf(ids).last_hidden_state) < 1e-5


def test_shard_paths_stay_inside_the_checkpoint(tmp_path):
    hf, path, index = _sharded(tmp_path)
    name, shard = next(iter(index["weight_map"].items()))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / shard).write_bytes((path / shard).read_bytes())
    for evil in (f"../elsewhere/{shard}", str(outside / shard), f"sub/../../elsewhere/{shard}"):
        wm = {k: (evil if v == shard else v) for k, v in index["weight_map"].items()}
        _write_index(path, {**index, "weight_map": wm})
        with pytest.raises(ValueError, match="not a file inside the checkpoint directory"):
            engine.from_pretrained(path)


def test_shard_holds_what_the_index_says(tmp_path):
    hf, path, index = _sharded(tmp_path)
    wm = index["weight_map"]
    shards = sorted(set(wm.values()))
    a, b = (next(k for k, v in wm.items() if v == s) for s in shards[:2])
    # The index names the wrong shard for a tensor.
    _write_index(path, {**index, "weight_map": {**wm, a: wm[b]}})
    with pytest.raises(ValueError, match=f"does not hold {a}"):
        engine.from_pretrained(path)
    # A tensor in two shards: the second copy (other values) must not silently win or lose.
    _write_index(path, index)
    other = load_file(path / wm[b])
    other[a] = torch.zeros_like(hf.state_dict()[a])
    save_file(other, path / wm[b], metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{a} \(indexed in {wm[a]}\).*two shards"):
        engine.from_pretrained(path)


@pytest.mark.parametrize("index", [{}, {"metadata": {}}, {"weight_map": []}, {"weight_map": {}}, []])
def test_index_without_weight_map_is_an_error(index, tmp_path):
    _, path, _ = _sharded(tmp_path)
    _write_index(path, index)
    with pytest.raises(ValueError, match="weight_map|JSON object"):
        engine.from_pretrained(path)


def test_mixed_dtype_checkpoint_loads_in_one_dtype(tmp_path, reference_backend):
    """Some tensors fp16, the rest fp32, config says float32: all fp32, as Hugging Face loads it."""
    torch.manual_seed(0)
    hf = T.BertModel(T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=40)).eval()
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state = {k: v.half() if i % 2 else v for i, (k, v) in enumerate(state.items())}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf = T.BertModel.from_pretrained(tmp_path).eval()
    ours = engine.from_pretrained(tmp_path)
    assert {p.dtype for p in ours.parameters()} == {torch.float32} == {p.dtype for p in hf.parameters()}
    ids = torch.randint(0, 99, (2, 9))
    with torch.no_grad():
        assert rel_err(ours(ids).last_hidden_state, hf(ids).last_hidden_state) < 1e-5
    _without_config_keys(tmp_path, "dtype", "torch_dtype")  # no dtype named: the first float tensor's
    first = next(v.dtype for v in state.values() if v.is_floating_point())
    assert {p.dtype for p in engine.from_pretrained(tmp_path).parameters()} == {first}


@pytest.mark.parametrize("config, match", [
    ("[1, 2]", "expected a JSON object, got list"),
    ('"bert"', "expected a JSON object, got str"),
    ("{not json", "not valid JSON"),
    ('{"hidden_size": 32}', "no 'model_type'"),
    ('{"model_type": "llama"}', "unsupported model_type 'llama'"),
])
def test_config_that_is_not_a_config(config, match, tmp_path):
    T.BertModel(T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=37)).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError, match=match):
        engine.from_pretrained(tmp_path)


def test_missing_size_keys_take_defaults_and_the_mismatch_is_named(tmp_path):
    """Like Hugging Face, a config without hidden_size means 768; the tensors then say it is wrong."""
    T.BertModel(T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=37)).save_pretrained(tmp_path)
    _without_config_keys(tmp_path, "hidden_size")
    with pytest.raises(ValueError, match=r"mis-shaped tensors: embeddings\.word_embeddings\.weight has shape "
                                         r"\(99, 32\), expected \(99, 768\)"):
        engine.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------
# Clear errors up front.


def _bert():
    torch.manual_seed(0)
    return T.BertModel(T.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=37)).eval()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match="CUDA is not available"):
            engine.from_pretrained(_bert(), device=device)


def test_device_that_is_not_a_device():
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        engine.from_pretrained(_bert(), device="gpu")


def test_empty_batches_and_bool_ids_are_named_errors_before_any_work(reference_backend):
    model = engine.from_pretrained(_bert())
    with pytest.raises(ValueError, match=r"input_ids is empty \(shape \(0, 5\)\)"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor .* got torch.bool"):
        model(torch.ones(2, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------
# The CLI: documented combinations work, bad input is one line and exit status 2, no partial output.


def _cli(capsys, *argv):
    """``(exit status, stdout, stderr lines)`` of ``trifuse ARGV`` run in this process."""
    from trifuse.cli import main

    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "ckpt"
    _bert().save_pretrained(path)
    return path


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_cli_export_with_layer_outputs_and_verify(bert_dir, tmp_path, capsys, reference_backend):
    out = tmp_path / "b.onnx"
    rc, text, err = _cli(capsys, "export", str(bert_dir), str(out), "--layer-outputs", "--verify")
    assert rc == 0, err
    assert "PASS" in text and "hidden_states.1" in text and "every block output within budget" in text
    # ONNX Runtime's CUDA provider, where it does not load, must fail the check rather than fall back.
    import onnxruntime as ort

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA provider loads here")
    rc, text, err = _cli(capsys, "verify", str(out), str(bert_dir), "--provider", "cuda")
    assert rc == 2 and "PASS" not in text
    assert len(err) == 1 and "did not load CUDAExecutionProvider" in err[0], err


@pytest.mark.parametrize("argv, match", [
    (["verify", "x.onnx", "ckpt", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["verify", "x.onnx", "ckpt", "--seq", "-3"], "argument --seq: must be >= 1, got -3"),
    (["check", "ckpt", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["check", "ckpt", "--seq", "ten"], "argument --seq: expected an integer, got 'ten'"),
    (["export", "ckpt"], "the following arguments are required: output"),
    (["export", "ckpt", "o.onnx", "--dtype", "fp8"], "argument --dtype: invalid choice"),
    (["nonsense"], "argument COMMAND: invalid choice"),
])
def test_cli_bad_arguments_are_one_line_exit_2(argv, match, capsys):
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2 and len(err) == 1 and match in err[0], err


@pytest.mark.parametrize("argv, match", [
    (["export", "{missing}", "{tmp}/o.onnx"], "not a checkpoint directory"),
    (["export", "{bert}", "{tmp}/o.txt"], "must end in .onnx"),
    (["export", "{bert}", "{tmp}/o.onnx", "--opset", "7"], "opset must be an int in 20..23"),
    (["verify", "{tmp}/missing.onnx", "{bert}"], "no such ONNX file"),
    (["verify", "{bert}/config.json", "{bert}"], "not a readable ONNX model"),
    (["check", "{missing}"], "not a checkpoint directory"),
    (["check", "{bert}", "--seq", "100000", "--device", "cpu"], "seq=100000 exceeds the model's 512 positions"),
    (["compare", "{tmp}/a.json", "{tmp}/b.json"], "a.json"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, match, bert_dir, tmp_path, capsys, reference_backend):
    argv = [a.format(missing=tmp_path / "missing", tmp=tmp_path, bert=bert_dir) for a in argv]
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2 and len(err) == 1 and match in err[0], err
    assert err[0].startswith(f"trifuse {argv[0]}: error: ")
    assert not list(tmp_path.glob("o.*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cli_cuda_without_cuda_is_one_line_exit_2(bert_dir, tmp_path, capsys):
    rc, _, err = _cli(capsys, "export", str(bert_dir), str(tmp_path / "o.onnx"), "--device", "cuda")
    assert rc == 2 and len(err) == 1 and "CUDA is not available" in err[0], err
    assert not list(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_failed_t5_export_leaves_nothing_behind(tmp_path, monkeypatch, reference_backend):
    """The encoder exports, the decoder fails: neither file is left, and earlier files stay as they were."""
    from trifuse import export

    model = engine.from_pretrained(_t5(0))
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


# ----------------------------------------------------------------------------
# Generation: generation_config.json, ids fed back, right padding, memory that follows the work done.


def _gpt2(seed=0):
    torch.manual_seed(seed)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           eos_token_id=98, bos_token_id=98)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def _first_token(hf, ids, **kw):
    return int(hf.generate(ids, max_new_tokens=1, do_sample=False, **kw)[0, -1])


def test_gpt2_generation_config_json_sets_defaults(tmp_path, reference_backend):
    hf = _gpt2()
    ids = torch.randint(0, 99, (1, 5), generator=torch.Generator().manual_seed(1))
    eos = int(hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)[0, -1])
    hf.generation_config = T.GenerationConfig(eos_token_id=eos, pad_token_id=3, bos_token_id=98, max_new_tokens=9,
                                              no_repeat_ngram_size=2, repetition_penalty=1.3)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_new_tokens"] == 9
    hf = T.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ours = engine.from_pretrained(tmp_path)
    assert ours.generation_config["eos_token_id"] == eos and ours.config.eos_token_id == (eos,)
    want = hf.generate(ids, attention_mask=torch.ones_like(ids))
    assert torch.equal(ours.generate(ids), want)
    assert torch.equal(torch.stack(list(ours.stream(ids)), 1), want[:, 5:])
    # Arguments passed explicitly win. An explicit max_length replaces the file's max_new_tokens (Hugging Face
    # keeps the file's max_new_tokens then, with a warning; here the caller's limit holds).
    for kw, hf_kw in ((dict(max_new_tokens=3), None), (dict(max_length=8), dict(max_new_tokens=3)),
                      (dict(repetition_penalty=1.0, no_repeat_ngram_size=0), None)):
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), **(hf_kw or kw))
        assert torch.equal(ours.generate(ids, **kw), want), kw


def test_t5_generation_config_json_sets_defaults(tmp_path, reference_backend):
    hf = _t5(0)
    ids, mask, _ = _t5_inputs()
    hf.generation_config = T.GenerationConfig(decoder_start_token_id=5, eos_token_id=7, pad_token_id=0,
                                              max_length=6, num_beams=2)
    hf.save_pretrained(tmp_path)
    hf = T.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ours = engine.from_pretrained(tmp_path)
    assert ours.config.decoder_start_token_id == 5
    want = hf.generate(ids, attention_mask=mask)
    assert want.shape[1] == 6 and (want[:, 0] == 5).all()
    assert torch.equal(ours.generate(ids, mask), want)
    want = hf.generate(ids, attention_mask=mask, num_beams=1, max_new_tokens=4, decoder_start_token_id=0)
    assert torch.equal(ours.generate(ids, mask, num_beams=1, max_new_tokens=4, decoder_start_token_id=0), want)


def test_unsupported_generation_options_are_named(tmp_path):
    hf = _gpt2()
    hf.generation_config = T.GenerationConfig(eos_token_id=98, suppress_tokens=[4, 5])
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="sets suppress_tokens, which trifuse's generate does not implement"):
        engine.from_pretrained(tmp_path)


def test_pad_id_outside_the_vocabulary_is_rejected_before_the_loop(tmp_path, reference_backend, monkeypatch):
    ids = torch.randint(2, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    gpt2, t5 = engine.from_pretrained(_gpt2()), engine.from_pretrained(_t5(0))
    steps = []
    for model in (gpt2, t5):
        monkeypatch.setattr(model, "forward", lambda *a, **k: steps.append(1))  # no forward may run
        for call in (model.generate, model.stream):
            with pytest.raises(ValueError, match=r"pad_token_id=500 is outside the vocabulary \[0, 99\)"):
                call(ids, max_new_tokens=5, pad_token_id=500, eos_token_id=[3])
    assert not steps
    hf = _gpt2()
    hf.generation_config = T.GenerationConfig(eos_token_id=98, pad_token_id=1000)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pad_token_id=1000 is outside the vocabulary"):
        engine.from_pretrained(tmp_path).generate(ids)


def test_right_padded_decoder_prompt_warns_as_hugging_face_does(reference_backend):
    model = engine.from_pretrained(_gpt2())
    ids = torch.randint(2, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with pytest.warns(UserWarning, match="right-padding detected"):
        model.generate(ids, right, max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, right.flip(1), max_new_tokens=2)  # left padding: no warning


def test_t5_cache_grows_with_the_work_done(reference_backend, monkeypatch):
    """max_new_tokens=10**8 with an early EOS allocates for the tokens decoded, not for 10**8 (51 GB here);
    decoding past the first chunk grows the cache and matches Hugging Face (greedy and beams)."""
    from trifuse.engine.cache import KVCache

    hf = _t5(0)
    ours = engine.from_pretrained(hf)
    ids, mask, _ = _t5_inputs()
    eos = _first_token(hf, ids[:1], attention_mask=mask[:1])
    capacities = []
    real_init = KVCache.__init__

    def recording_init(self, batch, layers, heads, max_len, *args, **kwargs):
        capacities.append(max_len)
        real_init(self, batch, layers, heads, max_len, *args, **kwargs)

    monkeypatch.setattr(KVCache, "__init__", recording_init)
    out = ours.generate(ids[:1], mask[:1], max_new_tokens=10**8, eos_token_id=eos)
    assert out.shape == (1, 2) and int(out[0, 1]) == eos
    assert capacities and max(capacities) <= 64
    hf.generation_config.eos_token_id = None
    for beams in (1, 2):
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=150, num_beams=beams, do_sample=False)
        assert torch.equal(ours.generate(ids, mask, max_new_tokens=150, num_beams=beams, eos_token_id=[]), want)


def test_sequence_buffers_follow_the_tokens_decoded(monkeypatch):
    """Beam search and the n-gram ban keep the sequences decoded so far; with max_new_tokens=10**8 and
    an early EOS they hold a few dozen positions, never 10**8 (which would be GBs per row)."""
    from trifuse.engine import beam_search as bs
    from trifuse.engine import generation as gen

    vocab, eos, steps = 11, 3, []
    widths = []
    real_full = torch.full

    def recording_full(size, *args, **kwargs):
        widths.append(size[-1] if isinstance(size, (tuple, list)) else size)
        return real_full(size, *args, **kwargs)

    def logits_for(rows: int) -> torch.Tensor:  # EOS certain from the fourth step on
        out = torch.randn(rows, vocab)
        if len(steps) >= 3:
            out[:, eos] = 100.0
        return out

    def step(tokens, beam_idx=None):
        steps.append(tokens.clone())
        return logits_for(tokens.shape[0])

    monkeypatch.setattr(torch, "full", recording_full)
    cfg = gen.GenerationConfig(max_new_tokens=10**8, eos_token_id=(eos,), pad_token_id=0)
    prompt = torch.randint(4, vocab, (4, 5))
    out = bs.beam_search(logits_for(4), step, prompt, cfg, bs.BeamConfig(num_beams=2, early_stopping=True))
    assert out.shape[0] == 2 and out.shape[1] <= 5 + 8 and (out == eos).any(dim=1).all()
    assert widths and max(widths) <= 5 + 64
    steps.clear()
    ngram = gen.GenerationConfig(max_new_tokens=10**8, eos_token_id=(eos,), pad_token_id=0, no_repeat_ngram_size=2)
    out = gen.generate(logits_for(4), step, prompt, ngram)
    assert out.shape[1] <= 5 + 8 and (out[:, 5:] == eos).any(dim=1).all()
