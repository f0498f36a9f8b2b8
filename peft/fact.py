"""FacT-TT: the weight increments of every layer factorised with factors shared across the whole network.

Paper: Jie & Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer", AAAI 2023; official code
JieShibo/PETL-ViT ``FacT/fact_tt.py`` (``set_FacT``, ``fact_forward_attn``, ``fact_forward_mlp``). Two factors for
the whole model, U (d × D) and V (D × d), and a small core per layer:

    q, k, v, proj:  Δ(x) = s · V dropout(S U x)                 S: d × d
    fc1 (D → 4D):   Δ(x) = s · [V dropout(S U x)_j]_{j=1..4}    S: 4d × d, its output split into 4 chunks of d
    fc2 (4D → D):   Δ(x) = s · V dropout(S [U x_j]_{j=1..4})    S: d × 4d, U applied to each D-chunk of x

U and the cores take nn.Linear's default init (kaiming-uniform, a = √5), V is zero (the model starts as the
pretrained one), dropout 0.1, rank d = 8 and s = 1 (``set_FacT(model, dim=8, s=1)``; ``FacT/configs/tt/*.yaml``
tune rank and scale per task: ``--fact-rank``, ``--fact-scale``). ViT-B/16 at d = 8: 2 · 768 · 8 + 12 · (4 · 64 +
2 · 256) = 21,504 parameters. Linear and mergeable: W' = W + s · ΔW with ΔW_q = V S U, and the fc1/fc2 blocks
built chunk by chunk. The shared factors live in ``model.fact`` (an adapter module that merges to nothing);
each adapted Linear keeps its ``weight``/``bias`` names and owns its core ``fact_s``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Wrapper, Cost, LinearDelta, Method, MethodConfig, Work
from .fields import option

TARGETS = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class FactConfig(MethodConfig):
    """FacT-TT's options: ``set_FacT(model, dim=8, s=1)`` and the dropout of ``FacT/fact_tt.py``."""

    PREFIX: ClassVar[str] = "fact"
    rank: int = option(8, "FacT rank d of the shared factors and the cores", min=1)
    scale: float = option(1.0, "FacT scale s of the increment (tuned per task in FacT/configs/tt)")
    dropout: float = option(0.1, "dropout on the FacT cores' outputs", min=0, max=1)


