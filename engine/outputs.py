"""Model outputs with Hugging Face's field names.

Fields read as attributes (``out.logits``), keys (``out["logits"]``) or positions
(``out[0]``, ``to_tuple()``); unset optional fields are ``None`` and left out of
``keys()`` and of the positions, as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator, Optional, Tuple, Union

from torch import Tensor


class ModelOutput:
    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def items(self) -> Iterator[Tuple[str, Any]]:
        return ((k, getattr(self, k)) for k in self.keys())

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def __getitem__(self, key: Union[str, int, slice]) -> Any:
        """``out["logits"]`` by name; ``out[0]`` / ``out[:2]`` by position among the set fields (as in HF)."""
        if isinstance(key, (int, slice)) and not isinstance(key, bool):
            return self.to_tuple()[key]
        if not isinstance(key, str):
            raise TypeError(f"{type(self).__name__} is indexed by field name or position, got {key!r}")
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

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
