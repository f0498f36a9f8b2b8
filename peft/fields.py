"""Options as dataclass fields: each field carries its default, its one-line help and its bounds, read by the
command-line parser, the one :func:`check` every options class runs, and the documentation tables.

    rank: int = option(8, "LoRA rank r", min=1)
    variant: str = option("loralib", "loralib | noah", choices=VARIANTS)
    crop_pct: float = option(0.875, "evaluation crop fraction", above=0, max=1)

As Hugging Face peft's ``LoraConfig`` and transformers' ``HfArgumentParser`` keep help in
``field(metadata={"help": ...})``. Bounds: ``min`` / ``max`` inclusive, ``above`` / ``below`` exclusive; ``None``
values (an unset optional) are not checked; every float must be finite.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None, min=None, max=None,
           above=None, below=None, range_text: str | None = None,
           default_factory: Callable | Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help and bounds as metadata (only the given keys are stored). ``range_text``:
    the range in words where the numbers would not read well ("in [0, 2**63)")."""
    bounds = {"choices": choices, "min": min, "max": max, "above": above, "below": below, "range_text": range_text}
    metadata = {"help": help, **{k: v for k, v in bounds.items() if v is not None}}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def flag(name: str) -> str:
    """``crop_pct`` → ``--crop-pct``."""
    return "--" + name.replace("_", "-")


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def choices_of(f: dataclasses.Field) -> tuple | None:
    return f.metadata.get("choices")


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING \
        else f.default


def bounds_text(f: dataclasses.Field) -> str:
    """The field's range in words ("at least 1", "positive", "in [0, 1)"), or ""."""
    m = f.metadata
    if "range_text" in m:
        return m["range_text"]
    low = ("[", m["min"]) if "min" in m else ("(", m["above"]) if "above" in m else None
    high = (m["max"], "]") if "max" in m else (m["below"], ")") if "below" in m else None
    if low is None and high is None:
        return ""
    if high is None:
        return f"at least {low[1]}" if low[0] == "[" else ("positive" if low[1] == 0 else f"above {low[1]}")
    if low is None:
        return f"at most {high[0]}" if high[1] == "]" else f"below {high[0]}"
    return f"in {low[0]}{low[1]}, {high[0]}{high[1]}"


def _within(f: dataclasses.Field, value) -> bool:
    m = f.metadata
    return not (("min" in m and value < m["min"]) or ("above" in m and value <= m["above"])
                or ("max" in m and value > m["max"]) or ("below" in m and value >= m["below"]))


def check(obj, error: type[Exception] = ValueError, name: Callable[[str], str] = flag) -> None:
    """Check every field of the dataclass instance ``obj`` against its metadata; the first bad value raises
    ``error`` with one line naming the flag (``name(field)``) and what it accepts."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{name(f.name)} must be a finite number, got {value}")
        choices = choices_of(f)
        for item in value if isinstance(value, (list, tuple)) else [value]:  # a list: each of its values
            if choices is not None and item not in choices:
                raise error(f"{name(f.name)} {item!r}: choose one of {', '.join(map(str, choices))}")
            if isinstance(item, (int, float)) and not isinstance(item, bool) and not _within(f, item):
                raise error(f"{name(f.name)} must be {bounds_text(f)}, got {item}")


def options_table(cls, name: Callable[[str], str] = flag, skip: tuple[str, ...] = ()) -> str:
    """A markdown table of the options of the dataclass ``cls`` (flag, default, what it does, accepted values),
    from the same metadata: what the guides' option tables are generated from and tested against."""
    rows = ["| flag | default | what it does |", "|------|---------|--------------|"]
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        accepted = bounds_text(f) or (" \\| ".join(map(str, choices_of(f))) if choices_of(f) else "")
        text = help_of(f).replace("|", "\\|") + (f" ({accepted})" if accepted and choices_of(f) is None else "")
        rows.append(f"| `{name(f.name)}` | `{default_of(f)}` | {text} |")
    return "\n".join(rows) + "\n"


__all__ = ["bounds_text", "check", "choices_of", "default_of", "flag", "help_of", "option", "options_table"]
