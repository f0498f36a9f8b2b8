"""Hyper-parameters chosen on validation, then one test: the protocol the papers describe, as one command.

``tools/vtab.py --sweep lr=1e-3,3e-3,1e-2 [--sweep weight_decay=0,1e-4]`` runs every point of the grid (the
product of the lists) per task and method on the tuning split (VTAB-1k: train800 → val200; FGVC: train → val),
picks the point with the highest validation accuracy (mean over the seeds), and then runs the final protocol
(train800val200 / trainval → test, once) with the chosen values. Ties go to the point listed first in the grid
(the grid is enumerated in the order the values were given, the first ``--sweep`` varying slowest). Every point is
an ordinary run folder (``<task>/<mode>/sweep/<point>/seed-<s>``): a finished one is skipped on restart, an
interrupted one resumes from its checkpoint. Every point is also a cell of the suite that workers share
(``peft.finetune.workers``); a task's final run starts once its grid is complete, on whichever worker gets there
first, and all of them choose the same point from the grid's ``metrics.json`` files.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing

from ..registry import METHOD_OPTIONS, get_method
from .options import FinetuneOptions, OptionsError

TIE_RULE = "highest mean validation accuracy over the seeds; ties go to the grid point listed first"
_SCALARS = (int, float, str)


def _field_types() -> dict:
    hints = typing.get_type_hints(FinetuneOptions)
    out = {}
    for f in dataclasses.fields(FinetuneOptions):
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind in _SCALARS:
            out[f.name] = kind
    return out


NOT_SWEPT = ("mode", "data", "data_root", "protocol", "recipe", "output_dir", "weights", "device", "seed")


def parse_grid(specs: list[str]) -> list[tuple[str, list]]:
    """``["lr=1e-3,3e-3", "weight_decay=0,1e-4"]`` → [("lr", [0.001, 0.003]), ("weight_decay", [0.0, 0.0001])].
    Keys are FinetuneOptions fields (``lr``, ``weight_decay``, ``drop_path``, ...) or method options
    (``lora_rank``, ``vpt_tokens``, ...); values are parsed with the field's type."""
    types = _field_types()
    grid = []
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not eq or not values.strip():
            raise OptionsError(f"--sweep {spec!r}: expected NAME=V1,V2,..., e.g. lr=1e-3,3e-3,1e-2")
        kind = types.get(key) or (type(METHOD_OPTIONS[key]) if key in METHOD_OPTIONS else None)
        if kind is None or key in NOT_SWEPT:
            raise OptionsError(f"--sweep {spec!r}: {key!r} is not an option that can be swept (e.g. lr, weight_decay, "
                               f"drop_path, epochs, lora_rank)")
        if key in (k for k, _ in grid):
            raise OptionsError(f"--sweep {key} is given twice; list all its values in one --sweep {key}=...")
        try:
            parsed = [kind(v.strip()) if kind is not bool else v.strip().lower() in ("1", "true", "yes")
                      for v in values.split(",") if v.strip()]
        except ValueError:
            raise OptionsError(f"--sweep {spec!r}: every value of {key} must be a {kind.__name__}") from None
        grid.append((key, list(dict.fromkeys(parsed))))
    return grid


def grid_points(grid: list[tuple[str, list]]) -> list[dict]:
    """Every combination, the first key varying slowest (the order that breaks ties)."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in grid))]


def point_name(point: dict) -> str:
    """A folder name for a grid point: ``lr=0.001,weight_decay=0.0001``."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def choose(scores: list[dict]) -> dict:
    """The winning entry of ``scores`` ([{"point": {...}, "val_accuracy": a}, ...] in grid order)."""
    best = scores[0]
    for entry in scores[1:]:
        if entry["val_accuracy"] > best["val_accuracy"]:  # strictly better: the earlier point wins ties
            best = entry
    return best


def apply_point(kw: dict, point: dict) -> dict:
    """FinetuneOptions keyword arguments with the point's values (method options into ``method_options``)."""
    kw = dict(kw)
    methods = dict(kw.get("method_options", {}))
    own = get_method(kw["mode"]).options
    for key, value in point.items():
        if key in METHOD_OPTIONS and key not in _field_types():
            if key not in own:
                raise OptionsError(f"--sweep {key}: not an option of --mode {kw['mode']} (its options: "
                                   f"{', '.join(own) or 'none'})")
            methods[key] = value
        else:
            kw[key] = value
    kw["method_options"] = methods
    return kw
