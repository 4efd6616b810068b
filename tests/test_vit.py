"""ViT and DeiT against Hugging Face transformers, from checkpoints on disk and in memory."""

import json

import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.helpers import assert_same_outputs, bench_row_passed, rel_err
from trifuse import engine
from trifuse.engine.images import ImageProcessor, preprocess

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
CONFIGS = {
    "vit-32-p8-rgb": lambda: T.ViTConfig(**SMALL, image_size=32, patch_size=8),
    "vit-30-p6-gray": lambda: T.ViTConfig(**SMALL, image_size=30, patch_size=6, num_channels=1),
    # A non-square image, no QKV bias, the tanh GELU, a narrower pooler with another activation.
    "vit-24x40-p8": lambda: T.ViTConfig(**SMALL, image_size=[24, 40], patch_size=8, qkv_bias=False,
                                        hidden_act="gelu_new", pooler_output_size=48, pooler_act="relu"),
    "deit-32-p8": lambda: T.DeiTConfig(**SMALL, image_size=32, patch_size=8),
}
HEADS = {"vit": ["Model", "ForImageClassification"],
         "deit": ["Model", "ForImageClassification", "ForImageClassificationWithTeacher"]}
PREFIX = {"vit": "ViT", "deit": "DeiT"}
CASES = [(name, head) for name in CONFIGS for head in HEADS[name.split("-")[0]]]


def hf_model(name: str, head: str, config=None, seed: int = 0, attn_implementation=None):
    torch.manual_seed(seed)
    if config is None:
        config = CONFIGS[name]()
        if "Classification" in head:
            config.num_labels = 3
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model = getattr(T, PREFIX[config.model_type] + head)(config).eval()
    # Perturb every tensor (HF leaves LayerNorms at (1, 0), DeiT's tokens at 0) so that a
    # swapped or dropped weight cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def image_hw(config):
    s = config.image_size
    return (s, s) if isinstance(s, int) else tuple(s)


