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


def official_decay(name: str, p: torch.Tensor) -> bool:
    """The official RLRR code's ``get_parameters`` grouping: it decays s_in, s_out, the patch-embedding SSF and
    the head's weight (and nothing else that trains: f, the other SSF vectors and the head bias are not decayed)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("s_in", "s_out") or name.startswith("patch_embed.ssf.") or name == "head.weight"


def param_groups(model, weight_decay: float, groups: str = "project") -> list[dict]:
    """AdamW groups: ``groups="project"`` decays weight matrices only (see :func:`no_decay`); ``"official"`` is
    the official RLRR grouping (:func:`official_decay`), for every mode's trainable tensors."""
    decay, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = official_decay(name, p) if groups == "official" else not no_decay(name, p)
            (decay if decays else other).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int, start: float = 0.0, end: float = 0.0):
    """LR multiplier per optimizer step: linear warmup from ``start`` (as a fraction of the peak; 0 gives
    1/warmup at the first step) to 1, then a cosine to ``end`` at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return start + (1 - start) * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor
