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

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import Adapter, LinearDelta, Method, MethodConfig, check_fresh, configure, freeze_for_adapters, replace_module

TARGETS = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class FactConfig(MethodConfig):
    """FacT-TT's options: ``set_FacT(model, dim=8, s=1)`` and the dropout of ``FacT/fact_tt.py``."""

    PREFIX: ClassVar[str] = "fact"
    POSITIVE: ClassVar[tuple] = ("rank",)
    rank: int = 8  # FacT rank d of the shared factors and the cores
    scale: float = 1.0  # FacT scale s of the increment (tuned per task in FacT/configs/tt)
    dropout: float = 0.1  # dropout on the FacT cores' outputs


def _linear_init(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # nn.Linear's default for a (out, in) weight


class FacTShared(Adapter, nn.Module):
    """The factors U (rank, D) and V (D, rank) every FacT layer of the model shares."""

    ADAPTER_PARAMS = ("u", "v")

    def __init__(self, width: int, rank: int, ref: torch.Tensor):
        super().__init__()
        kw = dict(device=ref.device, dtype=ref.dtype)
        self.u = nn.Parameter(torch.empty(rank, width, **kw))
        self.v = nn.Parameter(torch.zeros(width, rank, **kw))
        with torch.no_grad():
            _linear_init(self.u)

    def merge(self) -> nn.Module:
        return nn.Identity()  # the layers' merges have folded U and V into their weights


class FacTLinear(LinearDelta, nn.Module):
    """A frozen ``nn.Linear`` plus FacT's increment through the shared U, V and its own core ``fact_s``.

    ``kind``: "square" (D → D), "expand" (fc1, D → c·D) or "reduce" (fc2, c·D → D), c the MLP ratio."""

    ADAPTER_PARAMS = ("fact_s",)

    def __init__(self, base: nn.Linear, shared: FacTShared, kind: str, config: FactConfig):
        super().__init__(base)
        scale, dropout = config.scale, config.dropout
        width, rank = shared.v.shape
        self.kind, self.scale, self.rank = kind, scale, rank
        self.chunks = {"square": 1, "expand": base.out_features // width, "reduce": base.in_features // width}[kind]
        if self.chunks * width != (base.out_features if kind == "expand" else base.in_features):
            raise ValueError(f"FacT needs the MLP width to be a multiple of the model width, got {base}")
        shape = {"square": (rank, rank), "expand": (self.chunks * rank, rank), "reduce": (rank, self.chunks * rank)}
        self.fact_s = nn.Parameter(torch.empty(shape[kind], device=base.weight.device, dtype=base.weight.dtype))
        with torch.no_grad():
            _linear_init(self.fact_s)
        self.fact_dropout = nn.Dropout(dropout)
        self._shared = [shared]  # a plain list: the factors are registered once, on model.fact

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


def apply_fact(model: nn.Module, config: FactConfig | None = None, **fields) -> list[str]:
    """FacT-TT on q, k, v, proj, fc1, fc2 of every block; freezes all but the factors, the cores and the head."""
    config = configure(FactConfig, config, fields)
    check_fresh(model)
    shared = FacTShared(model.config.hidden_size, config.rank, model.blocks[0].norm1.weight)
    model.fact = shared
    names = []
    for i in range(len(model.blocks)):
        for target in TARGETS:
            name = f"blocks.{i}.{target}"
            kind = {"mlp.fc1": "expand", "mlp.fc2": "reduce"}.get(target, "square")
            replace_module(model, name, FacTLinear(model.get_submodule(name), shared, kind, config))
            names.append(name)
    freeze_for_adapters(model)
    return names + ["fact"]


METHOD = Method(
    "fact-tt", apply_fact,
    "FacT-TT: every layer's increment V S U with U, V shared across the model (rank 8), + head", lr=1e-3,
    config=FactConfig, wrappers=(FacTShared, FacTLinear),
    lr_note="FacT's own VTAB runs: AdamW at 1e-3, weight decay 1e-4 (FacT/fact_tt.py:165-166, 195)",
    paper="Jie & Deng, FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer, AAAI 2023")

__all__ = ["FacTLinear", "FacTShared", "FactConfig", "METHOD", "apply_fact"]
