"""SSF: scale and shift features, y = γ ⊙ x + β, after a frozen layer.

Paper: Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning", NeurIPS 2022.
The SSF method puts it after every operation of the ViT (norm1, q, k, v, proj, norm2, fc1, fc2 in every block,
the patch embedding and the final norm: 205,824 parameters for ViT-B/16), initialised γ ~ N(1, 0.02),
β ~ N(0, 0.02) as in the paper's code. RLRR uses the same wrappers after the norms and the patch embedding. The wrappers keep the wrapped layer's frozen ``weight``/``bias`` under their old names
and merge back into a plain layer of the same type: after a LayerNorm γ' = s ⊙ γ, β' = s ⊙ β + t; after the
patch convolution W'[o] = s[o] W[o], b' = s ⊙ b + t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import Wrapper, Cost, FoldsIn, Method, MethodConfig
from .fields import option

INITS = ("official", "identity")


@dataclass(frozen=True)
class SSFConfig(MethodConfig):
    """SSF's options: the paper's init (dongzelian/SSF ``models/vision_transformer.py`` ``init_ssf_scale_shift``)."""

    PREFIX: ClassVar[str] = "ssf"
    init: str = option("official", "SSF init: official (scale ~ N(1, 0.02), shift ~ N(0, 0.02)) | identity (scale 1, shift 0: starts as the base model)", choices=INITS)


def _init(config) -> str:
    """The init a wrapper's config names (SSF's or RLRR's, which places SSF too); the default without one."""
    return "official" if config is None else config.init


class SSF(Wrapper, nn.Module):
    """Scale and shift features: y = γ ⊙ x + β along one dimension (Lian et al., NeurIPS 2022).

    init="official" (as the RLRR code): γ ~ N(1, 0.02), β ~ N(0, 0.02). init="identity": γ = 1, β = 0.
    """

    ADAPTER_PARAMS = ("scale", "shift")
    NO_DECAY = ("scale", "shift")  # rescaling vectors, not weights
    CANNOT_MERGE = "on its own it is no layer; the SSF wrappers fold it into the layer it follows"

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


class SSFLayerNorm(FoldsIn, nn.LayerNorm):
    """A LayerNorm followed by SSF. Keeps the frozen affine as ``weight``/``bias`` (same names as before)."""

    WRAPS = nn.LayerNorm
    ADAPTER_PARAMS = ()  # its SSF child owns scale and shift

    def __init__(self, norm: nn.LayerNorm, config: SSFConfig | None = None):
        if type(norm) is nn.LayerNorm and len(norm.normalized_shape) != 1:  # (another type: refused just below)
            raise ValueError(f"SSF after a LayerNorm needs a 1-D normalized_shape, got {norm.normalized_shape}")
        super().__init__(norm)  # the frozen affine keeps its names
        w = norm.weight
        self.ssf = SSF(norm.normalized_shape[0], _init(config), device=None if w is None else w.device,
                       dtype=None if w is None else w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.merged else self.ssf(y)

    @torch.no_grad()
    def merged_tensors(self) -> dict[str, torch.Tensor]:
        """The SSF folded into the affine: γ' = s ⊙ γ, β' = s ⊙ β + t."""
        s, t = self.ssf.scale, self.ssf.shift
        return {"weight": s if self.weight is None else s * self.weight,
                "bias": t if self.bias is None else s * self.bias + t}

    @torch.no_grad()
    def merge(self) -> nn.LayerNorm:
        """A plain LayerNorm with the SSF folded into its affine."""
        new = {"weight": self.weight, "bias": self.bias} if self.merged else self.merged_tensors()
        norm = nn.LayerNorm(self.normalized_shape, eps=self.eps, device=new["weight"].device,
                            dtype=new["weight"].dtype)
        norm.weight.copy_(new["weight"])
        norm.bias.copy_(new["bias"])
        return norm.requires_grad_(False)


class SSFConv2d(FoldsIn, nn.Conv2d):
    """A Conv2d followed by SSF on its output channels (the patch embedding). Keeps ``weight``/``bias``."""

    WRAPS = nn.Conv2d
    ADAPTER_PARAMS = ()

    def __init__(self, conv: nn.Conv2d, config: SSFConfig | None = None):
        super().__init__(conv)
        self.ssf = SSF(conv.out_channels, _init(config), device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D, H/P, W/P)
        y = super().forward(x)
        return y if self.merged else self.ssf(y, dim=1)

    @torch.no_grad()
    def merged_tensors(self) -> dict[str, torch.Tensor]:
        """The SSF folded in: W'[o] = s[o] W[o], b' = s ⊙ b + t."""
        s, t = self.ssf.scale, self.ssf.shift
        return {"weight": self.weight * s.view(-1, 1, 1, 1), "bias": t if self.bias is None else s * self.bias + t}

    @torch.no_grad()
    def merge(self) -> nn.Conv2d:
        """A plain Conv2d with the SSF folded in."""
        new = {"weight": self.weight, "bias": self.bias} if self.merged else self.merged_tensors()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups, bias=True,
                         padding_mode=self.padding_mode, device=self.weight.device, dtype=self.weight.dtype)
        conv.weight.copy_(new["weight"])
        conv.bias.copy_(new["bias"])
        return conv.requires_grad_(False)


class SSFLinear(FoldsIn, nn.Linear):
    """A frozen Linear followed by SSF on its outputs. Keeps ``weight``/``bias``; merges to W' = diag(s) W,
    b' = s ⊙ b + t."""

    WRAPS = nn.Linear
    ADAPTER_PARAMS = ()

    def __init__(self, linear: nn.Linear, config: SSFConfig | None = None):
        super().__init__(linear)
        self.ssf = SSF(linear.out_features, _init(config), device=linear.weight.device, dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.merged else self.ssf(y)

    @torch.no_grad()
    def merged_tensors(self) -> dict[str, torch.Tensor]:
        s, t = self.ssf.scale, self.ssf.shift
        return {"weight": self.weight * s[:, None], "bias": t if self.bias is None else s * self.bias + t}

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        new = {"weight": self.weight, "bias": self.bias} if self.merged else self.merged_tensors()
        out = nn.Linear(self.in_features, self.out_features, device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(new["weight"])
        out.bias.copy_(new["bias"])
        return out.requires_grad_(False)


SSF_TARGETS = ("norm1", "attn.q", "attn.k", "attn.v", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")  # per block


def ssf_targets(model: nn.Module, config: SSFConfig) -> list[str]:
    """After every operation of a :class:`vit.VisionTransformer`: the patch embedding, each block's norms and
    Linears, the final norm."""
    return ["patch_embed"] + [f"blocks.{i}.{t}" for i in range(len(model.blocks)) for t in SSF_TARGETS] + ["norm"]


METHOD = Method(
    "ssf", "scale and shift after every operation (norms, q, k, v, proj, fc1, fc2, patch embedding), + head",
    lr=3e-3, config=SSFConfig, wrappers=(SSFLinear, SSFLayerNorm, SSFConv2d), targets=ssf_targets,
    cost=lambda config: Cost(trains_everywhere=True),
    lr_note="the rate of RLRR's scale vectors (the same kind of parameter); SSF's own VTAB runs tune it per task",
    paper="Lian et al., Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning, NeurIPS 2022")
