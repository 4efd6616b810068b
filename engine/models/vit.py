"""Vision Transformers on trifuse's kernels: ViT and DeiT.

An image is cut into patches by a convolution whose kernel and stride are the
patch size; a CLS token (DeiT: also a distillation token) goes in front, learned
positions are added, and pre-LN layers (``PreLNBlock``: every residual add fused
into the next LayerNorm, exact GELU fused with its bias) and a final LayerNorm
follow. Heads:

- ``feature-extraction`` (``ViTModel``, ``DeiTModel``): ``last_hidden_state`` and,
  when the checkpoint has one, the pooler's ``act(dense(cls))`` as ``pooler_output``;
- ``image-classification`` (``ViTForImageClassification``, ``DeiTForImageClassification``):
  a linear layer on the final-normed CLS token;
  ``DeiTForImageClassificationWithTeacher`` averages the CLS and distillation
  heads (``logits``; the two also come back as ``cls_logits`` and ``distillation_logits``).

``model(pixel_values, interpolate_pos_encoding=True)`` takes images of another
size than the checkpoint's: the patch positions are resized bicubically as in
Hugging Face's ``interpolate_pos_encoding``. Label names: ``model.id2label``
(also ``model.config.id2label``). From image files to labels::

    from trifuse import engine
    from trifuse.engine.images import ImageProcessor

    model, processor = engine.from_pretrained(ckpt), ImageProcessor.from_pretrained(ckpt)
    labels = [model.id2label[i] for i in model(processor(["cat.jpg", "dog.jpg"])).logits.argmax(-1).tolist()]

Reference semantics: Hugging Face transformers' ``modeling_vit.py`` and
``modeling_deit.py``; the checkpoint names below are theirs (the saved names and
the in-memory names of transformers >= 5.2x both work).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import inputs
from ..family import VISION, Family
from ..images import ImageProcessor, preprocess  # noqa: F401  (re-exported: engine.models.vit.preprocess)
from ..layers import Attention, LayerNorm, PreLNBlock, bias_act, check_activation
from ..loading import assemble_state, load_into, module_keys
from ..outputs import EncoderOutput, LogitsOutput

FAMILIES = ("vit", "deit")
TASKS = ("feature-extraction", "image-classification")


def _pair(v, what: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{what} must be an int or a pair of ints; got {v!r}")


@dataclass(frozen=True)
class VisionConfig:
    family: str  # "vit" or "deit"
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: Tuple[int, int]  # (height, width)
    patch_size: Tuple[int, int]
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    pooler_output_size: int = 0  # 0: hidden_size
    pooler_act: str = "tanh"
    num_labels: int = 2
    id2label: dict = field(default_factory=dict, compare=False)

    @property
    def num_special(self) -> int:
        """Tokens before the patches: CLS, and DeiT's distillation token."""
        return 2 if self.family == "deit" else 1

    @property
    def grid(self) -> Tuple[int, int]:
        """Patches per column and per row at the checkpoint's image size."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    def seq_len(self, height: Optional[int] = None, width: Optional[int] = None) -> int:
        h, w = self.image_size if height is None else (height, width)
        return self.num_special + (h // self.patch_size[0]) * (w // self.patch_size[1])

    @classmethod
    def from_hf(cls, cfg: dict) -> "VisionConfig":
        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not a ViT-family model ({', '.join(FAMILIES)})")
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        if cfg.get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"head_dim={cfg['head_dim']} != hidden_size / num_attention_heads is not supported")
        id2label = {int(k): v for k, v in (cfg.get("id2label") or {}).items()}
        num_labels = len(id2label) if id2label else cfg.get("num_labels", 2)
        c = cls(family, hidden, cfg["num_hidden_layers"], heads, cfg["intermediate_size"],
                image_size=_pair(cfg.get("image_size", 224), "image_size"),
                patch_size=_pair(cfg.get("patch_size", 16), "patch_size"),
                num_channels=cfg.get("num_channels", 3), hidden_act=cfg.get("hidden_act", "gelu"),
                layer_norm_eps=cfg.get("layer_norm_eps", 1e-12), qkv_bias=cfg.get("qkv_bias", True),
                pooler_output_size=cfg.get("pooler_output_size") or hidden,
                pooler_act=cfg.get("pooler_act", "tanh"), num_labels=num_labels,
                id2label=id2label or {i: f"LABEL_{i}" for i in range(num_labels)})
        check_activation(c.hidden_act)
        check_activation(c.pooler_act)
        if min(c.grid) < 1:
            raise ValueError(f"image_size {c.image_size} is smaller than patch_size {c.patch_size}")
        return c


@dataclass
class DistilledLogitsOutput(LogitsOutput):
    """DeiT with its teacher head: ``logits`` is the mean of the two heads' logits."""

    cls_logits: Optional[Tensor] = None
    distillation_logits: Optional[Tensor] = None


