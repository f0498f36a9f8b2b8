"""LoRA: a trainable low-rank update next to a frozen Linear.

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022. Initialisation, scaling and
dropout placement as in huggingface/peft: A (r×in) kaiming-uniform with a = √5 (nn.Linear's default), B (out×r)
zeros, so the adapted model equals the base model at step 0; dropout on the LoRA branch's input only.

    h = W₀ x + b + (α / r) · B A dropout(x)

Like :class:`peft.rlrr.RLRRLinear`, the wrapper owns the frozen ``weight``/``bias`` under their old names.

``variant="noah"`` is the LoRA of the VTAB-1k tables' "LoRA 0.29M" row as NOAH's VTAB runs trained it
(ZhangYuanhan-AI/NOAH@e9c55f3 ``model/supernet_vision_transformer_timm.py:224-228,277-281``): one low-rank pair on
the fused qkv projection, x W_qkvᵀ + (drop(x) A) B with A (in × r), B (r × 3·out), no α/r scaling. With separate
q, k, v layers that is one A shared by the three and B split into three (r × out) blocks, so k is adapted too;
4·D·r per block = 294,912 for ViT-B/16 at r = 8, the same count as q,v LoRA in loralib's form. Initialisation: the
run's ``init_weights`` (``:462,531``, timm's ``_init_vit_weights``) re-draws both A and B truncated-normal std 0.02
after the module's own kaiming/zero init, so B is not zero and the model does not start as the pretrained one.
Dropout (``--drop_rate_LoRA``, 0.1 in the runs) is applied once to the block's attention input, before the fused
projection: one mask shared by q, k and v (:class:`SharedInputDropout`).
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Cost, LinearDelta, Method, MethodConfig, Work, configure
from .fields import option

SHORT_NAMES = ("q", "k", "v", "proj", "fc1", "fc2")
VARIANTS = ("loralib", "noah")


@dataclass(frozen=True)
class LoraConfig(MethodConfig):
    """LoRA's options; defaults as Hugging Face peft's ``LoraConfig`` and loralib (r = 8, alpha = r) on q and v,
    the placement the LoRA paper recommends (Hu et al. 2022, §7.1)."""

    PREFIX: ClassVar[str] = "lora"
    rank: int = option(8, "LoRA rank r", min=1)
    alpha: float = option(8.0, "LoRA scale alpha (update scaled by alpha / r)")
    targets: str = option("q,v", "comma-separated Linear names that get LoRA (q,k,v,proj,fc1,fc2), globs or regexes")
    dropout: float = option(0.0, "dropout on the LoRA branch input", min=0, max=1)
    variant: str = option("loralib", "loralib (= HF peft: B A scaled by alpha/r on the targets) | noah (the VTAB tables' LoRA row: one unscaled pair on the fused q,k,v)", choices=VARIANTS)

    def __post_init__(self):
        if not isinstance(self.targets, str):  # a list or tuple of names: one canonical form, "q,v"
            object.__setattr__(self, "targets", ",".join(self.targets))
        super().__post_init__()


class SharedInputDropout(nn.Dropout):
    """Dropout shared by ``users`` layers that read the same input: the first call on a tensor draws the mask, the
    next ``users - 1`` calls on that same tensor object get the same dropped tensor (then it is forgotten). NOAH's
    ``LoRA_drop(x)`` runs once before its fused qkv projection; with separate q, k, v this keeps the one mask (and
    the one draw from the random stream, at q's call)."""

    def __init__(self, p: float, users: int):
        super().__init__(p)
        self.users = users
        self._last: tuple | None = None  # (input, output, calls left)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self._last is not None and self._last[0] is x:
            _, out, left = self._last
            self._last = (x, out, left - 1) if left > 1 else None
            return out
        out = super().forward(x)
        self._last = (x, out, self.users - 1) if self.users > 1 else None
        return out


class LoRALinear(LinearDelta, nn.Module):
    """``nn.Linear`` + (α/r) B A; ``merge()``, ``merge_in_place()`` and ``unmerge()`` come from
    :class:`peft.base.LinearDelta`, built on ``delta_weight()``."""

    ADAPTER_PARAMS = ("lora_A", "lora_B")
    DECAY = ("lora_A", "lora_B")  # weight matrices, even at rank 1
    DROPOUTS = ("lora_dropout",)

    def __init__(self, base: nn.Linear, config: LoraConfig | None = None, **fields):
        """``config`` or its fields (``rank=4``). NOAH's variant (``variant="noah"``): B is (r, out), drawn
        truncated-normal std 0.02, the update x A B is not scaled, and A, (in, r), and the dropout are the block's,
        given by :meth:`share` (:func:`wrap_lora`)."""
        config = configure(LoraConfig, config, fields)
        super().__init__(base)
        rank = config.rank
        self.noah = config.variant == "noah"
        self.rank, self.alpha, self.scaling = rank, config.alpha, 1.0 if self.noah else config.alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if self.noah:
            self.register_parameter("lora_A", None)  # until share()
            if config.dropout > 0:  # one mask for q, k and v (the first of them keeps it, the others share it)
                self.lora_dropout = SharedInputDropout(config.dropout, users=3)
            self.lora_B = nn.Parameter(torch.empty(rank, self.out_features, **kw))
            with torch.no_grad():
                nn.init.trunc_normal_(self.lora_B, std=0.02)  # _init_vit_weights on LoRA_b (bounds ±2 absolute)
            return
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def share(self, shared_A: nn.Parameter, dropout: nn.Module | None = None) -> "LoRALinear":
        """NOAH's variant: use the block's (in, r) A and, given, its dropout, shared with its other projections."""
        if tuple(shared_A.shape) != (self.in_features, self.rank):
            raise ValueError(f"shared A must be ({self.in_features}, {self.rank}), got {tuple(shared_A.shape)}")
        self.lora_A = shared_A
        if dropout is not None:
            self.lora_dropout = dropout
        return self

    @staticmethod
    def macs(rank: int, tokens: int, fan_in: int, fan_out: int, input_grad: bool, once: float = 0) -> Work:
        """The branch's two rank-r products (tokens·r·(in + out)); backward dB = dYᵀ(A x), d(Ax) = dY B and
        dA = d(Ax)ᵀ x (tokens·r·(2·out + in)), and the branch's share of dX when the input needs one."""
        return Work(forward=tokens * rank * (fan_in + fan_out), forward_once=once,
                    backward=tokens * rank * (2 * fan_out + fan_in) + (tokens * rank * fan_in if input_grad else 0))

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.noah:
            return y + (self.lora_dropout(x) @ self.lora_A) @ self.lora_B
        a = F.linear(self.lora_dropout(x), self.lora_A)  # (..., r)
        return y + F.linear(a, self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(α/r) B A, shape (out, in); NOAH's variant: (A B)ᵀ."""
        if self.noah:
            return (self.lora_A @ self.lora_B).T
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha if not self.noah else 'none (noah)'}, merged={self.merged}")


def _matches(name: str, target: str) -> bool:
    """A target is a short name ("q", "fc1": the last name component), a glob or a regex on the full name."""
    if name == target or name.endswith("." + target):
        return True
    if any(c in target for c in "*?[") and fnmatch.fnmatchcase(name, target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def find_lora_targets(model: nn.Module, targets) -> list[str]:
    """Names of the nn.Linear modules matched by ``targets``; a target that matches none raises ValueError."""
    if isinstance(targets, str):  # "q,v" from a command line
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    found, unmatched = [], []
    for t in targets:
        hits = [n for n in linears if _matches(n, t)]
        if not hits:
            unmatched.append(t)
        found += [n for n in hits if n not in found]
    if unmatched:
        raise ValueError(
            f"LoRA target(s) {', '.join(map(repr, unmatched))} match no nn.Linear; use a short name "
            f"({', '.join(SHORT_NAMES)}), a glob such as 'blocks.*.attn.q' or a regex on the full module name")
    return [n for n in linears if n in found]  # model order


def lora_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The targeted Linears; NOAH's variant: q, k and v of every block (``targets`` does not apply)."""
    if config.variant == "noah":
        return [f"blocks.{i}.attn.{part}" for i in range(len(model.blocks)) for part in ("q", "k", "v")]
    return find_lora_targets(model, config.targets)


def wrap_lora(model: nn.Module, name: str, config: LoraConfig) -> LoRALinear:
    """``LoRALinear(layer, config)``. NOAH's variant, as its VTAB runs trained it: per block one A (in, r), drawn
    truncated-normal std 0.02 before q's wrapper (``_init_vit_weights`` on LoRA_a; timm: bounds ±2 absolute), and one
    dropout on the attention input, both shared by q, k and v (k and v take them from the wrapped q)."""
    block, _, part = name.rpartition(".")
    layer = model.get_submodule(name)
    if config.variant != "noah":
        return LoRALinear(layer, config)
    if part != "q":
        q = model.get_submodule(f"{block}.q")
        return LoRALinear(layer, config).share(q.lora_A, q.lora_dropout)
    ref = layer.weight
    shared = nn.Parameter(torch.empty(ref.shape[1], config.rank, device=ref.device, dtype=ref.dtype))
    with torch.no_grad():
        nn.init.trunc_normal_(shared, std=0.02)
    return LoRALinear(layer, config).share(shared)


def apply_lora(model: nn.Module, config: LoraConfig | None = None, **fields) -> list[str]:
    """LoRA on the targeted Linears (short names q,k,v,proj,fc1,fc2, or glob/regex on full names), or NOAH's
    fused-qkv variant; freezes all but adapters and head. ``apply_lora(model, LoraConfig(rank=16))`` or
    ``apply_lora(model, rank=16)``. Returns the wrapped module names."""
    return METHOD.apply(model, configure(LoraConfig, config, fields))


def short_targets(config) -> tuple[str, ...]:
    """The short names a LoRA-style config targets, for the FLOP model (``qkv``: one fused layer, as timm's)."""
    if getattr(config, "variant", "") == "noah":
        return ("q", "k", "v")
    return tuple(t.strip() for t in config.targets.split(","))


METHOD = Method(
    "lora", "LoRA A/B on the targets (default q, v; r = 8), + head", lr=1e-3, config=LoraConfig,
    wrappers=(LoRALinear,), targets=lora_targets, wrap=wrap_lora,
    cost=lambda config: Cost(linears=dict.fromkeys(short_targets(config),
                                                   functools.partial(LoRALinear.macs, config.rank))),
    lr_note="the usual LoRA rate for ViTs with AdamW (B starts at zero, so the start is the base model)",
    paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022")

__all__ = ["LoRALinear", "LoraConfig", "METHOD", "SHORT_NAMES", "SharedInputDropout", "VARIANTS", "apply_lora",
           "find_lora_targets", "lora_targets", "short_targets", "wrap_lora"]
