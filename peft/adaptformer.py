"""AdaptFormer: a bottleneck adapter in parallel with every block's MLP.

Paper: Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition", NeurIPS 2022.
As in its official ViT code (``ffn_option="parallel"``, no adapter LayerNorm, "lora" init, scale 0.1):

    x = x + attn(norm1(x))
    x = x + mlp(norm2(x)) + s · up(dropout(ReLU(down(x))))

with down (D → d̂) kaiming-uniform, up (d̂ → D) and both biases zero (so the block starts as the pretrained one),
s = 0.1 fixed, dropout 0.1, d̂ = ``adaptformer_dim`` (8 in the VTAB tables): 12 × (2·768·8 + 8 + 768) = 156,768
parameters for ViT-B/16. The ReLU makes the branch non-linear, so it cannot be merged into the MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, Method, NotMergeableError, Option, check_fresh, freeze_for_adapters, replace_module


class AdaptFormerBlock(Adapter, nn.Module):
    """A pre-norm encoder block with AdaptFormer's parallel adapter; shares the block's sub-modules and names."""

    ADAPTER_PARAMS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
    MERGEABLE = False

    def __init__(self, block: nn.Module, dim: int = 8, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        if dim < 1:
            raise ValueError(f"adaptformer_dim must be at least 1, got {dim}")
        for name, child in block.named_children():  # norm1, attn, norm2, mlp (+ drop paths): shared, same names
            self.add_module(name, child)
        width = block.norm1.normalized_shape[0]
        ref = block.norm1.weight
        self.adapter_down = nn.Linear(width, dim, device=ref.device, dtype=ref.dtype)
        self.adapter_up = nn.Linear(dim, width, device=ref.device, dtype=ref.dtype)
        self.adapter_dropout = nn.Dropout(dropout)
        self.scale = scale
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            for p in (self.adapter_down.bias, self.adapter_up.weight, self.adapter_up.bias):
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        drop1, drop2 = getattr(self, "drop_path1", nn.Identity()), getattr(self, "drop_path2", nn.Identity())
        x = x + drop1(self.attn(self.norm1(x)))
        branch = self.adapter_up(self.adapter_dropout(F.relu(self.adapter_down(x))))
        return x + drop2(self.mlp(self.norm2(x))) + self.scale * branch

    def merge(self) -> nn.Module:
        raise NotMergeableError("AdaptFormer cannot be merged: its adapter has a ReLU between the two projections, "
                                "so it is not a linear map a weight could absorb; keep the adapter instead")

    def extra_repr(self) -> str:
        return f"dim={self.adapter_down.out_features}, scale={self.scale}"


def apply_adaptformer(model: nn.Module, dim: int = 8, scale: float = 0.1, dropout: float = 0.1) -> list[str]:
    """AdaptFormer beside every block's MLP; freezes all but the adapters and the head."""
    check_fresh(model)
    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    for name in names:
        replace_module(model, name, AdaptFormerBlock(model.get_submodule(name), dim, scale, dropout))
    freeze_for_adapters(model)
    return names


METHOD = Method(
    "adaptformer", lambda model, adaptformer_dim=8, adaptformer_scale=0.1, adaptformer_dropout=0.1: apply_adaptformer(
        model, adaptformer_dim, adaptformer_scale, adaptformer_dropout),
    "a parallel bottleneck adapter beside every MLP (d = 8), + head", lr=1e-3, mergeable=False,
    lr_note="a LoRA-like low-rank branch that starts at zero: LoRA's rate",
    options={"adaptformer_dim": Option(8, "AdaptFormer bottleneck width"),
             "adaptformer_scale": Option(0.1, "AdaptFormer output scale s (fixed)"),
             "adaptformer_dropout": Option(0.1, "dropout inside the AdaptFormer branch")},
    paper="Chen et al., AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition, NeurIPS 2022")
