"""Adapter: a sequential bottleneck with its own residual after every block's MLP (the VTAB tables' "Adapter").

Papers: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019 (adapters after the attention
and after the feed-forward sub-layers); the "Adapter 0.16M" row of the VTAB-1k tables (NOAH, RLRR papers) comes
from NOAH's code (ZhangYuanhan-AI/NOAH ``model/supernet_transformer_prompt.py:395``,
``model/module/adapter_super.py``), which puts one adapter on the MLP output only:

    h = mlp(norm2(x));   x = x + h + up(QuickGELU(down(h)))          QuickGELU(z) = z · sigmoid(1.702 z)

with down (D → d) and up (d → D) xavier-uniform, biases N(0, 1e-6) (``adapter_super.py:_init_weights``: the block
is not the pretrained one at step 0), d = 8 (``experiments/Adapter/ViT-B_prompt_adapter_8.yaml``): 12 ×
(2 · 768 · 8 + 8 + 768) = 156,768 parameters for ViT-B/16. ``adapter_placement="both"`` adds Houlsby's second
adapter on the attention output (313,536). The adapter wraps the sub-layer's last Linear (``mlp.fc2``,
``attn.proj``), which keeps its ``weight``/``bias`` names, so the block and the attention module stay as they are
(attention maps, fused attention) and no block forward is rewritten; NOAH applies it after the MLP's output
dropout, here it comes before it (the same with dropout 0, this project's default). Not mergeable (the
activation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Wrapper, Cost, Method, MethodConfig
from .fields import option

PLACEMENTS = ("mlp", "both")


@dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    """The Adapter's options: NOAH's VTAB row (``experiments/Adapter/ViT-B_prompt_adapter_8.yaml``: d = 8, MLP only)."""

    PREFIX: ClassVar[str] = "adapter"
    dim: int = option(8, "Adapter bottleneck width d", min=1)
    placement: str = option("mlp", "mlp: after every MLP (NOAH, the VTAB row) | both: also after the attention (Houlsby)", choices=PLACEMENTS)


class SequentialAdapter(Wrapper, nn.Module):
    """A frozen ``nn.Linear`` (h = x Wᵀ + b, under its old parameter names) followed by h + up(QuickGELU(down(h)))."""

    ADAPTER_PARAMS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
    CANNOT_MERGE = "its bottleneck has a non-linearity (QuickGELU), which no weight can absorb; keep the adapter"
    WRAPS = nn.Linear

    def __init__(self, base: nn.Linear, config: AdapterConfig):
        super().__init__(base)
        width, dim = base.out_features, config.dim
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.adapter_down = nn.Linear(width, dim, **kw)
        self.adapter_up = nn.Linear(dim, width, **kw)
        with torch.no_grad():
            for lin in (self.adapter_down, self.adapter_up):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)
        z = self.adapter_down(h)
        return h + self.adapter_up(z * torch.sigmoid(1.702 * z))  # QuickGELU, as NOAH's adapter

    def extra_repr(self) -> str:
        return f"dim={self.adapter_down.out_features}"


def adapter_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Every block's ``mlp.fc2`` (and ``attn.proj`` first, ``placement="both"``)."""
    parts = ("attn.proj", "mlp.fc2") if config.placement == "both" else ("mlp.fc2",)
    return [f"blocks.{i}.{part}" for i in range(len(model.blocks)) for part in parts]


METHOD = Method(
    "adapter", "a sequential bottleneck adapter after every MLP (d = 8, NOAH's VTAB row), + head",
    lr=1e-3, config=AdapterConfig, wrappers=(SequentialAdapter,), targets=adapter_targets,
    cost=lambda config: Cost(branches=dict.fromkeys(("attn", "mlp") if config.placement == "both" else ("mlp",),
                                                    config.dim)),
    lr_note="NOAH's Adapter VTAB runs use 1e-3 (configs/Adapter/VTAB/slurm_train_adapter_vtab.sh)",
    paper="Houlsby et al., Parameter-Efficient Transfer Learning for NLP, ICML 2019")

__all__ = ["AdapterConfig", "METHOD", "SequentialAdapter", "adapter_targets"]
