"""The registry of fine-tuning methods: one entry per method, defined in the method's own file.

``METHOD_NAMES`` (the names, in the order of every table and help text), ``METHODS`` (name → :class:`peft.base.Method`)
and :func:`apply_method` are all derived from the tuple below; the command lines, the benchmark and the
table-driven tests read them from here. To add a method, write its file (wrappers, ``apply``, a ``Method``
entry with its published defaults) and add the entry to ``_ENTRIES``.
"""

from __future__ import annotations

from torch import nn

from . import adaptformer, bitfit, dora, fact, houlsby, lora, rlrr, selective, ssf, vpt
from .base import Method, MethodConfig

_ENTRIES: tuple[Method, ...] = (
    selective.HEAD,
    selective.MLP,
    selective.FULL,
    bitfit.METHOD,
    vpt.METHOD,
    vpt.SHALLOW,
    adaptformer.METHOD,
    houlsby.METHOD,
    lora.METHOD,
    dora.METHOD,
    fact.METHOD,
    ssf.METHOD,
    rlrr.METHOD,
)

METHODS: dict[str, Method] = {m.name: m for m in _ENTRIES}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
METHOD_OPTIONS: dict[str, object] = {k: o.default for m in _ENTRIES for k, o in m.options.items()}
CONFIGS: dict[type, Method] = {m.config: m for m in _ENTRIES if m.options}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown fine-tuning method {name!r}; choose one of {', '.join(METHOD_NAMES)}") from None


def configure_method(name: str, **options) -> MethodConfig:
    """The config of method ``name`` from flat keywords (``lora_rank=16``; None or missing: the default). An option
    no method knows raises TypeError; other methods' options are ignored, so one dict can serve several methods."""
    unknown = set(options) - set(METHOD_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) for apply_method: {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(METHOD_OPTIONS)}")
    return get_method(name).config.from_options(options)


def apply_method(model: nn.Module, method: str | MethodConfig, **options) -> list[str]:
    """Prepare ``model`` for fine-tuning, in place: ``apply_method(model, "lora", lora_rank=16)`` (a registered name,
    :data:`METHOD_NAMES`, with flat keyword options, see :func:`configure_method`) or ``apply_method(model,
    LoraConfig(rank=16))`` (a method's config, as Hugging Face peft's ``get_peft_model(model, config)``). Returns
    the names of the modules replaced by wrappers (empty for head, mlp, full)."""
    if isinstance(method, str):
        return get_method(method).apply(model, configure_method(method, **options))
    if type(method) not in CONFIGS:
        raise TypeError(f"{type(method).__name__} is not the config of a registered method")
    if options:
        raise TypeError("apply_method(model, config) takes no other options: set them in the config")
    return CONFIGS[type(method)].apply(model, method)


__all__ = ["CONFIGS", "METHODS", "METHOD_NAMES", "METHOD_OPTIONS", "apply_method", "configure_method", "get_method"]
