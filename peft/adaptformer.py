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
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Wrapper, Cost, Method, MethodConfig
from .fields import option


@dataclass(frozen=True)
class AdaptFormerConfig(MethodConfig):
    """AdaptFormer's options: the official code's parallel adapter (scale 0.1, "lora" init, dropout 0.1) at the
    width of the VTAB tables' row (d = 8)."""

    PREFIX: ClassVar[str] = "adaptformer"
    dim: int = option(8, "AdaptFormer bottleneck width", min=1)
    scale: float = option(0.1, "AdaptFormer output scale s (fixed)")
    dropout: float = option(0.1, "dropout inside the AdaptFormer branch", min=0, max=1)


class AdaptFormerBlock(Wrapper, nn.Module):
    """An encoder block (its ``norm1``, ``attn``, ``norm2``, ``mlp`` and drop-paths taken over, same names) with
    AdaptFormer's branch beside its MLP sub-layer: s · branch(x) is added outside the MLP's drop-path, as the official
    code does. The forward is the block's, written out (``vit.model.EncoderBlock.forward``) plus the branch."""

    ADAPTER_PARAMS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
    DROPOUTS = ("adapter_dropout",)
    CANNOT_MERGE = ("its adapter has a ReLU between the two projections, so it is not a linear map a weight could "
                    "absorb; keep the adapter")

    def __init__(self, block: nn.Module, config: AdaptFormerConfig):
        super().__init__(block)  # norm1, attn, norm2, mlp, drop paths: shared, same names
        width = block.norm1.normalized_shape[0]
        ref = block.norm1.weight
        self.adapter_down = nn.Linear(width, config.dim, device=ref.device, dtype=ref.dtype)
        self.adapter_up = nn.Linear(config.dim, width, device=ref.device, dtype=ref.dtype)
        self.adapter_dropout = nn.Dropout(config.dropout)
        self.scale = config.scale
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            for p in (self.adapter_down.bias, self.adapter_up.weight, self.adapter_up.bias):
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        branch = self.adapter_up(self.adapter_dropout(F.relu(self.adapter_down(x))))
        return x + self.drop_path2(self.mlp(self.norm2(x))) + self.scale * branch

    def extra_repr(self) -> str:
        return f"dim={self.adapter_down.out_features}, scale={self.scale}"


METHOD = Method(
    "adaptformer", "a parallel bottleneck adapter beside every MLP (d = 8), + head", lr=1e-3,
    config=AdaptFormerConfig, wrappers=(AdaptFormerBlock,),
    targets=lambda model, config: [f"blocks.{i}" for i in range(len(model.blocks))],
    wrap=lambda model, name, config: AdaptFormerBlock(model.get_submodule(name), config),
    cost=lambda config: Cost(branches={"mlp": config.dim}),
    lr_note="a LoRA-like low-rank branch that starts at zero: LoRA's rate",
    paper="Chen et al., AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition, NeurIPS 2022")

__all__ = ["AdaptFormerBlock", "AdaptFormerConfig", "METHOD"]
