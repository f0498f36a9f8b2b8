"""Write small random checkpoints in the exact key layout of Google's ViT ``.npz`` files.

Keys, shapes and dtypes follow google-research/vision_transformer (Flax parameter paths joined with "/"):
kernels in Flax's (in, out) order, attention kernels split per head (D, H, Dh) and (H, Dh, D), the patch
embedding as an HWIO convolution kernel. Values are random but shaped like trained weights (LayerNorm scales
near 1, biases non-zero, a non-zero head) so that every converter is exercised by exactness tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def google_shapes(config, *, pre_logits: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every key of a Google checkpoint for ``config`` (a ``vit.ViTConfig``) and its shape, in file order."""
    d, h, dh, m = config.hidden_size, config.num_heads, config.head_dim, config.mlp_dim
    p, c, n = config.patch_size, config.in_channels, config.num_patches
    shapes = {
        "embedding/kernel": (p, p, c, d),  # HWIO convolution kernel
        "embedding/bias": (d,),
        "cls": (1, 1, d),
        "Transformer/posembed_input/pos_embedding": (1, 1 + n, d),  # CLS position first
    }
    for i in range(config.num_layers):
        blk = f"Transformer/encoderblock_{i}"
        att = f"{blk}/MultiHeadDotProductAttention_1"
        shapes[f"{blk}/LayerNorm_0/scale"] = shapes[f"{blk}/LayerNorm_0/bias"] = (d,)
        for name in ("query", "key", "value"):
            shapes[f"{att}/{name}/kernel"] = (d, h, dh)
            shapes[f"{att}/{name}/bias"] = (h, dh)
        shapes[f"{att}/out/kernel"] = (h, dh, d)
        shapes[f"{att}/out/bias"] = (d,)
        shapes[f"{blk}/LayerNorm_2/scale"] = shapes[f"{blk}/LayerNorm_2/bias"] = (d,)
        shapes[f"{blk}/MlpBlock_3/Dense_0/kernel"] = (d, m)  # Flax Dense kernels are (in, out)
        shapes[f"{blk}/MlpBlock_3/Dense_0/bias"] = (m,)
        shapes[f"{blk}/MlpBlock_3/Dense_1/kernel"] = (m, d)
        shapes[f"{blk}/MlpBlock_3/Dense_1/bias"] = (d,)
    shapes["Transformer/encoder_norm/scale"] = shapes["Transformer/encoder_norm/bias"] = (d,)
    width = d
    if pre_logits:
        shapes["pre_logits/kernel"] = (d, pre_logits)
        shapes["pre_logits/bias"] = (pre_logits,)
        width = pre_logits
    shapes["head/kernel"] = (width, config.num_classes)
    shapes["head/bias"] = (config.num_classes,)
    return shapes


def google_params(config, *, seed: int = 0, pre_logits: int | None = None) -> dict[str, np.ndarray]:
    """Random float32 arrays keyed and shaped like a Google checkpoint for ``config``."""
    rng = np.random.default_rng(seed)

    def normal(std, shape):  # float32 throughout: a ViT-B/16-sized file is written in about a second
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    params = {}
    for key, shape in google_shapes(config, pre_logits=pre_logits).items():
        if key.endswith("/scale"):  # LayerNorm scales near 1
            params[key] = np.float32(1.0) + normal(0.1, shape)
        elif key.endswith("/bias") or key == "cls":
            params[key] = normal(0.1, shape)
        elif key.endswith("pos_embedding"):
            params[key] = normal(0.5, shape)
        else:  # kernels, scaled by 1/sqrt(fan-in) so activations stay near unit size
            if key == "embedding/kernel":
                fan_in = shape[0] * shape[1] * shape[2]  # (P, P, C, D)
            elif key.endswith("out/kernel"):
                fan_in = shape[0] * shape[1]  # (H, Dh, D)
            else:
                fan_in = shape[0]  # Dense (in, out) and query/key/value (D, H, Dh)
            params[key] = normal(1.0 / np.sqrt(fan_in), shape)
    return params


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
