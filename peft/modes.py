"""The registry of fine-tuning methods: one entry per method, defined in the method's own file.

``MODES`` (the names, in the order of every table and help text), ``METHODS`` (name → :class:`peft.base.Method`)
and :func:`apply_mode` are all derived from the tuple below; the command lines, the benchmark and the
table-driven tests read them from here. To add a method, write its file (wrappers, ``apply``, a ``Method``
entry with its published defaults) and add the entry to ``_ENTRIES``.
"""

from __future__ import annotations

from torch import nn

from . import adapter, adaptformer, bitfit, dora, fact, lora, rlrr, selective, ssf, vpt
from .base import Method

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
DEFAULT_LR: dict[str, float] = {m.name: m.lr for m in _ENTRIES}


def get_method(mode: str) -> Method:
    try:
        return METHODS[mode]
    except KeyError:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {', '.join(MODES)}") from None


def apply_mode(model: nn.Module, mode: str, **options) -> list[str]:
    """Prepare ``model`` for fine-tuning in ``mode`` (one of :data:`MODES`), in place.

    Options are the registry's keyword names (e.g. ``lora_rank``, ``rlrr_init``; None means the default).
    An option no method knows raises TypeError; options of other methods are ignored, so one dict of options
    can serve several modes. Returns the names of modules replaced by adapters (empty for head, mlp, full).
    """
    unknown = set(options) - set(MODE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) for apply_mode: {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(MODE_OPTIONS)}")
    method = get_method(mode)
    own = {k: options[k] for k in method.options if options.get(k) is not None}
    return method.apply(model, **own)


__all__ = ["DEFAULT_LR", "METHODS", "MODES", "MODE_OPTIONS", "apply_mode", "get_method"]
