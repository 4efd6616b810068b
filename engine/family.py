"""The door a model family comes in by: one :class:`Family` per model file, and one typed contract per kind.

Each module under ``trifuse.engine.models`` ends with ``FAMILY = Family(...)``: what the rest
of trifuse needs to know about it. The registry (``engine.registry.FAMILY_MODULES``) lists
the modules; ``from_pretrained``, ``trifuse check``, the ONNX export and verify, the CUDA-graph
wrappers, the pipelines and the benchmarks read the contract and switch on a family's
``kind`` (never on its name), so a new family touches its model file, its tests and one line
of registration.

What a model of each kind must provide is a :class:`typing.Protocol` below, written from what
the shared code calls: :class:`TextEncoder` (``encoder``, the BERT family), :class:`VisionEncoder`
(``vision``, ViT and DeiT), :class:`CausalDecoder` (``decoder``, decoder-only, e.g. GPT-2) and
:class:`EncoderDecoder` (``seq2seq``, e.g. T5 and BART), all on top of :class:`Model`.
:func:`conformance` checks a model class (or a built model) against its kind's protocol, names
and signatures both (``tests/test_family.py`` runs it on every family). The generative kinds get
``generate`` / ``stream`` from :class:`engine.decoding.Decoding`; the methods with a leading
underscore are the hooks that shared code (``engine.decoding``, ``engine.cache``,
``engine.graphs``) calls back into the model file.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Protocol, Tuple, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from .decoding import Prefill

ENCODER, DECODER, SEQ2SEQ, VISION = "encoder", "decoder", "seq2seq", "vision"
KINDS = (ENCODER, DECODER, SEQ2SEQ, VISION)


@dataclass(frozen=True)
class Family:
    """A model family's contract with the rest of trifuse."""

    #: Short name (``"bert"``, ``"gpt2"``, ...): messages and the bench report's family column.
    name: str
    #: ``encoder``, ``decoder``, ``seq2seq`` or ``vision``.
    kind: str
    #: The Hugging Face ``model_type``s this module builds.
    model_types: Tuple[str, ...]
    #: The ``nn.Module`` class(es) it builds (``family_of`` recognizes a model by them).
    model_classes: Tuple[type, ...]
    #: ``from_checkpoint(config: dict, state: dict, *, task, dtype, device) -> nn.Module``.
    from_checkpoint: Callable
    #: trifuse task -> the ``transformers`` class holding the same head (``trifuse check``,
    #: the benchmarks' references).
    hf_classes: Mapping[str, str]
    #: ``model_type`` -> Hugging Face's config-class defaults for every key the family reads, so
    #: a ``config.json`` without one means what it means to Hugging Face.
    config_defaults: Mapping[str, Mapping]
    #: ``example_inputs(model, batch, seq, seed) -> dict``: keyword inputs both trifuse and
    #: Hugging Face's model take (mixed lengths, padded; on ``model.device``).
    example_inputs: Callable
    #: ``model_type`` -> Hugging Face's ``attribute_map`` (e.g. GPT-2's ``n_embd`` is ``hidden_size``).
    config_aliases: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: Output fields holding the hidden states, one per stack (``trifuse check``'s layer walk).
    hidden_streams: Tuple[str, ...] = ("hidden_states",)
    #: Named sizes: name -> ``config.json`` dict (random weights; no hub at run time). The
    #: benchmarks build them (the main job's plan of which it runs: ``bench/default.py``).
    named_sizes: Dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"family {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @property
    def generative(self) -> bool:
        return self.kind in (DECODER, SEQ2SEQ)

    @property
    def protocol(self) -> type:
        """What this family's models must provide: its kind's :class:`typing.Protocol`."""
        return PROTOCOLS[self.kind]


# ----------------------------------------------------------------------------
# What a model of each kind provides. Bodies are ``...``: these are types, checked by
# ``conformance`` (names and signatures) and ``isinstance`` (names, on a built model).


@runtime_checkable
class Model(Protocol):
    """Every family's model: an ``nn.Module`` whose ``forward`` takes Hugging Face's keyword names."""

    #: The family's frozen config dataclass (``from_hf(config_dict)``).
    config: Any
    #: The trifuse task it was built for (``"feature-extraction"``, ``"causal-lm"``, ...).
    task: str
    #: Hugging Face's ``model_type`` (``"bert"``, ``"gpt2"``, ...).
    model_type: str

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def num_hidden_states(self, stack: str = "model") -> int:
        """How many hidden states ``output_hidden_states=True`` returns for ``stack`` (``"model"``, or
        ``"encoder"`` / ``"decoder"``)."""

    def parameters(self, recurse: bool = True): ...


@runtime_checkable
class TextEncoder(Model, Protocol):
    """``encoder``: BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA. Pipelines, ``trifuse check``, the ONNX
    encoder graph and :class:`engine.graphs.BucketedModel` call it."""

    #: The task head (``None``: feature extraction) and the pooler (``None``: none); the ONNX graph's
    #: outputs follow them.
    head: Optional[nn.Module]
    pooler: Optional[nn.Module]

    @property
    def uses_token_type_ids(self) -> bool: ...

    @property
    def id2label(self) -> Optional[dict]: ...

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                output_hidden_states: bool = False, output_attentions: bool = False): ...

    def _check(self, input_ids: Tensor, attention_mask: Optional[Tensor], token_type_ids: Optional[Tensor],
               position_ids: Optional[Tensor]) -> None:
        """Raise ``ValueError`` for inputs ``forward`` cannot take (the bucketed runs check before padding)."""


