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

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from . import kernels
from .base import Cost, LinearDelta, Method, MethodConfig, Work, configure
from .functional import official_rlrr_linear, rlrr_weight
from .rlrr_function import WEIGHT_MEMORY, WeightCache, rlrr_linear
from .ssf import INITS, SSFConv2d, SSFLayerNorm
from .fields import option

IMPLS = ("function", "official")
RLRR_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")  # inside each block


@dataclass(frozen=True)
class RLRRConfig(MethodConfig):
    """RLRR's options: rank 1 and the kaiming init of the official ViT code (zstarN70/RLRR ``models/networks.py``)."""

    PREFIX: ClassVar[str] = "rlrr"
    rank: int = option(1, "RLRR rescaling rank (the official ViT code uses 1)", min=1)
    init: str = option("official", "RLRR init: official (kaiming, not the base model at step 0) | identity (S_out = 0: starts as the base model)", choices=INITS)
    impl: str = option("function", "function (W' rebuilt in backward, optional CUDA kernel) | official (the official formula, autograd keeps W'; for benchmarks)", choices=IMPLS)
    weight_memory: str = option("rebuild", "rebuild W' in backward | keep the forward's W' until backward (+ one W' per layer in flight, ~170 MB bf16 for ViT-B/16) | reuse W' while S is unchanged (one persistent W' per layer: one build per optimizer step across --grad-accum)", choices=WEIGHT_MEMORY)


class RLRRLinear(LinearDelta, nn.Module):
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

    def __init__(self, base: nn.Linear, config: RLRRConfig | None = None, **fields):
        config = configure(RLRRConfig, config, fields)
        super().__init__(base)  # the same Parameter objects: names and storage unchanged, frozen
        rank, impl, weight_memory = config.rank, config.impl, config.weight_memory
        self.rank, self.impl = rank, impl
        self.weight_memory = weight_memory  # rebuild | keep | reuse: see peft.rlrr_function.RLRRLinearFunction
        self._weight_cache = WeightCache()  # a plain attribute: not a buffer, never saved
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.s_out = nn.Parameter(torch.empty(self.out_features, rank, **kw))
        self.s_in = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.f = nn.Parameter(torch.zeros(self.out_features, **kw))
        self.reset_adapter(config.init)

    ADAPTER_PARAMS = ("s_out", "s_in", "f")
    NO_DECAY = ("s_out", "s_in", "f")  # rescaling vectors in spirit, matrices only at rank > 1
    BIASES = ("f",)  # the official code's ``shift_bias``

    @torch.no_grad()
    def reset_adapter(self, init: str = "official") -> None:
        nn.init.kaiming_uniform_(self.s_in)  # a=0: bound √(6 / in)
        if init == "official":
            nn.init.kaiming_uniform_(self.s_out)  # fan_in = r: bound √(6 / r)
        else:
            nn.init.zeros_(self.s_out)
        nn.init.zeros_(self.f)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "official":
            return official_rlrr_linear(x, self.weight, self.bias, self.s_out, self.s_in, self.f)
        return rlrr_linear(x, self.weight, self.bias, self.s_out, self.s_in, self.f, self.weight_memory,
                           self._weight_cache)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """W' − W = W ⊙ (S_out S_in), in W's dtype (formed in float32)."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.weight.to(acc) * (self.s_out.to(acc) @ self.s_in.to(acc))).to(self.weight.dtype)

    def delta_bias(self) -> torch.Tensor:
        return self.f

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W' = W ⊙ (1 + S_out S_in) as the forward forms it (one rounding to W's dtype). RLRR cannot be un-merged
        from W' alone (it would divide by 1 + S_out S_in): ``unmerge()`` restores the kept pretrained W."""
        return rlrr_weight(self.weight, self.s_out, self.s_in, self.weight.dtype)

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


def apply_rlrr(model: nn.Module, config: RLRRConfig | None = None, **fields) -> list[str]:
    """RLRR exactly as the official ViT code places it; freezes all but adapters and head.

    RLRR on q, k, v, proj, fc1, fc2 of every block; SSF after norm1, norm2, the final norm and the patch
    embedding. Returns the replaced module names. ``impl="official"`` keeps the materialised-W' formulation
    (for benchmarks); the default runs :class:`peft.rlrr_function.RLRRLinearFunction`.
    """
    return METHOD.apply(model, configure(RLRRConfig, config, fields))


def rlrr_cost(config: RLRRConfig) -> Cost:
    """RLRR in the FLOP model: per adapted layer W' = W ⊙ (1 + S_out S_in) once per pass (out·r·in, also on the
    official path, where broadcasting does the same multiplications), the full dYᵀX its scale gradients are built
    from (tokens·in·out), the two rank-r reductions (G ⊙ W) S_inᵀ and S_outᵀ (G ⊙ W) (2·out·r·in), and, when the
    Function rebuilds W' for dX instead of keeping it, one more out·r·in; SSF after the norms trains everywhere."""
    r, rebuilds = config.rank, config.impl == "function" and config.weight_memory == "rebuild"

    def work(tokens: int, fan_in: int, fan_out: int, input_grad: bool) -> Work:
        w = fan_out * r * fan_in
        return Work(backward=tokens * fan_in * fan_out, forward_once=w,
                    backward_once=2 * w + (w if rebuilds and input_grad else 0))

    return Cost(trains_everywhere=True, linears=dict.fromkeys(("q", "k", "v", "proj", "fc1", "fc2"), work))


METHOD = Method(
    "rlrr", "RLRR on q,k,v,proj,fc1,fc2 + SSF on the norms and the patch embedding, + head", lr=3e-3,
    config=RLRRConfig, wrappers=(RLRRLinear, SSFLayerNorm, SSFConv2d), targets=lambda model, config:
    rlrr_module_names(model), cost=rlrr_cost,
    lr_note="the official RLRR VTAB-1k learning rate for CIFAR-100 (at batch 32; scale vectors need larger "
            "steps than weights, and a larger batch only makes each step less noisy)",
    paper="Dong et al., Low-Rank Rescaled Vision Transformer Fine-Tuning: A Residual Design Approach, CVPR 2024")

__all__ = ["METHOD", "RLRRConfig", "RLRRLinear", "apply_rlrr", "rlrr_cost", "rlrr_module_names", "INITS", "IMPLS"]
