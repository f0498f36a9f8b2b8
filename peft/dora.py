"""DoRA: weight-decomposed low-rank adaptation, a magnitude and a LoRA-updated direction per output unit.

Paper: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024 (NVlabs/DoRA). As Hugging Face peft
implements it for ``nn.Linear`` (``use_dora=True``, ``peft/tuners/lora/dora.py``):

    V = W + (α/r) B A          m initialised to ‖W‖ (the L2 norm of each row: one value per output unit)
    y = (m / ‖V‖) ⊙ (x Vᵀ) + b  with ‖V‖ treated as a constant in backward (detached), as peft does

A (r × in) kaiming-uniform (a = √5), B (out × r) zero: at step 0 V = W and m / ‖V‖ = 1, so the layer is the
pretrained one. Defaults as this project's LoRA (q, v, r = 8, α = 8): 294,912 + 2 · 12 · 768 = 313,344
parameters for ViT-B/16. Mergeable: W' = (m / ‖V‖) ⊙ V row by row, bias unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, LinearDelta, Method, Option, adopt_linear, check_fresh, freeze_for_adapters, replace_module
from .lora import find_lora_targets


class DoRALinear(LinearDelta, Adapter, nn.Module):
    """A frozen ``nn.Linear`` with DoRA's magnitude ``m`` (out,) and LoRA pair ``lora_A`` (r, in), ``lora_B`` (out, r)."""

    ADAPTER_PARAMS = ("lora_A", "lora_B", "magnitude")

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 8.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"DoRA rank must be >= 1, got {rank}")
        adopt_linear(self, base)  # the frozen weight and bias, under their old names
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.magnitude = nn.Parameter(self.weight.norm(dim=1))  # ‖W‖ per output unit

    def direction(self) -> torch.Tensor:
        """V = W + (α/r) B A, (out, in)."""
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """W' − W, with W' = (m / ‖V‖) ⊙ V (the merged weight)."""
        v = self.direction()
        return (self.magnitude / v.norm(dim=1))[:, None] * v - self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # ‖V‖ is a constant in backward (peft: weight_norm.detach())
            norm = self.direction().norm(dim=1)
        scale = self.magnitude / norm  # (out,), carries m's gradient
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        y = scale * (F.linear(x, self.weight) + lora)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def apply_dora(model: nn.Module, rank: int = 8, alpha: float = 8.0, targets=("q", "v")) -> list[str]:
    """DoRA on the targeted Linears (LoRA's target syntax); freezes all but adapters and head."""
    check_fresh(model)
    names = find_lora_targets(model, targets)
    for name in names:
        replace_module(model, name, DoRALinear(model.get_submodule(name), rank=rank, alpha=alpha))
    freeze_for_adapters(model)
    return names


METHOD = Method(
    "dora", lambda model, dora_rank=8, dora_alpha=8.0, dora_targets=("q", "v"): apply_dora(
        model, rank=dora_rank, alpha=dora_alpha, targets=dora_targets),
    "DoRA: a magnitude per output unit and a LoRA-updated direction on the targets (q, v; r = 8), + head",
    lr=1e-3, lr_note="LoRA's rate: the same low-rank pair, plus a magnitude vector that starts at ‖W‖",
    options={"dora_rank": Option(8, "DoRA rank r of the direction's LoRA update"),
             "dora_alpha": Option(8.0, "DoRA scale alpha (the update is scaled by alpha / r)"),
             "dora_targets": Option("q,v", "comma-separated Linear names that get DoRA (q,k,v,proj,fc1,fc2)")},
    paper="Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation, ICML 2024")

__all__ = ["DoRALinear", "METHOD", "apply_dora"]
