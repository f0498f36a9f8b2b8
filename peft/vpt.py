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

from .base import BlockWrapper, Cost, Method, MethodConfig
from .fields import option


@dataclass(frozen=True)
class VPTConfig(MethodConfig):
    """VPT-deep's options: 10 prompts (the paper tunes p per task; KMnP/vpt's config default is 5,
    ``src/configs/config.py:50``) and prompt dropout 0.1 as in the paper's VTAB runs (the config default is 0.0,
    ``config.py:74``; the ``vpt-official`` recipe sets 0)."""

    PREFIX: ClassVar[str] = "vpt"
    DEEP: ClassVar[bool] = True  # prompts at every block (False: before the first only)
    tokens: int = option(10, "prompt tokens (vpt: per block; vpt-shallow: once, before block 0)", min=1)
    dropout: float = option(0.1, "dropout on the prompt tokens", min=0, max=1)


@dataclass(frozen=True)
class VPTShallowConfig(VPTConfig):
    """VPT-shallow's options: VPT-deep's fields, with prompts inserted once."""

    PREFIX: ClassVar[str] = "vpt_shallow"
    DEEP: ClassVar[bool] = False


class VPTBlock(BlockWrapper, nn.Module):
    """An encoder block with its own prompts, through :class:`peft.base.BlockWrapper`: inserted after CLS
    (``insert``, block 0) or replacing the previous block's prompt outputs, then the block's own forward. The
    prompts start at zero; :func:`wrap_vpt` draws them with the bound of the model's patch size."""

    ADAPTER_PARAMS = ("prompts",)
    DROPOUTS = ("prompt_dropout",)
    CANNOT_MERGE = ("its prompt tokens lengthen the token sequence, which no plain layer can hold; keep the "
                    "adapter (peft.adapter_state_dict) instead")

    def __init__(self, block: nn.Module, config: VPTConfig):
        super().__init__(block)  # norm1, attn, norm2, mlp: the same modules, the same names
        dim = block.norm1.normalized_shape[0]
        ref = block.norm1.weight
        self.prompts = nn.Parameter(torch.zeros(config.tokens, dim, device=ref.device, dtype=ref.dtype))
        self.prompt_dropout = nn.Dropout(config.dropout)
        self.num_tokens, self.insert = config.tokens, False  # insert: set for the first block by wrap_vpt

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


def vpt_targets(model: nn.Module, config: VPTConfig) -> list[str]:
    """Every block (VPT-deep), or the first only (VPT-shallow)."""
    return [f"blocks.{i}" for i in range(len(model.blocks) if config.DEEP else 1)]


def wrap_vpt(model: nn.Module, name: str, config: VPTConfig) -> VPTBlock:
    """``VPTBlock(block, config)``, its prompts drawn U(-v, v) with v = sqrt(6 / (C·P² + D)) (VPT's xavier-style
    bound over the patch embedding's fan-in); the first block inserts them after CLS."""
    block = VPTBlock(model.get_submodule(name), config)
    c = model.config
    bound = math.sqrt(6.0 / (c.in_channels * c.patch_size**2 + c.hidden_size))
    with torch.no_grad():
        nn.init.uniform_(block.prompts, -bound, bound)
    block.insert = name == "blocks.0"
    return block


def vpt_cost(config: VPTConfig) -> Cost:
    """Prompt tokens from block 0 on (deep replaces them, the count is the same), trained at the input."""
    return Cost(extra_tokens=config.tokens, trains_input=True)


METHOD = Method(
    "vpt", "VPT-deep: prompt tokens at the input of every block, + head", lr=3e-3,
    config=VPTConfig, wrappers=(VPTBlock,), targets=vpt_targets, wrap=wrap_vpt, cost=vpt_cost,
    lr_note="prompts are new inputs learned from scratch, like RLRR's vectors; VPT's own runs (SGD) tune it "
            "per task",
    paper="Jia et al., Visual Prompt Tuning, ECCV 2022")


SHALLOW = Method(
    "vpt-shallow", "VPT-shallow: prompt tokens before the first block only, + head", lr=3e-3,
    config=VPTShallowConfig, wrappers=(VPTBlock,), targets=vpt_targets, wrap=wrap_vpt, cost=vpt_cost,
    lr_note="VPT-deep's rate (the same kind of parameters, fewer of them)",
    paper="Jia et al., Visual Prompt Tuning, ECCV 2022")

__all__ = ["METHOD", "SHALLOW", "VPTBlock", "VPTConfig", "VPTShallowConfig", "vpt_targets", "wrap_vpt"]
