"""What the model sees: attention rollout, position-embedding similarity and patch-filter PCA, with plots.

References:
- Attention rollout: Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.
- Position-embedding similarity and patch-filter PCA: Dosovitskiy et al., ICLR 2021, Figure 7.

Attention probabilities come from :func:`vit.record_attention`, which runs the manual attention path and
hooks each block's ``attn.softmax``; nothing here changes what ``forward`` returns. The computations are
plain functions on tensors, tested against independent references; :mod:`vit.plots` draws them.

Shape vocabulary: B batch, L layers, H heads, N tokens (1 CLS + patches), g patch-grid side (N - 1 = g·g),
D hidden size, C channels, P patch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


def divide_by_max(masks: torch.Tensor) -> torch.Tensor:
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
                      as_grid: bool = True, fresh_tokens: slice | None = None,
                      gradients: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Rollout through layers 1..l for every l: (L, B, gh, gw) (or (L, B, N - prefix)), each divided by its max.

    The last entry is :func:`attention_rollout`; earlier ones show how attention spreads with depth.
    ``fresh_tokens``: positions whose input is replaced at every layer (VPT-deep's prompts): before each layer
    their rows of R become identity rows, so no path from the image runs through a replaced token.
    ``gradients``: the attention maps' gradients for one class: gradient-weighted rollout (:func:`grad_rollout_layers`
    instead of head fusion).
    """
    layers = (rollout_layers(attentions, head_fusion, discard_ratio, num_prefix_tokens) if gradients is None else
              grad_rollout_layers(attentions, gradients, discard_ratio, num_prefix_tokens))
    rolled, r = [], None
    for a in layers:
        if r is not None and fresh_tokens is not None:
            r = r.clone()
            r[:, fresh_tokens] = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)[fresh_tokens]
        r = a if r is None else a @ r  # R_l = Â_l R_{l-1}: later layers multiply from the left
        rolled.append(r[:, 0, num_prefix_tokens:])  # CLS row, patch columns: (B, N - prefix)
    out = torch.stack(rolled).float()
    if not as_grid:
        return out / out.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return divide_by_max(tokens_to_grid(out, grid_size))


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
    prefix_share: torch.Tensor  # (B, H) last layer's CLS attention on extra prefix tokens (VPT prompts; else 0)


def grad_rollout_layers(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor],
                        discard_ratio: float = 0.0, num_prefix_tokens: int = 1) -> list[torch.Tensor]:
    """Class-specific layers for gradient-weighted rollout: Ā_l = mean over heads of A_l ⊙ max(∂y_c/∂A_l, 0),
    then the usual discard and (Ā + I)/2 with rows re-normalised (Chefer et al., "Generic Attention-model
    Explainability", ICCV 2021, weight the attention by its positive gradients this way)."""
    if len(attentions) != len(gradients) or not attentions:
        raise ValueError("grad-rollout needs one gradient per attention map (run the model with keep_grad=True)")
    return [normalize_layer(discard_lowest((a.double() * g.double().clamp_min(0)).mean(dim=1), discard_ratio,
                                           num_prefix_tokens)) for a, g in zip(attentions, gradients)]


def attention_gradients(model: nn.Module, images: torch.Tensor, target: int | torch.Tensor | None = None):
    """Attention maps, their gradients for class ``target`` (default: each image's predicted class), and the
    logits: ``(maps, grads, logits)`` with maps and grads (B, H, N, N) per block."""
    images = images.detach().requires_grad_(True)  # a graph to the maps even when every weight is frozen
    with torch.enable_grad(), record_attention(model, keep_grad=True) as maps:
        logits = model(images)
        if target is None:
            target = logits.argmax(-1)
        target = torch.as_tensor(target, device=logits.device).expand(logits.shape[0])
        logits.gather(1, target[:, None]).sum().backward()
    grads = [m.grad for m in maps]
    if any(g is None for g in grads):
        raise RuntimeError("no gradient reached the attention maps")
    return [m.detach() for m in maps], [g.detach() for g in grads], logits.detach()


METHODS = ("rollout", "grad-rollout")


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
                   per_layer: bool = False, method: str = "rollout", target=None) -> AttentionMaps:
    """Run ``model`` (a VisionTransformer, adapters allowed) on normalised images and collect its maps.

    The prefix tokens (CLS, plus any prompt tokens a method such as VPT inserts after it) are found from the
    shapes: N - g·g. They are kept out of the patch grid; extra ones are treated as replaced at every layer
    (VPT-deep) in the rollout, and the CLS attention they receive is reported as ``prefix_share``.
    """
    fuse_heads(torch.zeros(1, 1, 1, 1), head_fusion)  # fail on a bad mode before running the model
    if method not in METHODS:
        raise ValueError(f"unknown attention method {method!r}; choose one of {', '.join(METHODS)}")
    was_training = model.training
    model.eval()
    try:
        if method == "grad-rollout":
            attentions, gradients, logits = attention_gradients(model, images, target)
        else:
            with record_attention(model) as attentions:
                logits = model(images)
    finally:
        model.train(was_training)
    g = model.config.grid_size
    prefix = attentions[-1].shape[-1] - g * g
    fresh = slice(1, prefix) if prefix > 1 else None
    layers = per_layer_rollout(attentions, head_fusion, discard_ratio, prefix, grid_size=g, fresh_tokens=fresh,
                               gradients=gradients if method == "grad-rollout" else None)
    return AttentionMaps(probs=logits.float().softmax(dim=-1).cpu(), rollout=layers[-1].cpu(),
                         cls_heads=cls_attention(attentions[-1], prefix, grid_size=g).float().cpu(),
                         per_layer=layers.cpu() if per_layer else None,
                         prefix_share=attentions[-1][:, :, 0, 1:prefix].sum(-1).float().cpu())


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