def pixels(config, b=2, size=None, seed=1):
    h, w = size or image_hw(config)
    return torch.randn(b, config.num_channels, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,head", CASES)
def test_matches_hf(name, head, tmp_path, reference_backend):
    hf = hf_model(name, head)
    hf.save_pretrained(tmp_path)
    x = pixels(hf.config)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        for source in (tmp_path, hf):  # by path and by object
            model = engine.from_pretrained(source)
            assert_same_outputs(model(x, output_hidden_states=True), ref, hidden=True)
    if head == "Model":
        assert model(x).pooler_output is not None
    else:
        assert model.id2label == model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


@pytest.mark.parametrize("name,head", [("vit-32-p8-rgb", "ForImageClassification"), ("vit-30-p6-gray", "Model"),
                                       ("deit-32-p8", "ForImageClassificationWithTeacher")])
def test_interpolate_pos_encoding(name, head, reference_backend):
    hf = hf_model(name, head)
    model = engine.from_pretrained(hf)
    p = hf.config.patch_size
    h, w = image_hw(hf.config)
    # Bigger (square and not), smaller, and the checkpoint's own size.
    for size in [(h + 2 * p, w + 2 * p), (h + 2 * p, w + p), (h - p, w), (h, w)]:
        x = pixels(hf.config, size=size)
        with torch.no_grad():
            ours = model(x, interpolate_pos_encoding=True, output_hidden_states=True)
            assert_same_outputs(ours, hf(x, interpolate_pos_encoding=True, output_hidden_states=True), hidden=True)
        assert ours.hidden_states[0].shape[1] == model.config.seq_len(*size)


@pytest.mark.parametrize("name,head", [("vit-32-p8-rgb", "ForImageClassification"),
                                       ("deit-32-p8", "ForImageClassificationWithTeacher")])
def test_triton_kernels_under_interpreter(name, head, tmp_path, device):
    """Once per model type with the Triton kernels (interpreted on the CPU), interpolation included."""
    hf = hf_model(name, head)
    hf.save_pretrained(tmp_path)
    model = engine.from_pretrained(tmp_path, device=device)
    for size in (None, (48, 40)):
        x = pixels(hf.config, size=size)
        interpolate = size is not None
        with torch.no_grad():
            ref = hf(x, interpolate_pos_encoding=interpolate, output_hidden_states=True)
            ours = model(x.to(device), interpolate_pos_encoding=interpolate, output_hidden_states=True)
        assert_same_outputs(ours, ref, tol=2e-5, hidden=True)


def test_output_attentions(reference_backend):
    hf = hf_model("vit-32-p8-rgb", "Model", attn_implementation="eager")
    model = engine.from_pretrained(hf)
    x = pixels(hf.config)
    with torch.no_grad():
        ours = model(x, output_attentions=True)
        ref = hf(x, output_attentions=True)
    assert len(ours.attentions) == len(ref.attentions) == 2
    for a, b in zip(ours.attentions, ref.attentions):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert_same_outputs(ours, ref)


def test_task_override_no_pooler_and_masked_image_modeling(tmp_path, reference_backend):
    x = pixels(CONFIGS["deit-32-p8"]())
    # A classifier loaded as a backbone: the heads are skipped, there is no pooler.
    hf = hf_model("deit-32-p8", "ForImageClassificationWithTeacher")
    model = engine.from_pretrained(hf, task="feature-extraction")
    with torch.no_grad():
        out = model(x)
        assert_same_outputs(out, hf.deit(x))
    assert out.pooler_output is None and model.head is None
    # ViTModel without its pooling layer; a masked-image-modeling checkpoint as a backbone.
    cfg = CONFIGS["vit-32-p8-rgb"]()
    torch.manual_seed(0)
    for hf, backbone in ((T.ViTModel(cfg, add_pooling_layer=False).eval(), None),
                         (T.ViTForMaskedImageModeling(cfg).eval(), "vit")):
        hf.save_pretrained(tmp_path / type(hf).__name__)
        model = engine.from_pretrained(tmp_path / type(hf).__name__)
        with torch.no_grad():
            ref = (getattr(hf, backbone) if backbone else hf)(x)
            out = model(x)
        assert out.pooler_output is None and model.head is None
        assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-5


def test_labels_and_dtype(tmp_path, reference_backend):
    cfg = CONFIGS["vit-32-p8-rgb"]()
    cfg.id2label, cfg.label2id = {0: "cat", 1: "dog"}, {"cat": 0, "dog": 1}
    hf = hf_model("vit-32-p8-rgb", "ForImageClassification", config=cfg)
    hf.save_pretrained(tmp_path)
    model = engine.from_pretrained(tmp_path)
    assert model.id2label == {0: "cat", 1: "dog"} and model.config.num_labels == 2
    x = pixels(cfg)
    half = engine.from_pretrained(tmp_path, dtype="bf16")
    assert half.embed.pos.dtype == torch.bfloat16
    with torch.no_grad():
        out = half(x)  # float32 pixels are cast to the weights' dtype, as in Hugging Face
        assert out.logits.dtype == torch.bfloat16
        assert rel_err(out.logits.float(), model(x).logits) < 5e-2


# ----------------------------------------------------------------------------
# Preprocessing.


def random_images(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(17, 23), (64, 48), (40, 40), (9, 70)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def hf_processor(kind, **kw):
    cls = getattr(T, f"{kind}ImageProcessorPil", None)  # transformers >= 5.2x: the PIL backend
    return cls(**kw) if cls is not None else getattr(T, f"{kind}ImageProcessor")(use_fast=False, **kw)


@pytest.mark.parametrize("kind,kw", [
    ("ViT", dict(size={"height": 40, "width": 24})),  # bilinear
    ("ViT", dict(size={"height": 32, "width": 32}, resample=Image.Resampling.NEAREST, image_mean=[0.4, 0.5, 0.6],
                 image_std=[0.2, 0.3, 0.25])),
    ("DeiT", dict(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32})),  # bicubic + crop
    ("DeiT", dict(size={"height": 20, "width": 28}, crop_size={"height": 24, "width": 24})),  # crop pads
])
def test_preprocess_matches_hf(kind, kw, tmp_path):
    proc = hf_processor(kind, **kw)
    proc.save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path)
    images = random_images()
    pil = [Image.fromarray(a) for a in images]
    ref = torch.as_tensor(np.stack(proc(pil, return_tensors="np")["pixel_values"]))
    for inputs in (images, pil):
        torch.testing.assert_close(ours(inputs), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours(pil[1]), ref[1:2], atol=2e-5, rtol=2e-5)  # a single image


