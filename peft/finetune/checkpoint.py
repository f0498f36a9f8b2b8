"""Fine-tuning checkpoints: small, safe to load, and enough to rebuild the fine-tuned model.

A checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` accepts: tensors, numbers, strings,
lists and dicts only (no pickled classes). For the parameter-efficient modes it holds only what was trained
(``peft.adapter_state_dict``: adapters and head, a few MB) and names the base weights by path and sha256; the
base model is rebuilt from the ``.npz`` and checked against that digest. Training from scratch (``--weights
none``) and full fine-tuning store every parameter instead.

Keys: ``format``, ``version``, ``model_config`` (``ViTConfig`` fields), ``mode``, ``mode_options``,
``base_weights`` ({"name", "path", "sha256"} or None), ``state_dict_kind`` ("adapters" | "full"),
``state_dict``, ``classes``, ``options`` (the training options), ``epoch``, ``step``, ``best_val_accuracy``,
``history`` (per-epoch metrics), and, in the latest-state file only, ``training_state`` (optimizer, scheduler,
GradScaler, RNG states) used by ``--resume``.

This module reads and writes the files; ``peft.finetune.rng`` captures and restores the random streams, and
``peft.finetune.rebuild`` turns a checkpoint back into a model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from loaders.atomic import atomic_write

from .. import state

log = logging.getLogger(__name__)

FORMAT = "vit-peft-finetune"
VERSION = 1
LATEST = "checkpoint.pt"  # latest state, rewritten every epoch; --resume reads it
BEST = "best.pt"  # model with the best validation accuracy so far (no optimizer state)


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the weights, model or options it is being combined with."""


def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, then os.replace: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(obj, f)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file (or ``best.pt``/``checkpoint.pt`` inside a run folder) with weights_only=True."""
    path = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, corrupt pickle stream, a file of another kind: name the file
        raise CheckpointMismatch(f"{path} is not a readable checkpoint (truncated or corrupt? "
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:160]})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointMismatch(f"{path} is not a checkpoint written by tools/finetune.py (format {FORMAT!r})")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointMismatch(f"{path} has format version {ckpt['version']}; this code reads up to {VERSION}")
    ckpt["path"] = str(path)
    return ckpt


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A file as is; a run folder gives its best.pt, else its checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LATEST):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no {BEST} or {LATEST} in folder {path}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


# ------------------------------------------------------------------------------------------ what a checkpoint holds

def config_dict(config) -> dict:
    """ViTConfig → plain dict for the checkpoint."""
    return dataclasses.asdict(config)


def trainable_state(model, full: bool) -> dict:
    """What a checkpoint stores: every tensor (full fine-tuning, from scratch) or the trained ones only."""
    if full:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state.adapter_state_dict(model)


def load_trainable_state(model, saved: dict, full: bool, source: str) -> None:
    """The inverse of :func:`trainable_state`; a state that does not fit is one error naming ``source``."""
    if full:
        missing, unexpected = model.load_state_dict(saved, strict=False)
        if missing or unexpected:
            raise CheckpointMismatch(f"{source}: missing keys {missing}, unexpected keys {unexpected}")
    else:
        state.load_adapter_state_dict(model, saved)