@runtime_checkable
class VisionEncoder(Model, Protocol):
    """``vision``: ViT and DeiT. The image pipeline, ``trifuse check`` and the ONNX vision graph call it."""

    head: Optional[nn.Module]
    pooler: Optional[nn.Module]

    @property
    def id2label(self) -> Optional[dict]: ...

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False,
                output_hidden_states: bool = False, output_attentions: bool = False): ...


@runtime_checkable
class Generative(Model, Protocol):
    """What both generative kinds provide: :class:`engine.decoding.Decoding`'s front-end (``generate``,
    ``stream``) and what it, the static decoders (:mod:`engine.graphs`) and the ONNX decoder graphs call."""

    #: Whether lengths count from the decoder start token (encoder-decoder) or the prompt, as in HF.
    is_encoder_decoder: bool
    #: The decoder's position limit (``None``: none).
    max_decoder_positions: Optional[int]

    @property
    def has_lm_head(self) -> bool: ...

    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor: ...

    def stream(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs): ...

    def start_decoding(self, input_ids: Tensor, mask: Tensor, *, num_beams: int, max_new_tokens: int,
                       start_token: Optional[int], cache=None) -> Prefill:
        """Run the prompt (and an encoder-decoder's encoder) into a cache: a :class:`engine.decoding.Prefill`."""

    def decode_step(self, tokens: Tensor, positions: Optional[Tensor], slot: Tensor, cache, kv_len: int) -> Tensor:
        """One decoding step with no read back to the host (CUDA graphs replay it): the next logits ``[B, V]``."""

    def new_cache(self, batch: int, max_len: int): ...

    def new_static_cache(self, rows: int, max_len: int, *, encoder_length: Optional[int]):
        """A fixed-capacity, zero-filled cache for static decoding; ``encoder_length``: an encoder-decoder's
        encoder buffers (a decoder-only model ignores it)."""

    def cache_shape(self) -> Tuple[int, int, int]:
        """``(layers, heads, head_dim)`` of the self-attention cache (the ONNX graphs' past inputs)."""

    def _check_generation(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> None:
        """Raise ``ValueError`` for a model that cannot generate or inputs it cannot take."""


@runtime_checkable
class CausalDecoder(Generative, Protocol):
    """``decoder``: decoder-only models (GPT-2)."""

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values=None, use_cache: bool = False,
                output_hidden_states: bool = False): ...

    def export_forward(self, input_ids: Tensor, attention_mask: Tensor, cache, past_length,
                       output_hidden_states: bool = False):
        """The ONNX decoder graph's forward: ``(logits or last hidden state, hidden states or None)``."""


@runtime_checkable
class EncoderDecoder(Generative, Protocol):
    """``seq2seq``: encoder-decoders (T5, BART), on :class:`engine.decoding.EncoderDecoderDecoding`."""

    #: The decoder stack; ``decoder.project_encoder(hidden)`` gives every layer's cross keys/values.
    decoder: Any

    @property
    def has_decoder(self) -> bool: ...

    @property
    def cross_width(self) -> int:
        """The last dimension of ``cross_key_values`` (every decoder layer's keys and values)."""

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                decoder_input_ids: Optional[Tensor] = None, decoder_attention_mask: Optional[Tensor] = None,
                encoder_outputs=None, past_key_values=None, use_cache: bool = False,
                output_hidden_states: bool = False): ...

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               output_hidden_states: bool = False): ...

    def cross_key_values(self, encoder_hidden_state: Tensor) -> Tensor: ...

    def export_encode(self, input_ids: Tensor, attention_mask: Tensor, output_hidden_states: bool = False):
        """The ONNX encoder graph's forward: ``(hidden state, cross keys/values or None, hidden states or None)``."""

    def export_decode(self, decoder_input_ids: Tensor, decoder_attention_mask: Tensor,
                      encoder_attention_mask: Tensor, cross_key_values: Tensor, cache, past_length,
                      output_hidden_states: bool = False):
        """The ONNX decoder graph's forward."""

    def _decode(self, ids: Tensor, decoder_attention_mask: Optional[Tensor], cross_kv: Tensor,
                enc_mask: Optional[Tensor], cache, start: int, output_hidden_states: bool = False):
        """The decoder stack on ``ids`` through ``cache``: ``(hidden state, hidden states or None)``."""

    def _logits(self, x: Tensor) -> Tensor: ...

    def _check_mask(self, name: str, mask: Optional[Tensor], shapes: list) -> None: ...


