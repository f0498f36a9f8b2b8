"""An independent float64 numpy forward pass of Google's ViT, written directly in Google's checkpoint layout
(einsums over the (D, H, Dh) and (H, Dh, D) attention kernels, HWIO patch kernel, Flax Dense (in, out)), following
vit_jax/models_vit.py: LayerNorm eps 1e-6, tanh-approximate GELU, pre_logits Dense + tanh. Used by test_model.py
and test_npz_variants.py."""

from __future__ import annotations

import math

import numpy as np
import torch

import vit

# A second small config with odd sizes, so that no two axes can be confused with each other.
ODD = vit.ViTConfig(image_size=24, patch_size=4, hidden_size=24, mlp_dim=40, num_heads=3, num_layers=3,
                    num_classes=7)


def _layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def google_forward(params: dict[str, np.ndarray], images_nchw: np.ndarray) -> np.ndarray:
    """Logits of Google's ViT, computed in float64 from the raw checkpoint arrays."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    x = images_nchw.astype(np.float64).transpose(0, 2, 3, 1)  # Google works in NHWC
    ph, pw, _, _ = p["embedding/kernel"].shape
    b, h, w, c = x.shape
    x = x.reshape(b, h // ph, ph, w // pw, pw, c)  # (B, gh, P, gw, P, C)
    x = np.einsum("bipjqc,pqcd->bijd", x, p["embedding/kernel"], optimize=True) + p["embedding/bias"]
    x = x.reshape(b, -1, x.shape[-1])  # row-major patch order
    cls = np.broadcast_to(p["cls"], (b, 1, x.shape[-1]))
    x = np.concatenate([cls, x], axis=1) + p["Transformer/posembed_input/pos_embedding"]

    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in p:
        blk = f"Transformer/encoderblock_{i}"
        att = f"{blk}/MultiHeadDotProductAttention_1"
        y = _layer_norm(x, p[f"{blk}/LayerNorm_0/scale"], p[f"{blk}/LayerNorm_0/bias"])
        q, k, v = (np.einsum("bnd,dhk->bnhk", y, p[f"{att}/{n}/kernel"], optimize=True) + p[f"{att}/{n}/bias"]
                   for n in ("query", "key", "value"))
        depth = q.shape[-1]
        weights = _softmax(np.einsum("bqhk,bthk->bhqt", q / math.sqrt(depth), k, optimize=True))
        o = np.einsum("bhqt,bthk->bqhk", weights, v, optimize=True)
        x = x + np.einsum("bqhk,hkd->bqd", o, p[f"{att}/out/kernel"], optimize=True) + p[f"{att}/out/bias"]
        y = _layer_norm(x, p[f"{blk}/LayerNorm_2/scale"], p[f"{blk}/LayerNorm_2/bias"])
        y = _gelu_tanh(y @ p[f"{blk}/MlpBlock_3/Dense_0/kernel"] + p[f"{blk}/MlpBlock_3/Dense_0/bias"])
        x = x + y @ p[f"{blk}/MlpBlock_3/Dense_1/kernel"] + p[f"{blk}/MlpBlock_3/Dense_1/bias"]
        i += 1

    x = _layer_norm(x, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])[:, 0]
    if "pre_logits/kernel" in p:
        x = np.tanh(x @ p["pre_logits/kernel"] + p["pre_logits/bias"])
    return x @ p["head/kernel"] + p["head/bias"]


def images(config, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, config.in_channels, config.image_size, config.image_size, generator=g) * 2 - 1


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())
