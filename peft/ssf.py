"""SSF: scale and shift features, y = γ ⊙ x + β, after a frozen layer (Lian et al., NeurIPS 2022).

Used by RLRR (after the norms and the patch embedding, as in the official RLRR code) and by the SSF method
(after every operation). The wrappers keep the wrapped layer's frozen ``weight``/``bias`` under their old names
and merge back into a plain layer of the same type: after a LayerNorm γ' = s ⊙ γ, β' = s ⊙ β + t; after the
patch convolution W'[o] = s[o] W[o], b' = s ⊙ b + t.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter

INITS = ("official", "identity")


class SSF(Adapter, nn.Module):
    """Scale and shift features: y = γ ⊙ x + β along one dimension (Lian et al., NeurIPS 2022).

    init="official" (as the RLRR code): γ ~ N(1, 0.02), β ~ N(0, 0.02). init="identity": γ = 1, β = 0.
    """

    ADAPTER_PARAMS = ("scale", "shift")
    MERGEABLE = False  # on its own; the wrappers below fold it into the layer it follows

    def __init__(self, dim: int, init: str = "official", device=None, dtype=None):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown SSF init {init!r}; choose one of {', '.join(INITS)}")
        self.scale = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.shift = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        if init == "official":
            with torch.no_grad():
                nn.init.normal_(self.scale, mean=1.0, std=0.02)
                nn.init.normal_(self.shift, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[dim] = -1
        return x * self.scale.view(shape) + self.shift.view(shape)


class SSFLayerNorm(Adapter, nn.LayerNorm):
    """A LayerNorm followed by SSF. Keeps the frozen affine as ``weight``/``bias`` (same names as before)."""

    ADAPTER_PARAMS = ()  # its SSF child owns scale and shift

    def __init__(self, norm: nn.LayerNorm, init: str = "official"):
        w = norm.weight
        super().__init__(norm.normalized_shape, eps=norm.eps, elementwise_affine=w is not None,
                         bias=norm.bias is not None, device=None if w is None else w.device,
                         dtype=None if w is None else w.dtype)
        self.weight, self.bias = norm.weight, norm.bias  # share the pretrained parameters
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        dim = math.prod(norm.normalized_shape)
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"SSF after a LayerNorm needs a 1-D normalized_shape, got {norm.normalized_shape}")
        self.ssf = SSF(dim, init, device=None if w is None else w.device, dtype=None if w is None else w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ssf(super().forward(x))

    @torch.no_grad()
    def merge(self) -> nn.LayerNorm:
        """A plain LayerNorm with the SSF folded into its affine: γ' = s ⊙ γ, β' = s ⊙ β + t."""
        s, t = self.ssf.scale, self.ssf.shift
        norm = nn.LayerNorm(self.normalized_shape, eps=self.eps, device=s.device, dtype=s.dtype)
        gamma = s if self.weight is None else s * self.weight
        beta = t if self.bias is None else s * self.bias + t
        norm.weight.copy_(gamma)
        norm.bias.copy_(beta)
        norm.requires_grad_(False)
        return norm


class SSFConv2d(Adapter, nn.Conv2d):
    """A Conv2d followed by SSF on its output channels (the patch embedding). Keeps ``weight``/``bias``."""

    ADAPTER_PARAMS = ()

    def __init__(self, conv: nn.Conv2d, init: str = "official"):
        w = conv.weight
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
        self.weight, self.bias = conv.weight, conv.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        self.ssf = SSF(conv.out_channels, init, device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D, H/P, W/P)
        return self.ssf(super().forward(x), dim=1)

    @torch.no_grad()
    def merge(self) -> nn.Conv2d:
        """A plain Conv2d with the SSF folded in: W'[o] = s[o] W[o], b' = s ⊙ b + t."""
        s, t = self.ssf.scale, self.ssf.shift
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups, bias=True,
                         padding_mode=self.padding_mode, device=self.weight.device, dtype=self.weight.dtype)
        conv.weight.copy_(self.weight * s.view(-1, 1, 1, 1))
        conv.bias.copy_(t if self.bias is None else s * self.bias + t)
        conv.requires_grad_(False)
        return conv
