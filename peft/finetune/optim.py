"""The optimisation: the optimizer and which tensors decay, and the learning rate at every optimizer step.

Schedules (``--schedule``), all a pure function of the step index, so a resumed run continues on the same curve:

* ``step-cosine`` (the project's): linear warmup per optimizer step, then a cosine to ``--min-lr``;
* ``epoch-cosine``: timm's ``CosineLRScheduler`` with ``t_in_epochs`` (timm 0.9.8 ``scheduler/cosine_lr.py``
  ``_get_lr``, one cycle, no noise), ``t_initial = epochs - cooldown``: warmup ``warmup_lr + t (lr - warmup_lr) /
  warmup_t`` for t < warmup_t, then ``min_lr + (lr - min_lr)(1 + cos(π t / t_initial)) / 2`` with t counted from
  0 (the warmup is not a prefix), then ``min_lr`` for the cooldown epochs;
* ``epoch-restarts``: torch's ``CosineAnnealingWarmRestarts(T_0=restart_epochs, T_mult=1, eta_min=min_lr)``;
* ``epoch-warmup-cosine``: VPT's ``WarmupCosineSchedule`` stepped per epoch (``src/solver/lr_scheduler.py``):
  ``t / warmup`` for t < warmup, then ``max(0, (1 + cos(π (t - warmup) / (epochs - warmup))) / 2)``, times lr.

An epoch schedule is constant within an epoch; epoch e (0-based) trains at its value for ``max(0, e - lag)``:
the official RLRR and NOAH loops call ``scheduler.step(epoch)`` after finishing epoch ``epoch`` (lag 1, so epochs
0 and 1 share the first value); timm's own train loop calls ``step(epoch + 1)`` (lag 0).
"""

from __future__ import annotations

import math

import torch

from ..base import declared


def project_decay(name: str, p: torch.Tensor, declared: dict[str, set[str]]) -> bool:
    """The project's rule: weight matrices decay; biases, norm parameters, CLS and position embeddings and vectors
    (a tensor with at most one dimension larger than 1) do not. A wrapper's own parameters follow what it declares
    (``NO_DECAY``: vectors in spirit at any rank, as RLRR's factors and SSF's scale and shift; ``DECAY``: weight
    matrices even at rank 1, as LoRA's A and B)."""
    if name in declared["NO_DECAY"] or name in ("cls_token", "pos_embed"):
        return False
    if name in declared["DECAY"]:
        return True
    leaf = name.rsplit(".", 1)[-1]
    return not (sum(d > 1 for d in p.shape) <= 1 or leaf == "bias" or ".norm" in name or name.startswith("norm"))


def rlrr_decay(name: str, p: torch.Tensor, declared: dict[str, set[str]]) -> bool:
    """The official RLRR code's ``get_parameters`` (zstarN70/RLRR ``models/networks.py:299-313``): names holding
    'bias' or 'norm' are not decayed. On RLRR's official names that decays its two scale factors (``scale_col``,
    ``scale_line``), the patch embedding's scale and shift (``ssf_scale_patch``) and the head's weight, and not the
    shift of the adapted Linears (``shift_bias``), the norms' scale and shift or the head bias; here the biases
    under other names are the wrappers' ``BIASES``."""
    return name not in declared["BIASES"] and "bias" not in name and "norm" not in name


def timm_decay(name: str, p: torch.Tensor, declared: dict[str, set[str]]) -> bool:
    """timm's ``param_groups_weight_decay`` (SSF ``optim_factory.py:39-57``, NOAH via timm's create_optimizer):
    tensors with at most one dimension and biases are not decayed."""
    return p.ndim > 1 and not name.endswith(".bias")


def vpt_decay(name: str, p: torch.Tensor, declared: dict[str, set[str]]) -> bool:
    """VPT's ``make_optimizer`` (KMnP/vpt ``src/solver/optimizer.py:58-62``): every parameter but the head bias."""
    return name != "head.bias"


def all_decay(name: str, p: torch.Tensor, declared: dict[str, set[str]]) -> bool:
    """FacT's ``AdamW(trainable, lr, weight_decay)`` (JieShibo/PETL-ViT@026e4f1 ``FacT/fact_tt.py:184-195``): one
    group, every trainable tensor decayed (the head's bias included)."""
    return True


DECAY_RULES = {"project": project_decay, "rlrr": rlrr_decay, "timm": timm_decay, "vpt": vpt_decay, "all": all_decay}


def param_groups(model, weight_decay: float, groups: str = "project") -> list[dict]:
    """Optimizer groups of the trainable tensors: ``groups`` names the rule (:data:`DECAY_RULES`; "project"
    decays weight matrices only, see :func:`project_decay`)."""
    rule = DECAY_RULES[groups]
    facts = {fact: declared(model, fact) for fact in ("NO_DECAY", "DECAY", "BIASES")}
    decay, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if rule(name, p, facts) else other).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def build_optimizer(model, opts, lr: float) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.999, eps 1e-8: torch's and timm's defaults) or SGD with momentum, on the groups."""
    groups = param_groups(model, opts.resolved_weight_decay(), opts.decay_groups)
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opts.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def epoch_value(schedule: str, t: int, lr: float, epochs: int, warmup: float, warmup_lr: float, min_lr: float,
                cooldown: int = 0, restart: int = 5) -> float:
    """The learning rate an epoch schedule gives at epoch index ``t`` (see the module docstring)."""
    if schedule == "epoch-cosine":
        t_initial = epochs - cooldown
        if t < warmup:
            return warmup_lr + t * (lr - warmup_lr) / warmup
        if t >= t_initial:  # past the one cycle: timm holds lr_min
            return min_lr
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / t_initial))
    if schedule == "epoch-restarts":
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (t % restart) / restart)) / 2
    if schedule == "epoch-warmup-cosine":
        if t < warmup:
            return lr * t / max(1.0, warmup)
        progress = (t - warmup) / max(1, epochs - warmup)
        return lr * max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown epoch schedule {schedule!r}")


class LRSchedule:
    """The learning rate of every optimizer step of a run (a pure function of the step index)."""

    def __init__(self, opts, lr: float, steps_per_epoch: int):
        self.opts, self.lr, self.steps_per_epoch = opts, lr, steps_per_epoch
        total = opts.epochs * steps_per_epoch
        warmup = min(total, round(opts.warmup_epochs * steps_per_epoch))
        self._step_factor = warmup_cosine(warmup, total, opts.warmup_lr / lr, opts.min_lr / lr)

    def __call__(self, step: int) -> float:
        o = self.opts
        if o.schedule == "step-cosine":
            return self.lr * self._step_factor(step)
        epoch = step // self.steps_per_epoch
        return epoch_value(o.schedule, max(0, epoch - o.schedule_lag), self.lr, o.epochs, o.warmup_epochs,
                           o.warmup_lr, o.min_lr, o.cooldown_epochs, o.restart_epochs)


def warmup_cosine(warmup_steps: int, total_steps: int, start: float = 0.0, end: float = 0.0):
    """LR multiplier per optimizer step: linear warmup from ``start`` (as a fraction of the peak; 0 gives
    1/warmup at the first step) to 1, then a cosine to ``end`` at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return start + (1 - start) * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor
