"""Image classification (transformers 5.x's ``ImageClassificationPipeline``) on ViT / DeiT."""

from __future__ import annotations

import numpy as np
import torch

from ..family import VISION
from ..images import ImageProcessor
from .base import Pipeline, Unit, apply_function, classification_function


class ImageClassification(Pipeline):
    task = "image-classification"
    model_task = "image-classification"
    kinds = (VISION,)
    text = False
    options = {"top_k": 5, "function_to_apply": None, "timeout": None}

    def __init__(self, path, config, **kw):
        super().__init__(path, config, **kw)
        self.processor = ImageProcessor.from_pretrained(path)

    def _prepare(self, i, x, opts):
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
        top_k = min(opts.get("top_k") or 5, n)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [{"label": self.id2label.get(int(i), f"LABEL_{int(i)}"), "score": float(scores[i])} for i in order]


