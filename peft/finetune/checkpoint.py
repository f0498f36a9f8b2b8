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
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

import vit
from loaders import load_npz
from loaders.atomic import atomic_write
from loaders.download import file_digest

from .. import adapters, modes, state

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


# ---------------------------------------------------------------------------------------------- RNG states
# Every random stream that influences training, as tensors and plain Python values (weights_only-safe).

def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    np_state = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _to_lists(random.getstate()),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
        "generator_devices": {name: g.device.type for name, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None, reseed=None) -> list[str]:
    """Put every random stream back. A stream saved on another kind of device (a GPU run resumed on the CPU, or
    the reverse) or on more GPUs than this machine has cannot continue: with ``reseed(name) -> int`` its
    generator is re-seeded from the run's seed and step instead (reproducible from here, not bitwise the
    uninterrupted run), and the returned notes say which; without ``reseed`` that is an error naming it."""
    notes = []
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        n_saved, n_here = len(state["cuda"]), torch.cuda.device_count()
        for i, s in enumerate(state["cuda"][:n_here]):
            torch.cuda.set_rng_state(s, i)
        if n_saved != n_here:
            notes.append(f"CUDA random states of {n_saved} GPU(s) restored on {n_here}")
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    saved_devices = state.get("generator_devices", {})
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointMismatch(f"checkpoint has no state for random generator {name!r}")
        saved_on = saved_devices.get(name, g.device.type)
        try:
            if saved_on != g.device.type:
                raise RuntimeError(f"saved on {saved_on}")
            g.set_state(state["generators"][name])
        except RuntimeError as e:  # a state of another device type (its size differs): it cannot continue here
            if reseed is None:
                raise CheckpointMismatch(f"random generator {name!r} was saved on another device ({e}) and cannot "
                                         f"continue on {g.device.type}") from None
            g.manual_seed(reseed(name))
            notes.append(f"random stream {name!r} was saved on {saved_on} and is re-seeded from the run's seed "
                         f"and step on {g.device.type}")
    return notes


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


# ------------------------------------------------------------------------------------------ rebuilding models

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
    # Checkpoints from before the resize option were trained on the half-pixel bilinear grid.
    resize = base_weights.get("pos_embed_resize", "bilinear")
    model = load_npz(path, num_classes=config.num_classes, image_size=config.image_size, resize=resize)
    vit.set_gelu(model, config.gelu)  # the GELU the run trained with (older checkpoints: Google's tanh)
    return model


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
        modes.apply_mode(model, ckpt["mode"], **ckpt["mode_options"])
    load_trainable_state(model, ckpt["state_dict"], full, ckpt["path"])
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "training_state")}
    return model.to(device).eval(), meta


def config_dict(config) -> dict:
    """ViTConfig → plain dict for the checkpoint."""
    return dataclasses.asdict(config)


def load_for_inference(checkpoint, image_size: int | None = None, weights=None, resize: str = "google"):
    """Any model file the visual tools accept: ``(model, class names or None, short description)``, eval, CPU.

    ``checkpoint``: a Google-layout ``.npz`` (also merged fine-tuned models), or a fine-tuning checkpoint ``.pt``
    or run folder (base weights + adapters). ``image_size``: resize the position embedding (``.npz`` only).
    ``weights``: the base ``.npz`` of a fine-tuning checkpoint if it moved since training.
    """
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file() and path.suffix == ".npz":
        return load_npz(path, image_size=image_size, resize=resize), None, path.name
    model, meta = load_model_from_checkpoint(path, weights=weights)
    if image_size is not None and image_size != model.config.image_size:
        raise CheckpointMismatch(f"--image-size {image_size} only applies to .npz checkpoints; {path} was "
                                 f"fine-tuned at {model.config.image_size} px")
    resolved = Path(meta.get("path", path))  # a run folder resolves to its best.pt or checkpoint.pt
    return model, meta.get("classes"), f"{resolved.parent.name}/{resolved.name} ({meta.get('mode', '?')})"


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
        adapters.add_adapter(model, name, ckpt["mode"], num_classes=len(ckpt["classes"]), **ckpt["mode_options"])
        adapters.load_adapter_state_dict(model, ckpt["state_dict"], name=name)
        metas[name] = {k: v for k, v in ckpt.items() if k not in ("state_dict", "training_state")}
    return model.to(device).eval(), metas
