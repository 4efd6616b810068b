"""Text generation (transformers 5.x's ``TextGenerationPipeline``, GPT-2 family) and what the
generation pipelines share: :class:`GenerationPipeline`, which merges the pipeline's defaults,
the checkpoint's ``generation_config.json`` (read once, by :func:`engine.registry.from_pretrained`)
and the call's options into ``generate``'s keywords (:data:`engine.decoding.OPTIONS`)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Iterator

import torch

from ..decoding import OPTIONS
from ..family import DECODER
from .base import Pipeline, Unit, text_input


#: generate()'s options, which the generation pipelines take too (Hugging Face's names).
GENERATE = OPTIONS


def generation_config(model) -> dict:
    """The checkpoint's ``generation_config.json`` as :func:`engine.registry.from_pretrained` read it
    (``model.generation_config``, the keys ``generate`` takes)."""
    return dict(getattr(model, "generation_config", None) or {})


class GenerationPipeline(Pipeline):
    default_batch_size = 8

    def _generate_kwargs(self, opts: dict, base: dict) -> dict:
        asked = {k: v for k, v in opts.items() if k in GENERATE and v is not None}
        kw = {**base, **asked}
        if opts.get("max_length") is not None and opts.get("max_new_tokens") is None:
            kw.pop("max_new_tokens", None)  # a total length asked for: the default new-token count gives way
        return kw


class TextGeneration(GenerationPipeline):
    """transformers 5.x's ``TextGenerationPipeline`` for GPT-2 (plain prompts, no chat templates)."""

    task = "text-generation"
    model_task = "causal-lm"
    kinds = (DECODER,)
    options = {**{k: None for k in GENERATE}, "return_full_text": True, "return_text": None,
               "return_tensors": False, "prefix": "", "clean_up_tokenization_spaces": None,
               "skip_special_tokens": True, "handle_long_generation": None}

    def _base(self) -> dict:
        base = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7, "top_k": 50}  # transformers' pipeline
        base.update(generation_config(self.model))
        if self.tokenizer.pad_token_id is not None:
            base["pad_token_id"] = self.tokenizer.pad_token_id
        elif self.config.get("eos_token_id") is not None:
            base.setdefault("pad_token_id", self.config["eos_token_id"])
        return base

    def stream_start(self, text: str, **options) -> tuple[list[int], dict, "TextPieces"]:
        """What :meth:`stream` decodes, for a caller that produces the ids itself (``trifuse serve`` on
        a :class:`~engine.continuous.GenerationEngine`): ``(prompt ids, generate's keywords, pieces)``;
        feed each new id to ``pieces``. Bad input or options raise here."""
        opts = self._options(options)
        if (opts.get("num_beams") or 1) != 1 or (opts.get("num_return_sequences") or 1) != 1:
            raise ValueError("streaming decodes one sequence: num_beams and num_return_sequences must be 1")
        (unit,) = self._prepare(0, text, opts)
        if not unit.enc.ids:
            raise ValueError("streaming needs a non-empty prompt")
        kw = self._generate_kwargs(opts, self._base())
        clean = opts.get("clean_up_tokenization_spaces")
        clean = self.tokenizer.clean_up_tokenization_spaces if clean is None else bool(clean)
        eos = kw.get("eos_token_id", self.config.get("eos_token_id"))
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        return list(unit.enc.ids), kw, TextPieces(self.tokenizer, opts.get("skip_special_tokens", True), clean, eos)

    def stream(self, text: str, **options) -> Iterator[str]:
        """The generated text of one prompt, piece by piece as tokens are decoded (what ``trifuse
        serve`` streams); the pieces joined equal ``pipe(text, return_full_text=False, **options)``'s
        ``generated_text`` for the same draws. One sequence: no beams, ``num_return_sequences`` 1."""
        prompt, kw, pieces = self.stream_start(text, **options)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            for step in self.model.stream(ids, torch.ones_like(ids), **kw):
                piece = pieces.feed(int(step[0]))
                if piece:
                    yield piece
                if pieces.ended:
                    break
        tail = pieces.flush()
        if tail:
            yield tail

    def _prepare(self, i, x, opts):
        x = text_input(x, self.task)
        enc, = self.tokenizer.encode([(opts.get("prefix") or "") + x])
        mode = opts.get("handle_long_generation")
        if mode not in (None, "hole"):
            raise ValueError(f"handle_long_generation must be None or 'hole', got {mode!r}")
        if mode == "hole":  # transformers: keep the end of the prompt so that it and the new tokens fit
            kw = {**self._base(), **{k: v for k, v in opts.items() if k in GENERATE and v is not None}}
            new = opts.get("max_new_tokens") or (kw["max_length"] - len(enc.ids) if opts.get("max_length")
                                                 else kw.get("max_new_tokens", 20))
            if new < 0:
                raise ValueError("We cannot infer how many new tokens are expected")
            limit = min(self.tokenizer.model_max_length, self.max_tokens)
            if len(enc.ids) + new > limit:
                keep = limit - new
                if keep <= 0:
                    raise ValueError(f"handle_long_generation='hole': {new} new tokens do not fit the model's "
                                     f"{limit} positions")
                enc = SimpleNamespace(ids=enc.ids[-keep:], type_ids=enc.type_ids[-keep:])
        return [Unit(i, enc)]

    def _forward(self, batch, opts):
        kw = self._generate_kwargs(opts, self._base())
        bos = self.config.get("bos_token_id")
        empty = [u for u in batch if not u.enc.ids]
        full = [u for u in batch if u.enc.ids]
        if empty and bos is None:
            raise ValueError("an empty prompt needs the config's bos_token_id to start from")
        for group, prompt_len in ((full, None), (empty, 0)):
            if not group:
                continue
            if prompt_len == 0:  # transformers generates from BOS and decodes it as part of the output
                inputs = {"input_ids": torch.full((len(group), 1), bos, dtype=torch.long, device=self.device),
                          "attention_mask": torch.ones(len(group), 1, dtype=torch.long, device=self.device)}
            else:
                # transformers pads GPT-2's batches with the pad (or EOS) id, which n-gram bans count
                inputs = self.tokenizer.pad([u.enc for u in group], side="left", device=self.device, type_ids=False,
                                            pad_id=kw.get("pad_token_id"))
            out = self.model.generate(inputs["input_ids"], inputs["attention_mask"], **kw).cpu()
            r = out.shape[0] // len(group)
            n = inputs["input_ids"].shape[1]
            for j, u in enumerate(group):
                rows = out[j * r:(j + 1) * r]
                u.out["prompt_len"] = prompt_len if prompt_len is not None else u.length
                # drop this row's left padding: the sequence as an unbatched call returns it
                u.out["sequences"] = rows[:, n - u.length:] if prompt_len is None else rows

    def _finish(self, x, units, opts):
        u = units[0]
        records = []
        return_full = opts.get("return_full_text", True)
        if opts.get("return_text") is False:
            opts = {**opts, "return_tensors": True}
        for seq in u.out["sequences"].tolist():
            if opts.get("return_tensors"):
                records.append({"generated_token_ids": seq})
                continue
            text = self.tokenizer.decode(seq[u.out["prompt_len"]:],
                                         skip_special_tokens=opts.get("skip_special_tokens", True),
                                         clean_up_tokenization_spaces=opts.get("clean_up_tokenization_spaces"))
            records.append({"generated_text": x + text if return_full else text})
        return records