# ----------------------------------------------------------------------------
# The model.


class Embeddings(nn.Module):
    """Patches (a conv with kernel = stride = patch), the special tokens in front, positions added."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch = nn.Conv2d(c.num_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, c.hidden_size))
        self.dist_token = nn.Parameter(torch.empty(1, 1, c.hidden_size)) if c.family == "deit" else None
        self.pos = nn.Parameter(torch.empty(1, c.seq_len(), c.hidden_size))

    def positions(self, grid: Tuple[int, int]) -> Tensor:
        """The position table for a ``grid`` of patches: the checkpoint's, or resized bicubically.

        Hugging Face's ``interpolate_pos_encoding``: the patch positions, laid out on
        the checkpoint's grid, are resized to ``size=grid`` (``align_corners=False``);
        the special tokens' positions are kept. (Hugging Face reads the table as a
        square grid and returns it unchanged for a same-size square input; on square
        grids both agree exactly, and a non-square checkpoint grid is honoured here.)
        """
        c, k = self.config, self.config.num_special
        if tuple(grid) == c.grid:
            return self.pos
        patch_pos = self.pos[:, k:].reshape(1, *c.grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return torch.cat((self.pos[:, :k], patch_pos), dim=1)

    def forward(self, pixel_values: Tensor, interpolate: bool) -> Tensor:
        k = self.config.num_special
        patches = self.patch(pixel_values)  # [B, D, gh, gw]
        b, d, gh, gw = patches.shape
        pos = self.positions((gh, gw)) if interpolate else self.pos
        special = self.cls_token if self.dist_token is None else torch.cat((self.cls_token, self.dist_token), 1)
        # One pass: the patches are transposed to tokens and their positions added into place.
        x = patches.new_empty(b, k + gh * gw, d)
        torch.add(patches.flatten(2).transpose(1, 2), pos[:, k:], out=x[:, k:])
        x[:, :k] = special + pos[:, :k]
        return x


class Head(nn.Module):
    """Image classification on the CLS token; with a teacher, the mean of the CLS and distillation heads."""

    def __init__(self, c: VisionConfig, teacher: bool):
        super().__init__()
        self.classifier = nn.Linear(c.hidden_size, c.num_labels)
        self.distillation = nn.Linear(c.hidden_size, c.num_labels) if teacher else None

    def forward(self, x: Tensor, extra: dict):
        logits = self.classifier(x[:, 0])
        if self.distillation is None:
            return LogitsOutput(logits=logits, **extra)
        dist = self.distillation(x[:, 1])
        return DistilledLogitsOutput(logits=(logits + dist) / 2, cls_logits=logits, distillation_logits=dist,
                                     **extra)


class VisionTransformer(nn.Module):
    """A ViT / DeiT encoder with an optional head; call it like the Hugging Face model."""

    def __init__(self, c: VisionConfig, task: str, pooler: bool = False, teacher: bool = False):
        super().__init__()
        self.config, self.task = c, task
        self.embed = Embeddings(c)
        self.layers = nn.ModuleList(
            PreLNBlock(c.hidden_size, c.intermediate_size, c.hidden_act, c.layer_norm_eps,
                       Attention(c.hidden_size, c.num_heads, qkv_bias=c.qkv_bias))
            for _ in range(c.num_layers))
        self.norm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.pooler = nn.Linear(c.hidden_size, c.pooler_output_size) if pooler else None
        self.head = Head(c, teacher) if task == "image-classification" else None

    @property
    def id2label(self) -> dict:
        return self.config.id2label

    @property
    def model_type(self) -> str:
        return self.config.family

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.patch.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.patch.weight.device

    def num_hidden_states(self, stack: str = "model") -> int:
        return len(self.layers) + 1

    def _check(self, pixel_values, interpolate: bool) -> None:
        c = self.config
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a float tensor of shape [batch, channels, height, width]; "
                             f"got {shape}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a float tensor (normalized images, see trifuse.engine.images); "
                             f"got {pixel_values.dtype}")
        n, ch, h, w = pixel_values.shape
        if n == 0:
            raise ValueError("pixel_values is an empty batch (batch size 0)")
        if ch != c.num_channels:
            raise ValueError(f"pixel_values have {ch} channels; this checkpoint expects {c.num_channels}")
        (ph, pw), (ih, iw) = c.patch_size, c.image_size
        if (h, w) == (ih, iw):
            return
        if not interpolate:
            raise ValueError(f"image size {h}x{w} does not match the checkpoint's {ih}x{iw}; resize the images "
                             "or pass interpolate_pos_encoding=True")
        if h < ph or w < pw or h % ph or w % pw:
            raise ValueError(f"image size {h}x{w} does not fit the {ph}x{pw} patch grid: height and width must "
                             f"be positive multiples of the patch size")

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False,
                output_hidden_states: bool = False, output_attentions: bool = False):
        self._check(pixel_values, interpolate_pos_encoding)
        pixel_values = pixel_values.to(self.embed.patch.weight.dtype)
        h = self.embed(pixel_values, interpolate_pos_encoding)
        pending, hidden, attns = None, [h], []
        for layer in self.layers:
            h, pending, probs = layer(h, pending, None, need_probs=output_attentions)
            if output_hidden_states:
                hidden.append(h + pending)
            attns.append(probs)
        extra = dict(hidden_states=tuple(hidden) if output_hidden_states else None,
                     attentions=tuple(attns) if output_attentions else None)
        if self.head is not None:
            # The head reads only the special tokens: normalize just those rows.
            k = self.config.num_special
            h = h[:, :k]
            pending = None if pending is None else pending[:, :k]
        x = self.norm(h) if pending is None else self.norm(pending, residual=h)[0]
        if self.head is not None:
            return self.head(x, extra)
        pooled = None
        if self.pooler is not None:
            pooled = bias_act(F.linear(x[:, 0], self.pooler.weight), self.pooler.bias, self.config.pooler_act)
        return EncoderOutput(last_hidden_state=x, pooler_output=pooled, **extra)


# ----------------------------------------------------------------------------
# Checkpoint names.

# Our layer module -> the checkpoint's: (saved name, transformers >= 5.2x in-memory name).
_LAYER = {
    "attn.qkv": [("encoder.layer.{}.attention.attention.query", "layers.{}.attention.q_proj"),
                 ("encoder.layer.{}.attention.attention.key", "layers.{}.attention.k_proj"),
                 ("encoder.layer.{}.attention.attention.value", "layers.{}.attention.v_proj")],
    "attn.out": [("encoder.layer.{}.attention.output.dense", "layers.{}.attention.o_proj")],
    "norm1": [("encoder.layer.{}.layernorm_before", "layers.{}.layernorm_before")],
    "ffn.up": [("encoder.layer.{}.intermediate.dense", "layers.{}.mlp.fc1")],
    "ffn.down": [("encoder.layer.{}.output.dense", "layers.{}.mlp.fc2")],
    "norm2": [("encoder.layer.{}.layernorm_after", "layers.{}.layernorm_after")],
}
_HEAD_PREFIXES = ("classifier.", "cls_classifier.", "distillation_classifier.", "decoder.")


def key_map(model: VisionTransformer, prefix: str) -> dict:
    """Our parameter name -> checkpoint name(s), for this model and backbone prefix."""
    p, spec = prefix, {}
    spec["embed.cls_token"] = [f"{p}embeddings.cls_token"]
    if model.embed.dist_token is not None:
        spec["embed.dist_token"] = [f"{p}embeddings.distillation_token"]
    spec["embed.pos"] = [f"{p}embeddings.position_embeddings"]
    module_keys(spec, "embed.patch", [f"{p}embeddings.patch_embeddings.projection"])
    for i in range(len(model.layers)):
        for ours, theirs in _LAYER.items():
            names = [tuple(p + a.format(i) for a in alts) for alts in theirs]
            module_keys(spec, f"layers.{i}.{ours}", names, bias=ours != "attn.qkv" or model.config.qkv_bias)
    module_keys(spec, "norm", [f"{p}layernorm"])
    if model.pooler is not None:
        module_keys(spec, "pooler", [f"{p}pooler.dense"])
    if model.head is not None:
        if model.head.distillation is None:
            module_keys(spec, "head.classifier", ["classifier"])
        else:
            module_keys(spec, "head.classifier", ["cls_classifier"])
            module_keys(spec, "head.distillation", ["distillation_classifier"])
    return spec


def _task_from_architectures(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    return "image-classification" if any("ForImageClassification" in a for a in archs) else "feature-extraction"


def from_checkpoint(cfg: dict, state: dict, *, task: Optional[str] = None, dtype=None,
                    device=None) -> VisionTransformer:
    c = VisionConfig.from_hf(cfg)
    task = task or _task_from_architectures(cfg)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} for {c.family}; choose from {', '.join(TASKS)}")
    prefix = f"{c.family}." if any(k.startswith(f"{c.family}.") for k in state) else ""
    teacher = "cls_classifier.weight" in state
    if task == "image-classification" and c.num_labels < 1:
        raise ValueError("this checkpoint has no labels (num_labels=0); load it with task='feature-extraction'")
    pooler = task == "feature-extraction" and f"{prefix}pooler.dense.weight" in state
    with torch.device("meta"):
        model = VisionTransformer(c, task, pooler=pooler, teacher=teacher)

    def skip(name: str) -> bool:
        return (name.startswith(_HEAD_PREFIXES)  # heads of other tasks; the masked-image decoder
                or name == f"{prefix}embeddings.mask_token"
                or (model.pooler is None and name.startswith(f"{prefix}pooler.")))

    weights = assemble_state(model, state, key_map(model, prefix), skip=skip, dtype=dtype, device=device,
                             what=f"{c.family} checkpoint for {task}")
    return load_into(model, weights)


# ----------------------------------------------------------------------------
# The family's contract (engine.family).


def example_inputs(model: VisionTransformer, batch: int, seq: int = 0, seed: int = 0) -> dict:
    """Images of the checkpoint's size (``seq`` is unused: the patch grid sets the length)."""
    c = model.config
    return {"pixel_values": inputs.images(batch, c.num_channels, *c.image_size, device=model.device, seed=seed)}


#: Hugging Face's config-class defaults (transformers 5.24).
_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                 qkv_bias=True, pooler_act="tanh")
_BASE = dict(model_type="vit", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, image_size=224, patch_size=16, num_channels=3, hidden_act="gelu",
             layer_norm_eps=1e-12)
_SIZES = {
    "vit-small-patch16-224": {**_BASE, "hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1536},
    "vit-base-patch16-224": _BASE,
    "vit-large-patch16-224": {**_BASE, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                              "intermediate_size": 4096},
    # For smoke runs, tests and the main job's quick CPU check: 16-pixel patches of a 64-pixel image
    # (17 tokens), a toy body.
    "vit-tiny": {**_BASE, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 128, "image_size": 64},
}

FAMILY = Family(
    name="vit", kind=VISION, model_types=FAMILIES, model_classes=(VisionTransformer,),
    from_checkpoint=from_checkpoint,
    hf_classes={"feature-extraction": "AutoModel", "image-classification": "AutoModelForImageClassification"},
    config_defaults={t: _DEFAULTS for t in FAMILIES}, example_inputs=example_inputs, named_sizes=_SIZES,
)
