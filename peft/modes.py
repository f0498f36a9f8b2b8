"""The registry of fine-tuning methods: one entry per method, defined in the method's own file.

``MODES`` (the names, in the order of every table and help text), ``METHODS`` (name → :class:`peft.base.Method`)
and :func:`apply_mode` are all derived from the tuple below; the command lines, the benchmark and the
table-driven tests read them from here. To add a method, write its file (wrappers, ``apply``, a ``Method``
entry with its published defaults) and add the entry to ``_ENTRIES``.
"""

from __future__ import annotations

from torch import nn

from . import adapter, adaptformer, bitfit, dora, fact, lora, rlrr, selective, ssf, vpt
from .base import Method, MethodConfig

_ENTRIES: tuple[Method, ...] = (
    selective.HEAD,
    selective.MLP,
    selective.FULL,
    bitfit.METHOD,
    vpt.METHOD,
    vpt.SHALLOW,
    adaptformer.METHOD,
    adapter.METHOD,
    lora.METHOD,
    dora.METHOD,
    fact.METHOD,
    ssf.METHOD,
    rlrr.METHOD,
)

METHODS: dict[str, Method] = {m.name: m for m in _ENTRIES}
MODES: tuple[str, ...] = tuple(METHODS)
MODE_OPTIONS: dict[str, object] = {k: o.default for m in _ENTRIES for k, o in m.options.items()}
CONFIGS: dict[type, Method] = {m.config: m for m in _ENTRIES if m.options}


def get_method(mode: str) -> Method:
    try:
        return METHODS[mode]
    except KeyError:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}") from None


def configure_mode(mode: str, **options) -> MethodConfig:
    """The config of ``mode`` from flat keywords (``lora_rank=16``; None or missing: the default). An option no
    method knows raises TypeError; other methods' options are ignored, so one dict can serve several modes."""
    unknown = set(options) - set(MODE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) for apply_mode: {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(MODE_OPTIONS)}")
    return get_method(mode).config.from_options(options)


def apply_mode(model: nn.Module, mode: str, **options) -> list[str]:
    """Prepare ``model`` for fine-tuning in ``mode`` (one of :data:`MODES`), in place, with flat keyword options
    (see :func:`configure_mode`). Returns the names of modules replaced by adapters (empty for head, mlp, full)."""
    return get_method(mode).apply(model, configure_mode(mode, **options))


def apply_method(model: nn.Module, config: MethodConfig) -> list[str]:
    """Prepare ``model`` with the method whose config ``config`` is, e.g. ``apply_method(model, LoraConfig(rank=16))``
    (as Hugging Face peft's ``get_peft_model(model, config)``, in place)."""
    if type(config) not in CONFIGS:
        raise TypeError(f"{type(config).__name__} is not the config of a registered method")
    return CONFIGS[type(config)].apply(model, config)


__all__ = ["CONFIGS", "METHODS", "MODES", "MODE_OPTIONS", "apply_method", "apply_mode", "configure_mode",
           "get_method"]
