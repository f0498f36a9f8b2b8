"""What every PEFT method shares: the wrapper contract, method configs, the registry entry, the apply skeleton.

**The wrapper contract** (kept by every wrapper, so that merging, saving and the engine need no per-method code):

* *Built one way*, ``Wrapper(layer, config)``. An adapter module is a :class:`Wrapper`; its ``__init__`` calls
  ``super().__init__(layer)``,
  which takes the wrapped layer over (:func:`adopt_layer`): the layer's hyper-parameters (``in_features``,
  ``eps``, ``stride``, ...), its Parameter objects (``weight``, ``bias``: the same tensors under the same names,
  frozen) and its sub-modules (an encoder block's ``norm1``, ``attn``, ...). Nothing is allocated twice, and a
  wrapper that subclasses the layer's type (``SSFLayerNorm(Wrapper, nn.LayerNorm)``) runs that type's forward.
* *Its own parameters* are named by ``ADAPTER_PARAMS``; :func:`adapter_parameter_names` is the one place that
  lists them for a model, :func:`has_adapters` the one place that says whether a model is adapted. What else the
  engine must know it declares too (``NO_DECAY``, ``DECAY``, ``BIASES``, ``DROPOUTS``, read through
  :func:`declared`); its method entry declares its FLOPs (:class:`Cost`).
* *Merging.* ``merge()`` returns a new plain module (``nn.Linear``, ``nn.LayerNorm``, ``nn.Conv2d``, ...)
  computing the same function, which :func:`peft.merge_adapters` puts in the wrapper's place. A method whose
  extra computation no plain layer can hold says why once, in ``CANNOT_MERGE``; its ``merge()`` raises
  :class:`NotMergeableError` with that reason and its registry entry reports ``mergeable = False``.
* *Weight-space methods* fold into the wrapped layer's own tensors (:class:`FoldsIn`: ``merged_tensors()`` gives
  ``merge_in_place()`` and ``unmerge()``). For a frozen Linear, (W + ΔW) x + b' (LoRA, DoRA, RLRR, FacT-TT), they
  derive from :class:`LinearDelta` and define ``delta_weight()`` (and ``delta_bias()`` if they move the bias);
  SSF folds its scale and shift into the layer it follows. BitFit needs no unmerge: its trained bias is a copy,
  the pretrained one is never written.
* *Tokens* added to an encoder block go through :class:`BlockWrapper`: the wrapper runs the block's own forward,
  so it follows the model when the block changes (the model imports nothing from ``peft``); a branch beside a
  sub-layer (AdaptFormer) writes the block's two residual lines out with the branch added.

**A method** is one file: its wrappers, a :class:`MethodConfig` (fields with their published defaults, help and
bounds as metadata: the command-line flags, the registry's documentation, the FLOP model and the checkpoints read
it), where its wrappers go and a :class:`Method` entry; ``peft/registry.py`` lists the entries.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import fields


class NotMergeableError(TypeError):
    """The adapter adds computation that no plain layer can hold (e.g. VPT's extra tokens)."""


class AdapterStateError(ValueError):
    """A saved adapter state that does not fit the model (keys, shapes) or holds unusable values; the message
    names the keys."""


# ------------------------------------------------------------------------------------------ the adapter contract

_MODULE_STATE = frozenset(vars(nn.Module()))  # what every nn.Module has (training, _parameters, hooks, ...)


def adopt_layer(wrapper: nn.Module, layer: nn.Module) -> None:
    """Make ``wrapper`` take ``layer`` over: its own attributes (hyper-parameters), its Parameters (the same
    objects, frozen; a ``None`` bias stays ``None``) and its child modules, under the same names."""
    for key, value in vars(layer).items():
        if key not in _MODULE_STATE:
            setattr(wrapper, key, value)
    for name, p in layer._parameters.items():
        if p is not None:
            p.requires_grad_(False)
        wrapper.register_parameter(name, p)
    for name, child in layer.named_children():
        wrapper.add_module(name, child)


class Wrapper:
    """Base of every adapter module (first in the bases: ``class X(Wrapper, nn.Module)``), built as
    ``Wrapper(layer, config)`` with the method's :class:`MethodConfig`.

    ``ADAPTER_PARAMS``: the names of its own trainable parameters. ``CANNOT_MERGE``: why it cannot be merged into
    plain layers (None: it can, and the subclass implements :meth:`merge`). ``NO_DECAY``, ``DECAY``, ``BIASES``,
    ``DROPOUTS``: facts the optimizer and the training loop read (:func:`declared`)."""

    ADAPTER_PARAMS: ClassVar[tuple[str, ...]] = ()
    CANNOT_MERGE: ClassVar[str | None] = None
    WRAPS: ClassVar[type | None] = None  # the layer type it takes over (None: any module, e.g. an encoder block)
    # What the engine asks instead of knowing the method (names relative to the wrapper):
    NO_DECAY: ClassVar[tuple[str, ...]] = ()  # own parameters never weight-decayed: vectors in spirit at any rank
    DECAY: ClassVar[tuple[str, ...]] = ()  # own parameters always decayed: weight matrices even at rank 1
    BIASES: ClassVar[tuple[str, ...]] = ()  # own parameters that are biases under another name (official codes' rules)
    DROPOUTS: ClassVar[tuple[str, ...]] = ()  # own dropout sub-modules: they train while the frozen backbone is in eval

    def __init__(self, layer: nn.Module | None = None):
        nn.Module.__init__(self)  # never the wrapped type's constructor: nothing is allocated twice
        if layer is not None:
            if self.WRAPS is not None and type(layer) is not self.WRAPS:
                raise TypeError(f"{type(self).__name__} wraps a plain {self.WRAPS.__name__}, got "
                                f"{type(layer).__name__} (adapters already applied?)")
            adopt_layer(self, layer)

    @classmethod
    def mergeable(cls) -> bool:
        return cls.CANNOT_MERGE is None

    def merge(self) -> nn.Module:
        if self.CANNOT_MERGE is not None:
            raise NotMergeableError(f"{type(self).__name__} cannot be merged into plain layers: {self.CANNOT_MERGE}")
        raise NotImplementedError(f"{type(self).__name__} must implement merge()")

    def runtime_path(self, device) -> str | None:
        """Which compute path this adapter takes on ``device`` when it has a choice (a fused kernel), and why;
        None for the others. The engine logs and records it without knowing the method."""
        return None


class FoldsIn(Wrapper):
    """An adapter whose update folds into the wrapped layer's own frozen tensors (a weight-space update: LoRA,
    DoRA, RLRR, FacT-TT, SSF). The subclass defines ``merged_tensors()``, the new values of the wrapped layer's
    tensors by name (``weight``, ``bias``); built on it, the same for every such method: ``merge_in_place()`` writes
    them into the shared frozen tensors (forward then runs the plain layer) and ``unmerge()`` restores the
    pretrained values bit for bit, kept aside while merged, as Hugging Face peft does."""

    merged = False  # True while the update is folded into the wrapped layer's tensors

    def merged_tensors(self) -> dict[str, torch.Tensor]:  # every subclass defines it (the contract above)
        raise NotImplementedError(f"{type(self).__name__} must define merged_tensors()")

    @torch.no_grad()
    def merge_in_place(self) -> None:
        """Write the merged tensors into the frozen ones; forward then skips the adapter."""
        if self.merged:
            return
        new = self.merged_tensors()
        absent = next((name for name in new if getattr(self, name) is None), None)
        if absent is not None:
            raise NotMergeableError(f"{type(self).__name__} moves the {absent} of a layer that has none: use merge()")
        self._pretrained = {name: getattr(self, name).clone() for name in new}
        for name, value in new.items():
            getattr(self, name).copy_(value)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the pretrained tensors back, bit for bit."""
        if not self.merged:
            return
        for name, value in self._pretrained.items():
            getattr(self, name).copy_(value)
        del self._pretrained
        self.merged = False


class LinearDelta(FoldsIn):
    """An adapter of a frozen ``nn.Linear`` whose function is (W + ΔW) x + b + Δb.

    Subclasses define ``delta_weight()`` (ΔW, out × in), if they move the bias ``delta_bias()`` (Δb, out), and their
    unmerged computation ``adapted(x)``. Built on those, the same for every method: ``merged_weight()`` /
    ``merged_bias()`` (formed in at least float32, rounded once to W's dtype; a method may form W + ΔW another way,
    as RLRR's W ⊙ (1 + S)), ``merge()`` (a new plain ``nn.Linear``), and from :class:`FoldsIn`
    ``merge_in_place()`` / ``unmerge()``."""

    WRAPS = nn.Linear

    def delta_weight(self) -> torch.Tensor:  # every subclass defines it (the contract above)
        raise NotImplementedError(f"{type(self).__name__} must define delta_weight(), ΔW (out × in)")

    def delta_bias(self) -> torch.Tensor | None:
        return None

    def adapted(self, x: torch.Tensor) -> torch.Tensor:  # every subclass defines it (the contract above)
        raise NotImplementedError(f"{type(self).__name__} must define adapted(x), its unmerged forward")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) if self.merged else self.adapted(x)

    def _acc(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)  # float64 stays float64

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        acc = self._acc()
        return (self.weight.to(acc) + self.delta_weight().to(acc)).to(self.weight.dtype)

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor | None:
        db = self.delta_bias()
        if db is None:
            return self.bias
        acc = self._acc()
        bias = db.to(acc) if self.bias is None else self.bias.to(acc) + db.to(acc)
        return bias.to(self.weight.dtype)

    def merged_tensors(self) -> dict[str, torch.Tensor]:
        new = {"weight": self.merged_weight()}
        if self.delta_bias() is not None:
            new["bias"] = self.merged_bias()
        return new

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new plain, frozen ``nn.Linear`` computing the adapted map (this module is left unchanged)."""
        weight, bias = (self.weight, self.bias) if self.merged else (self.merged_weight(), self.merged_bias())
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device,
                        dtype=weight.dtype)
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
        return out.requires_grad_(False)


class BlockWrapper(Wrapper):
    """The one mechanism for methods that add tokens to an encoder block (VPT): the wrapper takes the block over
    (its sub-modules keep their names) and :meth:`run_block` runs *the block's own forward* on it, so tokens are
    added by changing ``x`` before the call and nothing of the block's computation is written a second time."""

    def __init__(self, block: nn.Module, config: "MethodConfig | None" = None):
        super().__init__(block)
        self._block_forward = type(block).forward

    def run_block(self, x: torch.Tensor) -> torch.Tensor:
        return self._block_forward(self, x)


# -------------------------------------------------------------------------------------------------- method configs

@dataclass(frozen=True)
class Option:
    """One option of a method as the command line sees it: flat keyword (``lora_rank``), field, type, default,
    help and choices; derived from the method's :class:`MethodConfig`."""

    key: str
    field: str
    kind: type
    default: Any
    help: str
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config (as Hugging Face peft's ``LoraConfig``): a frozen dataclass whose fields are
    :func:`peft.fields.option` s carrying the published default, the one-line help of the ``--flag`` and the
    accepted values. ``PREFIX`` names the flags (``PREFIX="lora"``: field ``rank`` is ``--lora-rank`` and keyword
    ``lora_rank``). ``check()`` (:func:`peft.fields.check`, as every options class) raises ValueError naming the
    flag for a value the method cannot use."""

    PREFIX: ClassVar[str] = ""

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        fields.check(self, ValueError, lambda name: fields.flag(f"{self.PREFIX}_{name}"))

    @classmethod
    @functools.cache
    def options(cls) -> dict[str, Option]:
        """The flat options, keyed ``PREFIX_field``, in field order (built once per class; do not modify)."""
        hints = typing.get_type_hints(cls)
        return {f"{cls.PREFIX}_{f.name}": Option(f"{cls.PREFIX}_{f.name}", f.name, hints[f.name], f.default,
                                                 fields.help_of(f), fields.choices_of(f))
                for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls, options: dict) -> "MethodConfig":
        """The config from flat keywords (``lora_rank=16``); missing or None values take the default, other
        methods' keywords are ignored."""
        return cls(**{o.field: options[k] for k, o in cls.options().items() if options.get(k) is not None})

    def to_options(self) -> dict:
        """Every field as a flat keyword: what checkpoints record and :meth:`from_options` reads back."""
        return {f"{self.PREFIX}_{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class NoOptions(MethodConfig):
    """The config of a method without options (head, mlp, full, bitfit)."""


def configure(cls: type[MethodConfig], config: MethodConfig | None, fields: dict) -> MethodConfig:
    """``apply_x(model, config=None, **fields)``: the given config, its fields replaced by ``fields``; or the
    defaults with ``fields``."""
    if config is None:
        return cls(**fields)
    if not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config, **fields) if fields else config


class Work(typing.NamedTuple):
    """Multiply-adds an adapted layer adds to the FLOP model (``peft.bench.flops``): per image in the forward and
    backward passes, and once per pass whatever the batch (a weight rebuilt from its factors), forward / backward."""

    forward: float = 0
    backward: float = 0
    forward_once: float = 0
    backward_once: float = 0


@dataclass(frozen=True)
class Cost:
    """What a method changes in the analytic FLOP model of a ViT (``peft.bench.flops``), for one config.

    ``linears`` maps a block Linear's short name (q, k, v, proj, fc1, fc2; ``qkv``: one fused layer) to its
    adapter's work, a function ``(tokens, fan_in, fan_out, input_needs_grad) -> Work``; ``branches`` maps a
    sub-layer ("attn", "mlp") to the width of a trained down/up bottleneck added after it."""

    extra_tokens: int = 0  # tokens every block processes besides CLS and patches (prompts)
    trains_input: bool = False  # something trains at block 0's input (prompts): gradients reach the stream there
    trains_everywhere: bool = False  # a trained vector after every layer: every activation needs a gradient
    trains_weights: tuple[str, ...] = ()  # layers whose own weight trains (short names; "*": every layer)
    linears: dict = dataclasses.field(default_factory=dict)
    branches: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registry entry: the method's config, where its wrappers go, and its published defaults.

    :meth:`apply` is the one skeleton every method shares: refuse an adapted model, find the ``targets(model,
    config)`` (dotted module names), replace each by its wrapper (``wrap(model, name, config)``; by default the
    wrapper in ``wrappers`` whose ``WRAPS`` is the layer's type, built as ``Wrapper(layer, config)``), freeze all
    but the adapters and the head. A method that adds nothing gives ``trains`` instead (which pretrained tensors
    train). ``cost(config)``: its :class:`Cost` in the FLOP model; ``upgrade_state(state)``: a saved state of an earlier
version under today's parameter names (saved runs keep loading). ``lr``: the default peak AdamW learning rate for
    ViT-B/16 at batch 128, with the reason in ``lr_note``. ``trains_backbone``: it updates pretrained tensors in
    place (mlp, full: it cannot share a backbone with other tasks); ``saves_everything``: its checkpoints store
    every parameter (full).
    """

    name: str
    summary: str  # what trains, in a few words
    lr: float
    lr_note: str = ""
    config: type[MethodConfig] = NoOptions
    wrappers: tuple[type, ...] = ()
    targets: Callable[[nn.Module, MethodConfig], list[str]] | None = None
    wrap: Callable[[nn.Module, str, MethodConfig], nn.Module] | None = None
    trains: Callable[[str], bool] | None = None
    cost: Callable[[MethodConfig], Cost] = lambda config: Cost()
    upgrade_state: Callable[[dict], dict] = lambda state: state  # a state saved by an earlier version, today's names
    trains_backbone: bool = False
    saves_everything: bool = False
    paper: str = ""

    @property
    def mergeable(self) -> bool:
        return all(w.mergeable() for w in self.wrappers)

    @property
    def options(self) -> dict[str, Option]:
        return self.config.options()

    def apply(self, model: nn.Module, config: MethodConfig | None = None) -> list[str]:
        """Adapt and freeze ``model`` in place; returns the names of the replaced modules (empty for a method that
        adds nothing)."""
        config = configure(self.config, config, {})
        if self.trains is not None:
            freeze_all_but(model, self.trains)
            return []
        check_fresh(model)
        names = self.targets(model, config)
        for name in names:
            replace_module(model, name, (self.wrap or self.wrap_by_type)(model, name, config))
        freeze_for_adapters(model)
        return names

    def wrap_by_type(self, model: nn.Module, name: str, config: MethodConfig) -> nn.Module:
        """``Wrapper(layer, config)`` with the wrapper made for the layer's type."""
        layer = model.get_submodule(name)
        for wrapper in self.wrappers:
            if wrapper.WRAPS is type(layer):
                return wrapper(layer, config)
        plain = " / ".join(f"nn.{w.WRAPS.__name__}" for w in self.wrappers if w.WRAPS is not None)
        raise TypeError(f"cannot apply {self.name} to {name}: it is a {type(layer).__name__}, not a plain {plain} "
                        "(adapters already applied?)")


# -------------------------------------------------------------------------------------------------- model surgery

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
        if isinstance(module, Wrapper):
            names += [f"{mod_name}.{p}" if mod_name else p for p in module.ADAPTER_PARAMS]
    return names


def has_adapters(model: nn.Module) -> bool:
    """Whether any adapter module is inside ``model`` (the one definition of "already adapted")."""
    return any(isinstance(m, Wrapper) for m in model.modules())


def check_fresh(model: nn.Module) -> None:
    """Refuse to stack a second method on a model that already carries adapters."""
    if has_adapters(model):
        present = sorted({type(m).__name__ for m in model.modules() if isinstance(m, Wrapper)})
        raise ValueError(f"the model already has adapters ({', '.join(present)}); apply one method to a fresh "
                         "model, or merge_adapters() first")


def declared(model: nn.Module, fact: str) -> set[str]:
    """Full names of the parameters (or modules) the model's wrappers list under ``fact`` ("NO_DECAY", "DECAY",
    "BIASES", "DROPOUTS"): how the optimizer and the training loop learn what only the method knows."""
    return {f"{mod_name}.{p}" if mod_name else p for mod_name, module in model.named_modules()
            if isinstance(module, Wrapper) for p in getattr(module, fact)}


def freeze_for_adapters(model: nn.Module) -> None:
    """Adapters and the head train; everything else is frozen."""
    adapters = set(adapter_parameter_names(model))
    freeze_all_but(model, lambda n: n in adapters or is_head(n))