def test_preprocess_grayscale_and_files(tmp_path):
    proc = hf_processor("ViT", size={"height": 30, "width": 30}, image_mean=[0.45], image_std=[0.25])
    proc.save_pretrained(tmp_path)
    gray = [a[..., 0] for a in random_images(1)]
    ref = torch.as_tensor(np.stack(proc([Image.fromarray(g) for g in gray], return_tensors="np")["pixel_values"]))
    torch.testing.assert_close(preprocess(tmp_path, gray), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(preprocess(tmp_path, [g[..., None] for g in gray]), ref, atol=2e-5, rtol=2e-5)
    paths = []
    for i, g in enumerate(gray):
        Image.fromarray(g).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    torch.testing.assert_close(preprocess(tmp_path, paths), ref, atol=2e-5, rtol=2e-5)


def test_image_files_to_labels(tmp_path, reference_backend):
    """docs/models.md's ViT lines: image files -> labels, as Hugging Face's processor + model."""
    hf = hf_model("vit-32-p8-rgb", "ForImageClassification")
    hf.save_pretrained(tmp_path)
    proc = hf_processor("ViT", size={"height": 32, "width": 32})
    proc.save_pretrained(tmp_path)
    rgba = np.concatenate([random_images(2)[1], np.full((64, 48, 1), 255, np.uint8)], axis=-1)
    files = [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"]
    Image.fromarray(random_images(2)[0]).save(files[0])
    Image.fromarray(random_images(2)[2]).save(files[1], quality=95)
    Image.fromarray(rgba).save(files[2])  # opaque RGBA: converted to RGB
    model, processor = engine.from_pretrained(tmp_path), ImageProcessor.from_pretrained(tmp_path)
    logits = model(processor(files)).logits
    labels = [model.id2label[i] for i in logits.argmax(-1).tolist()]
    with torch.no_grad():
        ref = hf(**proc([Image.open(f).convert("RGB") for f in files], return_tensors="pt")).logits
    assert rel_err(logits, ref) < 1e-5
    assert labels == [hf.config.id2label[i] for i in ref.argmax(-1).tolist()]


# ----------------------------------------------------------------------------
# Errors.


def test_bad_pixel_values(reference_backend):
    hf = hf_model("vit-32-p8-rgb", "Model")
    model = engine.from_pretrained(hf)
    x = pixels(hf.config)
    with pytest.raises(ValueError, match="3 channels; this checkpoint expects 1"):
        engine.from_pretrained(hf_model("vit-30-p6-gray", "Model"))(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"does not match the checkpoint's 32x32.*interpolate_pos_encoding=True"):
        model(pixels(hf.config, size=(48, 48)))
    with pytest.raises(ValueError, match="does not fit the 8x8 patch grid"):
        model(pixels(hf.config, size=(36, 40)), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match=r"shape \[batch, channels, height, width\]; got \(3, 32, 32\)"):
        model(x[0])
    with pytest.raises(ValueError, match="must be a float tensor.*got torch.uint8"):
        model((x * 50).to(torch.uint8))
    with pytest.raises(ValueError, match="got ndarray"):
        model(x.numpy())
    with pytest.raises(ValueError, match="empty batch"):
        model(x[:0])


def test_bad_checkpoints(tmp_path):
    hf = hf_model("vit-32-p8-rgb", "ForImageClassification")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unknown task 'masked-lm'"):
        engine.from_pretrained(tmp_path, task="masked-lm")
    with pytest.raises(ValueError, match="missing tensors: classifier.weight"):
        engine.from_pretrained(hf_model("vit-32-p8-rgb", "Model"), task="image-classification")
    key = "vit.encoder.layer.1.attention.attention.key.weight"
    broken = {k: v for k, v in state.items() if k != key}
    broken["vit.embeddings.position_embeddings"] = state["vit.embeddings.position_embeddings"][:, :-1]
    broken["vit.extra.weight"] = torch.zeros(1)
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"missing tensors: {key}.*mis-shaped tensors: "
                                         r"vit.embeddings.position_embeddings has shape \(1, 16, 64\), expected "
                                         r"\(1, 17, 64\).*unexpected tensors: vit.extra.weight"):
        engine.from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "mish"}))
    with pytest.raises(ValueError, match="unsupported activation 'mish'"):
        engine.from_pretrained(tmp_path)


def test_bad_images(tmp_path):
    proc = ImageProcessor.from_dict({"size": {"height": 8, "width": 8}})
    img = random_images()[0]
    with pytest.raises(ValueError, match="must be uint8"):
        proc(img.astype(np.float32))
    with pytest.raises(ValueError, match=r"H x W x C with C in 1, 3, 4"):
        proc(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="unsupported image type Tensor"):
        proc(torch.zeros(8, 8, 3))
    with pytest.raises(ValueError, match="different sizes after preprocessing"):
        proc.with_options(do_resize=False)(random_images()[:2])
    with pytest.raises(ValueError, match="image has 1 channels, the processor normalizes 3"):
        proc(img[..., 0])
    with pytest.raises(ValueError, match="unsupported size"):
        ImageProcessor.from_dict({"size": {"longest_edge": 8}})
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------
# The benchmark suite, on a small checkpoint directory.


def test_bench_vit_checkpoint_dir(tmp_path):
    from trifuse.bench import vision as suite
    from trifuse.bench.suite import Options

    ckpt = tmp_path / "ckpt"
    hf_model("deit-32-p8", "ForImageClassificationWithTeacher").save_pretrained(ckpt)
    assert suite.is_model(str(ckpt)) and suite.is_model("vit-base-patch16-224") and not suite.is_model("bert-base")
    opts = Options(device=torch.device("cpu"), dtype=torch.float32, quick=True, batch=[2],
                   backends=["trifuse", "reference", "hf-eager"])
    result = suite.run(opts, [str(ckpt)])
    rows = {r["backend"]: r for r in result.rows}
    assert bench_row_passed(rows["trifuse"]) and rows["trifuse"]["rel_err"] < 1e-4
    for b in ("reference", "hf-eager"):
        assert bench_row_passed(rows[b]) and rows[b]["status"] != "checked" and rows[b]["rel_err"] < 1e-4
        assert rows[b]["status"] != "ok" or rows[b]["images_per_s"] > 0
    assert all(r["batch"] == 2 and r["seq"] == 18 for r in rows.values())
    assert rows["hf-eager"]["status"] != "ok" or rows["hf-eager"]["speedup_vs_hf_eager"] == 1.0
