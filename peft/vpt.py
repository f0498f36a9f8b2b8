"""VPT-deep and VPT-shallow: learnable prompt tokens at the input of every encoder block, or of the first only.

Paper: Jia et al., "Visual Prompt Tuning", ECCV 2022. ``vpt_tokens`` prompts (default 10) are inserted right after
CLS at the input of block 0; at every later block the previous block's outputs at those positions are replaced
by that block's own prompts. Prompts are initialised U(-v, v) with v = sqrt(6 / (3·P² + D)) and pass through
dropout (0.1, as in the paper's VTAB runs) after being expanded to the batch (one mask per sample).
12 × 10 × 768 = 92,160 parameters for ViT-B/16.

The classifier still reads the CLS token; the attention maps have 1 + p prefix tokens before the patch grid
(``vit.visualize.attention_maps`` finds them from the shapes and keeps them out of the grid). Prompts add tokens
to the sequence, so VPT cannot be merged into plain layers.

VPT-shallow (``vpt-shallow``) inserts its prompts once, before block 0, and lets every block process them like
the other tokens: p × D parameters (7,680 for ViT-B/16 at p = 10); KMnP/vpt ``src/models/vit_prompt/vit.py``
(``PromptedTransformer`` without ``DEEP``). p = 10 as for VPT-deep here; VPT's config default is 5
(``src/configs/config.py:50``) and the paper tunes p per task; same init and dropout as VPT-deep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import BlockAdapter, Method, MethodConfig, check_fresh, configure, freeze_for_adapters, replace_module


@dataclass(frozen=True)
class VPTConfig(MethodConfig):
    """VPT-deep's options: 10 prompts (the paper tunes p per task; KMnP/vpt's config default is 5,
    ``src/configs/config.py:50``) and prompt dropout 0.1 as in the paper's VTAB runs (the config default is 0.0,
    ``config.py:74``; the ``vpt-official`` recipe sets 0)."""

    PREFIX: ClassVar[str] = "vpt"
    POSITIVE: ClassVar[tuple] = ("tokens",)
    DEEP: ClassVar[bool] = True  # prompts at every block (False: before the first only)
    tokens: int = 10  # VPT prompt tokens per block
    dropout: float = 0.1  # dropout on the prompt tokens


@dataclass(frozen=True)
class VPTShallowConfig(VPTConfig):
    """VPT-shallow's options: VPT-deep's, with prompts inserted once."""

    PREFIX: ClassVar[str] = "vpt_shallow"
    DEEP: ClassVar[bool] = False
    tokens: int = 10  # VPT-shallow prompt tokens (inserted once, before block 0)
    dropout: float = 0.1  # dropout on the VPT-shallow prompt tokens


class VPTBlock(BlockAdapter, nn.Module):
    """An encoder block with its own prompts, through :class:`peft.base.BlockAdapter`: inserted after CLS
    (``insert``, block 0) or replacing the previous block's prompt outputs, then the block's own forward."""

    ADAPTER_PARAMS = ("prompts",)
    CANNOT_MERGE = ("its prompt tokens lengthen the token sequence, which no plain layer can hold; keep the "
                    "adapter (peft.adapter_state_dict) instead")

    def __init__(self, block: nn.Module, num_tokens: int, insert: bool, init_bound: float, dropout: float):
        super().__init__(block)  # norm1, attn, norm2, mlp: the same modules, the same names
        dim = block.norm1.normalized_shape[0]
        ref = block.norm1.weight
        self.prompts = nn.Parameter(torch.empty(num_tokens, dim, device=ref.device, dtype=ref.dtype))
        nn.init.uniform_(self.prompts, -init_bound, init_bound)
        self.prompt_dropout = nn.Dropout(dropout)
        self.num_tokens, self.insert = num_tokens, insert

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, 1 + p + patches, D)
        # Expanded to the batch first, then dropped: every sample draws its own mask, as the official code does
        # (KMnP/vpt@4410440 src/models/vit_prompt/vit.py:82,114-115). In eval mode the dropout is the identity.
        # Functional, with the module's rate and mode: module hooks (torch's FlopCounterMode) cannot take the
        # expanded view of a parameter that no_grad creates.
        drop = self.prompt_dropout
        prompts = F.dropout(self.prompts.expand(x.shape[0], -1, -1), drop.p, drop.training).to(x.dtype)
        rest = x[:, 1:] if self.insert else x[:, 1 + self.num_tokens:]
        return self.run_block(torch.cat([x[:, :1], prompts, rest], dim=1))

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, insert={self.insert}"


def apply_vpt(model: nn.Module, config: VPTConfig | None = None, **fields) -> list[str]:
    """VPT-deep on every block of a :class:`vit.VisionTransformer` (a :class:`VPTShallowConfig`: VPT-shallow,
    prompts before block 0 only); freezes all but the prompts and the head."""
    config = configure(VPTConfig, config, fields)
    check_fresh(model)
    c = model.config
    bound = math.sqrt(6.0 / (c.in_channels * c.patch_size**2 + c.hidden_size))
    names = [f"blocks.{i}" for i in range(len(model.blocks) if config.DEEP else 1)]
    for i, name in enumerate(names):
        replace_module(model, name, VPTBlock(model.get_submodule(name), config.tokens, insert=i == 0,
                                             init_bound=bound, dropout=config.dropout))
    freeze_for_adapters(model)
    return names


METHOD = Method(
    "vpt", apply_vpt, "VPT-deep: prompt tokens at the input of every block, + head", lr=3e-3,
    config=VPTConfig, wrappers=(VPTBlock,),
    lr_note="prompts are new inputs learned from scratch, like RLRR's vectors; VPT's own runs (SGD) tune it "
            "per task",
    paper="Jia et al., Visual Prompt Tuning, ECCV 2022")


SHALLOW = Method(
    "vpt-shallow", apply_vpt, "VPT-shallow: prompt tokens before the first block only, + head", lr=3e-3,
    config=VPTShallowConfig, wrappers=(VPTBlock,),
    lr_note="VPT-deep's rate (the same kind of parameters, fewer of them)",
    paper="Jia et al., Visual Prompt Tuning, ECCV 2022")

__all__ = ["METHOD", "SHALLOW", "VPTBlock", "VPTConfig", "VPTShallowConfig", "apply_vpt"]
