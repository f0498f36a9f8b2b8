"""Adapter: a sequential bottleneck with its own residual after every block's MLP (the VTAB tables' "Adapter").

Papers: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019 (adapters after the attention
and after the feed-forward sub-layers); the "Adapter 0.16M" row of the VTAB-1k tables (NOAH, RLRR papers) comes
from NOAH's VTAB runs (ZhangYuanhan-AI/NOAH@e9c55f3 ``model/supernet_vision_transformer_timm.py:365``,
``model/module/adapter_super.py:62-74``), which put one adapter on the MLP output, *after* its drop-path:

    h = drop_path(mlp(norm2(x)));   x = x + h + up(dropout(QuickGELU(down(h))))     QuickGELU(z) = z · sigmoid(1.702 z)

d = 8 (``experiments/Adapter/ViT-B_prompt_adapter_8.yaml``): 12 × (2 · 768 · 8 + 8 + 768) = 156,768 parameters for
ViT-B/16. Without drop-path this is x + h + adapter(h) on the MLP output; with it, a dropped sample's adapter sees
zeros (its bias path still adds). This is the official placement, so it is the only one here.
``adapter_placement="both"`` adds Houlsby's second adapter after the attention sub-layer, placed the same way
(after its drop-path): 313,536 parameters.

Initialisation (``adapter_init``): "xavier" is ``AdapterSuper``'s own (xavier-uniform weights, biases N(0, 1e-6),
``adapter_super.py:38-45``: the block is not the pretrained one at step 0); "trunc-normal" is what NOAH's VTAB runs
actually trained from: ``VisionTransformer.init_weights`` re-draws every ``nn.Linear`` truncated-normal std 0.02 with
zero biases after the adapters are built (``supernet_vision_transformer_timm.py:462,531``, ``_init_vit_weights``).
Dropout after QuickGELU: ``adapter_dropout`` (NOAH's ``--drop_rate_adapter`` default 0.1,
``supernet_train_prompt.py:209``; 0 by default here). The wrapper takes the encoder block over (its modules keep
their names) and writes the block's two residual lines out with the adapter after the drop-path. Not mergeable (the
activation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Cost, Method, MethodConfig, Wrapper
from .fields import option

PLACEMENTS = ("mlp", "both")
INITS = ("xavier", "trunc-normal")


@dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    """The Adapter's options: NOAH's VTAB row (``experiments/Adapter/ViT-B_prompt_adapter_8.yaml``: d = 8, MLP only);
    the ``adapter-noah`` recipe adds the run's truncated-normal init and dropout 0.1."""

    PREFIX: ClassVar[str] = "adapter"
    dim: int = option(8, "Adapter bottleneck width d", min=1)
    placement: str = option("mlp", "mlp: after every MLP (NOAH, the VTAB row) | both: also after the attention (Houlsby)", choices=PLACEMENTS)
    init: str = option("xavier", "xavier: AdapterSuper's own | trunc-normal: std 0.02, zero biases (what NOAH's VTAB runs trained from)", choices=INITS)
    dropout: float = option(0.0, "dropout after the Adapter's QuickGELU (NOAH's runs: 0.1)", min=0, max=1)


class AdapterBlock(Wrapper, nn.Module):
    """An encoder block whose MLP branch (and, ``placement="both"``, attention branch) passes through a bottleneck
    adapter after the branch's drop-path: ``x + A(drop_path(mlp(norm2(x))))`` with A(h) = h + up(drop(QuickGELU(down
    h))). The forward is the block's (``vit.model.EncoderBlock.forward``) written out with A in it."""

    ADAPTER_PARAMS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
    CANNOT_MERGE = "its bottleneck has a non-linearity (QuickGELU), which no weight can absorb; keep the adapter"
    DROPOUTS = ("adapter_dropout",)

    def __init__(self, block: nn.Module, config: AdapterConfig):
        super().__init__(block)  # norm1, attn, norm2, mlp, drop paths: shared, same names
        width = block.norm1.normalized_shape[0]
        ref = block.norm1.weight
        kw = dict(device=ref.device, dtype=ref.dtype)
        self.adapter_down = nn.Linear(width, config.dim, **kw)
        self.adapter_up = nn.Linear(config.dim, width, **kw)
        self.both = config.placement == "both"
        if self.both:  # Houlsby's adapter after the attention sub-layer
            self.adapter_attn_down = nn.Linear(width, config.dim, **kw)
            self.adapter_attn_up = nn.Linear(config.dim, width, **kw)
            self.ADAPTER_PARAMS = AdapterBlock.ADAPTER_PARAMS + tuple(
                f"adapter_attn_{p}.{t}" for p in ("down", "up") for t in ("weight", "bias"))
        self.adapter_dropout = nn.Dropout(config.dropout)
        with torch.no_grad():
            for lin in self.projections():
                if config.init == "xavier":  # adapter_super.py:38-45
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.normal_(lin.bias, std=1e-6)
                else:  # timm's _init_vit_weights (non-jax): trunc_normal_(std=.02), bounds ±2 absolute; bias 0
                    nn.init.trunc_normal_(lin.weight, std=0.02)
                    nn.init.zeros_(lin.bias)

    def projections(self) -> list[nn.Linear]:
        extra = [self.adapter_attn_down, self.adapter_attn_up] if self.both else []
        return [self.adapter_down, self.adapter_up, *extra]

    def adapt(self, h: torch.Tensor, down: nn.Linear, up: nn.Linear) -> torch.Tensor:
        z = down(h)
        return h + up(self.adapter_dropout(z * torch.sigmoid(1.702 * z)))  # QuickGELU, then dropout: as NOAH

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        h = self.drop_path1(self.attn(self.norm1(x)))
        x = x + (self.adapt(h, self.adapter_attn_down, self.adapter_attn_up) if self.both else h)
        return x + self.adapt(self.drop_path2(self.mlp(self.norm2(x))), self.adapter_down, self.adapter_up)

    def extra_repr(self) -> str:
        return f"dim={self.adapter_down.out_features}, both={self.both}"


def upgrade_state(state: dict) -> dict:
    """A state saved when the adapter wrapped the sub-layer's last Linear (``blocks.i.mlp.fc2.adapter_down.weight``,
    ``blocks.i.attn.proj.adapter_*``: checkpoint format 1) under today's names (``blocks.i.adapter_down.weight``,
    ``blocks.i.adapter_attn_*``); the function is the same in eval mode (the old adapter came before the MLP's
    output dropout and drop-path, which eval mode skips)."""
    out = {}
    for key, value in state.items():
        key = key.replace(".mlp.fc2.adapter_", ".adapter_").replace(".attn.proj.adapter_", ".adapter_attn_")
        out[key] = value
    return out


METHOD = Method(
    "adapter", "a sequential bottleneck adapter after every MLP (d = 8, NOAH's VTAB row), + head",
    lr=1e-3, config=AdapterConfig, wrappers=(AdapterBlock,),
    targets=lambda model, config: [f"blocks.{i}" for i in range(len(model.blocks))],
    wrap=lambda model, name, config: AdapterBlock(model.get_submodule(name), config),
    cost=lambda config: Cost(branches=dict.fromkeys(("attn", "mlp") if config.placement == "both" else ("mlp",),
                                                    config.dim)),
    upgrade_state=upgrade_state,
    lr_note="NOAH's Adapter VTAB runs use 1e-3 (configs/Adapter/VTAB/slurm_train_adapter_vtab.sh)",
    paper="Houlsby et al., Parameter-Efficient Transfer Learning for NLP, ICML 2019")

__all__ = ["AdapterBlock", "AdapterConfig", "METHOD", "upgrade_state"]
