"""Loading checkpoints: Hugging Face's config defaults for missing keys, sharded indexes that stay
inside the checkpoint and hold what they say, mixed dtypes, configs that are not configs."""

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from tests.helpers import rel_err
from trifuse import engine


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


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_loaded_weights_are_the_models_own(family, tmp_path):
    """Every parameter is trifuse's own memory: none aliases the in-memory model it came from, and a
    checkpoint directory's safetensors file is not left memory-mapped by tensors taken from it as they
    are (the mapping would keep the whole file resident beside the fused and transposed copies)."""
    from pathlib import Path

    from tests import test_bert, test_gpt2

    hf = test_gpt2.hf_model() if family == "gpt2" else test_bert.hf_model("bert", "Model")
    ours = engine.from_pretrained(hf)
    theirs = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    assert not any(p.untyped_storage().data_ptr() in theirs for p in ours.parameters())
    hf.save_pretrained(tmp_path)
    ours = engine.from_pretrained(tmp_path)
    file = str((tmp_path / "model.safetensors").resolve())
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps here")
    assert file not in maps.read_text()
    with torch.no_grad():
        ids = torch.randint(0, 90, (2, 7), generator=torch.Generator().manual_seed(0))
        want = hf(ids)[0]
        assert rel_err(ours(ids)[0], want) < 2e-5
