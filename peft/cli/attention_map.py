"""Where does the classifier look? Attention rollout and per-head CLS attention for a few images.

Draws the images (top row, titled with the predicted class and its probability), then heat maps over them:
attention rollout (Abnar & Zuidema 2020), the last layer's CLS→patch attention for each head, and with
--per-layer the rollout through layers 1..l. Saves the figure as PNG and the raw maps as .npy beside it:
<stem>_rollout.npy (B, g, g), <stem>_cls_heads.npy (B, H, g, g), <stem>_per_layer.npy (L, B, g, g).
The computations are in vit/visualize.py, the figure in vit/plots.py.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import torch

from loaders.datasets import DatasetError, gather_batch, load_dataset
from loaders.images import read_images, resize_array
from loaders.npz import ZERO_HEAD_MESSAGE, has_zero_head
from loaders.transforms import BatchTransform
from vit import plots, visualize
from vit.model import RESIZE_METHODS

from ..finetune import OptionsError
from ..finetune.distributed import resolve_device
from .args import run_main
from .visual import VisualOptions, load_model, parse_tool_options, save
from ..fields import option

log = logging.getLogger("attention_map")

EXAMPLES = """examples:
  python tools/attention_map.py --checkpoint ~/.cache/vit-peft/ViT-B_16.npz cat.jpg dog.jpg
  python tools/attention_map.py --checkpoint runs/quickstart/pretrained.npz \\
      --dataset fashion_mnist --split test --index 0 1 2 3 --per-layer --output img/attention_map.png
  python tools/attention_map.py --checkpoint runs/quickstart/rlrr --dataset fashion_mnist --index 7
"""


def read_labels(path) -> list[str]:
    """One class name per line (blank lines ignored)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def load_dataset_samples(name: str, indices, split: str, root=None, size: int | None = None):
    """``(uint8 images (B, H, W, C), labels (B,), class names)`` picked from a dataset by index; images of
    different sizes (an image folder) are each resized to size × size (PIL bilinear), as image files are."""
    ds = load_dataset(name, root=root, split=split)
    bad = [i for i in indices if not -len(ds.labels) <= i < len(ds.labels)]
    if bad:
        raise DatasetError(f"--index {bad} out of range for {ds.name} {split} ({len(ds.labels)} images)")
    idx = torch.tensor(indices, dtype=torch.long) % len(ds.labels)
    images, sizes = gather_batch(ds.images, idx)
    if sizes is not None or (size is not None and ds.on_disk):
        hw = sizes.tolist() if sizes is not None else [images.shape[1:3]] * len(idx)
        # torch.tensor copies: PIL's resized arrays are read-only, and from_numpy warned about it on every call
        images = torch.stack([torch.tensor(resize_array(img[:h, :w].numpy(), size)) for img, (h, w) in
                              zip(images, hw)])
    return images, ds.labels[idx], list(ds.classes)


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"



@dataclass
class AttentionMapOptions(VisualOptions):
    images: list[str] = option(help="image files (any format PIL reads)", default_factory=list)
    dataset: Optional[str] = option(None, "take images from a dataset: cifar10, cifar100, fashion_mnist, tiny_imagenet or a folder (see loaders.datasets)")
    index: list[int] = option(help="dataset sample indices", default_factory=lambda: [0])
    split: str = option("test", "dataset split", choices=("train", "test"))
    data_root: Optional[str] = option(None, "dataset folder (default: $VIT_PEFT_DATA or ~/.cache/vit-peft/data)")
    image_size: Optional[int] = option(None, "run a .npz model at this resolution (position embedding resized; a multiple of the patch size)", min=1)
    pos_embed_resize: str = option("google", "how --image-size resizes the position grid (google: scipy zoom order 1)", choices=RESIZE_METHODS)
    labels: Optional[str] = option(None, "text file with one class name per line (overrides other names)")
    head_fusion: str = option("mean", "how rollout combines the heads of a layer", choices=visualize.HEAD_FUSIONS)
    discard_ratio: float = option(0.0, "fraction of the lowest patch-to-patch attentions dropped per layer before rollout, in [0, 1); CLS row and column are always kept", min=0, below=1)
    per_layer: bool = option(False, "also show the rollout through each layer")
    method: str = option("rollout", "rollout (class-agnostic) or grad-rollout (attention weighted by its positive gradients for --target, then rolled out)", choices=visualize.METHODS)
    target: Optional[int] = option(None, "class index for --method grad-rollout (default: the predicted class)")
    output: str = option("runs/attention_map.png", "PNG to write; the .npy masks go beside it")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")

    def check(self) -> None:
        super().check()
        if not self.images and not self.dataset:
            raise OptionsError("give image files and/or --dataset NAME --index I ...")


