"""Many tasks on one frozen backbone: named adapters, each with its own head, switched in place.

    peft.add_adapter(model, "pets", method="rlrr", num_classes=37)
    peft.add_adapter(model, "flowers", method="lora", num_classes=102, lora_rank=4)
    peft.load_adapter_state_dict(model, torch.load("pets.pt"), name="pets")   # a task trained on its own
    peft.set_adapter(model, "pets")      # the model now computes exactly what the pets model computes
    peft.set_adapter(model, None)        # the plain backbone again

How: a task is the set of wrapper modules its method put into the model, plus its head, kept aside while
inactive. The wrappers hold the backbone's frozen tensors by reference (they never copy them), so switching is
a handful of ``setattr`` calls and moves only the task's own tensors to the backbone's device: time and memory of
the adapter, not the backbone. Tasks of different methods coexist (each is activated alone, on the plain
backbone); methods that train the backbone's own tensors (``full``, ``mlp``) cannot share it and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import state
from .base import adapter_parameter_names, has_adapters, replace_module
from .registry import configure_method, get_method


@dataclass
class _Task:
    method: str
    options: dict
    modules: dict[str, nn.Module]  # path -> the module this task puts there (its wrappers and its head)
    num_classes: int


class _Registry:
    """Kept on the model as ``model._peft_tasks`` (a plain attribute: not a sub-module, not in state_dict)."""

    def __init__(self, model: nn.Module):
        self.base: dict[str, nn.Module] = {"head": model.head}  # the plain module at every path a task replaces
        self.base_classes = model.config.num_classes
        self.tasks: dict[str, _Task] = {}
        self.active: str | None = None


def _registry(model: nn.Module, create: bool = False) -> _Registry | None:
    reg = model.__dict__.get("_peft_tasks")
    if reg is None and create:
        if has_adapters(model):
            raise ValueError("the model already has adapters from apply_method; named adapters need the plain "
                             "backbone (merge_adapters first, or start from a fresh model)")
        reg = _Registry(model)
        model.__dict__["_peft_tasks"] = reg
    return reg


def _put(model: nn.Module, path: str, module: nn.Module | None) -> None:
    """``module`` at ``path``; None: no module there (a task's own addition, such as FacT's ``model.fact``)."""
    if module is not None:
        replace_module(model, path, module)
    elif path in dict(model.named_modules()):
        parent, _, child = path.rpartition(".")
        delattr(model.get_submodule(parent) if parent else model, child)


def _place(model: nn.Module, modules: dict[str, nn.Module | None], num_classes: int) -> None:
    device = model.cls_token.device
    for path in sorted(modules, key=lambda p: p.count(".")):  # parents before children
        module = modules[path]
        _put(model, path, None if module is None else module.to(device).train(model.training))  # the model's mode
    model.config = model.config.replace(num_classes=num_classes)


def _deactivate(model: nn.Module, reg: _Registry) -> None:
    if reg.active is not None:
        _place(model, {p: reg.base[p] for p in reg.tasks[reg.active].modules}, reg.base_classes)
        reg.active = None


def add_adapter(model: nn.Module, name: str, method: str, num_classes: int | None = None, **options) -> list[str]:
    """Add task ``name``: ``method``'s wrappers (with ``options``) and a new zero-initialised head of ``num_classes``
    outputs (default: the backbone head's). The active task does not change. Returns the adapted module names."""
    entry = get_method(method)
    if entry.trains_backbone:
        raise ValueError(f"method {method!r} trains the backbone's own tensors, so it cannot share one frozen backbone "
                         "with other tasks; use a separate model for it")
    reg = _registry(model, create=True)
    if name in reg.tasks:
        raise ValueError(f"an adapter named {name!r} exists already (adapters: {', '.join(reg.tasks)})")
    previous = reg.active
    _deactivate(model, reg)
    base_head = reg.base["head"]
    classes = num_classes or base_head.out_features
    head = nn.Linear(base_head.in_features, classes, device=base_head.weight.device, dtype=base_head.weight.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.head = head
    before = dict(model.named_modules())
    changed = entry.apply(model, configure_method(method, **options))
    modules = {path: model.get_submodule(path) for path in changed}
    modules["head"] = head
    for path in changed:
        reg.base.setdefault(path, before.get(path))  # None: the method added a module there
    for path in modules:  # back to the plain backbone
        _put(model, path, reg.base[path])
    reg.tasks[name] = _Task(method, dict(options), modules, classes)
    if previous is not None:
        set_adapter(model, previous)
    return changed


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make task ``name`` the one the model computes (None: the plain backbone and its own head), in place."""
    reg = _registry(model)
    if reg is None or (name is not None and name not in reg.tasks):
        known = ", ".join(reg.tasks) if reg else "none"
        raise KeyError(f"no adapter named {name!r} (adapters: {known})")
    _deactivate(model, reg)
    if name is not None:
        task = reg.tasks[name]
        _place(model, task.modules, task.num_classes)
        reg.active = name
        for _, module in task.modules.items():  # only the active task trains
            for pname, p in module.named_parameters():
                p.requires_grad_(pname in _own_parameters(module))


def _own_parameters(module: nn.Module) -> set[str]:
    """Names (relative to ``module``) of the task's own tensors: adapter parameters, or every head parameter."""
    if not has_adapters(module):
        return {n for n, _ in module.named_parameters()}  # the head
    return set(adapter_parameter_names(module))


def adapter_names(model: nn.Module) -> list[str]:
    reg = _registry(model)
    return list(reg.tasks) if reg else []


def active_adapter(model: nn.Module) -> str | None:
    reg = _registry(model)
    return reg.active if reg else None


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The trainable tensors (``name=None``: of the model as it is) or those of task ``name``, under the names a
    model adapted for that task alone would give them, so one file loads into either."""
    if name is None:
        return state.adapter_state_dict(model)
    return {key: t.detach().cpu().clone() for key, t in _task_parameters(_task(model, name)).items()}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, saved: dict[str, torch.Tensor], name: str | None = None) -> None:
    """Load an adapter state (strict) into the model as it is (``name=None``) or into task ``name``."""
    if name is None:
        return state.load_adapter_state_dict(model, saved)
    task = _task(model, name)
    params = _task_parameters(task)
    state.check_state_fits(params, saved, f"adapter {name!r} ({task.method})")
    for key, p in params.items():
        p.copy_(saved[key])


def _task_parameters(task: _Task) -> dict[str, nn.Parameter]:
    """The task's own tensors by the names the model adapted for it alone gives them: a tensor shared by several
    wrappers (NOAH's one A per block for q, k and v) under its first name only, as ``named_parameters`` does."""
    params, seen = {}, set()
    for path, module in task.modules.items():
        for p, t in module.named_parameters():
            if p in _own_parameters(module) and id(t) not in seen:
                seen.add(id(t))
                params[f"{path}.{p}"] = t
    return params


def _task(model: nn.Module, name: str) -> _Task:
    reg = _registry(model)
    if reg is None or name not in reg.tasks:
        raise KeyError(f"no adapter named {name!r} (adapters: {', '.join(reg.tasks) if reg else 'none'})")
    return reg.tasks[name]


__all__ = ["active_adapter", "adapter_names", "adapter_state_dict", "add_adapter", "load_adapter_state_dict",
           "set_adapter"]
