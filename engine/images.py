"""Images -> ``pixel_values``: the preprocessing of a checkpoint's ``preprocessor_config.json``.

A dependency-light twin of Hugging Face's PIL image processors (``ViTImageProcessorPil``,
``DeiTImageProcessorPil``; the "slow" ``ViTImageProcessor`` of older releases), step
for step: resize with PIL and the same resample filter, optional center crop,
rescale (``uint8 * rescale_factor`` in float64, then float32), normalize
(``(x - mean) / std`` in float32). Its output equals Hugging Face's.

    from trifuse.engine.images import ImageProcessor

    processor = ImageProcessor.from_pretrained("path/to/checkpoint")
    pixel_values = processor(["cat.jpg", Image.open("dog.png"), uint8_hwc_array])  # [B, C, H, W] float32

``preprocess(checkpoint_dir, images)`` does both steps at once. Images are PIL
images, ``uint8`` numpy arrays of shape ``H x W x C`` (C in 1, 3, 4) or ``H x W``,
or paths to image files (read by :func:`load_image`, then made grayscale for a
one-channel ``image_mean``); one image or a list of them.

:func:`load_image` is transformers' ``load_image``, which its image pipelines call on
every input: a PIL image, a file path, an ``http(s)://`` URL, a base64 string or a
``data:image/...;base64,`` URI, upright by its EXIF orientation
(``ImageOps.exif_transpose``) and then ``convert("RGB")`` (transparency is dropped,
not composited). ``allow_paths=False`` refuses paths and URLs: what a server calls on
a request's input.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
BILINEAR, BICUBIC = 2, 3  # PIL.Image.Resampling values, as the configs store them

# Each Hugging Face processor's defaults, for keys a preprocessor_config.json leaves out.
_DEFAULTS = {
    "ViTImageProcessor": dict(size={"height": 224, "width": 224}, resample=BILINEAR),
    "DeiTImageProcessor": dict(size={"height": 256, "width": 256}, resample=BICUBIC, do_center_crop=True,
                               crop_size={"height": 224, "width": 224}),
}


def _hw(size, what: str, allow_shortest_edge: bool = False):
    """A config ``size`` -> ``(height, width)``, or ``("shortest_edge", n)``."""
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return (int(size[0]), int(size[1]))
    if isinstance(size, dict):  # checked in Hugging Face's order
        if allow_shortest_edge and size.get("shortest_edge") and not size.get("longest_edge"):
            return ("shortest_edge", int(size["shortest_edge"]))
        if size.get("height") and size.get("width") and not size.get("shortest_edge"):
            return (int(size["height"]), int(size["width"]))
    raise ValueError(f"unsupported {what} {size!r}: expected {{'height': H, 'width': W}}"
                     + (" or {'shortest_edge': N}" if allow_shortest_edge else ""))


@dataclass(frozen=True)
class ImageProcessor:
    """Turns images into a normalized ``[B, C, H, W]`` float32 tensor."""

    do_resize: bool = True
    size: tuple = (224, 224)  # (height, width), or ("shortest_edge", n)
    resample: int = BILINEAR
    do_center_crop: bool = False
    crop_size: Tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Tuple[float, ...] = IMAGENET_STANDARD_MEAN
    image_std: Tuple[float, ...] = IMAGENET_STANDARD_STD
    do_convert_rgb: Optional[bool] = None

    @classmethod
    def from_dict(cls, cfg: dict) -> "ImageProcessor":
        kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or ""
        kind = kind[:-3] if kind.endswith("Pil") else kind[:-4] if kind.endswith("Fast") else kind
        kind = kind.replace("FeatureExtractor", "ImageProcessor")
        cfg = {**_DEFAULTS.get(kind, _DEFAULTS["ViTImageProcessor"]), **cfg}
        for key in ("image_mean", "image_std"):
            value = cfg.get(key, IMAGENET_STANDARD_MEAN)
            cfg[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if len(cfg["image_mean"]) != len(cfg["image_std"]):
            raise ValueError(f"image_mean has {len(cfg['image_mean'])} values, image_std {len(cfg['image_std'])}")
        known = {f: cfg[f] for f in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb",
                                     "image_mean", "image_std") if f in cfg}
        return cls(size=_hw(cfg["size"], "size", allow_shortest_edge=True),
                   resample=int(cfg.get("resample", BILINEAR)),
                   crop_size=_hw(cfg.get("crop_size") or (224, 224), "crop_size"),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)), **known)

    @classmethod
    def from_pretrained(cls, path) -> "ImageProcessor":
        """Read ``preprocessor_config.json`` from a checkpoint directory (or that file itself)."""
        path = Path(path)
        file = path / "preprocessor_config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no preprocessor_config.json")
        return cls.from_dict(json.loads(file.read_text()))

    def with_options(self, **changes) -> "ImageProcessor":
        """A copy with some fields changed, e.g. ``size=(384, 384)``."""
        return replace(self, **changes)

    @property
    def num_channels(self) -> int:
        return len(self.image_mean)

    # ------------------------------------------------------------------
    # The steps, as Hugging Face's PIL backend runs them.

    def _load(self, image) -> np.ndarray:
        """One input -> an ``H x W x C`` (or ``H x W``) uint8 array."""
        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
            return np.array(image if self.num_channels == 3 else image.convert("L"))
        if isinstance(image, Image.Image):
            return np.array(_to_rgb(image) if self.do_convert_rgb else image)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise ValueError(f"numpy images must be uint8 (H x W x C); got dtype {image.dtype}")
            if image.ndim == 3 and image.shape[-1] not in (1, 3, 4) or image.ndim not in (2, 3):
                raise ValueError(f"numpy images must be H x W x C with C in 1, 3, 4, or H x W; got shape "
                                 f"{image.shape}")
            if image.ndim == 3 and image.shape[-1] == 1:
                image = image[..., 0]
            return np.array(_to_rgb(Image.fromarray(image))) if self.do_convert_rgb else image
        raise ValueError(f"unsupported image type {type(image).__name__}: pass PIL images, uint8 numpy arrays "
                         "(H x W x C) or image file paths")

    def _resize(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        h, w = image.shape[:2]
        if self.size[0] == "shortest_edge":
            n = self.size[1]
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = n, int(n * long / short)
            new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
        else:
            new_h, new_w = self.size
        return np.array(Image.fromarray(image).resize((new_w, new_h), resample=self.resample))

    def _center_crop(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        ch, cw = self.crop_size
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0:
            return image[top:top + ch, left:left + cw]
        # Smaller than the crop: pad with zeros around it, as Hugging Face does.
        nh, nw = max(ch, h), max(cw, w)
        pt, pl = -(-(nh - h) // 2), -(-(nw - w) // 2)
        out = np.zeros((nh, nw) + image.shape[2:], dtype=image.dtype)
        out[pt:pt + h, pl:pl + w] = image
        top, left = top + pt, left + pl
        return out[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]

    def process(self, image) -> np.ndarray:
        """One image -> a ``C x H x W`` float32 array (uint8 if neither rescaled nor normalized)."""
        x = self._load(image)
        if self.do_resize:
            x = self._resize(x)
        if self.do_center_crop:
            x = self._center_crop(x)
        x = x[:, :, None] if x.ndim == 2 else x
        if x.shape[-1] != self.num_channels and self.do_normalize:
            raise ValueError(f"image has {x.shape[-1]} channels, the processor normalizes {self.num_channels} "
                             "(a grayscale or RGBA image for an RGB model? pass a path or an RGB image)")
        x = np.ascontiguousarray(x.transpose(2, 0, 1))
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            mean = np.array(self.image_mean, dtype=x.dtype)[:, None, None]
            std = np.array(self.image_std, dtype=x.dtype)[:, None, None]
            x = (x - mean) / std
        return x

    def __call__(self, images, *, device=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """One image or a list -> ``pixel_values`` ``[B, C, H, W]`` (float32 unless ``dtype``)."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given")
        arrays = [self.process(im) for im in batch]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes after preprocessing ({sorted(shapes)}); "
                             "enable do_resize or pass images of one size")
        x = torch.from_numpy(np.stack(arrays))
        return x.to(device=device, dtype=dtype or (x.dtype if x.is_floating_point() else torch.float32))


