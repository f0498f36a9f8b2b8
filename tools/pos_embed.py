"""Position-embedding similarity, as in Figure 7 (centre) of the ViT paper (Dosovitskiy et al., ICLR 2021).

The CLS position is dropped; for each input patch position (row i, column j) one tile shows the cosine
similarity of its position embedding to those of all positions, on a fixed colour scale [-1, 1]. A trained
ViT shows a bright spot at the patch's own place and similar rows and columns: it has learned 2-D distance.
The computation is vit.visualize.pos_embed_similarity; this is a thin command-line shell.
"""

import os
import sys

# Run from a checkout without installing: put the repository root first on the import path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import logging  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")


from attention_map import load_model, tool_parser  # noqa: E402  (tools/ is on sys.path when run as a script)
from vit import visualize  # noqa: E402

log = logging.getLogger("pos_embed")

EXAMPLES = """examples:
  python tools/pos_embed.py --checkpoint ~/.cache/vit-peft/ViT-B_16.npz --output img/pos_embed.png
  python tools/pos_embed.py --checkpoint runs/quickstart/pretrained.npz
"""


def parse_args(argv=None):
    p = tool_parser(__doc__, EXAMPLES)
    p.add_argument("--cmap", default="viridis", help="matplotlib colour map (default: viridis)")
    p.add_argument("--output", default="img/pos_embed.png", help="PNG to write (default: img/pos_embed.png)")
    p.add_argument("--save-npy", action="store_true", help="also save the (g, g, g, g) similarities as <stem>.npy")
    return p.parse_args(argv)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    model, _, desc = load_model(args.checkpoint, weights=args.weights)
    sim = visualize.pos_embed_similarity(model.pos_embed)
    g = sim.shape[0]
    log.info("model %s: %dx%d position grid, embedding size %d", desc, g, g, model.pos_embed.shape[-1])
    fig = visualize.plot_pos_embed_similarity(
        sim, title=f"Position embedding similarity ({desc}, {g}x{g} patches)", cmap=args.cmap)
    written = visualize.save_outputs(fig, args.output, dpi=args.dpi,
                                     arrays={"": sim.numpy()} if args.save_npy else None)
    log.info("wrote %s", ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
