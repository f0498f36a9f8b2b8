"""What every PEFT method shares: the adapter contract, the registry entry, and two small model-surgery helpers.

The contract (one for every wrapper, so that merging and saving need no per-method branches):

* an adapter module is an :class:`Adapter`; ``ADAPTER_PARAMS`` names its own trainable parameters, and the
  frozen pretrained tensors it wraps keep their old names (``weight``, ``bias``);
* ``merge()`` returns a *new plain module* (``nn.Linear``, ``nn.LayerNorm``, ``nn.Conv2d``, …) computing the
  same function, which :func:`peft.merge_adapters` puts in the wrapper's place; a method whose extra
  computation cannot be folded into weights sets ``MERGEABLE = False`` and ``merge()`` raises
  :class:`NotMergeableError` saying why.

A method is one file defining its wrappers, an ``apply(model, **options)`` function and a :class:`Method` entry
with its published defaults; ``peft/modes.py`` lists the entries (see the README's "Adding a method").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


class NotMergeableError(TypeError):
    """The adapter adds computation that no plain layer can hold (e.g. VPT's extra tokens)."""


class AdapterStateError(ValueError):
    """A saved adapter state that does not fit the model (keys, shapes) or holds unusable values; the message
    names the keys."""


class Adapter:
    """Mixin marking an adapter module. Subclasses set ADAPTER_PARAMS and implement :meth:`merge`."""

    ADAPTER_PARAMS: tuple[str, ...] = ()
    MERGEABLE = True

    def merge(self) -> nn.Module:
        raise NotMergeableError(f"{type(self).__name__} cannot be merged into plain layers")

    def runtime_path(self, device) -> str | None:
        """Which compute path this adapter takes on ``device`` when it has a choice (a fused kernel), and why;
        None for the others. The engine logs and records it without knowing the method."""
        return None


def adopt_linear(wrapper: nn.Module, base: nn.Linear) -> None:
    """How every wrapper of an ``nn.Linear`` takes it over: the same ``weight``/``bias`` Parameter objects (names
    and storage unchanged), frozen, and its ``in_features``/``out_features``."""
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{type(wrapper).__name__} wraps nn.Linear, got {type(base).__name__}")
    wrapper.in_features, wrapper.out_features = base.in_features, base.out_features
    wrapper.weight, wrapper.bias = base.weight, base.bias
    wrapper.weight.requires_grad_(False)
    if wrapper.bias is not None:
        wrapper.bias.requires_grad_(False)


class LinearDelta:
    """For adapters of an ``nn.Linear`` whose function is (W + ΔW) x + b: ``merge()`` built on ``delta_weight()``
    (ΔW, out × in, in W's dtype). The adapter keeps ``weight``, ``bias``, ``in_features``, ``out_features``."""

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out.requires_grad_(False)


@dataclass(frozen=True)
class Option:
    """One option of a method: default, a one-line help (it becomes the ``--flag``'s help) and choices."""

    default: Any
    help: str
    choices: tuple | None = None


@dataclass(frozen=True)
class Method:
    """A registry entry: how to apply the method, its options and published defaults.

    ``apply(model, **options)`` adapts and freezes the model in place and returns the names of the replaced
    modules. ``options`` maps keyword names (unique across methods, prefixed with the method's name, e.g.
    ``lora_rank``) to :class:`Option`; ``lr`` is the default peak AdamW learning rate for ViT-B/16 at batch 128,
    with the reason in ``lr_note``.
    """

    name: str
    apply: Callable[..., list[str]]
    summary: str  # what trains, in a few words
    lr: float
    lr_note: str = ""
    options: dict[str, Option] = field(default_factory=dict)
    mergeable: bool = True  # merge_adapters can fold it into a plain ViT
    trains_backbone: bool = False  # updates pretrained tensors in place (full, mlp): cannot share a backbone
    paper: str = ""


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (the one place that does this)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def freeze_all_but(model: nn.Module, keep: Callable[[str], bool]) -> int:
    """Set ``requires_grad = keep(name)`` for every parameter; returns the number of trainable elements."""
    total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep(name)))
        total += p.numel() if p.requires_grad else 0
    return total


def is_head(name: str) -> bool:
    return name.startswith("head.")


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Full names (relative to ``model``) of every adapter parameter (RLRR s_out/s_in/f, SSF scale/shift, LoRA A/B,
    …): the one definition of "an adapter's own parameters"."""
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, Adapter):
            names += [f"{mod_name}.{p}" if mod_name else p for p in module.ADAPTER_PARAMS]
    return names


def has_adapters(model: nn.Module) -> bool:
    """Whether any adapter module is inside ``model`` (the one definition of "already adapted")."""
    return any(isinstance(m, Adapter) for m in model.modules())


def check_fresh(model: nn.Module) -> None:
    """Refuse to stack a second method on a model that already carries adapters."""
    present = sorted({type(m).__name__ for m in model.modules() if isinstance(m, Adapter)})
    if present:
        raise ValueError(f"the model already has adapters ({', '.join(present)}); apply one method to a fresh "
                         "model, or merge_adapters() first")


def freeze_for_adapters(model: nn.Module) -> None:
    """Adapters and the head train; everything else is frozen."""
    adapters = set(adapter_parameter_names(model))
    freeze_all_but(model, lambda n: n in adapters or is_head(n))