def _linear_init(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # nn.Linear's default for a (out, in) weight


class FacTShared(Wrapper, nn.Module):
    """The factors U (rank, D) and V (D, rank) every FacT layer of the model shares."""

    ADAPTER_PARAMS = ("u", "v")

    def __init__(self, model: nn.Module, config: FactConfig):
        """The factors for ``model`` (a :class:`vit.VisionTransformer`: its width, device and dtype)."""
        super().__init__()
        width, rank, ref = model.config.hidden_size, config.rank, model.blocks[0].norm1.weight
        kw = dict(device=ref.device, dtype=ref.dtype)
        self.u = nn.Parameter(torch.empty(rank, width, **kw))
        self.v = nn.Parameter(torch.zeros(width, rank, **kw))
        with torch.no_grad():
            _linear_init(self.u)

    def merge(self) -> nn.Module:
        return nn.Identity()  # the layers' merges have folded U and V into their weights


class FacTLinear(LinearDelta, nn.Module):
    """A frozen ``nn.Linear`` plus FacT's increment through the shared U, V (:meth:`share`) and its own core ``fact_s``.

    ``kind``, from the layer's shape: "square" (D → D), "expand" (fc1, D → c·D) or "reduce" (fc2, c·D → D), c the
    MLP ratio."""

    ADAPTER_PARAMS = ("fact_s",)
    DROPOUTS = ("fact_dropout",)

    def __init__(self, base: nn.Linear, config: FactConfig):
        super().__init__(base)
        scale, dropout, rank = config.scale, config.dropout, config.rank
        width = min(base.in_features, base.out_features)
        kind = ("square" if base.in_features == base.out_features else
                "expand" if base.out_features > base.in_features else "reduce")
        self.kind, self.scale, self.rank = kind, scale, rank
        self.chunks = {"square": 1, "expand": base.out_features // width, "reduce": base.in_features // width}[kind]
        if self.chunks * width != (base.out_features if kind == "expand" else base.in_features):
            raise ValueError(f"FacT needs the MLP width to be a multiple of the model width, got {base}")
        shape = {"square": (rank, rank), "expand": (self.chunks * rank, rank), "reduce": (rank, self.chunks * rank)}
        self.fact_s = nn.Parameter(torch.empty(shape[kind], device=base.weight.device, dtype=base.weight.dtype))
        with torch.no_grad():
            _linear_init(self.fact_s)
        self.fact_dropout = nn.Dropout(dropout)
        self._shared: list[FacTShared] = []  # a plain list: the factors are registered once, on model.fact

    def share(self, shared: FacTShared) -> "FacTLinear":
        """Use the model's factors U, V."""
        if tuple(shared.v.shape) != (min(self.in_features, self.out_features), self.rank):
            raise ValueError(f"FacT factors of shape {tuple(shared.v.shape)} do not fit {self}")
        self._shared[:] = [shared]
        return self

    @staticmethod
    def macs(rank: int, tokens: int, fan_in: int, fan_out: int, input_grad: bool) -> Work:
        """x → U → S → V, every factor trains (U and V are shared, their gradients add): per product, forward and
        dW always, dX where its input needs a gradient (after the first, always)."""
        r, chunks = rank, max(fan_out, fan_in) // min(fan_out, fan_in)
        t, i, o = tokens, fan_in, fan_out
        if o > i:  # fc1: U on the tokens, S to c·d, V on each of the c chunks
            chain = [(t, i, r), (t, r, chunks * r), (t * chunks, r, o // chunks)]
        elif i > o:  # fc2: U on each of the c chunks, S from c·d, V on the tokens
            chain = [(t * chunks, i // chunks, r), (t, chunks * r, r), (t, r, o)]
        else:
            chain = [(t, i, r), (t, r, r), (t, r, o)]
        grads = [input_grad, True, True]
        return Work(forward=sum(a * b * c for a, b, c in chain),
                    backward=sum(a * b * c * (2 if g else 1) for (a, b, c), g in zip(chain, grads)))

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self._shared[0].u, self._shared[0].v
        y = F.linear(x, self.weight, self.bias)
        if self.kind == "reduce":
            z = F.linear(x.unflatten(-1, (self.chunks, -1)), u).flatten(-2)  # U on each D-chunk, (..., c·d)
            delta = F.linear(self.fact_dropout(F.linear(z, self.fact_s)), v)
        else:
            z = self.fact_dropout(F.linear(F.linear(x, u), self.fact_s))  # (..., c·d)
            delta = F.linear(z.unflatten(-1, (self.chunks, -1)), v).flatten(-2)  # V on each d-chunk
        return y + delta * self.scale

    def delta_weight(self) -> torch.Tensor:
        """s · ΔW, (out, in)."""
        u, v, s, r = self._shared[0].u, self._shared[0].v, self.fact_s, self.rank
        if self.kind == "square":
            dw = v @ s @ u
        elif self.kind == "expand":  # row block j: V S_j U
            dw = torch.cat([v @ s[j * r:(j + 1) * r] @ u for j in range(self.chunks)], 0)
        else:  # column block j: V S_j U
            dw = torch.cat([v @ s[:, j * r:(j + 1) * r] @ u for j in range(self.chunks)], 1)
        return dw * self.scale

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}, scale={self.scale}"


def fact_targets(model: nn.Module, config: FactConfig) -> list[str]:
    """The shared factors first (``model.fact``, a new module), then q, k, v, proj, fc1, fc2 of every block."""
    return ["fact"] + [f"blocks.{i}.{target}" for i in range(len(model.blocks)) for target in TARGETS]


def wrap_fact(model: nn.Module, name: str, config: FactConfig) -> nn.Module:
    if name == "fact":
        return FacTShared(model, config)
    return FacTLinear(model.get_submodule(name), config).share(model.fact)


METHOD = Method(
    "fact-tt", "FacT-TT: every layer's increment V S U with U, V shared across the model (rank 8), + head",
    lr=1e-3, config=FactConfig, wrappers=(FacTShared, FacTLinear), targets=fact_targets, wrap=wrap_fact,
    cost=lambda config: Cost(linears=dict.fromkeys(("q", "k", "v", "proj", "fc1", "fc2"),
                                                   functools.partial(FacTLinear.macs, config.rank))),
    lr_note="FacT's own VTAB runs: AdamW at 1e-3, weight decay 1e-4 (FacT/fact_tt.py:165-166, 195)",
    paper="Jie & Deng, FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer, AAAI 2023")

__all__ = ["FacTLinear", "FacTShared", "FactConfig", "METHOD", "fact_targets", "wrap_fact"]