class TextPieces:
    """Generated ids in, text pieces out: each piece is final (the pieces joined equal the ids
    decoded at once, as the pipeline decodes them). A character split across tokens waits for the
    rest; with Hugging Face's clean-up of tokenization spaces, which deletes a space before
    punctuation and contractions (" ." -> ".", " n't" -> "n't"), the text from the last space on
    is held back (a word at most) until later tokens cannot rewrite it."""

    def __init__(self, tokenizer, skip_special_tokens: bool, clean: bool, eos: set):
        self.tokenizer, self.skip, self.clean, self.eos = tokenizer, skip_special_tokens, clean, eos
        self.tokens: list[int] = []
        self.said = ""
        self.ended = False  # an EOS id was fed

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip,
                                     clean_up_tokenization_spaces=self.clean)

    def feed(self, token: int) -> str:
        """The text that ``token`` makes final ('' if none yet)."""
        self.tokens.append(token)
        self.ended = self.ended or token in self.eos
        now = self._text()
        if now.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        if self.clean:
            now = now[: max(now.rfind(" "), 0)]
        if len(now) > len(self.said) and now.startswith(self.said):
            piece, self.said = now[len(self.said):], now
            return piece
        return ""

    def flush(self) -> str:
        """The rest of the text, once no more ids come."""
        final = self._text()
        if not final.startswith(self.said):  # cannot happen with Hugging Face's clean-up rules; say so if it does
            raise RuntimeError(f"streamed text {self.said!r} is not a prefix of the decoded text {final!r}")
        piece, self.said = final[len(self.said):], final
        return piece
