"""Text -> token ids through the ``tokenizers`` library, with Hugging Face's conventions.

:class:`Tokenizer` reads a checkpoint's ``tokenizer.json`` (the fast tokenizer Hugging
Face saves) plus ``tokenizer_config.json`` / ``special_tokens_map.json`` for the special
tokens, ``model_max_length``, ``padding_side`` and ``clean_up_tokenization_spaces``.
Nothing here imports transformers when ``tokenizer.json`` is present; a checkpoint that
ships only slow-tokenizer files (sentencepiece ``spiece.model``, GPT-2's
``vocab.json`` + ``merges.txt``, BERT's ``vocab.txt``) is converted once through
transformers, which must then be installed.

Encoding follows ``PreTrainedTokenizerFast``: truncation is the backend's
(``longest_first`` / ``only_first`` / ``only_second``, ``stride`` overlap and the
overflowing windows flattened after their first, as ``return_overflowing_tokens=True``
returns them); :meth:`Tokenizer.pad` builds the ``[B, L]`` tensors on either side.
Decoding is the backend's ``decode`` plus Hugging Face's ``clean_up_tokenization``
when the checkpoint asks for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

#: Hugging Face's "no limit" (``VERY_LARGE_INTEGER``); a config above it has no real maximum.
_UNLIMITED = int(1e30)
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(token) -> Optional[str]:
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict):
        return token.get("content")
    return str(token)


def clean_up_tokenization(text: str) -> str:
    """Hugging Face's ``PreTrainedTokenizerBase.clean_up_tokenization``: no space before punctuation."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer:
    """A checkpoint's fast tokenizer. ``Tokenizer.from_pretrained(path)``."""

    def __init__(self, backend, config: Optional[dict] = None):
        self.backend = backend
        config = dict(config or {})
        self.config = config
        for name in _SPECIAL:
            setattr(self, name, _content(config.get(name)))
        limit = config.get("model_max_length")
        self.model_max_length = int(limit) if isinstance(limit, (int, float)) and limit < _UNLIMITED else _UNLIMITED
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.backend.no_padding()
        self.backend.no_truncation()

    # -- loading ----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: Union[str, Path]) -> "Tokenizer":
        path = Path(path)
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in HF
            f = path / name
            if f.is_file():
                config.update({k: v for k, v in json.loads(f.read_text()).items() if v is not None})
        if (path / "tokenizer.json").is_file():
            from .extras import require

            require("trifuse's tokenization (pipelines)", "hf", "tokenizers")
            from tokenizers import Tokenizer as Backend

            return cls(Backend.from_file(str(path / "tokenizer.json")), config)
        return cls._from_slow_files(path, config)

    @classmethod
    def _from_slow_files(cls, path: Path, config: dict) -> "Tokenizer":
        slow = [n for n in ("spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")
                if (path / n).is_file()]
        if not slow:
            raise FileNotFoundError(f"{path}: no tokenizer (tokenizer.json, spiece.model, vocab.json + merges.txt "
                                    f"or vocab.txt)")
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(f"{path} has only slow-tokenizer files ({', '.join(slow)}); converting them needs "
                              f"transformers (pip install transformers), or save the checkpoint with a "
                              f"tokenizer.json") from e
        hf = AutoTokenizer.from_pretrained(str(path))
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"{path}: transformers could not convert {', '.join(slow)} to a fast tokenizer")
        for name in _SPECIAL:
            config.setdefault(name, getattr(hf, name, None))
        config.setdefault("model_max_length", hf.model_max_length)
        config.setdefault("padding_side", hf.padding_side)
        return cls(hf.backend_tokenizer, config)

    # -- vocabulary ---------------------------------------------------------------

    def token_to_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.backend.id_to_token(int(i))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Tokens back to text through the backend's decoder (Hugging Face's fast-tokenizer rule)."""
        decoder = self.backend.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    def get_vocab(self) -> Dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __getattr__(self, name: str):
        if name.endswith("_token_id") and name[: -len("_id")] in _SPECIAL:
            return self.token_to_id(getattr(self, name[: -len("_id")]))
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def continuing_subword_prefix(self) -> Optional[str]:
        return getattr(self.backend.model, "continuing_subword_prefix", None)

    @property
    def all_special_ids(self) -> set:
        ids = {self.token_to_id(getattr(self, n)) for n in _SPECIAL}
        return {i for i in ids if i is not None}

    # -- encoding -----------------------------------------------------------------

    def encode(self, texts: Sequence, pairs: Optional[Sequence] = None, *, add_special_tokens: bool = True,
               truncation: Union[bool, str, None] = None, max_length: Optional[int] = None, stride: int = 0,
               overflow: bool = False, is_split_into_words: bool = False) -> list:
        """``tokenizers.Encoding`` per text (and pair). With ``overflow``, each text's
        overflowing windows follow it in a list: ``[[first, *overflowing], ...]``.

        ``truncation``: ``True``/``"longest_first"``, ``"only_first"``, ``"only_second"``
        or ``None``/``False``; ``max_length`` defaults to ``model_max_length`` as in HF.
        """
        _check_count("max_length", max_length, 1)
        _check_count("stride", stride, 0)
        if truncation not in (None, False, True, "longest_first", "only_first", "only_second", "do_not_truncate"):
            raise ValueError(f"truncation must be True, False, 'longest_first', 'only_first' or 'only_second', "
                             f"got {truncation!r}")
        texts = list(texts)
        pairs = None if pairs is None else list(pairs)
        if truncation in (True, "longest_first", "only_first", "only_second"):
            strategy = "longest_first" if truncation is True else truncation
            limit = self.model_max_length if max_length is None else max_length
            if limit >= _UNLIMITED:  # no limit known: transformers warns and does not truncate
                self.backend.no_truncation()
            else:
                if pairs is not None or stride or strategy == "only_second":
                    self._check_room(texts, pairs, strategy, limit, stride, add_special_tokens, is_split_into_words)
                self.backend.enable_truncation(limit, stride=stride, strategy=strategy,
                                               direction=self.truncation_side)
        else:
            self.backend.no_truncation()
        try:
            inputs = texts if pairs is None else list(zip(texts, pairs))
            encs = self.backend.encode_batch(inputs, add_special_tokens=add_special_tokens,
                                             is_pretokenized=is_split_into_words)
        except BaseException as e:  # tokenizers' Rust panics are BaseExceptions (pyo3's PanicException)
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            raise ValueError(f"the tokenizer could not encode these inputs: {str(e).splitlines()[0]}") from None
        finally:
            self.backend.no_truncation()
        if overflow:
            return [[e, *e.overflowing] for e in encs]
        return encs

    def _check_room(self, texts, pairs, strategy, limit, stride, add_special_tokens, pretokenized) -> None:
        """Truncating to ``limit`` tokens leaves each window ``limit`` minus the special tokens (minus the
        other side of a pair when one side is cut); tokenizers panics (a Rust backtrace, a
        ``BaseException``) when ``stride`` does not fit in that room. Say so first, as a ``ValueError``."""
        special = self.backend.num_special_tokens_to_add(pairs is not None) if add_special_tokens else 0
        lengths = [[len(e.ids) for e in self.backend.encode_batch(side, add_special_tokens=False,
                                                                  is_pretokenized=pretokenized)]
                   for side in ((texts,) if pairs is None else (texts, pairs))]
        if pairs is None:  # one sequence: the window is what the special tokens leave of max_length
            room = limit - special
            for n in lengths[0]:
                if n > room and strategy == "only_second":
                    raise ValueError(f"truncation='only_second' cuts the second of a pair; this input is one "
                                     f"sequence of {n} tokens, over max_length {limit}")
                if n > room and stride >= room:
                    raise ValueError(f"stride {stride} must be smaller than the {max(room, 0)} tokens each window "
                                     f"holds (max_length {limit} - {special} special tokens)")
            return
        names = ("first sequence", "second sequence")
        for a, b in zip(*lengths):
            n = (a, b)
            if a + b + special <= limit:
                continue  # nothing to cut
            if strategy == "longest_first":
                _check_longest_first(n, limit - special, stride)
                continue
            cut, kept = (0, 1) if strategy == "only_first" else (1, 0)
            room = limit - special - n[kept]
            if room <= 0:
                raise ValueError(f"max_length {limit} leaves no room for the {names[cut]}: the {names[kept]} "
                                 f"takes {n[kept]} tokens and the special tokens {special}")
            if stride >= room:
                raise ValueError(f"stride {stride} must be smaller than the {room} tokens of the {names[cut]} each "
                                 f"window holds (max_length {limit} - {n[kept]} of the {names[kept]} - {special} "
                                 f"special tokens)")

    def pad(self, encodings: Sequence, *, side: Optional[str] = None, device=None, type_ids: bool = True,
            pad_id: Optional[int] = None) -> Dict[str, Tensor]:
        """``input_ids``, ``attention_mask`` (and ``token_type_ids``) ``[B, L]`` padded to the longest,
        with ``pad_id`` (default: the pad token; 0 when there is none, always under a zero mask)."""
        side = side or self.padding_side
        n = max((len(e.ids) for e in encodings), default=0)
        pad = self.pad_token_id if pad_id is None else pad_id
        if pad is None:
            pad = 0
        ids = torch.full((len(encodings), n), pad, dtype=torch.long)
        mask = torch.zeros((len(encodings), n), dtype=torch.long)
        types = torch.zeros((len(encodings), n), dtype=torch.long)
        for i, e in enumerate(encodings):
            k = len(e.ids)
            sl = slice(n - k, n) if side == "left" else slice(0, k)
            ids[i, sl] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, sl] = 1
            types[i, sl] = torch.tensor(e.type_ids, dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        if type_ids:
            out["token_type_ids"] = types
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    # -- decoding -----------------------------------------------------------------

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: Optional[bool] = None) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text


def _check_longest_first(n: tuple, room: int, stride: int) -> None:
    """tokenizers' ``longest_first`` split of ``room`` tokens between a pair (its ``truncate_encodings``):
    each side cut to a length that ``stride`` must stay below, or the library panics."""
    if room <= 0:
        return  # tokenizers keeps nothing of either side then: no stride check
    short, long = sorted(n)
    short_to = short if short <= room else room
    long_to = short_to if short > room else max(short_to, room - short_to)
    if short_to + long_to > room:
        short_to, long_to = room // 2, room // 2 + room % 2
    targets = (short_to, long_to) if n[0] <= n[1] else (long_to, short_to)
    for side, (length, target) in enumerate(zip(n, targets)):
        if 0 < target < length and stride >= target:
            raise ValueError(f"stride {stride} must be smaller than the {target} tokens the "
                             f"{('first', 'second')[side]} sequence keeps per window when the pair is truncated "
                             f"to {room} tokens (longest first)")


def _check_count(name: str, value, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