def parse_args(argv=None) -> AttentionMapOptions:
    return parse_tool_options(AttentionMapOptions, argv, "attention_map", __doc__, EXAMPLES, positional=("images",))


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    model, classes, desc, (mean, std) = load_model(args.checkpoint, args.image_size, args.weights,
                                                   args.pos_embed_resize)
    cfg = model.config
    log.info("model %s: %d px, patch %d, %d layers, %d heads, %d classes", desc, cfg.image_size,
             cfg.patch_size, cfg.num_layers, cfg.num_heads, cfg.num_classes)

    batches, truth = [], []
    if args.images:
        batches.append(read_images(args.images, cfg.image_size))
        truth += [None] * len(args.images)
    if args.dataset:
        images, labels, ds_classes = load_dataset_samples(args.dataset, args.index, args.split, args.data_root,
                                                          cfg.image_size)
        if classes is None and len(ds_classes) == cfg.num_classes:
            classes = ds_classes  # a plain .npz carries no names; the dataset's fit if the counts agree
        batches += [images]
        truth += [ds_classes[int(y)] for y in labels]
    to_input = BatchTransform(cfg.image_size, train=False, mean=mean, std=std)  # as the model was trained
    x = torch.cat([to_input(b) for b in batches])
    if args.labels:
        classes = read_labels(args.labels)
    if classes is not None and len(classes) != cfg.num_classes:
        log.warning("%d class names for a %d-class model: showing indices", len(classes), cfg.num_classes)
        classes = None

    device = resolve_device(args.device)
    model.to(device)
    if args.target is not None and not 0 <= args.target < cfg.num_classes:
        raise DatasetError(f"--target {args.target} is not a class of this {cfg.num_classes}-class model")
    maps = visualize.attention_maps(model, x.to(device), args.head_fusion, args.discard_ratio,
                                    args.per_layer, method=args.method, target=args.target)
    if maps.prefix_share.any():  # prompt tokens (VPT): kept out of the grid, their share reported here
        log.info("last layer: CLS gives %.1f%% of its attention to the prompt tokens (mean over heads and images)",
                 100 * float(maps.prefix_share.mean()))
    prob, pred = maps.probs.max(dim=-1)
    zero_head = has_zero_head(model)
    if zero_head:
        log.warning("%s: %s; the maps show attention, the titles no prediction", desc, ZERO_HEAD_MESSAGE)
    titles = []
    for i, (p, c) in enumerate(zip(prob.tolist(), pred.tolist())):
        name = _short(classes[c]) if classes else f"class {c}"
        guess = "head all zero:\nfine-tune first" if zero_head else f"{name} {p:.2f}"
        titles.append(guess + (f"\n(true: {_short(truth[i])})" if truth[i] else ""))
        log.info("image %d: predicted %s (p=%.3f)%s", i, classes[c] if classes else c, p,
                 f", true {truth[i]}" if truth[i] else "")

    fusion = args.head_fusion + (f", discard {args.discard_ratio:g}" if args.discard_ratio else "")
    label = ("grad-rollout\n(class " + ("pred." if args.target is None else str(args.target)) + ")"
             if args.method == "grad-rollout" else f"rollout\n({fusion})")
    rows = [(label, maps.rollout.numpy())]
    rows += [(f"last layer\nhead {h + 1}", maps.cls_heads[:, h].numpy()) for h in range(cfg.num_heads)]
    if maps.per_layer is not None:
        rows += [(f"rollout\n{'layer 1' if l == 0 else f'layers 1-{l + 1}'}", m.numpy())
                 for l, m in enumerate(maps.per_layer)]
    fig = plots.plot_attention(plots.denormalize(x, mean, std), rows, titles,
                                   title=f"Where {desc} looks (top: predicted class and its probability)")

    arrays = {"rollout": maps.rollout.numpy(), "cls_heads": maps.cls_heads.numpy()}
    if maps.per_layer is not None:
        arrays["per_layer"] = maps.per_layer.numpy()
    save(fig, args, arrays, log)
    return 0


def cli(argv=None) -> int:
    return run_main(main, argv, "attention_map")


if __name__ == "__main__":
    sys.exit(cli())
