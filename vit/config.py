"""Model configurations with the names used in the ViT paper (Dosovitskiy et al., ICLR 2021).

The presets follow google-research/vision_transformer ``configs/models.py``. ``testing`` is a tiny model used
by the tests to write fake checkpoints in Google's layout, and ``ViT-Mini/4`` is the small model that the
offline quick start trains from scratch on Fashion-MNIST.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Flax's nn.gelu defaults to the tanh approximation, which Google's checkpoints were trained with; the PyTorch
# ports the PEFT papers used (timm's and the official RLRR/SSF/VPT/NOAH code, nn.GELU()) compute the exact erf form.
GELU_KINDS = ("tanh", "erf")
DROP_PATH_MODES = ("sample", "sample-floor", "element")  # see vit.model.DropPath


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224  # input height = width, in pixels
    patch_size: int = 16  # P: each P×P patch becomes one token
    hidden_size: int = 768  # D: token width
    mlp_dim: int = 3072  # width of the MLP inside each block
    num_heads: int = 12  # H: attention heads; D must be divisible by H
    num_layers: int = 12  # number of encoder blocks
    num_classes: int = 1000  # outputs of the classification head
    representation_size: int | None = None  # width of the Dense+tanh "pre_logits" layer (i21k files), or None
    dropout_rate: float = 0.0  # dropout after the embeddings, inside the MLP and on the attention output
    attention_dropout_rate: float = 0.0  # dropout on the attention probabilities
    drop_path_rate: float = 0.0  # largest residual-branch drop rate (last block), rising linearly from 0 at block 0
    drop_path_mode: str = "sample"  # sample: stochastic depth (a sample's whole branch) | sample-floor: the same, drawn as timm 0.4 did | element: per element
    in_channels: int = 3
    gelu: str = "tanh"  # tanh: the approximation Google's JAX model computes | erf: exact (PyTorch ports, timm)

    def __post_init__(self):
        if self.gelu not in GELU_KINDS:
            raise ValueError(f"gelu must be one of {', '.join(GELU_KINDS)}, got {self.gelu!r}")
        if self.drop_path_mode not in DROP_PATH_MODES:
            raise ValueError(f"drop_path_mode must be one of {', '.join(DROP_PATH_MODES)}, "
                             f"got {self.drop_path_mode!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}: "
                f"choose a multiple of {self.patch_size}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)


def _preset(patch, hidden, mlp, heads, layers, image_size=224, **kw) -> ViTConfig:
    return ViTConfig(image_size=image_size, patch_size=patch, hidden_size=hidden, mlp_dim=mlp,
                     num_heads=heads, num_layers=layers, **kw)


CONFIGS: dict[str, ViTConfig] = {
    "testing": _preset(8, 16, 32, 2, 2, image_size=32, num_classes=10),
    "ViT-Mini/4": _preset(4, 96, 384, 3, 4, image_size=28, num_classes=10),
    "ViT-Ti/16": _preset(16, 192, 768, 3, 12),
    "ViT-S/16": _preset(16, 384, 1536, 6, 12),
    "ViT-B/16": _preset(16, 768, 3072, 12, 12),
    "ViT-B/32": _preset(32, 768, 3072, 12, 12),
    "ViT-L/16": _preset(16, 1024, 4096, 16, 24),
    "ViT-L/32": _preset(32, 1024, 4096, 16, 24),
    "ViT-H/14": _preset(14, 1280, 5120, 16, 32),
}


def get_config(name: str, **overrides) -> ViTConfig:
    """A preset by name (``"ViT-B/16"``; ``"ViT-B_16"`` and ``"B/16"`` also work), with fields overridden."""
    key = name.replace("_", "/")
    if key not in CONFIGS and f"ViT-{key}" in CONFIGS:
        key = f"ViT-{key}"
    if key not in CONFIGS:
        raise KeyError(f"unknown ViT config {name!r}; known: {', '.join(CONFIGS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ViTConfig)}
    if unknown:
        raise TypeError(f"unknown ViTConfig field(s) {sorted(unknown)} for get_config({name!r})")
    return dataclasses.replace(CONFIGS[key], **overrides)
