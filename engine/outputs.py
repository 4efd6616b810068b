"""Model outputs with Hugging Face's field names.

Fields read as attributes (``out.logits``) or keys (``out["logits"]``); unset
optional fields are ``None`` and left out of ``keys()``, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator, Optional, Tuple

from torch import Tensor


class ModelOutput:
    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def items(self) -> Iterator[Tuple[str, Any]]:
        return ((k, getattr(self, k)) for k in self.keys())

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str):
            raise TypeError(f"{type(self).__name__} is indexed by field name, e.g. out['logits']")
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def to_tuple(self) -> tuple:
        return tuple(v for _, v in self.items())


@dataclass
class EncoderOutput(ModelOutput):
    last_hidden_state: Tensor
    pooler_output: Optional[Tensor] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    attentions: Optional[Tuple[Tensor, ...]] = None


@dataclass
class LogitsOutput(ModelOutput):
    """Sequence and token classification, masked-LM."""

    logits: Tensor
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    attentions: Optional[Tuple[Tensor, ...]] = None


@dataclass
class QuestionAnsweringOutput(ModelOutput):
    start_logits: Tensor
    end_logits: Tensor
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    attentions: Optional[Tuple[Tensor, ...]] = None
