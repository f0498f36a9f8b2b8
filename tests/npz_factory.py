"""Write small random checkpoints in the exact key layout of Google's ViT ``.npz`` files.

Keys, shapes and dtypes follow google-research/vision_transformer (Flax parameter paths joined with "/"):
kernels in Flax's (in, out) order, attention kernels split per head (D, H, Dh) and (H, Dh, D), the patch
embedding as an HWIO convolution kernel. Values are random but shaped like trained weights (LayerNorm scales
near 1, biases non-zero, a non-zero head) so that every converter is exercised by exactness tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def google_params(config, *, seed: int = 0, pre_logits: int | None = None) -> dict[str, np.ndarray]:
    """Random float32 arrays keyed like a Google checkpoint for ``config`` (a ``vit.ViTConfig``)."""
    rng = np.random.default_rng(seed)
    d, h, dh, m = config.hidden_size, config.num_heads, config.head_dim, config.mlp_dim
    p, c, n = config.patch_size, config.in_channels, config.num_patches

    def normal(std, shape):  # float32 throughout: a ViT-B/16-sized file is written in about a second
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def w(*shape, fan_in=None):
        return normal(1.0 / np.sqrt(fan_in or shape[0]), shape)

    def b(*shape):
        return normal(0.1, shape)

    def norm(prefix):
        return {f"{prefix}/scale": np.float32(1.0) + b(d), f"{prefix}/bias": b(d)}

    params = {
        "embedding/kernel": w(p, p, c, d, fan_in=p * p * c),  # HWIO
        "embedding/bias": b(d),
        "cls": b(1, 1, d),
        "Transformer/posembed_input/pos_embedding": normal(0.5, (1, 1 + n, d)),
    }
    for i in range(config.num_layers):
        blk = f"Transformer/encoderblock_{i}"
        att = f"{blk}/MultiHeadDotProductAttention_1"
        params.update(norm(f"{blk}/LayerNorm_0"))
        for name in ("query", "key", "value"):
            params[f"{att}/{name}/kernel"] = w(d, h, dh)
            params[f"{att}/{name}/bias"] = b(h, dh)
        params[f"{att}/out/kernel"] = w(h, dh, d, fan_in=d)
        params[f"{att}/out/bias"] = b(d)
        params.update(norm(f"{blk}/LayerNorm_2"))
        params[f"{blk}/MlpBlock_3/Dense_0/kernel"] = w(d, m)
        params[f"{blk}/MlpBlock_3/Dense_0/bias"] = b(m)
        params[f"{blk}/MlpBlock_3/Dense_1/kernel"] = w(m, d)
        params[f"{blk}/MlpBlock_3/Dense_1/bias"] = b(d)
    params.update(norm("Transformer/encoder_norm"))
    width = d
    if pre_logits:
        params["pre_logits/kernel"] = w(d, pre_logits)
        params["pre_logits/bias"] = b(pre_logits)
        width = pre_logits
    params["head/kernel"] = w(width, config.num_classes)
    params["head/bias"] = b(config.num_classes)
    return {k: v.astype(np.float32) for k, v in params.items()}


def write_google_npz(path, config, *, seed: int = 0, prefix: str = "",
                     pre_logits: int | None = None) -> dict[str, np.ndarray]:
    """Write a random Google-layout checkpoint to ``path`` and return its arrays (keys without ``prefix``).

    ``pre_logits``: representation size of the i21k-style Dense+tanh layer, or None (AugReg / fine-tuned
    files). ``prefix``: prepended to every key, e.g. ``"opt/target/"`` as in some optimizer-state exports.
    """
    params = google_params(config, seed=seed, pre_logits=pre_logits)
    path = Path(path)
    with open(path, "wb") as f:  # a file object, so numpy does not append ".npz" to the name
        np.savez(f, **{prefix + k: v for k, v in params.items()})
    return params
