"""Google's ViT ``.npz`` checkpoints ⇄ :class:`vit.VisionTransformer`, driven by one table (``loaders.npz_table``).

Reference: google-research/vision_transformer (``vit_jax/checkpoint.py`` writes and reads these files).
A checkpoint is a zip of ``.npy`` float32 arrays keyed by Flax parameter paths joined with "/", for example
``Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel``. Accepted: the published files'
pre-linen numbering, the names Google's current Flax code writes, and either under an ``opt/target/`` prefix
(optimizer state beside it is skipped without being decompressed).

Reading is defensive and streaming: every member's ``.npy`` header (key, shape, dtype) is checked against the
architecture its shapes describe before any array is decompressed; a declared size that the member's
compressed size cannot hold is refused; arrays are then read one at a time straight into the model, so the
peak memory of :func:`load_npz` stays near the model's own size whatever the file claims. Nothing is ever
unpickled. Every failure is a :class:`CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import torch

from vit import VisionTransformer, ViTConfig, resample_pos_embed
from vit.model import RESIZE_METHODS

from .atomic import atomic_write
from .errors import CheckpointError
from .npz_reader import ArrayInfo, NpzArchive, _ArrayDict, _some, read_npz  # noqa: F401  (re-exported)
from .npz_table import CONVERTERS, NAMINGS, Converter, checkpoint_table, detect_naming, refuse_big_vision  # noqa: F401

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "Converter", "CONVERTERS", "NAMINGS", "RESIZE_METHODS", "ZERO_HEAD_MESSAGE",
           "checkpoint_table", "has_zero_head", "read_npz", "infer_config", "load_npz", "save_npz",
           "params_to_model", "model_to_params"]

ZERO_HEAD_MESSAGE = ("this checkpoint's head is all zero (Google's ImageNet-21k files have no trained classifier): "
                     "fine-tune first")


# ── the config is written in the shapes ─────────────────────────────────────────────────────────────────

def _shape(arrays, key, ndim, what, source):
    if key not in arrays.keys:
        raise CheckpointError(f"{source}: cannot infer {what}: key {key!r} is missing")
    shape = arrays.info(key).shape
    if len(shape) != ndim:
        raise CheckpointError(f"{source}: cannot infer {what}: {key!r} has shape {shape}, expected {ndim} dims")
    if 0 in shape:
        raise CheckpointError(f"{source}: cannot infer {what}: {key!r} has an empty dimension {shape}")
    return shape


def _infer(arrays, source: str) -> tuple[ViTConfig, str]:
    keys = arrays.keys
    refuse_big_vision(keys, source)
    if any(k.startswith("ResNet/") for k in keys):
        raise CheckpointError(f"{source} is a hybrid ResNet+ViT checkpoint ('ResNet/...' keys); only plain "
                              "ViT checkpoints (patch embedding by one convolution) are supported")
    p, q, channels, hidden = _shape(arrays, "embedding/kernel", 4, "patch size and hidden size", source)
    if p != q:
        raise CheckpointError(f"{source}: 'embedding/kernel' has shape {(p, q, channels, hidden)}: "
                              "patches must be square (expected HWIO kernel (P, P, C, D))")

    blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    if not blocks:
        detect_naming(keys, source)  # names a big_vision file (scanned blocks) before the generic message
        raise CheckpointError(f"{source}: cannot infer depth: no 'Transformer/encoderblock_<i>/...' keys")
    if blocks[-1] != len(blocks) - 1:  # bounded by the blocks present: no range() over a crafted huge number
        present = set(blocks)
        missing = [i for i in range(len(blocks)) if i not in present]
        raise CheckpointError(f"{source}: encoder blocks {missing[:10]}{' ...' if len(missing) > 10 else ''} are "
                              f"missing (found {len(blocks)} blocks, numbered up to {blocks[-1]})")
    naming = detect_naming(keys, source)
    names = NAMINGS[naming]

    qkey = f"Transformer/encoderblock_0/{names['attn']}/query/kernel"
    if qkey in keys and arrays.info(qkey).ndim != 3:
        raise CheckpointError(
            f"{source}: cannot infer num_heads: {qkey!r} has shape {arrays.info(qkey).shape}; Google's layout "
            f"splits heads, (D, H, Dh) = ({hidden}, H, {hidden}/H)")
    d, heads, head_dim = _shape(arrays, qkey, 3, "num_heads", source)
    if d != hidden or heads * head_dim != hidden:
        raise CheckpointError(f"{source}: cannot infer num_heads: {qkey!r} has shape {(d, heads, head_dim)}, "
                              f"expected (D, H, Dh) with D = H*Dh = {hidden} (the hidden size of 'embedding/kernel')")

    _, mlp_dim = _shape(arrays, f"Transformer/encoderblock_0/{names['mlp']}/Dense_0/kernel", 2, "mlp_dim", source)

    pos_key = "Transformer/posembed_input/pos_embedding"
    _, tokens, _ = _shape(arrays, pos_key, 3, "image size", source)
    grid = math.isqrt(max(tokens - 1, 0))
    if grid * grid != tokens - 1 or grid == 0:
        raise CheckpointError(f"{source}: {pos_key!r} has {tokens} positions; expected 1 CLS + a square grid "
                              "of patches (e.g. 1 + 14*14 = 197)")

    representation_size = None
    if "pre_logits/kernel" in keys:
        representation_size = _shape(arrays, "pre_logits/kernel", 2, "representation_size", source)[1]
    _, num_classes = _shape(arrays, "head/kernel", 2, "num_classes", source)
    try:
        config = ViTConfig(image_size=grid * p, patch_size=p, hidden_size=hidden, mlp_dim=mlp_dim,
                           num_heads=heads, num_layers=len(blocks), num_classes=num_classes,
                           representation_size=representation_size, in_channels=channels)
    except ValueError as e:
        raise CheckpointError(f"{source}: inconsistent shapes: {e}") from e
    return config, naming


def infer_config(params, source: str = "checkpoint") -> ViTConfig:
    """Read the ViTConfig from array shapes (hidden size, patch, depth, heads, MLP width, grid, head).

    ``params``: a dict of arrays, or an open :class:`NpzArchive` (headers only).
    """
    arrays = params if isinstance(params, NpzArchive) else _ArrayDict(params)
    return _infer(arrays, source)[0]


# ── loading ──────────────────────────────────────────────────────────────────────────────────────────────

def _check_against_table(arrays, config, naming, source):
    """Missing keys, unexpected keys, every shape and dtype, all reported at once, from the headers alone."""
    table = checkpoint_table(config, naming)
    expected = {key for _, key, _ in table}
    missing = [key for _, key, _ in table if key not in arrays.keys]
    unexpected = sorted(set(arrays.keys) - expected)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_some(unexpected)}")
    torch_shapes = _torch_shapes(config)
    for name, key, conv_ in table:
        if key in arrays.keys:
            want = conv_.npz_shape(torch_shapes[name], config.num_heads)
            info = arrays.info(key)
            if info.shape != want:
                problems.append(f"{key!r} has shape {info.shape}, expected {want} "
                                f"(for {name}, converter {conv_.name})")
            elif not np.issubdtype(info.dtype, np.floating):
                problems.append(f"{key!r} has dtype {info.dtype}, expected floating point")
    if problems:
        shown = problems[:6] + ([f"... ({len(problems) - 6} more problems)"] if len(problems) > 6 else [])
        raise CheckpointError(f"{source} does not fit the ViT its shapes describe ({_describe(config)}):\n  "
                              + "\n  ".join(shown))


def _describe(c: ViTConfig) -> str:
    pre = f", pre_logits {c.representation_size}" if c.representation_size else ""
    return (f"patch {c.patch_size}, hidden {c.hidden_size}, {c.num_layers} blocks, {c.num_heads} heads, "
            f"MLP {c.mlp_dim}, {c.image_size} px, {c.num_classes} classes{pre}")


def _torch_shapes(config: ViTConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in VisionTransformer(config).state_dict().items()}


def has_zero_head(model: VisionTransformer) -> bool:
    """True when the classifier head is exactly zero (Google's ImageNet-21k files ship it so on purpose)."""
    return not bool(model.head.weight.detach().any()) and not bool(model.head.bias.detach().any())


def params_to_model(params, num_classes: int | None = None, image_size: int | None = None, *,
                    dropout_rate: float = 0.0, attention_dropout_rate: float = 0.0, resize: str = "google",
                    source: str = "checkpoint") -> VisionTransformer:
    """Build a VisionTransformer from Google-layout arrays (a dict, or an open :class:`NpzArchive`)."""
    if resize not in RESIZE_METHODS:
        raise CheckpointError(f"resize={resize!r}: choose one of {', '.join(RESIZE_METHODS)}")
    arrays = params if isinstance(params, NpzArchive) else _ArrayDict(params)
    file_config, naming = _infer(arrays, source)
    _check_against_table(arrays, file_config, naming, source)

    config = file_config.replace(dropout_rate=dropout_rate, attention_dropout_rate=attention_dropout_rate)
    if num_classes is not None:  # Google's fine-tuning: no pre_logits, a new zero-initialised head
        if num_classes < 1:
            raise CheckpointError(f"num_classes must be positive, got {num_classes}")
        config = config.replace(num_classes=num_classes, representation_size=None)
    if image_size is not None and image_size != config.image_size:
        p = config.patch_size
        if image_size < 1 or image_size % p:
            raise CheckpointError(
                f"{source}: image_size={image_size} is not divisible by the checkpoint's patch size {p}; "
                f"use a multiple of {p} such as {max(image_size // p, 1) * p} or {(max(image_size, 0) // p + 1) * p}")
        config = config.replace(image_size=image_size)

    with torch.device("meta"):  # no random init: every tensor is overwritten below
        model = VisionTransformer(config)
    model = model.to_empty(device="cpu").float()
    state = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for name, key, conv_ in checkpoint_table(file_config, naming):  # one array in memory at a time
            if name not in state or (name.startswith("head.") and num_classes is not None):
                continue
            value = torch.from_numpy(np.ascontiguousarray(conv_.to_torch(arrays.read(key), config.num_heads)))
            if name == "pos_embed" and config.grid_size != file_config.grid_size:
                log.info("%s: resizing the position embedding from a %dx%d to a %dx%d patch grid "
                         "(image size %d -> %d, %s), CLS position kept", source, file_config.grid_size,
                         file_config.grid_size, config.grid_size, config.grid_size,
                         file_config.image_size, config.image_size, resize)
                value = resample_pos_embed(value.float(), config.grid_size, method=resize)
            state[name].copy_(value)
            loaded.add(name)
            del value
        if num_classes is not None:
            model.head.weight.zero_()
            model.head.bias.zero_()
            loaded |= {"head.weight", "head.bias"}
        elif has_zero_head(model):
            log.warning("%s: %s", source, ZERO_HEAD_MESSAGE)
    assert loaded == set(state), f"table does not cover {sorted(set(state) - loaded)}"  # a bug, not bad input
    return model.eval()


def load_npz(path, num_classes: int | None = None, image_size: int | None = None, *,
             dropout_rate: float = 0.0, attention_dropout_rate: float = 0.0,
             resize: str = "google") -> VisionTransformer:
    """Load a Google ViT ``.npz`` checkpoint into a VisionTransformer (eval mode, float32).

    The config (size, depth, heads, patch, resolution, pre_logits, classes) is read from the array headers, and
    every key, shape and dtype is checked before any array is decompressed. ``num_classes=K`` drops
    ``pre_logits`` and starts a zero-initialised K-way head (Google's fine-tuning recipe); ``image_size=S``
    resizes the position-embedding grid (S a multiple of the patch size) with ``resize``: "google" (default:
    ``scipy.ndimage.zoom(order=1)`` as Google's ``load_pretrained`` and the official RLRR code, corners
    aligned), "bilinear" (half-pixel, timm's npz loader) or "bicubic" (antialiased, timm's
    ``resample_abs_pos_embed``). Dropout rates are not stored in checkpoints; set them here for fine-tuning.
    A loaded head that is all zero (Google's ImageNet-21k files) gives one warning.
    """
    with NpzArchive(path) as archive:
        return params_to_model(archive, num_classes=num_classes, image_size=image_size, dropout_rate=dropout_rate,
                               attention_dropout_rate=attention_dropout_rate, resize=resize, source=str(path))


# ── saving ───────────────────────────────────────────────────────────────────────────────────────────────

def model_to_params(model: VisionTransformer, naming: str = "pre-linen") -> dict[str, np.ndarray]:
    """The model's weights as Google-layout float32 arrays (the inverse of :func:`params_to_model`)."""
    config = model.config
    state = model.state_dict()
    table = checkpoint_table(config, naming)
    names = {name for name, _, _ in table}
    missing = sorted(names - set(state))
    unexpected = sorted(set(state) - names)
    if missing or unexpected:
        raise CheckpointError(
            "the model's parameters do not match Google's layout"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; unexpected: {', '.join(unexpected)}" if unexpected else "")
            + ". Merge adapters first (peft.merge_adapters) so that only plain ViT weights remain.")
    out = {}
    for name, key, conv_ in table:
        tensor = state[name].detach().to("cpu", torch.float32)
        out[key] = np.ascontiguousarray(conv_.to_npz(tensor, config.num_heads).numpy())
    return out


def save_npz(model: VisionTransformer, path, naming: str = "pre-linen") -> Path:
    """Write the model in Google's ``.npz`` layout, atomically (a temp file in the same folder, then rename).

    ``naming``: "pre-linen" (the published files' block names, default) or "linen" (Google's current code)."""
    path = Path(path)
    params = model_to_params(model, naming)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise CheckpointError(f"cannot save {path}: it is a folder; give a file name such as {path / 'model.npz'}")
    with atomic_write(path) as f:
        np.savez(f, **params)
    return path
