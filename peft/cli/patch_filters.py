"""Principal components of the patch-embedding filters, as in Figure 7 (left) of the ViT paper.

The patch embedding is a linear map of each P×P patch: D filters of length 3·P·P. Their PCA shows the basis
the model projects patches onto; the first 28 components (fewer if the filters span fewer) are drawn as
P×P RGB tiles, each min-max scaled, titled with the fraction of variance it explains. --raw adds the first
raw filters below. The computation is vit.visualize.patch_filter_pca, the figure vit.plots'.
"""

from __future__ import annotations

import logging
import sys

from vit import plots, visualize

from .args import run_main
from .visual import check_common, load_model, save, tool_parser

log = logging.getLogger("patch_filters")

EXAMPLES = """examples:
  python tools/patch_filters.py --checkpoint ~/.cache/vit-peft/ViT-B_16.npz --output img/patch_filters.png
  python tools/patch_filters.py --checkpoint runs/quickstart/pretrained.npz --raw
"""


def parse_args(argv=None):
    p = tool_parser("patch_filters", __doc__, EXAMPLES)
    p.add_argument("--components", type=int, default=28, help="principal components to show (default: 28)")
    p.add_argument("--raw", action="store_true", help="also show the first raw filters")
    p.add_argument("--sum-channels", action="store_true",
                   help="sum each filter over its input channels first (grey tiles): for a model trained on "
                        "greyscale images repeated to RGB only this sum acts on the input; the colour part "
                        "of the filters never received a gradient")
    p.add_argument("--columns", type=int, default=7, help="tiles per row (default: 7)")
    p.add_argument("--output", default="runs/patch_filters.png", help="PNG to write (default: "
                                                                       "runs/patch_filters.png)")
    p.add_argument("--save-npy", action="store_true", help="also save the (k, C, P, P) components as <stem>.npy")
    args = p.parse_args(argv)
    if args.components < 1 or args.columns < 1:
        p.error("--components and --columns must be at least 1")
    check_common(p, args)
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    model, _, desc = load_model(args.checkpoint, weights=args.weights)
    weight = model.patch_embed.weight.detach()  # (D, C, P, P)
    if args.sum_channels:
        weight = weight.sum(dim=1, keepdim=True)  # (D, 1, P, P): what a grey input (R = G = B) sees
    comps, explained = visualize.patch_filter_pca(weight, k=args.components)
    d, c, p, _ = weight.shape
    log.info("model %s: %d filters of %dx%dx%d; first %d components explain %.1f%% of their variance",
             desc, d, c, p, p, len(comps), 100 * float(explained.sum()))
    raw = weight[:args.components] if args.raw else None
    fig = plots.plot_patch_filters(
        comps, explained, raw=raw, columns=args.columns,
        title=f"Patch-embedding filters of {desc}: first {len(comps)} principal components\n"
              f"({d} filters of {c}x{p}x{p}{', summed over RGB' if args.sum_channels else ''}; "
              "% = share of variance)")
    save(fig, args, {"": comps.numpy()} if args.save_npy else None, log)
    return 0


def cli(argv=None) -> int:
    return run_main(main, argv, "patch_filters")


if __name__ == "__main__":
    sys.exit(cli())
