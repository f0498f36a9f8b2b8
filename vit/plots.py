"""Figures of what the model sees: attention overlays, position-embedding tiles, patch-filter components.

The numbers come from :mod:`vit.visualize`; these functions only draw them. They build matplotlib Figures
without ``pyplot`` (so any backend works, and nothing global is touched); :func:`save_outputs` writes a figure
and its arrays to disk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from .visualize import divide_by_max, upsample_masks

def denormalize(images: torch.Tensor, mean=0.5, std=0.5) -> np.ndarray:
    """Model inputs (B, C, H, W) → displayable (B, H, W, C) floats in [0, 1] (C = 1 gives (B, H, W)); ``mean`` and
    ``std`` a number or one per channel, as the inputs were normalised."""
    mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1) for v in (mean, std))
    x = (images.detach().float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def _figure(width: float, height: float):
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
            m = divide_by_max(torch.as_tensor(np.asarray(maps[j]), dtype=torch.float32).clamp_min(0))
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
    (``<stem>.npy`` for the name ""); return the paths written. The figure is not kept anywhere (it was never
    registered with pyplot), so it is freed with its last reference."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    written = [out]
    for name, array in (arrays or {}).items():
        path = out.with_name(f"{out.stem}_{name}.npy" if name else f"{out.stem}.npy")
        np.save(path, np.asarray(array))
        written.append(path)
    return written
