"""What the three visual tools share: which model to draw (``--checkpoint``, ``--weights``) and ``--dpi``."""

from __future__ import annotations

import argparse
from pathlib import Path

import loaders
from vit import plots

from ..finetune.checkpoint import load_for_inference
from .args import Parser


def default_checkpoint() -> Path:
    """The cached ViT-B/16 weights, or a FileNotFoundError saying how to get them."""
    path = loaders.default_cache_dir() / "ViT-B_16.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"no --checkpoint given and the default ViT-B/16 weights are not at {path}. Download them (about "
            "413 MB) with: python -c \"import loaders; loaders.fetch_weights('ViT-B_16')\"; or put the file "
            "there by hand (VIT_PEFT_CACHE picks another folder), or pass --checkpoint PATH (a Google .npz or "
            "a fine-tuning checkpoint .pt / run folder)")
    return path


def load_model(checkpoint=None, image_size=None, weights=None, resize="google"):
    """:func:`peft.finetune.checkpoint.load_for_inference` with the cached ViT-B/16 as the default."""
    return load_for_inference(checkpoint or default_checkpoint(), image_size, weights, resize)


def tool_parser(prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    """The flags every visual tool shares: which model (``--checkpoint``, ``--weights``) and ``--dpi``."""
    p = Parser(prog=prog, description=description, epilog=examples)
    p.add_argument("--checkpoint", help="Google .npz, fine-tuning checkpoint .pt or run folder "
                                        "(default: ~/.cache/vit-peft/ViT-B_16.npz)")
    p.add_argument("--weights", help="base .npz for a fine-tuning checkpoint whose base weights moved")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default: 100)")
    return p


def check_common(p: argparse.ArgumentParser, args) -> None:
    if not 10 <= args.dpi <= 1200:
        p.error(f"--dpi must be in 10..1200, got {args.dpi}")


def save(fig, args, arrays: dict | None = None, log=None) -> list:
    """Write the tool's figure to ``--output`` at ``--dpi`` (and its arrays beside it); log what was written."""
    written = plots.save_outputs(fig, args.output, dpi=args.dpi, arrays=arrays)
    if log is not None:
        log.info("wrote %s", ", ".join(map(str, written)))
    return written
