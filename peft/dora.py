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
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Cost, LinearDelta, Method, MethodConfig, configure
from .lora import LoRALinear, find_lora_targets, short_targets
from .fields import option


@dataclass(frozen=True)
class DoraConfig(MethodConfig):
    """DoRA's options: this project's LoRA defaults (HF peft ``LoraConfig(use_dora=True)`` takes LoRA's r and
    alpha; the DoRA paper's commonsense runs use r = 8..32 on q, k, v, up, down)."""

    PREFIX: ClassVar[str] = "dora"
    rank: int = option(8, "DoRA rank r of the direction's LoRA update", min=1)
    alpha: float = option(8.0, "DoRA scale alpha (the update is scaled by alpha / r)")
    targets: str = option("q,v", "comma-separated Linear names that get DoRA (q,k,v,proj,fc1,fc2)")

    def __post_init__(self):
        if not isinstance(self.targets, str):  # a list or tuple of names: one canonical form, "q,v"
            object.__setattr__(self, "targets", ",".join(self.targets))
        super().__post_init__()


class DoRALinear(LinearDelta, nn.Module):
    """A frozen ``nn.Linear`` with DoRA's magnitude ``m`` (out,) and LoRA pair ``lora_A`` (r, in), ``lora_B`` (out, r)."""

    ADAPTER_PARAMS = ("lora_A", "lora_B", "magnitude")
    DECAY = ("lora_A", "lora_B")  # weight matrices, even at rank 1 (the magnitude is a vector)

    def __init__(self, base: nn.Linear, config: DoraConfig | None = None, **fields):
        config = configure(DoraConfig, config, fields)
        super().__init__(base)  # the frozen weight and bias, under their old names
        rank = config.rank
        self.rank, self.alpha, self.scaling = rank, config.alpha, config.alpha / rank
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

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # ‖V‖ is a constant in backward (peft: weight_norm.detach())
            norm = self.direction().norm(dim=1)
        scale = self.magnitude / norm  # (out,), carries m's gradient
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        y = scale * (F.linear(x, self.weight) + lora)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def dora_cost(config: DoraConfig) -> Cost:
    """LoRA's products on the targets, plus B A (out·r·in) for ‖W + s B A‖ once per forward pass."""
    def work(tokens: int, fan_in: int, fan_out: int, input_grad: bool):
        return LoRALinear.macs(config.rank, tokens, fan_in, fan_out, input_grad, once=fan_out * config.rank * fan_in)
    return Cost(linears=dict.fromkeys(short_targets(config), work))


METHOD = Method(
    "dora", "DoRA: a magnitude per output unit and a LoRA-updated direction on the targets (q, v; r = 8), + head",
    lr=1e-3, config=DoraConfig, wrappers=(DoRALinear,), cost=dora_cost,
    targets=lambda model, config: find_lora_targets(model, config.targets),
    lr_note="LoRA's rate: the same low-rank pair, plus a magnitude vector that starts at ‖W‖",
    paper="Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation, ICML 2024")

__all__ = ["DoRALinear", "DoraConfig", "METHOD", "dora_cost"]
