"""Where does the classifier look? Attention rollout and per-head CLS attention for a few images.

Draws the images (top row, titled with the predicted class and its probability), then heat maps over them:
attention rollout (Abnar & Zuidema 2020), the last layer's CLS→patch attention for each head, and with
--per-layer the rollout through layers 1..l. Saves the figure as PNG and the raw maps as .npy beside it:
<stem>_rollout.npy (B, g, g), <stem>_cls_heads.npy (B, H, g, g), <stem>_per_layer.npy (L, B, g, g).
The computations are in vit/visualize.py; this is a thin command-line shell.
"""

import os
import sys

# Run from a checkout without installing: put the repository root first on the import path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import loaders  # noqa: E402
import vit  # noqa: E402
from vit import visualize  # noqa: E402

log = logging.getLogger("attention_map")

EXAMPLES = """examples:
  python tools/attention_map.py --checkpoint ~/.cache/vit-peft/ViT-B_16.npz cat.jpg dog.jpg
  python tools/attention_map.py --checkpoint runs/quickstart/pretrained.npz \\
      --dataset fashion_mnist --split test --index 0 1 2 3 --per-layer --output img/attention_map.png
  python tools/attention_map.py --checkpoint runs/quickstart/rlrr --dataset fashion_mnist --index 7
"""


# ── model loading and common flags (shared by tools/pos_embed.py and tools/patch_filters.py) ──────────

def default_checkpoint() -> Path:
    """The cached ViT-B/16 weights, or a clear error saying how to get them."""
    path = loaders.default_cache_dir() / "ViT-B_16.npz"
    if not path.is_file():
        raise SystemExit(
            f"error: no --checkpoint given and the default ViT-B/16 weights are not at {path}.\n"
            "Download them (about 330 MB) with\n"
            "  python -c \"import loaders; loaders.fetch_weights('ViT-B_16')\"\n"
            "or put the file there by hand (set VIT_PEFT_CACHE to use another folder), or pass "
            "--checkpoint PATH (a Google .npz or a fine-tuning checkpoint .pt / run folder)."
        )
    return path


def load_model(checkpoint=None, image_size=None, weights=None):
    """Load a model for the visual tools: ``(model, class_names or None, description)``, eval mode, CPU.

    ``checkpoint``: a Google-layout ``.npz`` (also merged fine-tuned models), a fine-tuning checkpoint
    ``.pt`` or a run folder (adapters applied via peft.checkpoint), or None for the cached ViT-B/16.
    ``image_size``: resize the position embedding (``.npz`` only). ``weights``: the base ``.npz`` of a
    fine-tuning checkpoint if it moved since training.
    """
    path = Path(checkpoint).expanduser() if checkpoint else default_checkpoint()
    if not path.exists():
        raise SystemExit(f"error: --checkpoint {path} does not exist")
    if path.is_file() and path.suffix == ".npz":
        return loaders.load_npz(path, image_size=image_size), None, path.name
    vit.require_project_peft()
    from peft.checkpoint import load_model_from_checkpoint

    model, meta = load_model_from_checkpoint(path, weights=weights)
    if image_size is not None and image_size != model.config.image_size:
        raise SystemExit(f"error: --image-size {image_size} only applies to .npz checkpoints; {path} was "
                         f"fine-tuned at {model.config.image_size} px")
    resolved = Path(meta.get("path", path))  # a run folder resolves to its best.pt or checkpoint.pt
    desc = f"{resolved.parent.name}/{resolved.name} ({meta.get('mode', '?')})"
    return model, meta.get("classes"), desc


