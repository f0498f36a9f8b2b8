"""Principal components of the patch-embedding filters, as in Figure 7 (left) of the ViT paper.

The patch embedding is a linear map of each P×P patch: D filters of length 3·P·P. Their PCA shows the basis
the model projects patches onto; the first 28 components (fewer if the filters span fewer) are drawn as
P×P RGB tiles, each min-max scaled, titled with the fraction of variance it explains. --raw adds the first
raw filters below. The computation is vit.visualize.patch_filter_pca, the figure vit.plots'.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from vit import plots, visualize

from .args import run_main
from .visual import VisualOptions, load_model, parse_tool_options, save
from ..fields import option

log = logging.getLogger("patch_filters")

EXAMPLES = """examples:
  python tools/patch_filters.py --checkpoint ~/.cache/vit-peft/ViT-B_16.npz --output img/patch_filters.png
  python tools/patch_filters.py --checkpoint runs/quickstart/pretrained.npz --raw
"""


@dataclass
class PatchFiltersOptions(VisualOptions):
    components: int = option(28, "principal components to show", min=1)
    raw: bool = option(False, "also show the first raw filters")
    sum_channels: bool = option(False, "sum each filter over its input channels first (grey tiles): for a model trained on greyscale images repeated to RGB only this sum acts on the input")
    columns: int = option(7, "tiles per row", min=1)
    output: str = option("runs/patch_filters.png", "PNG to write")
    save_npy: bool = option(False, "also save the (k, C, P, P) components as <stem>.npy")


def parse_args(argv=None) -> PatchFiltersOptions:
    return parse_tool_options(PatchFiltersOptions, argv, "patch_filters", __doc__, EXAMPLES)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    model, _, desc, _ = load_model(args.checkpoint, weights=args.weights)
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
