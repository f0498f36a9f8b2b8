"""Position-embedding similarity, as in Figure 7 (centre) of the ViT paper (Dosovitskiy et al., ICLR 2021).

The CLS position is dropped; for each input patch position (row i, column j) one tile shows the cosine
similarity of its position embedding to those of all positions, on a fixed colour scale [-1, 1]. A trained
ViT shows a bright spot at the patch's own place and similar rows and columns: it has learned 2-D distance.
The computation is vit.visualize.pos_embed_similarity, the figure vit.plots'.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from vit import plots, visualize

from .args import run_main
from .visual import VisualOptions, load_model, parse_tool_options, save
from ..fields import option

log = logging.getLogger("pos_embed")

EXAMPLES = """examples:
  python tools/pos_embed.py --checkpoint ~/.cache/vit-peft/ViT-B_16.npz --output img/pos_embed.png
  python tools/pos_embed.py --checkpoint runs/quickstart/pretrained.npz
"""


@dataclass
class PosEmbedOptions(VisualOptions):
    cmap: str = option("viridis", "matplotlib colour map")
    output: str = option("runs/pos_embed.png", "PNG to write")
    save_npy: bool = option(False, "also save the (g, g, g, g) similarities as <stem>.npy")


def parse_args(argv=None) -> PosEmbedOptions:
    return parse_tool_options(PosEmbedOptions, argv, "pos_embed", __doc__, EXAMPLES)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    model, _, desc, _ = load_model(args.checkpoint, weights=args.weights)
    sim = visualize.pos_embed_similarity(model.pos_embed)
    g = sim.shape[0]
    log.info("model %s: %dx%d position grid, embedding size %d", desc, g, g, model.pos_embed.shape[-1])
    fig = plots.plot_pos_embed_similarity(
        sim, title=f"Position embedding similarity ({desc}, {g}x{g} patches)", cmap=args.cmap)
    save(fig, args, {"": sim.numpy()} if args.save_npy else None, log)
    return 0


def cli(argv=None) -> int:
    return run_main(main, argv, "pos_embed")


if __name__ == "__main__":
    sys.exit(cli())
