"""Changing a built model's regularisation and activation: what fine-tuning overrides on loaded weights.

A checkpoint fixes the architecture; dropout, drop-path and the GELU form are choices of the run. Each setter
changes the modules and records the value in ``model.config``, so a saved run's model config rebuilds the same
model. Kept apart from ``vit.model``, which is the model only.
"""

from __future__ import annotations

from torch import nn

from .model import DropPath, drop_path_rates


def set_drop_path(model: nn.Module, rate: float, mode: str = "sample") -> None:
    """Set the model's drop-path (rate of the last block, linear from 0; ``mode``: see :class:`vit.model.DropPath`)."""
    model.config = model.config.replace(drop_path_rate=rate, drop_path_mode=mode)
    for block, p in zip(model.blocks, drop_path_rates(model.config)):
        for m in block.modules():
            if isinstance(m, DropPath):
                m.p, m.mode = p, mode


def set_dropout(model: nn.Module, rate: float) -> None:
    """Set every dropout rate but the attention probabilities' (the config records it); drop-path: set_drop_path."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and not name.endswith("attn_drop"):
            m.p = rate
    model.config = model.config.replace(dropout_rate=rate)


def set_gelu(model: nn.Module, kind: str) -> None:
    """Switch every MLP's GELU between "tanh" (Google's) and "erf" (the PyTorch ports'); the config records it."""
    model.config = model.config.replace(gelu=kind)  # validates the name
    for m in model.modules():
        if isinstance(m, nn.GELU):
            m.approximate = "tanh" if kind == "tanh" else "none"