#: Each kind's protocol.
PROTOCOLS: Dict[str, type] = {ENCODER: TextEncoder, VISION: VisionEncoder, DECODER: CausalDecoder,
                              SEQ2SEQ: EncoderDecoder}


def _members(protocol: type) -> Dict[str, Any]:
    """A protocol's members, its bases' included: name -> the function or property, or ``None`` for
    a data member (an annotation)."""
    members: Dict[str, Any] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        for name in getattr(klass, "__annotations__", {}):
            members.setdefault(name, None)
        for name, value in vars(klass).items():
            if isinstance(value, property) or (inspect.isfunction(value) and name not in _PROTOCOL_MACHINERY):
                members[name] = value
    return members


_MISSING = object()
_PROTOCOL_MACHINERY = {"__init__", "__subclasshook__", "__class_getitem__", "__init_subclass__"}


def _signature_problems(want: inspect.Signature, have: inspect.Signature) -> List[str]:
    """Why ``have`` cannot stand in for ``want`` (both without ``self``): every call ``want`` admits must bind."""
    problems = []
    params = list(have.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    has_args = any(p.kind is p.VAR_POSITIONAL for p in params)
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    covered = set()
    for i, p in enumerate(q for q in want.parameters.values()):
        if p.kind is p.VAR_KEYWORD:
            if not has_kwargs:
                problems.append("takes no **kwargs")
            continue
        if p.kind is p.VAR_POSITIONAL:
            if not has_args:
                problems.append("takes no *args")
            continue
        if p.kind is p.POSITIONAL_OR_KEYWORD:
            if i < len(positional) and positional[i].name == p.name:
                got = positional[i]
            elif has_args and has_kwargs:
                continue
            else:
                problems.append(f"parameter {i + 1} should be {p.name!r}")
                continue
        else:  # keyword-only
            got = named.get(p.name)
            if got is None:
                if not has_kwargs:
                    problems.append(f"takes no keyword {p.name!r}")
                continue
        covered.add(got.name)
        if p.default is not p.empty and got.default is got.empty:
            problems.append(f"{p.name!r} needs a default (callers leave it out)")
    for p in params:
        if p.name not in covered and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is p.empty:
            problems.append(f"requires {p.name!r}, which callers do not pass")
    return problems


def _without_self(sig: inspect.Signature) -> inspect.Signature:
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def conformance(model, protocol: type) -> List[str]:
    """What ``model`` (a class, or a built model) lacks to satisfy ``protocol``: missing members, a method
    where a property is promised (or the reverse), signatures that cannot take the protocol's calls.
    Data members set in ``__init__`` are checked on a built model only. ``[]``: it conforms."""
    cls = model if isinstance(model, type) else type(model)
    problems = []
    built = not isinstance(model, type)
    for name, want in _members(protocol).items():
        static = inspect.getattr_static(cls, name, _MISSING)
        if static is _MISSING:
            # An instance attribute (``nn.Module`` keeps submodules in ``_modules``): a built model's only.
            if (want is not None or built) and not (built and hasattr(model, name)):
                problems.append(f"{name}: missing")
            continue
        if isinstance(want, property):
            if inspect.isfunction(static) or isinstance(static, (staticmethod, classmethod)):
                problems.append(f"{name}: a method, but the protocol promises a property")
        elif inspect.isfunction(want):
            if isinstance(static, property) or not callable(getattr(cls, name, None) if isinstance(model, type)
                                                            else getattr(model, name, None)):
                problems.append(f"{name}: not a method")
                continue
            impl = inspect.signature(static.__func__ if isinstance(static, staticmethod) else static)
            have = impl if isinstance(static, staticmethod) else _without_self(impl)
            problems += [f"{name}: {p}" for p in _signature_problems(_without_self(inspect.signature(want)), have)]
    return problems
