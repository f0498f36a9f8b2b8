"""What the model sees: attention rollout, position-embedding similarity and patch-filter PCA, with plots.

References:
- Attention rollout: Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.
- Position-embedding similarity and patch-filter PCA: Dosovitskiy et al., ICLR 2021, Figure 7.

Attention probabilities come from :func:`vit.record_attention`, which runs the manual attention path and
hooks each block's ``attn.softmax``; nothing here changes what ``forward`` returns. The computations are
plain functions on tensors (tested against independent references); the ``plot_*`` functions turn their
results into matplotlib Figures and never call ``pyplot``, so they work with any backend.

Shape vocabulary: B batch, L layers, H heads, N tokens (1 CLS + patches), g patch-grid side (N - 1 = g·g),
D hidden size, C channels, P patch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import record_attention

HEAD_FUSIONS = ("mean", "max", "min")


# ---------------------------------------------------------------------------------------------------------
# Attention rollout
# ---------------------------------------------------------------------------------------------------------

def fuse_heads(attn: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Combine the heads of one layer's attention, (B, H, N, N) → (B, N, N), by mean, max or min."""
    if attn.ndim != 4:
        raise ValueError(f"attention must be (B, H, N, N), got shape {tuple(attn.shape)}")
    if mode == "mean":
        return attn.mean(dim=1)
    if mode == "max":
        return attn.amax(dim=1)
    if mode == "min":
        return attn.amin(dim=1)
    raise ValueError(f"unknown head fusion {mode!r}; choose one of {', '.join(HEAD_FUSIONS)}")


def discard_lowest(attn: torch.Tensor, ratio: float, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Zero the lowest ``ratio`` fraction of patch-to-patch entries of each (N, N) map in (B, N, N).

    The rows and columns of the prefix (CLS) tokens are never candidates: discarding them would cut the very
    path that rollout follows from CLS to the patches. Returns a new tensor; rows no longer sum to 1 until
    :func:`normalize_layer` re-normalises them.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return attn
    b, n, _ = attn.shape
    p = num_prefix_tokens
    patches = attn[:, p:, p:].reshape(b, -1)  # candidates only: (B, (N-p)²)
    k = int(patches.shape[1] * ratio)
    if k == 0:
        return attn
    lowest = patches.topk(k, dim=1, largest=False).indices
    out = attn.clone()
    out[:, p:, p:] = patches.scatter(1, lowest, 0.0).reshape(b, n - p, n - p)
    return out


def normalize_layer(attn: torch.Tensor) -> torch.Tensor:
    """Account for the residual connection: Â = (A + I) / 2, then rows re-normalised to sum to 1. (B, N, N)."""
    eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    a = (attn + eye) / 2
    return a / a.sum(dim=-1, keepdim=True)  # rows: each query's distribution over keys


def rollout_layers(attentions: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
                   num_prefix_tokens: int = 1) -> list[torch.Tensor]:
    """Each layer's fused, discarded and normalised attention Â_l, (B, N, N) each, rows summing to 1."""
    if len(attentions) == 0:
        raise ValueError("no attention maps given (was the model run inside vit.record_attention?)")
    return [normalize_layer(discard_lowest(fuse_heads(a.double(), head_fusion), discard_ratio, num_prefix_tokens))
            for a in attentions]


def tokens_to_grid(x: torch.Tensor, grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """(..., g·g) patch values → (..., gh, gw), row-major like the patch embedding. Square unless given."""
    n = x.shape[-1]
    if grid_size is None:
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"{n} patch tokens do not form a square grid; pass grid_size=(gh, gw)")
        grid_size = (g, g)
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if gh * gw != n:
        raise ValueError(f"grid {gh}x{gw} does not hold {n} patch tokens")
    return x.reshape(*x.shape[:-1], gh, gw)


def _divide_by_max(masks: torch.Tensor) -> torch.Tensor:
    """Scale each map (..., gh, gw) so its maximum is 1; an all-zero map stays zero."""
    top = masks.flatten(-2).amax(dim=-1)[..., None, None]
    return masks / top.clamp_min(torch.finfo(masks.dtype).tiny)


def attention_rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
                      num_prefix_tokens: int = 1, grid_size: int | tuple[int, int] | None = None,
                      as_grid: bool = True) -> torch.Tensor:
    """Attention rollout from the CLS token to the patches.

    ``attentions``: per-layer post-softmax maps (B, H, N, N), first layer first (what
    :func:`vit.record_attention` records). R = Â_L ⋯ Â_1 with Â_l from :func:`rollout_layers`; the result is
    R[CLS, patches] divided by its maximum per sample: (B, gh, gw), or (B, N - prefix) with ``as_grid=False``.
    Upsample to the image with :func:`upsample_masks`.
    """
    return per_layer_rollout(attentions, head_fusion, discard_ratio, num_prefix_tokens, grid_size, as_grid)[-1]


