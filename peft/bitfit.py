"""BitFit: train every bias of the backbone (and the head), nothing else.

Paper: Ben Zaken, Ravfogel & Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", ACL 2022. In a ViT the biases are those of the patch embedding, q/k/v/proj, fc1/fc2
and every LayerNorm: 102,912 for ViT-B/16.

Each layer gets a wrapper of its own type that shares the frozen weight and owns a *copy* of the bias, so the
pretrained bias stays intact (several tasks can share one backbone, see ``peft.tasks``) and ``merge()``
returns the plain layer with the trained bias.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Wrapper, Cost, Method, MethodConfig


class _OwnBias(Wrapper):
    """Shares the wrapped layer's frozen ``weight``; ``bias`` is a trainable copy."""

    ADAPTER_PARAMS = ("bias",)

    def __init__(self, layer: nn.Module, config: MethodConfig | None = None):
        super().__init__(layer)
        self.bias = nn.Parameter(layer.bias.detach().clone())  # trains; the pretrained bias stays as it was

    @torch.no_grad()
    def _plain(self, plain: nn.Module) -> nn.Module:
        plain.weight.copy_(self.weight)
        plain.bias.copy_(self.bias)
        return plain.requires_grad_(False)


class BitFitLinear(_OwnBias, nn.Linear):
    WRAPS = nn.Linear

    def merge(self) -> nn.Linear:
        w = self.weight
        return self._plain(nn.Linear(self.in_features, self.out_features, device=w.device, dtype=w.dtype))


class BitFitLayerNorm(_OwnBias, nn.LayerNorm):
    WRAPS = nn.LayerNorm

    def merge(self) -> nn.LayerNorm:
        w = self.weight
        return self._plain(nn.LayerNorm(self.normalized_shape, eps=self.eps, device=w.device, dtype=w.dtype))


class BitFitConv2d(_OwnBias, nn.Conv2d):
    WRAPS = nn.Conv2d

    def merge(self) -> nn.Conv2d:
        w = self.weight
        return self._plain(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                                     padding=self.padding, dilation=self.dilation, groups=self.groups,
                                     padding_mode=self.padding_mode, device=w.device, dtype=w.dtype))


def bitfit_targets(model: nn.Module, config: MethodConfig) -> list[str]:
    """Every layer of the backbone with a bias (not the head, which trains whole)."""
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.LayerNorm, nn.Conv2d)
            and getattr(m, "bias", None) is not None and not n.startswith("head")]


METHOD = Method(
    "bitfit", "every bias of the backbone (patch embedding, q/k/v/proj, fc1/fc2, LayerNorms), + head",
    lr=1e-3, wrappers=(BitFitLinear, BitFitLayerNorm, BitFitConv2d), targets=bitfit_targets,
    cost=lambda config: Cost(trains_everywhere=True),
    lr_note="the rate of the other vector-only methods here (LoRA, head): biases are few and start "
            "at their pretrained values; not taken from a published ViT config",
    paper="Ben Zaken et al., BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked "
          "Language-models, ACL 2022")
