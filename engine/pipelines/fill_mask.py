"""Fill-mask (transformers 5.x's ``FillMaskPipeline``): the masked positions' best tokens, or
the scores of ``targets``."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .base import Pipeline, Unit, text_input


class FillMask(Pipeline):
    default_max_batch_tokens = 16384  # text-embeddings-inference's default budget
    task = "fill-mask"
    model_task = "masked-lm"
    options = {"top_k": 5, "targets": None, "truncation": None, "max_length": None, "output_attentions": False}

    def _target_ids(self, targets) -> Optional[np.ndarray]:
        if targets is None:
            return None
        if isinstance(targets, str):
            targets = [targets]
        vocab = self.tokenizer.get_vocab()
        ids = []
        for t in targets:
            i = vocab.get(t)
            if i is None:  # as transformers: the first token of the target's own tokenization
                enc, = self.tokenizer.encode([t], add_special_tokens=False, truncation=True, max_length=1)
                if not enc.ids:
                    continue
                i = enc.ids[0]
            ids.append(i)
        ids = list(set(ids))  # transformers' order (a set's)
        if not ids:
            raise ValueError("At least one target must be provided when passed.")
        return np.array(ids)

    def _prepare(self, i, x, opts):
        enc, = self._encode([text_input(x, self.task)], truncation=opts.get("truncation"),
                            max_length=opts.get("max_length"))
        mask_id = self.tokenizer.mask_token_id
        if mask_id is None or mask_id not in enc.ids:
            raise ValueError(f"No mask_token ({self.tokenizer.mask_token}) found on input {x!r}")
        return [Unit(i, enc)]

    def _forward(self, batch, opts):
        inputs = self.tokenizer.pad([u.enc for u in batch], side="right", device=self.device, type_ids=self._type_ids)
        attn = bool(opts.get("output_attentions"))
        out = self.model(**inputs, output_attentions=attn)
        mask_id = self.tokenizer.mask_token_id
        for r, u in enumerate(batch):
            n = u.length
            where = inputs["input_ids"][r, :n].eq(mask_id)
            u.out["logits"] = out.logits[r, :n][where].float().cpu()  # only the masked rows leave the device
            if attn:
                u.out["attentions"] = torch.stack([a[r, :, :n, :n] for a in out.attentions]).float().cpu()

    def _finish(self, x, units, opts):
        u = units[0]
        target_ids = self._target_ids(opts.get("targets"))
        top_k = opts.get("top_k") or 5
        if target_ids is not None and len(target_ids) < top_k:
            top_k = len(target_ids)
        ids = np.array(u.enc.ids)
        masked = np.nonzero(ids == self.tokenizer.mask_token_id)[0]
        probs = u.out["logits"].softmax(dim=-1)
        if target_ids is not None:
            probs = probs[..., torch.as_tensor(target_ids)]
        values, predictions = probs.topk(top_k)
        single = values.shape[0] == 1
        pad = self.tokenizer.pad_token_id
        result = []
        for i, (vs, ps) in enumerate(zip(values.tolist(), predictions.tolist())):
            row = []
            for v, p in zip(vs, ps):
                tokens = ids.copy()
                if target_ids is not None:
                    p = int(target_ids[p])
                tokens[masked[i]] = p
                tokens = tokens[tokens != pad] if pad is not None else tokens
                row.append({"score": v, "token": p, "token_str": self.tokenizer.decode([p]),
                            "sequence": self.tokenizer.decode(tokens.tolist(), skip_special_tokens=single)})
            result.append(row)
        return self._with_attentions(result[0] if single else result, units, opts)


