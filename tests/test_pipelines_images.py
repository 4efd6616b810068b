"""Image inputs load as transformers loads them (issue 26 item 5): EXIF orientation, then convert("RGB").

Every case is built in tmp_path and compared with transformers' own ``load_image`` (pixels equal)
and ``transformers.pipeline("image-classification")`` on the same checkpoint (scores within 1e-4).
"""

import base64
import io

import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image
from transformers.image_utils import load_image as hf_load_image

import trifuse
from trifuse.engine.images import load_image

TOL = 1e-4
LABELS = 6


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vit-images")
    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=48, id2label={i: f"label_{i}" for i in range(LABELS)},
                      label2id={f"label_{i}": i for i in range(LABELS)})
    model = T.ViTForImageClassification(cfg).eval()
    with torch.no_grad():  # large weights: the scores follow the pixels closely
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(d)
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pipes(vit_dir):
    return (trifuse.pipeline("image-classification", vit_dir, device="cpu", batch_size=3),
            T.pipeline("image-classification", model=str(vit_dir), device="cpu"))


def _picture(h=40, w=24, seed=0) -> np.ndarray:
    """A smooth random picture (a gradient plus blobs): rotating or flipping it changes what a model sees."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([255 * y / h, 255 * x / w, 128 + 100 * np.sin(x / 3.0 + y / 5.0)], -1)
    img = img + rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _exif_jpeg(path, orientation=6):
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation: 6 = rotate 90 degrees clockwise to display
    Image.fromarray(_picture()).save(path, quality=95, exif=exif.tobytes())
    return path


def _transparent_png(path):
    rgba = np.concatenate([_picture(seed=1), np.zeros((40, 24, 1), np.uint8)], -1)
    rgba[:20, :, 3] = 255  # the top half opaque, the bottom fully transparent (its colour still there)
    rgba[20:30, :, 3] = 90
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _cases(tmp_path):
    rgb = Image.fromarray(_picture(seed=2))
    jpeg, png = _exif_jpeg(tmp_path / "phone.jpg"), _transparent_png(tmp_path / "alpha.png")
    return {
        "exif-6 jpeg path": str(jpeg),
        "transparent png path": str(png),
        "rgba PIL": Image.open(png),
        "L PIL": rgb.convert("L"),
        "P PIL": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32),
        "CMYK PIL": rgb.convert("CMYK"),
        "exif-6 PIL": Image.open(jpeg),
        "base64 png": _b64(png),
        "data URI jpeg": "data:image/jpeg;base64," + _b64(jpeg),
    }


def assert_same_scores(ours, theirs, where):
    assert [d["label"] for d in ours] == [d["label"] for d in theirs], where
    worst = max(abs(a["score"] - b["score"]) for a, b in zip(ours, theirs))
    assert worst <= TOL, f"{where}: scores differ by {worst}"


def test_load_image_equals_transformers(tmp_path):
    for name, image in _cases(tmp_path).items():
        ours, theirs = load_image(image), hf_load_image(image)
        assert ours.mode == "RGB" and ours.size == theirs.size, name
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), name
    # EXIF orientation 6 turns the 24x40 picture on its side; the transparency is dropped, not composited.
    assert load_image(str(tmp_path / "phone.jpg")).size == (40, 24)
    png = Image.open(tmp_path / "alpha.png")
    assert np.array_equal(np.asarray(load_image(png)), np.asarray(png)[..., :3])


def test_image_classification_inputs_match_transformers(tmp_path, pipes):
    ours, hf = pipes
    cases = _cases(tmp_path)
    for name, image in cases.items():
        assert_same_scores(ours(image, top_k=LABELS), hf(image, top_k=LABELS), name)
    names = list(cases)
    got, want = ours([cases[n] for n in names]), hf([cases[n] for n in names])
    for name, a, b in zip(names, got, want):
        assert_same_scores(a, b, f"batched {name}")
    # The cases can tell the loaders apart: without the EXIF turn (or with RGBA laid over white)
    # transformers' own scores move by far more than the tolerance.
    upright = Image.fromarray(np.asarray(Image.open(tmp_path / "phone.jpg").convert("RGB")))  # EXIF dropped
    on_white = Image.alpha_composite(Image.new("RGBA", (24, 40), "white"), Image.open(tmp_path / "alpha.png"))
    for image, variant in ((cases["exif-6 jpeg path"], upright),
                           (cases["transparent png path"], on_white.convert("RGB"))):
        a, b = hf(image, top_k=LABELS), hf(variant, top_k=LABELS)
        by_label = {d["label"]: d["score"] for d in b}
        assert max(abs(d["score"] - by_label[d["label"]]) for d in a) > 50 * TOL


def test_top_k_as_transformers(tmp_path, pipes):
    ours, hf = pipes
    image = Image.fromarray(_picture(seed=3))
    for k in (0, 1, 3, LABELS + 4, None):  # 0: an empty list, as transformers answers; None: its default 5
        got, want = ours(image, top_k=k), hf(image, top_k=k)
        assert len(got) == len(want), k
        if want:
            assert_same_scores(got, want, f"top_k={k}")
    with pytest.raises(ValueError, match="top_k must be an int >= 0, got -1"):
        ours(image, top_k=-1)
    with pytest.raises(TypeError, match="top_k must be an int >= 0, got str '3'"):
        ours(image, top_k="3")


def test_paths_refused_when_the_caller_says_so(tmp_path, pipes):
    ours, _ = pipes
    png = _transparent_png(tmp_path / "a.png")
    for source in (str(png), png, "/etc/hostname", "../../../../etc/hostname", "http://127.0.0.1:9/x.png"):
        with pytest.raises(ValueError, match="not accepted here|not fetched here|is not an image"):
            load_image(source, allow_paths=False)
    # bytes and base64 still load; what a server passes on from a request
    want = np.asarray(load_image(str(png)))
    assert np.array_equal(np.asarray(load_image(png.read_bytes(), allow_paths=False)), want)
    assert np.array_equal(np.asarray(load_image("data:image/png;base64," + _b64(png), allow_paths=False)), want)
    with pytest.raises(ValueError, match="is not an image"):
        load_image("bm90IGFuIGltYWdl", allow_paths=False)  # base64 of "not an image"
    with pytest.raises(ValueError, match="image bytes is not an image"):
        load_image(b"GIF89a\x00garbage")
    with pytest.raises(TypeError, match="unsupported image type int"):
        load_image(3)
    with pytest.raises(ValueError, match="is not an image"):
        ours(str(tmp_path / "missing.png"))  # not a file: read as base64, as transformers does
    ours.allow_paths = False
    try:
        with pytest.raises(ValueError, match="is not an image"):
            ours(str(png))
        assert_same_scores(ours(_b64(png), top_k=LABELS), ours(Image.open(png), top_k=LABELS), "base64")
    finally:
        ours.allow_paths = True
    buf = io.BytesIO()
    Image.fromarray(_picture()).save(buf, format="PNG")
    assert len(ours(buf.getvalue())) == 5  # encoded bytes, one image
