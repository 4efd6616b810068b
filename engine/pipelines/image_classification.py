"""Image classification (transformers 5.x's ``ImageClassificationPipeline``) on ViT / DeiT."""

from __future__ import annotations

import numpy as np
import torch

from ..family import VISION
from ..images import ImageProcessor, load_image
from .base import Pipeline, Unit, apply_function, check_int, classification_function


class ImageClassification(Pipeline):
    task = "image-classification"
    model_task = "image-classification"
    kinds = (VISION,)
    text = False
    options = {"top_k": 5, "function_to_apply": None, "timeout": None}
    #: Whether a string input may name a file or URL (transformers' rule). A server sets it to False:
    #: then strings are base64 or data: URIs only (engine.images.load_image's ``allow_paths``).
    allow_paths = True

    def __init__(self, path, config, **kw):
        super().__init__(path, config, **kw)
        self.processor = ImageProcessor.from_pretrained(path)

    def _prepare(self, i, x, opts):
        top_k(opts)  # before any work
        if not isinstance(x, np.ndarray):  # transformers: arrays go to the processor as they are
            x = load_image(x, timeout=opts.get("timeout"), allow_paths=self.allow_paths)
            if self.processor.num_channels == 1:  # a grayscale model (transformers' pipeline fails there)
                x = x.convert("L")
        return [Unit(i, self.processor.process(x))]

    def _forward(self, batch, opts):
        pixels = torch.from_numpy(np.stack([u.enc for u in batch])).to(self.device, self.model_dtype)
        logits = self._runner()(pixels).logits.float().cpu()
        for r, u in enumerate(batch):
            u.out["logits"] = logits[r]

    @property
    def model_dtype(self):
        return next(self.model.parameters()).dtype

    def _finish(self, x, units, opts):
        logits = units[0].out["logits"].numpy()
        n = logits.shape[-1]
        scores = apply_function(classification_function(opts.get("function_to_apply"), self.config, n), logits)
        order = np.argsort(-scores, kind="stable")[:min(top_k(opts), n)]
        return [{"label": self.id2label.get(int(i), f"LABEL_{int(i)}"), "score": float(scores[i])} for i in order]


def top_k(opts: dict) -> int:
    """The call's ``top_k``: None means transformers' default 5, 0 an empty list (as transformers
    answers); anything but an int >= 0 is an error naming it."""
    k = opts.get("top_k")
    return 5 if k is None else check_int("top_k", k, 0)
