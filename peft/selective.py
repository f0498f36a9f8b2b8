"""Methods that add nothing and choose which pretrained tensors train: linear probe, MLP-only, full fine-tuning.

| mode | trainable                               | ViT-B/16 backbone params |
|------|-----------------------------------------|--------------------------|
| head | the classifier head only (linear probe) | 0                        |
| mlp  | fc1 and fc2 of every block, and the head| 56,669,184               |
| full | everything                              | 85,798,656               |
"""

from __future__ import annotations

from torch import nn

from .base import Cost, Method, is_head


def _mlp(name: str) -> bool:
    return is_head(name) or ".mlp.fc1." in name or ".mlp.fc2." in name


HEAD = Method(
    "head", "the classifier head only (linear probe)", lr=1e-3, trains=is_head,
    lr_note="a zero-initialised linear classifier on frozen features: Adam moves each of the D=768 weights by "
            "about lr per step, so logits move by up to ~lr*D = 0.8 per step (1e-2: ~8, too much for a start)")
MLP = Method(
    "mlp", "fc1 and fc2 of every block, and the head", lr=1e-4, trains=_mlp, trains_backbone=True,
    cost=lambda config: Cost(trains_weights=("fc1", "fc2")),
    lr_note="two thirds of the backbone's weights move, so this behaves like full fine-tuning and takes its rate")
FULL = Method(
    "full", "every parameter", lr=1e-4, trains=lambda name: True, trains_backbone=True, saves_everything=True,
    cost=lambda config: Cost(trains_everywhere=True, trains_weights=("*",)),
    lr_note="every weight moves; larger rates destroy the pretrained features (Google fine-tunes with small "
            "steps too). Training from scratch (--weights none) uses 1e-3 instead: nothing to preserve")