def _to_rgb(image):
    """RGB, compositing transparency onto white (Hugging Face's ``convert_to_rgb``)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def load_image(image, *, timeout: Optional[float] = None, allow_paths: bool = True):
    """One image as transformers' ``load_image`` returns it: an RGB ``PIL.Image.Image``.

    ``image``: a PIL image; encoded image bytes; a ``str`` that is a file path, an
    ``http(s)://`` URL (fetched with ``timeout`` seconds), a ``data:image/...;base64,``
    URI or a base64 string (tried in that order, as transformers does); or an
    ``os.PathLike``. The result is turned upright by its EXIF orientation and converted
    with ``convert("RGB")``. With ``allow_paths=False`` no file is opened and no URL
    fetched (a server's rule: a string is then base64 or a data URI, never a path).
    Anything that is not an image is a ``ValueError`` (a ``TypeError`` for another type).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, Image.Image):
        opened = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        opened = _open_bytes(bytes(image), "image bytes")
    elif isinstance(image, os.PathLike) or (isinstance(image, str) and allow_paths and os.path.isfile(image)):
        if not allow_paths:
            raise ValueError("image paths are not accepted here; send the image's bytes as base64 or a data: URI")
        try:
            with open(image, "rb") as f:
                opened = _open_bytes(f.read(), f"image file {os.fspath(image)!r}")
        except OSError as e:
            raise ValueError(f"cannot read image file {os.fspath(image)!r}: {e.strerror or e}") from None
    elif isinstance(image, str):
        if image.startswith(("http://", "https://")):
            if not allow_paths:
                raise ValueError("image URLs are not fetched here; send the image's bytes as base64 or a data: URI")
            import urllib.request

            with urllib.request.urlopen(image, timeout=timeout) as r:
                opened = _open_bytes(r.read(), f"the image at {image}")
        else:
            data = image.split(",")[1] if image.startswith("data:image/") and "," in image else image
            try:
                raw = base64.decodebytes(data.encode())
            except (binascii.Error, UnicodeEncodeError, ValueError) as e:
                raise ValueError(_bad_source(image, e, allow_paths)) from None
            try:
                opened = Image.open(io.BytesIO(raw))
                opened.load()
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise ValueError(_bad_source(image, e, allow_paths)) from None
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}: pass a PIL image, a path, a URL, "
                        "a base64 string or a data: URI")
    return ImageOps.exif_transpose(opened).convert("RGB")


def _open_bytes(raw: bytes, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{what} is not an image PIL can read: {e}") from None
    return image


def _bad_source(image: str, error: Exception, allow_paths: bool) -> str:
    shown = image if len(image) <= 60 else image[:57] + "..."
    sources = "a path to an image file, an http(s) URL, " if allow_paths else ""
    return f"{shown!r} is not an image: expected {sources}a base64 string or a data:image/...;base64, URI ({error})"


def preprocess(checkpoint, images: Sequence, **kwargs) -> torch.Tensor:
    """``ImageProcessor.from_pretrained(checkpoint)(images, **kwargs)``."""
    return ImageProcessor.from_pretrained(checkpoint)(images, **kwargs)


__all__ = ["ImageProcessor", "load_image", "preprocess"]
