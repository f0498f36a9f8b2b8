"""The optimisation recipe: which tensors decay, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norm parameters, RLRR/SSF scale and shift vectors, CLS and position embeddings: no weight decay.

    RLRR's s_out, s_in, f and SSF's scale, shift are excluded by name (at rank > 1 the RLRR factors are
    matrices, still rescaling vectors in spirit); otherwise a tensor with at most one dimension larger than 1
    is a vector. LoRA factors stay decayed even at rank 1 because they are weight matrices.
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("s_out", "s_in", "f") or ".ssf." in name or name in ("cls_token", "pos_embed"):
        return True
    if "lora" in name.lower():
        return False
    return sum(d > 1 for d in p.shape) <= 1 or leaf == "bias" or ".norm" in name or name.startswith("norm")


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (other if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier per optimizer step: linear warmup from 1/warmup to 1, then cosine to zero at the end."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor
