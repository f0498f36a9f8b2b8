"""The model a run starts from: Google's weights (a path or a known name, fetched once) or a fresh preset."""

from __future__ import annotations

from pathlib import Path

import torch

import vit
from loaders import fetch_weights, load_npz
from loaders.download import file_digest
from loaders.weights import KNOWN_WEIGHTS

from .options import FinetuneOptions, OptionsError


def resolve_weights(spec: str) -> tuple[Path, str]:
    """``--weights`` → (local .npz path, name): an existing file as is, else a known name fetched and cached."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path, path.name
    if spec in KNOWN_WEIGHTS:
        return Path(fetch_weights(spec)), spec
    raise OptionsError(f"--weights {spec!r} is neither an existing .npz file nor a known name "
                       f"({', '.join(KNOWN_WEIGHTS)}), nor 'none'")


@torch.no_grad()
def init_head(model, kind: str) -> None:
    """How the classifier starts: "zero" leaves the loader's head (a new head is zero, as Google's code starts one);
    "trunc-normal" is timm's ``_init_vit_weights`` / ``reset_classifier`` in NOAH's model (weight truncated-normal
    std 0.02, bias 0: ZhangYuanhan-AI/NOAH@e9c55f3 ``model/supernet_vision_transformer_timm.py:553-555``); "linear"
    is ``nn.Linear``'s own init, which timm 0.4.12's ``reset_classifier`` leaves on FacT's head (kaiming-uniform
    weight, uniform bias)."""
    if kind == "trunc-normal":
        torch.nn.init.trunc_normal_(model.head.weight, std=0.02)
        torch.nn.init.zeros_(model.head.bias)
    elif kind == "linear":
        model.head.reset_parameters()


def build_model(opts: FinetuneOptions, num_classes: int, weights: tuple[Path, str] | None = None):
    """The model before adapters and a record of its base weights (None when training from scratch).

    ``weights``: an already resolved (path, name) for ``opts.weights``.
    """
    if opts.from_scratch:
        overrides = {"num_classes": num_classes}
        if opts.image_size:
            overrides["image_size"] = opts.image_size
        if opts.dropout is not None:
            overrides.update(dropout_rate=opts.dropout)
        overrides.update(drop_path_rate=opts.drop_path, drop_path_mode=opts.drop_path_mode, gelu=opts.gelu)
        model = vit.VisionTransformer(vit.get_config(opts.model, **overrides))
        return model, None
    path, name = weights or resolve_weights(opts.weights)
    model = load_npz(path, num_classes=num_classes, image_size=opts.image_size, resize=opts.pos_embed_resize)
    init_head(model, opts.head_init)
    if opts.dropout is not None:
        vit.set_dropout(model, opts.dropout)
    if opts.drop_path:
        vit.set_drop_path(model, opts.drop_path, opts.drop_path_mode)
    vit.set_gelu(model, opts.gelu)
    base = {"name": name, "path": str(path.resolve()), "sha256": file_digest(path, "sha256"),
            "pos_embed_resize": opts.pos_embed_resize}
    return model, base
