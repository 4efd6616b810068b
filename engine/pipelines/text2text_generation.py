"""Text-to-text generation, summarization and translation (transformers 4.x's
``Text2TextGenerationPipeline`` and its subclasses) on encoder-decoders (T5, BART)."""

from __future__ import annotations

from ..family import SEQ2SEQ
from .base import Unit, text_input
from .text_generation import GENERATE, GenerationPipeline, generation_config


class Text2TextGeneration(GenerationPipeline):
    """transformers 4.x's ``Text2TextGenerationPipeline`` (and its summarization/translation
    subclasses) for T5: the task's prefix and generation settings from the config's
    ``task_specific_params``, overridden by the call's options."""

    task = "text2text-generation"
    model_task = "text2text-generation"
    kinds = (SEQ2SEQ,)
    return_name = "generated"
    options = {**{k: None for k in GENERATE}, "return_text": True, "return_tensors": False,
               "clean_up_tokenization_spaces": False, "truncation": None, "src_lang": None, "tgt_lang": None}

    def _task_params(self, opts) -> dict:
        params = self.config.get("task_specific_params") or {}
        key = self.task_name
        if self.task == "translation" and key == "translation":
            src, tgt = opts.get("src_lang"), opts.get("tgt_lang")
            keys = [k for k in params if k.startswith("translation_")]
            if src and tgt:
                key = f"translation_{src}_to_{tgt}"
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise ValueError(f"translation needs src_lang= and tgt_lang= (or a task name translation_xx_to_yy); "
                                 f"this checkpoint knows {keys or 'no translation tasks'}")
            if key not in params:
                raise ValueError(f"{self.path}: no task_specific_params for {key}; it knows {keys}")
        return dict(params.get(key, {}))

    def _base(self, opts) -> dict:
        base = generation_config(self.model)
        params = self._task_params(opts)
        base.update({k: v for k, v in params.items() if k in GENERATE})
        return base

    def _prefix(self, opts) -> str:
        p = self._task_params(opts).get("prefix", self.config.get("prefix"))
        return p or ""

    def _prepare(self, i, x, opts):
        x = text_input(x, self.task_name)
        enc, = self.tokenizer.encode([self._prefix(opts) + x], truncation=opts.get("truncation"))
        return [Unit(i, enc)]

    def _forward(self, batch, opts):
        kw = self._generate_kwargs(opts, self._base(opts))
        inputs = self.tokenizer.pad([u.enc for u in batch], side="right", device=self.device, type_ids=False)
        out = self.model.generate(inputs["input_ids"], inputs["attention_mask"], **kw).cpu()
        r = out.shape[0] // len(batch)
        for j, u in enumerate(batch):
            u.out["sequences"] = out[j * r:(j + 1) * r]

    def _finish(self, x, units, opts):
        records = []
        for seq in units[0].out["sequences"].tolist():
            if opts.get("return_tensors") or opts.get("return_text") is False:
                records.append({f"{self.return_name}_token_ids": seq})
            else:
                records.append({f"{self.return_name}_text": self.tokenizer.decode(
                    seq, skip_special_tokens=True,
                    clean_up_tokenization_spaces=opts.get("clean_up_tokenization_spaces", False))})
        return records

    def _run(self, items, opts):
        results = super()._run(items, opts)
        # transformers 4.x: a list of strings with one sequence each comes back flat
        if all(len(r) == 1 for r in results):
            return [r[0] for r in results]
        return results

    def _single(self, result, inputs, opts):
        return [result] if isinstance(result, dict) else result


class Summarization(Text2TextGeneration):
    task = "summarization"
    return_name = "summary"


class Translation(Text2TextGeneration):
    task = "translation"
    return_name = "translation"


