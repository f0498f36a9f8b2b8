"""RLRR: residual low-rank rescaling of frozen Linear layers, with SSF scale-and-shift on the norms.

Paper: Dong et al., "Low-Rank Rescaled Vision Transformer Fine-Tuning: A Residual Design Approach",
CVPR 2024. Official code: zstarN70/RLRR, ``models/networks.py`` (placement and initialisation facts only).

Per adapted Linear (frozen W: out×in, b): W' = W ⊙ (1 + S_out S_in), b' = b + f, trainable S_out (out×r),
S_in (r×in), f (out). The "1" keeps the pretrained weight; S_out S_in rescales it element by element.
Around the Linears, SSF modules (Lian et al., NeurIPS 2022) apply y = γ ⊙ x + β after norm1, norm2, the final
norm and the patch embedding. Everything merges back into plain layers for inference (:func:`merge_rlrr`).

Module names stay stable: an adapted ``blocks.0.attn.q`` is an :class:`RLRRLinear` that owns the frozen
``weight`` and ``bias`` under the same names, so ``blocks.0.attn.q.weight`` is still the pretrained matrix;
the new parameters are ``blocks.0.attn.q.s_out`` / ``.s_in`` / ``.f`` and ``blocks.0.norm1.ssf.scale`` / ``.shift``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels
from .functional import official_rlrr_linear, rlrr_linear, rlrr_weight

INITS = ("official", "identity")
IMPLS = ("function", "official")
RLRR_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")  # inside each block

set_backend = kernels.set_backend  # re-exported: peft.rlrr.set_backend("auto" | "cuda" | "torch" | None)
get_backend = kernels.get_backend


class RLRRLinear(nn.Module):
    """A frozen ``nn.Linear`` rescaled as W' = W ⊙ (1 + S_out S_in), b' = b + f.

    init="official" (the paper's code): S_in ~ kaiming-uniform with fan_in = in, i.e. U(±√(6/in));
    S_out ~ kaiming-uniform on its (out, r) shape, fan_in = r, i.e. U(±√(6/r)) (±√6 for r = 1); f = 0.
    The layer then differs from the pretrained one at step 0 (‖W' − W‖/‖W‖ ≈ 0.07 for ViT-B/16); the paper
    found this beats a zero init.
    init="identity": S_out = 0 and f = 0, so W' = W exactly and the model starts as the pretrained one; S_in
    keeps its random init, because ∂L/∂S_out = (G ⊙ W) S_inᵀ would vanish if both were zero.

    impl="function": :class:`peft.functional.RLRRLinearFunction` (W' rebuilt in backward, not kept; optional
    fused CUDA kernel). impl="official": the official three-pass formula with autograd keeping W' (benchmarks).
    """

    def __init__(self, base: nn.Linear, rank: int = 1, init: str = "official", impl: str = "function"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"RLRRLinear wraps nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"RLRR rank must be >= 1, got {rank}")
        if init not in INITS:
            raise ValueError(f"unknown RLRR init {init!r}; choose one of {', '.join(INITS)}")
        if impl not in IMPLS:
            raise ValueError(f"unknown RLRR impl {impl!r}; choose one of {', '.join(IMPLS)}")
        self.in_features, self.out_features, self.rank, self.impl = base.in_features, base.out_features, rank, impl
        self.weight = base.weight  # the same Parameter objects: names and storage unchanged
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.s_out = nn.Parameter(torch.empty(self.out_features, rank, **kw))
        self.s_in = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.f = nn.Parameter(torch.zeros(self.out_features, **kw))
        self.reset_adapter(init)

    ADAPTER_PARAMS = ("s_out", "s_in", "f")

    @torch.no_grad()
    def reset_adapter(self, init: str = "official") -> None:
        nn.init.kaiming_uniform_(self.s_in)  # a=0: bound √(6 / in)
        if init == "official":
            nn.init.kaiming_uniform_(self.s_out)  # fan_in = r: bound √(6 / r)
        else:
            nn.init.zeros_(self.s_out)
        nn.init.zeros_(self.f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = rlrr_linear if self.impl == "function" else official_rlrr_linear
        return fn(x, self.weight, self.bias, self.s_out, self.s_in, self.f)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """W' − W = W ⊙ (S_out S_in), in W's dtype (formed in float32)."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.weight.to(acc) * (self.s_out.to(acc) @ self.s_in.to(acc))).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` (frozen) computing the same map: weight W', bias b + f.

        RLRR cannot be un-merged in general (it would divide by 1 + S_out S_in); keep the adapter state instead.
        """
        w = self.weight
        merged = nn.Linear(self.in_features, self.out_features, bias=True, device=w.device, dtype=w.dtype)
        merged.weight.copy_(rlrr_weight(w, self.s_out, self.s_in, w.dtype))
        bias = self.f.float() if self.bias is None else self.bias.float() + self.f.float()
        merged.bias.copy_(bias)
        merged.requires_grad_(False)
        return merged

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, impl={self.impl}")


class SSF(nn.Module):
    """Scale and shift features: y = γ ⊙ x + β along one dimension (Lian et al., NeurIPS 2022).

    init="official" (as the RLRR code): γ ~ N(1, 0.02), β ~ N(0, 0.02). init="identity": γ = 1, β = 0.
    """

    ADAPTER_PARAMS = ("scale", "shift")

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


class SSFLayerNorm(nn.LayerNorm):
    """A LayerNorm followed by SSF. Keeps the frozen affine as ``weight``/``bias`` (same names as before)."""

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


class SSFConv2d(nn.Conv2d):
    """A Conv2d followed by SSF on its output channels (the patch embedding). Keeps ``weight``/``bias``."""

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


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def rlrr_module_names(model: nn.Module) -> list[str]:
    """Where the official placement puts RLRR and SSF in a :class:`vit.VisionTransformer`."""
    names = ["patch_embed"]
    for i in range(len(model.blocks)):
        names += [f"blocks.{i}.norm1", f"blocks.{i}.norm2"] + [f"blocks.{i}.{t}" for t in RLRR_TARGETS]
    return names + ["norm"]


def inject_rlrr(model: nn.Module, rank: int = 1, init: str = "official", impl: str = "function") -> list[str]:
    """Replace the official placement's modules by RLRR/SSF wrappers (no freezing). Returns their names."""
    changed = []
    for name in rlrr_module_names(model):
        module = _get(model, name)
        if isinstance(module, nn.Linear):
            wrapper = RLRRLinear(module, rank=rank, init=init, impl=impl)
        elif isinstance(module, nn.LayerNorm) and type(module) is nn.LayerNorm:
            wrapper = SSFLayerNorm(module, init=init)
        elif type(module) is nn.Conv2d:
            wrapper = SSFConv2d(module, init=init)
        else:
            raise TypeError(f"cannot apply RLRR to {name}: it is a {type(module).__name__}, not a plain "
                            "nn.Linear / nn.LayerNorm / nn.Conv2d (adapters already applied?)")
        _set(model, name, wrapper)
        changed.append(name)
    return changed


def set_rlrr_impl(model: nn.Module, impl: str) -> None:
    """Switch every RLRRLinear between "function" (memory-lean) and "official" (materialised W')."""
    if impl not in IMPLS:
        raise ValueError(f"unknown RLRR impl {impl!r}; choose one of {', '.join(IMPLS)}")
    for m in model.modules():
        if isinstance(m, RLRRLinear):
            m.impl = impl


__all__ = ["RLRRLinear", "SSF", "SSFLayerNorm", "SSFConv2d", "inject_rlrr", "rlrr_module_names",
           "set_backend", "get_backend", "set_rlrr_impl", "official_rlrr_linear", "INITS", "IMPLS"]