def read_labels(path) -> list[str]:
    """One class name per line (blank lines ignored)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


# ── inputs ─────────────────────────────────────────────────────────────────────────────────────────────────

def to_model_input(images: torch.Tensor, image_size: int, channels: int = 3) -> torch.Tensor:
    """uint8 (B, H, W, C) → float (B, channels, S, S) resized and normalised with mean = std = 0.5."""
    x = images.permute(0, 3, 1, 2).float() / 255
    if x.shape[1] != channels:
        x = x.mean(dim=1, keepdim=True) if channels == 1 else x[:, :1].expand(-1, channels, -1, -1)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) - 0.5) / 0.5


def load_image_files(paths, image_size: int) -> torch.Tensor:
    """Image files read with PIL, RGB, resized to S×S: uint8 (B, S, S, 3)."""
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
                out.append(torch.from_numpy(np.asarray(im).copy()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read image {p}: {e}") from None
    return torch.stack(out)


def load_dataset_samples(name: str, indices, split: str, root=None):
    """``(uint8 images (B, H, W, C), labels (B,), class names)`` picked from a dataset by index."""
    from loaders.datasets import load_dataset

    ds = load_dataset(name, root=root, split=split)
    bad = [i for i in indices if not -len(ds.labels) <= i < len(ds.labels)]
    if bad:
        raise SystemExit(f"error: --index {bad} out of range for {ds.name} {split} ({len(ds.labels)} images)")
    idx = torch.tensor(indices, dtype=torch.long)
    return ds.images[idx], ds.labels[idx], list(ds.classes)


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


# ── main ───────────────────────────────────────────────────────────────────────────────────────────────────

def tool_parser(description: str, examples: str) -> argparse.ArgumentParser:
    """The flags every visual tool shares: which model (``--checkpoint``, ``--weights``) and ``--dpi``."""
    p = argparse.ArgumentParser(description=description, epilog=examples,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="Google .npz, fine-tuning checkpoint .pt or run folder "
                                        "(default: ~/.cache/vit-peft/ViT-B_16.npz)")
    p.add_argument("--weights", help="base .npz for a fine-tuning checkpoint whose base weights moved")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default: 100)")
    return p


def parse_args(argv=None):
    p = tool_parser(__doc__, EXAMPLES)
    p.add_argument("images", nargs="*", help="image files (any format PIL reads)")
    p.add_argument("--dataset", help="take images from a dataset: cifar10, cifar100, fashion_mnist, "
                                     "tiny_imagenet or a folder (see loaders.datasets)")
    p.add_argument("--index", type=int, nargs="+", default=[0], help="dataset sample indices (default: 0)")
    p.add_argument("--split", default="test", choices=("train", "test"), help="dataset split (default: test)")
    p.add_argument("--data-root", help="dataset folder (default: $VIT_PEFT_DATA or ~/.cache/vit-peft/data)")
    p.add_argument("--image-size", type=int, help="run a .npz model at this resolution (position "
                                                  "embedding resized; a multiple of the patch size)")
    p.add_argument("--labels", help="text file with one class name per line (overrides other names)")
    p.add_argument("--head-fusion", default="mean", choices=visualize.HEAD_FUSIONS,
                   help="how rollout combines the heads of a layer (default: mean)")
    p.add_argument("--discard-ratio", type=float, default=0.0,
                   help="fraction of the lowest patch-to-patch attentions dropped per layer before rollout, "
                        "in [0, 1); CLS row and column are always kept (default: 0)")
    p.add_argument("--per-layer", action="store_true", help="also show the rollout through each layer")
    p.add_argument("--output", default="img/attention_map.png", help="PNG to write; the .npy masks go "
                                                                      "beside it (default: img/attention_map.png)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = p.parse_args(argv)
    if not args.images and not args.dataset:
        p.error("give image files and/or --dataset NAME --index I ...")
    if not 0.0 <= args.discard_ratio < 1.0:
        p.error(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    model, classes, desc = load_model(args.checkpoint, args.image_size, args.weights)
    cfg = model.config
    log.info("model %s: %d px, patch %d, %d layers, %d heads, %d classes", desc, cfg.image_size,
             cfg.patch_size, cfg.num_layers, cfg.num_heads, cfg.num_classes)

    batches, truth = [], []
    if args.images:
        batches.append(load_image_files(args.images, cfg.image_size))
        truth += [None] * len(args.images)
    if args.dataset:
        images, labels, ds_classes = load_dataset_samples(args.dataset, args.index, args.split, args.data_root)
        if classes is None and len(ds_classes) == cfg.num_classes:
            classes = ds_classes  # a plain .npz carries no names; the dataset's fit if the counts agree
        batches += [images]
        truth += [ds_classes[int(y)] for y in labels]
    x = torch.cat([to_model_input(b, cfg.image_size, cfg.in_channels) for b in batches])
    if args.labels:
        classes = read_labels(args.labels)
    if classes is not None and len(classes) != cfg.num_classes:
        log.warning("%d class names for a %d-class model: showing indices", len(classes), cfg.num_classes)
        classes = None

    model.to(args.device)
    maps = visualize.attention_maps(model, x.to(args.device), args.head_fusion, args.discard_ratio,
                                    args.per_layer)
    prob, pred = maps.probs.max(dim=-1)
    titles = []
    for i, (p, c) in enumerate(zip(prob.tolist(), pred.tolist())):
        name = _short(classes[c]) if classes else f"class {c}"
        titles.append(f"{name} {p:.2f}" + (f"\n(true: {_short(truth[i])})" if truth[i] else ""))
        log.info("image %d: predicted %s (p=%.3f)%s", i, classes[c] if classes else c, p,
                 f", true {truth[i]}" if truth[i] else "")

    fusion = args.head_fusion + (f", discard {args.discard_ratio:g}" if args.discard_ratio else "")
    rows = [(f"rollout\n({fusion})", maps.rollout.numpy())]
    rows += [(f"last layer\nhead {h + 1}", maps.cls_heads[:, h].numpy()) for h in range(cfg.num_heads)]
    if maps.per_layer is not None:
        rows += [(f"rollout\n{'layer 1' if l == 0 else f'layers 1-{l + 1}'}", m.numpy())
                 for l, m in enumerate(maps.per_layer)]
    fig = visualize.plot_attention(visualize.denormalize(x), rows, titles,
                                   title=f"Where {desc} looks (top: predicted class and its probability)")

    arrays = {"rollout": maps.rollout.numpy(), "cls_heads": maps.cls_heads.numpy()}
    if maps.per_layer is not None:
        arrays["per_layer"] = maps.per_layer.numpy()
    written = visualize.save_outputs(fig, args.output, dpi=args.dpi, arrays=arrays)
    log.info("wrote %s", ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
