"""The declarative table behind Google's ``.npz`` files: (PyTorch name, npz key, converter) rows.

Each converter is an einops pattern from the file's layout to PyTorch's; read right to left it is the inverse,
so the same rows drive loading and saving. The block sub-module names depend on which of Google's codes wrote
the file (:data:`NAMINGS`); :func:`detect_naming` tells them apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from einops import rearrange

from vit import ViTConfig

from .errors import CheckpointError

# ── converters ───────────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class Converter:
    """A layout change written as an einops pattern from the npz layout to the PyTorch layout."""

    name: str
    pattern: str  # "npz axes -> torch axes"; letters: d hidden, h heads, k head dim, i/o in/out, p/q patch

    @property
    def inverse_pattern(self) -> str:
        npz, torch_ = self.pattern.split("->")
        return f"{torch_.strip()} -> {npz.strip()}"

    def _axes(self, num_heads: int) -> dict:
        return {"h": num_heads} if re.search(r"\bh\b", self.pattern) else {}

    def to_torch(self, array, num_heads: int):
        return rearrange(array, self.pattern, **self._axes(num_heads))

    def to_npz(self, tensor, num_heads: int):
        return rearrange(tensor, self.inverse_pattern, **self._axes(num_heads))

    def npz_shape(self, torch_shape, num_heads: int) -> tuple[int, ...]:
        """The shape a checkpoint array must have to become a tensor of ``torch_shape`` (no memory used)."""
        meta = torch.empty(torch_shape, device="meta")
        return tuple(self.to_npz(meta, num_heads).shape)


dense = Converter("dense", "i o -> o i")
attn_in = Converter("attn_in", "d h k -> (h k) d")
attn_in_bias = Converter("attn_in_bias", "h k -> (h k)")
attn_out = Converter("attn_out", "h k d -> d (h k)")
conv = Converter("conv", "p q i o -> o i p q")  # HWIO -> OIHW
as_is = Converter("as_is", "... -> ...")
CONVERTERS = {c.name: c for c in (dense, attn_in, attn_in_bias, attn_out, conv, as_is)}


# ── the table: (PyTorch name, npz key, converter) ───────────────────────────────────────────────────────

_BLOCK = "Transformer/encoderblock_{i}"
_ATTN = _BLOCK + "/{attn}"
_MLP = _BLOCK + "/{mlp}"

# The names of the four sub-modules of an encoder block, by the code that wrote the file. Flax numbered unnamed
# sub-modules; the published checkpoints come from the pre-linen code, which numbered them across the block,
# while Google's current linen code numbers them per type. Google's own checkpoint.load reads both.
NAMINGS = {
    "pre-linen": {"norm1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_1", "norm2": "LayerNorm_2",
                  "mlp": "MlpBlock_3"},  # the published .npz files
    "linen": {"norm1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_0", "norm2": "LayerNorm_1",
              "mlp": "MlpBlock_0"},  # what vit_jax/models_vit.py writes today
}

EMBEDDING_ROWS = [
    ("patch_embed.weight", "embedding/kernel", conv),
    ("patch_embed.bias", "embedding/bias", as_is),
    ("cls_token", "cls", as_is),
    ("pos_embed", "Transformer/posembed_input/pos_embedding", as_is),
]
BLOCK_ROWS = [  # repeated for i = 0 .. num_layers-1
    ("blocks.{i}.norm1.weight", _BLOCK + "/{norm1}/scale", as_is),
    ("blocks.{i}.norm1.bias", _BLOCK + "/{norm1}/bias", as_is),
    ("blocks.{i}.attn.q.weight", _ATTN + "/query/kernel", attn_in),
    ("blocks.{i}.attn.q.bias", _ATTN + "/query/bias", attn_in_bias),
    ("blocks.{i}.attn.k.weight", _ATTN + "/key/kernel", attn_in),
    ("blocks.{i}.attn.k.bias", _ATTN + "/key/bias", attn_in_bias),
    ("blocks.{i}.attn.v.weight", _ATTN + "/value/kernel", attn_in),
    ("blocks.{i}.attn.v.bias", _ATTN + "/value/bias", attn_in_bias),
    ("blocks.{i}.attn.proj.weight", _ATTN + "/out/kernel", attn_out),
    ("blocks.{i}.attn.proj.bias", _ATTN + "/out/bias", as_is),
    ("blocks.{i}.norm2.weight", _BLOCK + "/{norm2}/scale", as_is),
    ("blocks.{i}.norm2.bias", _BLOCK + "/{norm2}/bias", as_is),
    ("blocks.{i}.mlp.fc1.weight", _MLP + "/Dense_0/kernel", dense),
    ("blocks.{i}.mlp.fc1.bias", _MLP + "/Dense_0/bias", as_is),
    ("blocks.{i}.mlp.fc2.weight", _MLP + "/Dense_1/kernel", dense),
    ("blocks.{i}.mlp.fc2.bias", _MLP + "/Dense_1/bias", as_is),
]
FINAL_NORM_ROWS = [
    ("norm.weight", "Transformer/encoder_norm/scale", as_is),
    ("norm.bias", "Transformer/encoder_norm/bias", as_is),
]
PRE_LOGITS_ROWS = [  # only in the original ImageNet-21k files (representation_size set)
    ("pre_logits.weight", "pre_logits/kernel", dense),
    ("pre_logits.bias", "pre_logits/bias", as_is),
]
HEAD_ROWS = [
    ("head.weight", "head/kernel", dense),
    ("head.bias", "head/bias", as_is),
]


def checkpoint_table(config: ViTConfig, naming: str = "pre-linen") -> list[tuple[str, str, Converter]]:
    """Every (PyTorch name, npz key, converter) row for a model with this config, in file order."""
    names = NAMINGS[naming]
    rows = list(EMBEDDING_ROWS)
    for i in range(config.num_layers):
        rows += [(t.format(i=i), k.format(i=i, **names), c) for t, k, c in BLOCK_ROWS]
    rows += FINAL_NORM_ROWS
    if config.representation_size:
        rows += PRE_LOGITS_ROWS
    return rows + HEAD_ROWS


def detect_naming(keys, source: str = "checkpoint") -> str:
    """Which naming of :data:`NAMINGS` the keys use (looked up in block 0); a clear error for any other."""
    refuse_big_vision(keys, source)  # its blocks may carry the linen names, yet it is another model
    block0 = {k.split("/")[2] for k in keys if k.startswith("Transformer/encoderblock_0/") and k.count("/") >= 3}
    for name, parts in NAMINGS.items():
        if {parts["attn"], parts["mlp"]} <= block0:
            return name
    refuse_big_vision(keys, source)
    known = "; ".join(f"{n}: {', '.join(p.values())}" for n, p in NAMINGS.items())
    raise CheckpointError(f"{source}: encoder block 0 has sub-modules {sorted(block0) or 'none'}, which match no "
                          f"known naming ({known})")


def is_big_vision(keys) -> bool:
    """big_vision's layout, as timm's npz loader recognises it: arrays under ``params/`` (``params/img/`` for SigLIP),
    a top-level ``pos_embedding`` instead of ``Transformer/posembed_input/pos_embedding``, or scanned blocks."""
    return any(k.startswith("params/") or k == "pos_embedding" or k.startswith("Transformer/encoderblock/")
               or k.startswith("MAPHead_") for k in keys)


def refuse_big_vision(keys, source: str = "checkpoint") -> None:
    """Raise, saying why, when the keys are big_vision's (see :func:`is_big_vision`)."""
    if is_big_vision(keys):
        raise CheckpointError(
            f"{source} is a big_vision checkpoint ({'params/ prefix, ' if any(k.startswith('params/') for k in keys) else ''}"
            "a top-level 'pos_embedding' or scanned 'Transformer/encoderblock/' arrays). big_vision's ViTs are a "
            "different model: position embeddings without a CLS slot (the CLS token, when there is one, is added "
            "after them), global-average or MAP-head pooling, optionally stacked (scanned) blocks; not supported")
