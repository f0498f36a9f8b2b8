"""Merging adapters into plain layers, and saving/loading only what was trained."""

from __future__ import annotations

import torch
from torch import nn

from .base import Wrapper, AdapterStateError, declared, replace_module


@torch.no_grad()
def merge_adapters(model: nn.Module) -> list[str]:
    """Fold every adapter into the layer it wraps, in place; returns the merged module names.

    Every adapter's ``merge()`` returns the plain layer that takes its place (see :mod:`peft.base`):
    RLRR/LoRA wrappers become plain ``nn.Linear`` (W ⊙ (1 + S_out S_in), b + f; or W₀ + (α/r) B A),
    SSF after a LayerNorm goes into its affine (γ' = s ⊙ γ, β' = s ⊙ β + t), SSF after the patch embedding
    into the conv (W'[o] = s[o] W[o], b' = s ⊙ b + t). Afterwards the model holds only standard modules
    with the original names, so ``loaders.save_npz`` exports it. Merged layers are frozen.
    """
    outermost = [(name, m) for name, m in model.named_modules() if isinstance(m, Wrapper)]
    outermost = [(n, m) for n, m in outermost if not any(n.startswith(o + ".") for o, _ in outermost)]
    for _, module in outermost:  # refuse before changing anything
        if not module.mergeable():
            module.merge()  # raises NotMergeableError with the method's own reason
    for name, module in outermost:
        replace_module(model, name, module.merge())
    return [name for name, _ in outermost]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of trainable parameter elements, total number of parameter elements)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters only (adapters and head after apply_method), detached CPU copies by name."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def check_state_fits(params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`AdapterStateError` listing missing keys, unexpected keys and shape mismatches of ``saved``
    vs ``params``, or naming a value that is not a tensor or not finite."""
    if not isinstance(saved, dict):
        raise AdapterStateError(f"adapter state for {what} is a {type(saved).__name__}, not a dict of tensors")
    bad = next((k for k, v in saved.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise AdapterStateError(f"adapter state key {bad!r} holds a {type(saved[bad]).__name__}, not a tensor")
    bad = next((k for k, v in saved.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise AdapterStateError(f"adapter state key {bad!r} holds non-finite values (nan or inf): the run that "
                                "saved it diverged, or the file is damaged")
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    wrong = [f"{n}: checkpoint {tuple(saved[n].shape)} vs model {tuple(params[n].shape)}"
             for n in sorted(set(params) & set(saved)) if tuple(saved[n].shape) != tuple(params[n].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches ({len(wrong)}): {'; '.join(wrong)}")
        raise AdapterStateError(f"adapter state does not fit {what} (apply the same mode and options first): "
                         + " | ".join(parts))


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters. Strict: keys and shapes must match exactly.

    The model must have been prepared the same way (same apply_method and options) as when it was saved;
    otherwise a ValueError lists the missing keys, unexpected keys and shape mismatches.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_state_fits(params, state, "this model")
    for n, p in params.items():
        p.copy_(state[n])


def runtime_path(model: nn.Module, device) -> str | None:
    """Which compute path the model's adapters take on ``device`` and why (e.g. RLRR's fused kernel or its PyTorch
    path), from the adapters' own ``runtime_path``; None when no adapter has a choice."""
    paths = [m.runtime_path(device) for m in model.modules() if isinstance(m, Wrapper)]
    return "; ".join(dict.fromkeys(p for p in paths if p)) or None


def train_adapters_only(model: nn.Module) -> None:
    """Eval mode for the model, train mode for the dropouts the adapters declare as their own (``DROPOUTS``: VPT's
    prompt dropout, LoRA's, AdaptFormer's, FacT's): the frozen backbone runs without dropout or drop-path, as
    VPT's ``PromptedTransformer.train()`` keeps it."""
    model.eval()
    for name in declared(model, "DROPOUTS"):
        model.get_submodule(name).train()


__all__ = ["adapter_state_dict", "load_adapter_state_dict", "merge_adapters", "runtime_path", "train_adapters_only",
           "trainable_parameters"]
