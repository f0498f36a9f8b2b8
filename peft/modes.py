"""Fine-tuning modes: which parameters of a :class:`vit.VisionTransformer` train, and which adapters exist.

| mode   | trainable                                                         | ViT-B/16 backbone params |
|--------|-------------------------------------------------------------------|--------------------------|
| head   | the classifier head only (linear probe)                           | 0                        |
| mlp    | fc1 and fc2 of every block, and the head                          | 56,669,184               |
| full   | everything                                                        | 85,798,656               |
| lora   | LoRA A/B on the targets (default q, v; r=8), and the head         | 294,912                  |
| rlrr   | RLRR on q,k,v,proj,fc1,fc2 + SSF on norms and patch embed, + head | 288,768                  |

(plus the head: 769 × classes). One helper, :func:`freeze_all_but`, sets ``requires_grad`` for every mode.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .lora import LoRALinear, inject_lora
from .rlrr import SSF, RLRRLinear, inject_rlrr

MODES = ("head", "mlp", "full", "lora", "rlrr")
ADAPTER_TYPES = (RLRRLinear, LoRALinear, SSF)
MODE_OPTIONS = {"lora_rank": 8, "lora_alpha": 8.0, "lora_targets": ("q", "v"), "lora_dropout": 0.0,
                "rlrr_rank": 1, "rlrr_init": "official", "rlrr_impl": "function"}


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Full names of every adapter parameter (RLRR s_out/s_in/f, SSF scale/shift, LoRA A/B)."""
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, ADAPTER_TYPES):
            names += [f"{mod_name}.{p}" if mod_name else p for p in module.ADAPTER_PARAMS]
    return names


def is_head(name: str) -> bool:
    return name.startswith("head.")


def freeze_all_but(model: nn.Module, keep: Callable[[str], bool]) -> int:
    """Set ``requires_grad = keep(name)`` for every parameter; returns the number of trainable elements."""
    total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep(name)))
        total += p.numel() if p.requires_grad else 0
    return total


def _check_fresh(model: nn.Module) -> None:
    present = sorted({type(m).__name__ for m in model.modules() if isinstance(m, ADAPTER_TYPES)})
    if present:
        raise ValueError(f"the model already has adapters ({', '.join(present)}); apply one method to a fresh "
                         "model, or merge_adapters() first")


def freeze_for_adapters(model: nn.Module) -> None:
    """Adapters and the head train; everything else is frozen."""
    adapters = set(adapter_parameter_names(model))
    freeze_all_but(model, lambda n: n in adapters or is_head(n))


def apply_rlrr(model: nn.Module, rank: int = 1, init: str = "official", impl: str = "function") -> list[str]:
    """RLRR exactly as the official ViT code places it; freezes all but adapters and head.

    RLRR on q, k, v, proj, fc1, fc2 of every block; SSF after norm1, norm2, the final norm and the patch
    embedding. Returns the replaced module names. ``impl="official"`` keeps the materialised-W' formulation
    (for benchmarks); the default runs :class:`peft.functional.RLRRLinearFunction`.
    """
    _check_fresh(model)
    changed = inject_rlrr(model, rank=rank, init=init, impl=impl)
    freeze_for_adapters(model)
    return changed


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 8.0, targets=("q", "v"),
               dropout: float = 0.0) -> list[str]:
    """LoRA on the targeted Linears (short names q,k,v,proj,fc1,fc2, or glob/regex on full names);
    freezes all but adapters and head. Returns the wrapped module names."""
    _check_fresh(model)
    changed = inject_lora(model, rank=rank, alpha=alpha, targets=targets, dropout=dropout)
    freeze_for_adapters(model)
    return changed


def apply_mode(model: nn.Module, mode: str, **options) -> list[str]:
    """Prepare ``model`` for fine-tuning in ``mode`` (head, mlp, full, lora, rlrr).

    Options (others raise TypeError; the ones a mode does not use are ignored): lora_rank, lora_alpha,
    lora_targets, lora_dropout, rlrr_rank, rlrr_init, rlrr_impl. Returns the names of modules replaced by
    adapters (empty for head, mlp and full).
    """
    unknown = set(options) - set(MODE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) for apply_mode: {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(MODE_OPTIONS)}")
    o = {**MODE_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    if mode == "head":
        freeze_all_but(model, is_head)
        return []
    if mode == "mlp":
        freeze_all_but(model, lambda n: is_head(n) or ".mlp.fc1." in n or ".mlp.fc2." in n)
        return []
    if mode == "full":
        freeze_all_but(model, lambda n: True)
        return []
    if mode == "lora":
        return apply_lora(model, rank=o["lora_rank"], alpha=o["lora_alpha"], targets=o["lora_targets"],
                          dropout=o["lora_dropout"])
    if mode == "rlrr":
        return apply_rlrr(model, rank=o["rlrr_rank"], init=o["rlrr_init"], impl=o["rlrr_impl"])
    raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}")


__all__ = ["MODES", "MODE_OPTIONS", "adapter_parameter_names", "apply_lora", "apply_mode", "apply_rlrr",
           "freeze_all_but", "freeze_for_adapters"]
