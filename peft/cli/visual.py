"""What the three visual tools share: which model to draw (``--checkpoint``, ``--weights``), ``--dpi``, the output.

Each tool's options are a dataclass derived from :class:`VisualOptions` (one commented field per flag, parsed by
:func:`peft.cli.args.parse_options` like every other command line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import loaders
from vit import plots

from ..finetune.rebuild import load_for_inference
from ..finetune import OptionsError
from .args import parse_options
from .. import fields
from ..fields import option


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
    """:func:`peft.finetune.rebuild.load_for_inference` with the cached ViT-B/16 as the default."""
    return load_for_inference(checkpoint or default_checkpoint(), image_size, weights, resize)


@dataclass
class VisualOptions:
    checkpoint: Optional[str] = option(None, "Google .npz, fine-tuning checkpoint .pt or run folder (default: ~/.cache/vit-peft/ViT-B_16.npz)")
    weights: Optional[str] = option(None, "base .npz for a fine-tuning checkpoint whose base weights moved")
    dpi: int = option(100, "resolution of the PNG", min=10, max=1200, range_text="in 10..1200")
    output: str = option("runs/figure.png", "PNG to write (arrays go beside it)")

    def check(self) -> None:
        """Every field against its metadata (the one check of every options class); tools add their own rules."""
        fields.check(self, OptionsError)


def parse_tool_options(cls, argv, prog: str, description: str, examples: str, positional=()):
    """A visual tool's options from ``argv`` (usage errors exit 2 naming the flag), checked."""
    opts = parse_options(argv, cls, prog=prog, description=description, epilog=examples, positional=positional)
    opts.check()
    return opts


def save(fig, args, arrays: dict | None = None, log=None) -> list:
    """Write the tool's figure to ``--output`` at ``--dpi`` (and its arrays beside it); log what was written."""
    written = plots.save_outputs(fig, args.output, dpi=args.dpi, arrays=arrays)
    if log is not None:
        log.info("wrote %s", ", ".join(map(str, written)))
    return written
