"""Turning checkpoints back into models: the base weights (sha256-checked) plus the trained adapters and head, one
model from one file (:func:`load_model_from_checkpoint`), any model file the visual tools accept
(:func:`load_for_inference`), or several tasks as named adapters on one backbone (:func:`load_tasks`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

import vit
from loaders import load_npz
from loaders.download import file_digest

from .. import registry, tasks
from .checkpoint import CheckpointMismatch, load_checkpoint, load_trainable_state
from .options import NORMALISERS


def saved_state(ckpt: dict) -> dict:
    """The checkpoint's trained tensors under today's parameter names (a method renamed since says how:
    ``Method.upgrade_state``)."""
    return registry.get_method(ckpt["mode"]).upgrade_state(ckpt["state_dict"])


def build_base_model(model_config: dict, base_weights: dict | None, weights: str | os.PathLike | None = None,
                     verify: bool = True):
    """The model before adapters: the recorded .npz (or ``weights`` instead), or a fresh one from the config."""
    config = vit.ViTConfig(**model_config)
    if base_weights is None:  # trained from scratch: the checkpoint holds every parameter
        return vit.VisionTransformer(config)
    path = Path(weights) if weights is not None else Path(base_weights["path"])
    if not path.is_file():
        raise FileNotFoundError(
            f"base weights {path} (recorded name {base_weights.get('name')!r}) not found; pass weights=... "
            "(--weights PATH) pointing to the same .npz file")
    if verify and base_weights.get("sha256"):
        digest = file_digest(path, "sha256")
        if digest != base_weights["sha256"]:
            raise CheckpointMismatch(
                f"base weights {path} have sha256 {digest}, but the checkpoint was trained on "
                f"{base_weights.get('name')!r} with sha256 {base_weights['sha256']}")
    model = load_npz(path, num_classes=config.num_classes, image_size=config.image_size,
                     resize=base_weights["pos_embed_resize"])
    vit.set_gelu(model, config.gelu)  # the GELU the run trained with
    return model


def load_model_from_checkpoint(path: str | os.PathLike, weights: str | os.PathLike | None = None,
                               device: str | torch.device = "cpu"):
    """Rebuild a fine-tuned model (base weights + adapters, not merged) from a checkpoint; eval mode, fp32.

    ``path``: a checkpoint file or a run folder (its best.pt). ``weights``: the base .npz, if it has moved
    since training (its sha256 must match the recorded one). Returns ``(model, meta)`` where meta is the
    checkpoint dict without state tensors (config, mode, classes, options, history, ...).
    """
    ckpt = load_checkpoint(path)
    full = ckpt["state_dict_kind"] == "full"
    if full:  # from scratch or full fine-tuning: every parameter is stored
        model = vit.VisionTransformer(vit.ViTConfig(**ckpt["model_config"]))
    else:  # base .npz (sha256-checked) + the trained adapters and head
        model = build_base_model(ckpt["model_config"], ckpt["base_weights"], weights)
        registry.apply_method(model, ckpt["mode"], **ckpt["mode_options"])
    load_trainable_state(model, saved_state(ckpt), full, ckpt["path"])
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "training_state")}
    return model.to(device).eval(), meta


class Inference(NamedTuple):
    """What the visual tools draw: the model (eval, CPU), its class names (None for a plain .npz), a short
    description, and the (mean, std) its inputs were normalised with when it was trained (Google's 0.5, 0.5
    for a .npz)."""

    model: torch.nn.Module
    classes: list | None
    description: str
    normalisation: tuple


def load_for_inference(checkpoint, image_size: int | None = None, weights=None, resize: str = "google"):
    """Any model file the visual tools accept, as an :class:`Inference` (model in eval mode on the CPU).

    ``checkpoint``: a Google-layout ``.npz`` (also merged fine-tuned models), or a fine-tuning checkpoint ``.pt``
    or run folder (base weights + adapters). ``image_size``: resize the position embedding (``.npz`` only).
    ``weights``: the base ``.npz`` of a fine-tuning checkpoint if it moved since training.
    """
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file() and path.suffix == ".npz":
        return Inference(load_npz(path, image_size=image_size, resize=resize), None, path.name, NORMALISERS["half"])
    model, meta = load_model_from_checkpoint(path, weights=weights)
    if image_size is not None and image_size != model.config.image_size:
        raise CheckpointMismatch(f"--image-size {image_size} only applies to .npz checkpoints; {path} was "
                                 f"fine-tuned at {model.config.image_size} px")
    resolved = Path(meta.get("path", path))  # a run folder resolves to its best.pt or checkpoint.pt
    normalise = meta.get("options", {}).get("normalise", "half")
    return Inference(model, meta.get("classes"), f"{resolved.parent.name}/{resolved.name} ({meta.get('mode', '?')})",
                     NORMALISERS[normalise])


def load_tasks(paths, weights=None, device: str | torch.device = "cpu"):
    """Several PEFT checkpoints trained from the same base weights, as named adapters on *one* backbone.

    Returns ``(model, {name: meta})``; ``peft.set_adapter(model, name)`` switches between them (names are the
    run folders', made unique). Every checkpoint must hold adapters (not a full state) over base weights with
    the same sha256 and architecture; otherwise a CheckpointMismatch says which differs.
    """
    metas, model, first = {}, None, None
    for path in paths:
        ckpt = load_checkpoint(path)
        if ckpt["state_dict_kind"] != "adapters":
            raise CheckpointMismatch(f"{ckpt['path']} stores every parameter (mode {ckpt['mode']}); only adapter "
                                     "checkpoints can share one backbone")
        config = {k: v for k, v in ckpt["model_config"].items() if k != "num_classes"}
        if first is None:
            first = (ckpt["base_weights"].get("sha256"), config, ckpt["path"])
            model = build_base_model(ckpt["model_config"], ckpt["base_weights"], weights)
        elif (ckpt["base_weights"].get("sha256"), config) != first[:2]:
            raise CheckpointMismatch(f"{ckpt['path']} was trained from other base weights or another architecture "
                                     f"than {first[2]}; one backbone can only carry adapters of the same base")
        name = Path(ckpt["path"]).parent.name or "task"
        name = name if name not in metas else f"{name}-{len(metas)}"
        tasks.add_adapter(model, name, ckpt["mode"], num_classes=len(ckpt["classes"]), **ckpt["mode_options"])
        tasks.load_adapter_state_dict(model, saved_state(ckpt), name=name)
        metas[name] = {k: v for k, v in ckpt.items() if k not in ("state_dict", "training_state")}
    return model.to(device).eval(), metas