def per_layer_rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
                      num_prefix_tokens: int = 1, grid_size: int | tuple[int, int] | None = None,
                      as_grid: bool = True) -> torch.Tensor:
    """Rollout through layers 1..l for every l: (L, B, gh, gw) (or (L, B, N - prefix)), each divided by its max.

    The last entry is :func:`attention_rollout`; earlier ones show how attention spreads with depth.
    """
    layers = rollout_layers(attentions, head_fusion, discard_ratio, num_prefix_tokens)
    rolled, r = [], None
    for a in layers:
        r = a if r is None else a @ r  # R_l = Â_l R_{l-1}: later layers multiply from the left
        rolled.append(r[:, 0, num_prefix_tokens:])  # CLS row, patch columns: (B, N - prefix)
    out = torch.stack(rolled).float()
    if not as_grid:
        return out / out.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return _divide_by_max(tokens_to_grid(out, grid_size))


def cls_attention(attn_last: torch.Tensor, num_prefix_tokens: int = 1,
                  grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Each head's attention from CLS to the patches in one layer: (B, H, N, N) → (B, H, gh, gw).

    These are raw probabilities (not re-scaled); they sum to 1 minus what CLS gives to the prefix tokens.
    """
    if attn_last.ndim != 4:
        raise ValueError(f"attention must be (B, H, N, N), got shape {tuple(attn_last.shape)}")
    return tokens_to_grid(attn_last[:, :, 0, num_prefix_tokens:], grid_size)


def upsample_masks(masks: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize maps (..., gh, gw) to the image size (..., H, W)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    lead = masks.shape[:-2]
    x = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.reshape(*lead, *size)


@dataclass
class AttentionMaps:
    """What :func:`attention_maps` returns for a batch of B images."""

    probs: torch.Tensor  # (B, num_classes) softmax of the logits
    rollout: torch.Tensor  # (B, g, g) attention rollout, divided by its max
    cls_heads: torch.Tensor  # (B, H, g, g) last layer's CLS→patch attention per head (raw probabilities)
    per_layer: torch.Tensor | None  # (L, B, g, g) rollout through layers 1..l, or None


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
                   per_layer: bool = False) -> AttentionMaps:
    """Run ``model`` (a VisionTransformer, adapters allowed) on normalised images and collect its maps."""
    fuse_heads(torch.zeros(1, 1, 1, 1), head_fusion)  # fail on a bad mode before running the model
    was_training = model.training
    model.eval()
    try:
        with record_attention(model) as attentions:
            logits = model(images)
    finally:
        model.train(was_training)
    g = model.config.grid_size
    layers = per_layer_rollout(attentions, head_fusion, discard_ratio, grid_size=g)
    return AttentionMaps(probs=logits.float().softmax(dim=-1).cpu(), rollout=layers[-1].cpu(),
                         cls_heads=cls_attention(attentions[-1], grid_size=g).float().cpu(),
                         per_layer=layers.cpu() if per_layer else None)


# ---------------------------------------------------------------------------------------------------------
# Position embeddings and patch filters
# ---------------------------------------------------------------------------------------------------------

def pos_embed_similarity(pos_embed: torch.Tensor | np.ndarray, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Cosine similarity between the grid positions' embeddings: (1, prefix + g·g, D) → (g, g, g, g).

    ``sim[i, j]`` is the tile for input patch (row i, column j): its similarity to every position (k, l).
    The prefix (CLS) rows are dropped; (prefix + g·g, D) without the batch axis is accepted too.
    """
    e = torch.as_tensor(pos_embed).detach().double().cpu()
    if e.ndim == 3:
        if e.shape[0] != 1:
            raise ValueError(f"pos_embed must be (1, N, D) or (N, D), got shape {tuple(e.shape)}")
        e = e[0]
    e = e[num_prefix_tokens:]  # (g·g, D)
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = (e @ e.T).clamp(-1.0, 1.0)  # (g·g, g·g), row-major positions on both axes
    g = tokens_to_grid(sim[0]).shape[-1]
    return sim.reshape(g, g, g, g).float()  # [i, j, k, l] = sim[(i, j), (k, l)]


def patch_filter_pca(weight: torch.Tensor | np.ndarray, k: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal components of the patch-embedding filters.

    ``weight``: the patch-embedding convolution's kernel (D, C, P, P) — D filters of length C·P·P. The
    filters are centred and decomposed with an SVD; returns the first ``k`` components (at most as many as
    have non-zero variance) as (k, C, P, P), unit-norm and orthogonal, and each one's fraction of the
    variance, (k,). The sign of a component is arbitrary; it is fixed so that its largest entry is positive.
    """
    w = torch.as_tensor(weight).detach().double().cpu()
    if w.ndim != 4:
        raise ValueError(f"patch-embedding weight must be (D, C, P, P), got shape {tuple(w.shape)}")
    x = w.reshape(w.shape[0], -1)  # (D, C·P·P): one row per filter
    x = x - x.mean(dim=0, keepdim=True)
    _, s, vt = torch.linalg.svd(x, full_matrices=False)
    var = s**2
    rank = int((s > s.max().clamp_min(1e-300) * 1e-10).sum())
    k = min(k, rank)
    comps = vt[:k]
    biggest = comps.gather(1, comps.abs().argmax(dim=1, keepdim=True))
    comps = comps * torch.sign(biggest)
    explained = var[:k] / var.sum().clamp_min(1e-300)
    return comps.reshape(k, *w.shape[1:]).float(), explained.float()


# ---------------------------------------------------------------------------------------------------------
# Plots (matplotlib Figures; save with fig.savefig)
# ---------------------------------------------------------------------------------------------------------

def denormalize(images: torch.Tensor, mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """Model inputs (B, C, H, W) → displayable (B, H, W, C) floats in [0, 1] (C = 1 gives (B, H, W))."""
    x = (images.detach().float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def plot_attention(images: np.ndarray, rows: Sequence[tuple[str, np.ndarray]], titles: Sequence[str] = (),
                   title: str | None = None, cell: float = 1.8, alpha: float = 0.5, cmap: str = "jet"):
    """Images on top, one row of heat-map overlays per entry of ``rows`` below.

    ``images``: (B, H, W[, 3]) in [0, 1] (see :func:`denormalize`); ``rows``: (label, maps) pairs with maps
    (B, h, w), each map scaled by its own max for display and upsampled to the image; ``titles``: one per
    image (two lines fit); ``title``: over the whole figure.
    """
    b, n_rows = len(images), 1 + len(rows)
    size = images.shape[1:3]
    # Margins in inches, so that tall figures (ViT-B/16: 12 heads) keep the same spacing as short ones.
    left, right, gap_w, gap_h, top, bottom = 0.9, 1.1, 0.1, 0.25, 0.45 + (0.35 if title else 0), 0.15
    width = left + b * cell + (b - 1) * gap_w + right
    height = top + n_rows * cell + (n_rows - 1) * gap_h + bottom
    fig = _figure(width, height)
    axes = fig.subplots(n_rows, b, squeeze=False)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                        bottom=bottom / height, wspace=gap_w / cell, hspace=gap_h / cell)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.12 / height, va="top")
    grey = images.ndim == 3
    heat = None
    for j in range(b):
        axes[0, j].imshow(images[j], cmap="gray" if grey else None, vmin=0, vmax=1)
        if j < len(titles):
            axes[0, j].set_title(titles[j], fontsize=8)
        for i, (_, maps) in enumerate(rows, start=1):
            m = _divide_by_max(torch.as_tensor(np.asarray(maps[j]), dtype=torch.float32).clamp_min(0))
            m = upsample_masks(m, size).numpy()
            axes[i, j].imshow(images[j], cmap="gray" if grey else None, vmin=0, vmax=1)
            heat = axes[i, j].imshow(m, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("input", fontsize=8)
    for i, (label, _) in enumerate(rows, start=1):
        axes[i, 0].set_ylabel(label, fontsize=8)
    if heat is not None:  # beside the heat-map rows, at most 4 inches tall
        span = min(4.0, len(rows) * cell + (len(rows) - 1) * gap_h)
        y0 = bottom + (len(rows) * (cell + gap_h) - gap_h - span) / 2
        cax = fig.add_axes([1 - (right - 0.25) / width, y0 / height, 0.15 / width, span / height])
        fig.colorbar(heat, cax=cax).set_label("attention (÷ max per map)", fontsize=8)
        cax.tick_params(labelsize=7)
    return fig


def _mosaic(tiles: np.ndarray, gap: int = 1) -> np.ndarray:
    """(R, C, h, w[, 3]) tiles → one (R·(h+gap)-gap, C·(w+gap)-gap[, 3]) image with NaN gaps."""
    r, c, h, w = tiles.shape[:4]
    out = np.full((r * (h + gap) - gap, c * (w + gap) - gap, *tiles.shape[4:]), np.nan)
    for i in range(r):
        for j in range(c):
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tiles[i, j]
    return out


def plot_pos_embed_similarity(sim: torch.Tensor | np.ndarray, title: str = "Position embedding similarity",
                              cmap: str = "viridis", size: float = 6.0):
    """The ViT paper's figure: tile (i, j) shows the cosine similarity of position (i, j) to all positions."""
    import matplotlib

    sim = np.asarray(sim)
    g = sim.shape[0]
    gap = max(1, g // 8)
    cm = matplotlib.colormaps[cmap].with_extremes(bad="white")  # the gaps between tiles
    fig = _figure(size + 1.2, size)
    ax = fig.add_axes([0.12, 0.1, 0.68, 0.8])
    im = ax.imshow(_mosaic(sim, gap), cmap=cm, vmin=-1, vmax=1, interpolation="nearest")
    centres = np.arange(g) * (sim.shape[2] + gap) + (sim.shape[2] - 1) / 2
    step = max(1, g // 7)
    ax.set_xticks(centres[::step], [str(i + 1) for i in range(0, g, step)])
    ax.set_yticks(centres[::step], [str(i + 1) for i in range(0, g, step)])
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    ax.set_title(title)
    for side in ax.spines.values():
        side.set_visible(False)
    cax = fig.add_axes([0.84, 0.2, 0.03, 0.6])
    fig.colorbar(im, cax=cax).set_label("Cosine similarity")
    return fig


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5)


def _tiles_rgb(filters: np.ndarray) -> np.ndarray:
    """(k, C, P, P) → (k, P, P, 3) each min-max scaled to [0, 1] (one channel is shown as grey)."""
    t = np.stack([_minmax(f) for f in filters]).transpose(0, 2, 3, 1)
    return np.repeat(t, 3, axis=-1) if t.shape[-1] == 1 else t


def plot_patch_filters(components: torch.Tensor | np.ndarray, explained: torch.Tensor | np.ndarray | None = None,
                       raw: torch.Tensor | np.ndarray | None = None, columns: int = 7, cell: float = 0.9,
                       title: str = "Principal components of the patch-embedding filters"):
    """Each PCA component (k, C, P, P) as a min-max scaled RGB tile; optionally raw filters (m, C, P, P) below.

    ``explained``: each component's share of the variance, shown above its tile.
    """
    sections = [("", np.asarray(components), explained)]
    if raw is not None:
        sections.append((f"Raw filters (first {len(raw)}), each min-max scaled", np.asarray(raw), None))
    # Lay the tiles out in inches: title, then per section an optional label line and rows of titled tiles.
    margin, gap, tile_title, label_h = 0.2, 0.1, 0.2, 0.35
    title_h = 0.25 + 0.2 * title.count("\n") + 0.15
    width = 2 * margin + columns * cell + (columns - 1) * gap
    row_h = tile_title + cell + gap
    height = title_h + margin + sum((label_h if label else 0) + math.ceil(len(t) / columns) * row_h
                                    for label, t, _ in sections)
    fig = _figure(width, height)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    y = title_h
    for label, tiles, expl in sections:
        if label:
            fig.text(margin / width, 1 - (y + 0.25) / height, label, fontsize=9)
            y += label_h
        for n, tile in enumerate(_tiles_rgb(tiles)):
            r, c = divmod(n, columns)
            top = y + r * row_h + tile_title
            ax = fig.add_axes([(margin + c * (cell + gap)) / width, 1 - (top + cell) / height, cell / width,
                               cell / height])
            ax.imshow(tile, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if expl is not None:
                ax.set_title(f"{n + 1}: {100 * float(expl[n]):.1f}%", fontsize=7, pad=2)
        y += math.ceil(len(tiles) / columns) * row_h
    return fig


def save_outputs(fig, output, dpi: int = 100, arrays: dict | None = None) -> list:
    """Save ``fig`` as ``output`` (folders created) and each array as ``<stem>_<name>.npy``
    (``<stem>.npy`` for the name ""); close the figure and return the paths written."""
    import matplotlib.pyplot as plt

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    written = [out]
    for name, array in (arrays or {}).items():
        path = out.with_name(f"{out.stem}_{name}.npy" if name else f"{out.stem}.npy")
        np.save(path, np.asarray(array))
        written.append(path)
    return written
