"""GPT-2 on trifuse's kernels: a causal LM with a preallocated KV cache and generation.

* Pre-LN blocks (:class:`~engine.layers.PreLNBlock`) with every residual add
  fused into the next LayerNorm; the position embeddings ride into the first
  LayerNorm the same way.
* One fused ``[3H, H]`` QKV projection (GPT-2's ``c_attn`` already is one);
  GPT-2's ``Conv1D`` weights are ``[in, out]`` and are transposed explicitly
  when loading.
* :class:`KVCache` is allocated once for a maximum length: each forward writes
  its keys and values in place and attends over a strided view of the filled
  part (``kernels.attention`` takes any strides; one new token against a long
  cache runs its split-K decode path). The cache keeps the attention mask too.
* Without ``position_ids``, positions follow the mask as in Hugging Face's
  ``generate``: ``cumsum(mask) - 1`` over everything seen so far, 0 on masked
  slots, so a left-padded row numbers its real tokens from 0.
* A padded prompt with nothing cached (a forward, ``generate``'s prefill) runs packed when
  :func:`engine.packing.plan` says it pays: the padding is dropped at the embeddings, every
  block runs on ``[total_tokens, hidden]`` with causal ``kernels.attention_varlen``, the real
  tokens' keys/values land in the cache slots the padded run fills (zeros in the padded
  slots, which stay masked), and the returned states and logits hold zeros at padded positions.
* ``generate`` / ``stream`` are :mod:`engine.decoding`'s, shared by every decoder:
  greedy, sampling, beam search, with Hugging Face's semantics.

Reference semantics: Hugging Face transformers' ``modeling_gpt2.py`` and
``generation/utils.py``; the checkpoint names below are theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from trifuse import kernels

from .. import generation as gen
from .. import inputs
from ..cache import KVCache, self_attention_mask
from ..decoding import Decoding, Prefill
from ..family import DECODER, Family
from ..layers import Attention, LayerNorm, PreLNBlock, check_activation, lm_head
from ..loading import assemble_state, load_into, module_keys
from ..outputs import ModelOutput
from ..packing import plan

TASKS = ("causal-lm", "feature-extraction")
_ARCH_TASKS = {"GPT2LMHeadModel": "causal-lm", "GPT2Model": "feature-extraction"}
# Heads of GPT-2 classes we do not build; their backbone still loads with task="feature-extraction".
_OTHER_HEADS = ("score.", "multiple_choice_head.", "classifier.", "qa_outputs.")


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    eos_token_id: Tuple[int, ...] = ()
    pad_token_id: Optional[int] = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def attn_scale(self, layer: int) -> float:
        scale = self.head_dim ** -0.5 if self.scale_attn_weights else 1.0
        return scale / (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale

    @classmethod
    def from_hf(cls, cfg: dict) -> "GPT2Config":
        if cfg.get("model_type") != "gpt2":
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not gpt2")
        if cfg.get("add_cross_attention"):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported")
        get = lambda *names, default=None: next((cfg[n] for n in names if cfg.get(n) is not None), default)  # noqa: E731
        n_embd = get("n_embd", "hidden_size")
        n_head = get("n_head", "num_attention_heads")
        eos = cfg.get("eos_token_id")
        c = cls(vocab_size=cfg["vocab_size"], n_positions=get("n_positions", "max_position_embeddings"),
                n_embd=n_embd, n_layer=get("n_layer", "num_hidden_layers"), n_head=n_head,
                n_inner=cfg.get("n_inner") or 4 * n_embd,
                activation_function=cfg.get("activation_function", "gelu_new"),
                layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
                scale_attn_weights=cfg.get("scale_attn_weights", True),
                scale_attn_by_inverse_layer_idx=cfg.get("scale_attn_by_inverse_layer_idx", False),
                tie_word_embeddings=cfg.get("tie_word_embeddings", True),
                eos_token_id=gen._eos_tuple(eos) if eos is not None else (),
                pad_token_id=cfg.get("pad_token_id"))
        check_activation(c.activation_function)
        if c.n_embd % c.n_head:
            raise ValueError(f"n_embd {c.n_embd} is not divisible by n_head {c.n_head}")
        if not kernels.MIN_HEAD_DIM <= c.head_dim <= kernels.MAX_HEAD_DIM:
            raise ValueError(f"head dim {c.head_dim} (n_embd {c.n_embd} / n_head {c.n_head}) is outside the "
                             f"attention kernel's {kernels.MIN_HEAD_DIM}..{kernels.MAX_HEAD_DIM}")
        return c


@dataclass
class CausalLMOutput(ModelOutput):
    logits: Optional[Tensor] = None
    past_key_values: Optional["KVCache"] = None
    last_hidden_state: Optional[Tensor] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None


# ----------------------------------------------------------------------------
# The model.


class GPT2Model(Decoding, nn.Module):
    """GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model``); call it like the Hugging Face model."""

    def __init__(self, c: GPT2Config, task: str = "causal-lm", untied_head: bool = False):
        super().__init__()
        self.config, self.task = c, task
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.n_positions, c.n_embd)
        self.layers = nn.ModuleList(
            PreLNBlock(c.n_embd, c.n_inner, c.activation_function, c.layer_norm_epsilon,
                       Attention(c.n_embd, c.n_head, causal=True, scale=c.attn_scale(i), layer=i))
            for i in range(c.n_layer))
        self.ln_f = LayerNorm(c.n_embd, c.layer_norm_epsilon)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False) if untied_head else None

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def has_lm_head(self) -> bool:
        return self.task == "causal-lm"

    model_type = "gpt2"

    def num_hidden_states(self, stack: str = "model") -> int:
        return self.config.n_layer + 1

    def cache_shape(self) -> Tuple[int, int, int]:
        """``(layers, heads, head_dim)`` of the KV cache."""
        c = self.config
        return c.n_layer, c.n_head, c.head_dim

    def export_forward(self, input_ids: Tensor, attention_mask: Tensor, cache, past_length,
                       output_hidden_states: bool = False) -> Tuple[Tensor, Optional[list]]:
        """The ONNX decoder graph's forward (:mod:`export.onnx`): ``attention_mask`` ``[B, P + n]`` covers
        the ``P = past_length`` positions in ``cache`` (any object with ``update(layer, start, k, v) ->
        (keys, values)``, e.g. a concatenating one) and the ``n`` new tokens; positions follow it as in
        :meth:`forward`. Returns ``(logits, or the last hidden state without an LM head; hidden states
        or None)``."""
        mask = attention_mask.ne(0)
        pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)[:, past_length:]
        h, pending = self.wte(input_ids), self.wpe(pos)
        hidden = [h + pending] if output_hidden_states else None
        for block in self.layers:
            h, pending, _ = block(h, pending, mask, cache=cache)
            if hidden is not None:
                hidden.append(h + pending)
        x, _ = self.ln_f(pending, residual=h)
        if hidden is not None:
            hidden[-1] = x  # as the model: the last hidden state is after the final LayerNorm
        return (self._lm_logits(x) if self.has_lm_head else x), hidden

    def new_cache(self, batch: int, max_len: Optional[int] = None) -> KVCache:
        """An empty cache for ``batch`` rows and up to ``max_len`` positions (default: the position table)."""
        c = self.config
        max_len = c.n_positions if max_len is None else max_len
        if not 0 < max_len <= c.n_positions:
            raise ValueError(f"max_len must lie in [1, {c.n_positions}] (the position table), got {max_len}")
        return KVCache(batch, c.n_layer, c.n_head, max_len, c.head_dim, self.dtype, self.device)

    # -- checks ---------------------------------------------------------------

    def _check(self, input_ids, attention_mask, position_ids, cache: Optional[KVCache]) -> None:
        c = self.config
        if (not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point()
                or input_ids.dtype == torch.bool):
            got = (f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"input_ids must be an integer tensor of shape [batch, seq], got {got}")
        b, n = input_ids.shape
        if b == 0 or n == 0:
            raise ValueError(f"input_ids is empty (shape {(b, n)}): batch size and sequence length must be >= 1")
        start = 0
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"past_key_values must be a trifuse KVCache (model.new_cache(...) or a previous "
                                f"output's past_key_values), got {type(cache).__name__}")
            if cache.batch_size != b:
                raise ValueError(f"past_key_values holds {cache.batch_size} rows but input_ids has {b}")
            start = cache.length
        if position_ids is None and start + n > c.n_positions:
            raise ValueError(f"sequence length {start + n} ({start} cached + {n} new) exceeds the position table "
                             f"({c.n_positions} positions)")
        if attention_mask is not None and tuple(attention_mask.shape) not in ((b, n), (b, start + n)):
            want = f"{(b, n)}" + (f" (new tokens) or {(b, start + n)} (cached + new)" if start else "")
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {want}")
        if position_ids is not None and tuple(position_ids.shape) != (b, n):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {(b, n)} like input_ids")
        if torch.compiler.is_compiling() or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            return  # the value checks below would synchronize or break the graph
        if input_ids.min() < 0 or input_ids.max() >= c.vocab_size:
            raise ValueError(f"token ids must lie in [0, {c.vocab_size}); got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if position_ids is not None and (position_ids.min() < 0 or position_ids.max() >= c.n_positions):
            raise ValueError(f"position_ids must lie in [0, {c.n_positions})")

    # -- forward --------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, output_hidden_states: bool = False,
                logits_to_keep: int = 0) -> CausalLMOutput:
        """Logits (``causal-lm``) and the last hidden state for ``input_ids`` ``[B, n]``.

        ``attention_mask``: ``[B, n]`` for the new tokens, or ``[B, cached + n]``
        (Hugging Face's convention), 1 = attend; left padding is fine.
        ``past_key_values``: a :class:`KVCache` to continue (it is updated in
        place and returned); ``use_cache=True`` without one starts a new cache.
        ``logits_to_keep``: only the last that many positions get logits (0: all).
        """
        self._check(input_ids, attention_mask, position_ids, past_key_values)
        cache = past_key_values
        if cache is None and use_cache:
            b, n = input_ids.shape
            cap = min(self.config.n_positions, max(n, 64))
            cache = self.new_cache(b, cap)
        return self._forward(input_ids, attention_mask, position_ids, cache, output_hidden_states, logits_to_keep)

    def _positions_and_mask(self, input_ids: Tensor, attention_mask: Optional[Tensor],
                            cache: Optional[KVCache], start: int) -> Tuple[Tensor, Optional[Tensor]]:
        """Position ids following the mask (Hugging Face ``generate``'s rule) and the kernel's mask."""
        b, n = input_ids.shape
        end = start + n
        mask = self_attention_mask(attention_mask, cache, start, n)
        if mask is None:
            return torch.arange(start, end, device=input_ids.device).expand(b, n), None
        pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
        return pos[:, start:], mask

    def _forward(self, input_ids: Tensor, attention_mask: Optional[Tensor], position_ids: Optional[Tensor],
                 cache: Optional[KVCache], output_hidden_states: bool = False,
                 logits_to_keep: int = 0) -> CausalLMOutput:
        b, n = input_ids.shape
        start = 0 if cache is None else cache.length
        if cache is not None:
            cache.ensure_capacity(start + n, limit=self.config.n_positions)
        pos, mask = self._positions_and_mask(input_ids, attention_mask, cache, start)
        if position_ids is not None:
            pos = position_ids
        # A padded prompt with nothing cached runs padding-free when it pays (engine.packing).
        packed = plan(attention_mask, decoder=True) if start == 0 else None
        if packed is not None:
            input_ids, pos, mask = packed.unpad(input_ids), packed.unpad(pos), packed
        # The position embeddings are the first block's pending residual: added inside its LayerNorm.
        h, pending = self.wte(input_ids), self.wpe(pos)
        hidden = [h + pending] if output_hidden_states else None
        for block in self.layers:
            h, pending, _ = block(h, pending, mask, cache=cache, start=start)
            if hidden is not None:
                hidden.append(h + pending)
        x, _ = self.ln_f(pending, residual=h)
        if cache is not None:
            cache.length = start + n
        if hidden is not None:
            hidden[-1] = x  # Hugging Face's last hidden state is after the final LayerNorm
        logits = None
        if packed is not None:  # back to [B, n, ...], zeros at padded positions
            packed_x, x = x, packed.pad(x)
            hidden = None if hidden is None else [packed.pad(t) for t in hidden]
            if self.has_lm_head and not logits_to_keep:
                logits = packed.pad(self._lm_logits(packed_x))  # the head on real tokens only
        if self.has_lm_head and logits is None:
            # contiguous: a strided [B, k, H] slice sends F.linear to a batched matmul (~9x slower on the CPU)
            logits = self._lm_logits((x[:, -logits_to_keep:] if logits_to_keep else x).contiguous())
        return CausalLMOutput(logits=logits, past_key_values=cache, last_hidden_state=x,
                              hidden_states=tuple(hidden) if hidden is not None else None)

    def decode_step(self, tokens: Tensor, positions: Tensor, slot: Tensor, cache: KVCache, kv_len: int) -> Tensor:
        """One decoding step with no host reads, for CUDA graphs: the next-token logits ``[B, V]``.

        ``tokens``, ``positions``: ``[B, 1]`` long, the new token of each row and its
        position id; ``slot``: one-element long tensor, the cache position it is
        written to. Attention covers the first ``kv_len`` cache slots through
        ``cache.mask``, whose slots from ``slot`` on must be False (masked) on entry.
        The step sets the mask at ``slot`` and advances ``slot`` and ``positions`` by
        one in place, so a captured graph replays step after step with nothing but
        the new tokens copied in. ``cache.length`` is the caller's to keep.
        :class:`engine.graphs.CUDAGraphDecoder` drives it.
        """
        mask = cache.step_mask(slot, kv_len)
        h, pending = self.wte(tokens), self.wpe(positions)
        for block in self.layers:
            h, pending, _ = block(h, pending, mask, cache=cache, start=slot)
        x, _ = self.ln_f(pending, residual=h)
        slot.add_(1)
        positions.add_(1)
        return self._lm_logits(x[:, -1])

    def packed_logits(self, ids: Tensor, positions: Tensor, step, rows: Tensor) -> Tensor:
        """One continuous-batching step (:mod:`engine.continuous`): ``ids`` / ``positions`` ``[T]`` are
        many sequences' tokens in one row, ``step`` (:class:`engine.paged.PackedStep`) runs their
        attention over its paged cache; the logits ``[len(rows), V]`` at the token indices ``rows``."""
        h, pending = self.wte(ids[None]), self.wpe(positions[None])
        for block in self.layers:
            h, pending, _ = block(h, pending, None, cache=step)
        x, _ = self.ln_f(pending[:, rows], residual=h[:, rows])
        return self._lm_logits(x[0])

    @property
    def tied_lm_embedding(self) -> Optional[nn.Embedding]:
        """The embedding table that is also the LM head (laid out for it on the CPU: ``pack_linears``)."""
        return self.wte if self.has_lm_head and self.lm_head is None else None

    def _lm_logits(self, x: Tensor) -> Tensor:
        return lm_head(x, self.wte if self.lm_head is None else self.lm_head)

    # -- decoding (engine.decoding.Decoding: generate, stream) -------------------

    @property
    def max_decoder_positions(self) -> int:
        return self.config.n_positions

    def _check_generation(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> None:
        if not self.has_lm_head:
            raise ValueError("this GPT-2 was loaded for feature-extraction; load it with task='causal-lm' to generate")
        self._check(input_ids, attention_mask, None, None)

    def start_decoding(self, input_ids: Tensor, mask: Tensor, *, num_beams: int, max_new_tokens: int,
                       start_token: Optional[int] = None, cache: Optional[KVCache] = None) -> Prefill:
        """Run the prompt (each row ``num_beams`` times) into ``cache`` or a new one; see :mod:`engine.decoding`."""
        if num_beams > 1:
            input_ids, mask = input_ids.repeat_interleave(num_beams, 0), mask.repeat_interleave(num_beams, 0)
        b, n = input_ids.shape
        if cache is None:
            cache = self.new_cache(b, n + max_new_tokens)
        else:
            cache.reset()
        first = self._forward(input_ids, mask, None, cache, logits_to_keep=1).logits[:, -1]

        def step(tokens: Tensor, beam_idx: Optional[Tensor]) -> Tensor:
            if beam_idx is not None:
                cache.reorder(beam_idx)
            return self._forward(tokens[:, None], None, None, cache, logits_to_keep=1).logits[:, -1]

        positions = cache.mask[:, :n].sum(dim=1, keepdim=True)  # the next position of each row
        return Prefill(input_ids, first, step, cache, positions)

    def new_static_cache(self, rows: int, max_len: int, **_) -> KVCache:
        """A fixed-capacity cache for static decoding (:mod:`engine.graphs`), zero-filled: masked slots still
        meet the kernel's dot products (0 * NaN = NaN)."""
        c = self.config
        return KVCache(rows, c.n_layer, c.n_head, max_len, c.head_dim, self.dtype, self.device).make_static()


# ----------------------------------------------------------------------------
# Checkpoint names.

_LAYER = {  # ours -> GPT-2's, under "h.{i}."; Conv1D modules have [in, out] weights
    "norm1": "ln_1", "attn.qkv": "attn.c_attn", "attn.out": "attn.c_proj",
    "norm2": "ln_2", "ffn.up": "mlp.c_fc", "ffn.down": "mlp.c_proj",
}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def key_map(model: GPT2Model, prefix: str) -> dict:
    """Our parameter name -> the checkpoint's, for this model and backbone prefix."""
    p = prefix
    spec = {"wte.weight": [f"{p}wte.weight"], "wpe.weight": [f"{p}wpe.weight"]}
    module_keys(spec, "ln_f", f"{p}ln_f")
    for i in range(model.config.n_layer):
        for ours, theirs in _LAYER.items():
            module_keys(spec, f"layers.{i}.{ours}", f"{p}h.{i}.{theirs}")
    if model.lm_head is not None:
        spec["lm_head.weight"] = ["lm_head.weight"]
    return spec


def _is_conv1d_weight(name: str) -> bool:
    return name.endswith(".weight") and name[: -len(".weight")].endswith(_CONV1D)


def _task_from_architectures(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in _ARCH_TASKS:
            return _ARCH_TASKS[arch]
    if archs:
        raise ValueError(f"GPT-2 head {archs[0]} is not supported; pass task='causal-lm' or "
                         f"task='feature-extraction' to load its backbone")
    return "causal-lm"


def from_checkpoint(cfg: dict, state: dict, *, task: Optional[str] = None, dtype=None,
                    device=None) -> GPT2Model:
    c = GPT2Config.from_hf(cfg)
    task = task or _task_from_architectures(cfg)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} for gpt2; choose from {', '.join(TASKS)}")
    prefix = "transformer." if any(k.startswith("transformer.") for k in state) else ""
    # The LM head reads the word embeddings unless the checkpoint unties it and has its own.
    # An untied head must come from the checkpoint: a missing lm_head.weight is reported, not
    # silently replaced by the embeddings.
    untied = task == "causal-lm" and not c.tie_word_embeddings
    with torch.device("meta"):
        model = GPT2Model(c, task, untied_head=untied)

    def skip(name: str) -> bool:
        return (name.endswith((".attn.bias", ".attn.masked_bias"))  # causal-mask buffers of old checkpoints
                or (name == "lm_head.weight" and not untied)  # tied to wte, or unused by feature-extraction
                or name.startswith(_OTHER_HEADS))

    # Conv1D stores [in, out]: hand assemble_state transposed views (names unchanged, so errors
    # still name the checkpoint's tensors), then make the loaded copies contiguous.
    state = {k: v.t() if _is_conv1d_weight(k) and v.dim() == 2 else v for k, v in state.items()}
    weights = assemble_state(model, state, key_map(model, prefix), skip=skip, dtype=dtype, device=device,
                             what=f"gpt2 checkpoint for {task} (Conv1D weights shown transposed)")
    weights = {k: v.contiguous() for k, v in weights.items()}
    return load_into(model, weights)


# ----------------------------------------------------------------------------
# The family's contract (engine.family).


def example_inputs(model: GPT2Model, batch: int, seq: int, seed: int = 0) -> dict:
    """Right-padded mixed lengths with explicit positions (Hugging Face's forward does not derive
    them from the mask)."""
    c = model.config
    inputs.check_length(seq, c.n_positions)
    ids, mask = inputs.token_batch(c.vocab_size, c.pad_token_id, batch, seq, model.device, seed)
    return {"input_ids": ids, "attention_mask": mask,
            "position_ids": torch.arange(seq, device=model.device).expand(batch, seq)}


_GPT2 = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
             bos_token_id=50256, eos_token_id=50256)

FAMILY = Family(
    name="gpt2", kind=DECODER, model_types=("gpt2",), model_classes=(GPT2Model,), from_checkpoint=from_checkpoint,
    hf_classes={"causal-lm": "AutoModelForCausalLM", "feature-extraction": "AutoModel"},
    # Hugging Face's config-class defaults (transformers 5.24) and attribute_map.
    config_defaults={"gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                  activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
                                  scale_attn_by_inverse_layer_idx=False, tie_word_embeddings=True,
                                  bos_token_id=50256, eos_token_id=50256)},
    config_aliases={"gpt2": {"n_embd": "hidden_size", "n_positions": "max_position_embeddings",
                             "n_layer": "num_hidden_layers", "n_head": "num_attention_heads"}},
    example_inputs=example_inputs,
    named_sizes={
        "gpt2": _GPT2,
        "gpt2-medium": {**_GPT2, "n_embd": 1024, "n_layer": 24, "n_head": 16},
        "gpt2-large": {**_GPT2, "n_embd": 1280, "n_layer": 36, "n_head": 20},
        "gpt2-xl": {**_GPT2, "n_embd": 1600, "n_layer": 48, "n_head": 25},
        # For smoke runs and tests: the real vocabulary, a toy body.
        "gpt2-tiny": {**_GPT2, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    },
)
