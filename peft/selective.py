"""Methods that add nothing and choose which pretrained tensors train: linear probe, MLP-only, full fine-tuning.

| mode | trainable                               | ViT-B/16 backbone params |
|------|-----------------------------------------|--------------------------|
| head | the classifier head only (linear probe) | 0                        |
| mlp  | fc1 and fc2 of every block, and the head| 56,669,184               |
| full | everything                              | 85,798,656               |
"""

from __future__ import annotations

from torch import nn

from .base import Method, NoOptions, freeze_all_but, is_head


def apply_head(model: nn.Module, config: NoOptions | None = None) -> list[str]:
    freeze_all_but(model, is_head)
    return []


def apply_mlp(model: nn.Module, config: NoOptions | None = None) -> list[str]:
    freeze_all_but(model, lambda n: is_head(n) or ".mlp.fc1." in n or ".mlp.fc2." in n)
    return []


def apply_full(model: nn.Module, config: NoOptions | None = None) -> list[str]:
    freeze_all_but(model, lambda n: True)
    return []


HEAD = Method(
    "head", apply_head, "the classifier head only (linear probe)", lr=1e-3,
    lr_note="a zero-initialised linear classifier on frozen features: Adam moves each of the D=768 weights by "
            "about lr per step, so logits move by up to ~lr*D = 0.8 per step (1e-2: ~8, too much for a start)")
MLP = Method(
    "mlp", apply_mlp, "fc1 and fc2 of every block, and the head", lr=1e-4, trains_backbone=True,
    lr_note="two thirds of the backbone's weights move, so this behaves like full fine-tuning and takes its rate")
FULL = Method(
    "full", apply_full, "every parameter", lr=1e-4, trains_backbone=True, saves_everything=True,
    lr_note="every weight moves; larger rates destroy the pretrained features (Google fine-tunes with small "
            "steps too). Training from scratch (--weights none) uses 1e-3 instead: nothing to preserve")
