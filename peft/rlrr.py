"""RLRR: residual low-rank rescaling of frozen Linear layers, with SSF scale-and-shift on the norms.

Paper: Dong et al., "Low-Rank Rescaled Vision Transformer Fine-Tuning: A Residual Design Approach",
CVPR 2024. Official code: zstarN70/RLRR, ``models/networks.py`` (placement and initialisation facts only).

Per adapted Linear (frozen W: out×in, b): W' = W ⊙ (1 + S_out S_in), b' = b + f, trainable S_out (out×r),
S_in (r×in), f (out). The "1" keeps the pretrained weight; S_out S_in rescales it element by element.
Around the Linears, SSF modules (Lian et al., NeurIPS 2022) apply y = γ ⊙ x + β after norm1, norm2, the final
norm and the patch embedding (``peft.ssf``). Everything merges back into plain layers for inference.

Module names stay stable: an adapted ``blocks.0.attn.q`` is an :class:`RLRRLinear` that owns the frozen
``weight`` and ``bias`` under the same names, so ``blocks.0.attn.q.weight`` is still the pretrained matrix;
the new parameters are ``blocks.0.attn.q.s_out`` / ``.s_in`` / ``.f`` and ``blocks.0.norm1.ssf.scale`` / ``.shift``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .base import Adapter, Method, Option, adopt_linear, check_fresh, freeze_for_adapters, replace_module
from .functional import official_rlrr_linear, rlrr_weight
from .rlrr_function import WEIGHT_MEMORY, WeightCache, rlrr_linear
from .ssf import INITS, SSFConv2d, SSFLayerNorm

IMPLS = ("function", "official")
RLRR_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")  # inside each block

set_backend = kernels.set_backend  # re-exported: peft.rlrr.set_backend("auto" | "cuda" | "torch" | None)
get_backend = kernels.get_backend


class RLRRLinear(Adapter, nn.Module):
    """A frozen ``nn.Linear`` rescaled as W' = W ⊙ (1 + S_out S_in), b' = b + f.

    init="official" (the paper's code): S_in ~ kaiming-uniform with fan_in = in, i.e. U(±√(6/in));
    S_out ~ kaiming-uniform on its (out, r) shape, fan_in = r, i.e. U(±√(6/r)) (±√6 for r = 1); f = 0.
    The layer then differs from the pretrained one at step 0 (‖W' − W‖/‖W‖ ≈ 0.07 for ViT-B/16); the paper
    found this beats a zero init.
    init="identity": S_out = 0 and f = 0, so W' = W exactly and the model starts as the pretrained one; S_in
    keeps its random init, because ∂L/∂S_out = (G ⊙ W) S_inᵀ would vanish if both were zero.

    impl="function": :class:`peft.rlrr_function.RLRRLinearFunction` (W' rebuilt in backward, not kept; optional
    fused CUDA kernel). impl="official": the official three-pass formula with autograd keeping W' (benchmarks).
    """

    def __init__(self, base: nn.Linear, rank: int = 1, init: str = "official", impl: str = "function",
                 weight_memory: str = "rebuild"):
        super().__init__()
        if not isinstance(base, nn.Linear):  # before the other checks, as adopt_linear would say it
            raise TypeError(f"RLRRLinear wraps nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"RLRR rank must be >= 1, got {rank}")
        if init not in INITS:
            raise ValueError(f"unknown RLRR init {init!r}; choose one of {', '.join(INITS)}")
        if impl not in IMPLS:
            raise ValueError(f"unknown RLRR impl {impl!r}; choose one of {', '.join(IMPLS)}")
        if weight_memory not in WEIGHT_MEMORY:
            raise ValueError(f"unknown RLRR weight memory {weight_memory!r}; choose one of {', '.join(WEIGHT_MEMORY)}")
        adopt_linear(self, base)  # the same Parameter objects: names and storage unchanged, frozen
        self.rank, self.impl = rank, impl
        self.weight_memory = weight_memory  # rebuild | keep | reuse: see peft.rlrr_function.RLRRLinearFunction
        self._weight_cache = WeightCache()  # a plain attribute: not a buffer, never saved
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
        if self.impl == "official":
            return official_rlrr_linear(x, self.weight, self.bias, self.s_out, self.s_in, self.f)
        return rlrr_linear(x, self.weight, self.bias, self.s_out, self.s_in, self.f, self.weight_memory,
                           self._weight_cache)

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
        acc = torch.promote_types(torch.promote_types(w.dtype, self.f.dtype), torch.float32)  # float64 stays float64
        bias = self.f.to(acc) if self.bias is None else self.bias.to(acc) + self.f.to(acc)
        merged.bias.copy_(bias)
        merged.requires_grad_(False)
        return merged

    def runtime_path(self, device) -> str | None:
        return f"RLRR {kernels.describe(device)}" if self.impl == "function" else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, impl={self.impl}")


def rlrr_module_names(model: nn.Module) -> list[str]:
    """Where the official placement puts RLRR and SSF in a :class:`vit.VisionTransformer`."""
    names = ["patch_embed"]
    for i in range(len(model.blocks)):
        names += [f"blocks.{i}.norm1", f"blocks.{i}.norm2"] + [f"blocks.{i}.{t}" for t in RLRR_TARGETS]
    return names + ["norm"]


def inject_rlrr(model: nn.Module, rank: int = 1, init: str = "official", impl: str = "function",
                weight_memory: str = "rebuild") -> list[str]:
    """Replace the official placement's modules by RLRR/SSF wrappers (no freezing). Returns their names."""
    changed = []
    for name in rlrr_module_names(model):
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            wrapper = RLRRLinear(module, rank=rank, init=init, impl=impl, weight_memory=weight_memory)
        elif isinstance(module, nn.LayerNorm) and type(module) is nn.LayerNorm:
            wrapper = SSFLayerNorm(module, init=init)
        elif type(module) is nn.Conv2d:
            wrapper = SSFConv2d(module, init=init)
        else:
            raise TypeError(f"cannot apply RLRR to {name}: it is a {type(module).__name__}, not a plain "
                            "nn.Linear / nn.LayerNorm / nn.Conv2d (adapters already applied?)")
        replace_module(model, name, wrapper)
        changed.append(name)
    return changed


def set_rlrr_impl(model: nn.Module, impl: str) -> None:
    """Switch every RLRRLinear between "function" (memory-lean) and "official" (materialised W')."""
    if impl not in IMPLS:
        raise ValueError(f"unknown RLRR impl {impl!r}; choose one of {', '.join(IMPLS)}")
    for m in model.modules():
        if isinstance(m, RLRRLinear):
            m.impl = impl


def apply_rlrr(model: nn.Module, rank: int = 1, init: str = "official", impl: str = "function",
               weight_memory: str = "rebuild") -> list[str]:
    """RLRR exactly as the official ViT code places it; freezes all but adapters and head.

    RLRR on q, k, v, proj, fc1, fc2 of every block; SSF after norm1, norm2, the final norm and the patch
    embedding. Returns the replaced module names. ``impl="official"`` keeps the materialised-W' formulation
    (for benchmarks); the default runs :class:`peft.rlrr_function.RLRRLinearFunction`.
    """
    check_fresh(model)
    changed = inject_rlrr(model, rank=rank, init=init, impl=impl, weight_memory=weight_memory)
    freeze_for_adapters(model)
    return changed


METHOD = Method(
    "rlrr", lambda model, rlrr_rank=1, rlrr_init="official", rlrr_impl="function", rlrr_weight_memory="rebuild":
    apply_rlrr(model, rank=rlrr_rank, init=rlrr_init, impl=rlrr_impl, weight_memory=rlrr_weight_memory),
    "RLRR on q,k,v,proj,fc1,fc2 + SSF on the norms and the patch embedding, + head", lr=3e-3,
    lr_note="the official RLRR VTAB-1k learning rate for CIFAR-100 (at batch 32; scale vectors need larger "
            "steps than weights, and a larger batch only makes each step less noisy)",
    options={"rlrr_rank": Option(1, "RLRR rescaling rank (the official ViT code uses 1)"),
             "rlrr_init": Option("official", "RLRR init: official (kaiming, not the base model at step 0) | "
                                             "identity (S_out = 0: starts as the base model)", INITS),
             "rlrr_impl": Option("function", "function (W' rebuilt in backward, optional CUDA kernel) | official "
                                             "(the official formula, autograd keeps W'; for benchmarks)", IMPLS),
             "rlrr_weight_memory": Option("rebuild", "rebuild W' in backward | keep the forward's W' until backward "
                                                     "(+ one W' per layer in flight, ~170 MB bf16 for ViT-B/16) | "
                                                     "reuse W' while S is unchanged (one persistent W' per layer: "
                                                     "one build per optimizer step across --grad-accum)",
                                          WEIGHT_MEMORY)},
    paper="Dong et al., Low-Rank Rescaled Vision Transformer Fine-Tuning: A Residual Design Approach, CVPR 2024")

__all__ = ["METHOD", "RLRRLinear", "apply_rlrr", "inject_rlrr", "rlrr_module_names", "set_backend", "get_backend",
           "set_rlrr_impl", "INITS", "IMPLS"]
