"""Attention maps: :func:`plot_attention` draws what ``output_attentions=True`` returns."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


def plot_attention(result, layer: int = -1, head: Optional[int] = None, path: Union[str, Path, None] = None,
                   title: Optional[str] = None):
    """Draw one layer's attention (one head, or the mean over heads when ``head`` is None)
    as a heatmap with the tokens on both axes; save it as a PNG at ``path`` (default
    ``attention.png``) and return the path.

    ``result``: what a pipeline returns with ``output_attentions=True`` (one input's
    ``{"output", "tokens", "attentions"}``, or a list of them: the first is drawn).
    """
    if isinstance(result, list) and result and isinstance(result[0], dict) and "attentions" in result[0]:
        result = result[0]
    if not isinstance(result, dict) or "attentions" not in result or "tokens" not in result:
        raise ValueError("plot_attention takes a pipeline result made with output_attentions=True")
    att = result["attentions"]  # [layers, H, L, L]
    layers, heads = att.shape[0], att.shape[1]
    if not -layers <= layer < layers:
        raise ValueError(f"layer {layer} out of range: the model has {layers} layers")
    if head is not None and not -heads <= head < heads:
        raise ValueError(f"head {head} out of range: the model has {heads} heads")
    m = att[layer].mean(0) if head is None else att[layer, head]
    tokens = result["tokens"]

    from ..extras import require

    require("trifuse.plot_attention", "bench", "matplotlib")
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are left alone

    n = len(tokens)
    size = max(4.0, min(0.35 * n + 2, 30.0))
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(m.numpy(), cmap="viridis", vmin=0.0)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(tokens, rotation=90, fontsize=8)
    ax.set_yticklabels(tokens, fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    which = "mean over heads" if head is None else f"head {head % heads}"
    ax.set_title(title or f"attention, layer {layer % layers}, {which}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path or "attention.png")
    fig.savefig(path, dpi=100)
    return path


