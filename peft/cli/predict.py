"""Top-5 classes for image files, from a fine-tuning checkpoint (base weights + adapters)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ..tasks import set_adapter
from ..finetune.rebuild import load_model_from_checkpoint, load_tasks
from ..finetune.distributed import resolve_device
from ..finetune.data import printable_name
from ..finetune.options import FinetuneOptions
from ..finetune.predict import predict_folder, predict_images, run_eval_transform
from ..finetune import OptionsError
from loaders.images import StorePolicy
from .args import parse_options, run_main
from .. import fields
from ..fields import option

EXAMPLES = """examples:
  python tools/predict.py cat.png dog.jpg --checkpoint runs/cifar10-rlrr
  python tools/predict.py shoe.png --checkpoint runs/quickstart/rlrr/best.pt --top-k 3
  python tools/predict.py shoe.png --checkpoint runs/quickstart/rlrr --checkpoint runs/quickstart/lora  # one backbone
  python tools/predict.py --data ~/new-photos --checkpoint runs/my-photos   # a folder, through the decode cache
"""


@dataclass
class PredictOptions:
    REQUIRED: ClassVar[tuple] = ("checkpoint",)
    images: list[str] = option(help="image files (any format PIL reads; resized like evaluation)", default_factory=list)
    data: Optional[str] = option(None, "a folder: every image under it, decoded once into the cache")
    checkpoint: list = option(help="a checkpoint file or a run folder (its best.pt); repeat the flag for several adapter checkpoints of one base: they share one backbone in memory and each reports its own top classes (images may come before or after)", default_factory=list)
    weights: Optional[str] = option(None, "base .npz if it moved since training (sha256 must match)")
    top_k: int = option(5, "classes to print per image", min=1)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")


def main(argv=None) -> int:
    a = parse_options(argv, PredictOptions, prog="predict", description=__doc__, epilog=EXAMPLES,
                      positional=("images",))
    fields.check(a, OptionsError)
    if not a.images and a.data is None:
        raise OptionsError("give image files, or --data FOLDER")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(a.device)
    if len(a.checkpoint) == 1:
        model, meta = load_model_from_checkpoint(a.checkpoint[0], weights=a.weights, device=device)
        tasks = {None: meta}
    else:
        model, tasks = load_tasks(a.checkpoint, weights=a.weights, device=device)
    failed = 0
    for task, meta in tasks.items():
        if task is not None:
            set_adapter(model, task)
            print(f"== {task} ({meta['mode']}, {len(meta['classes'])} classes)")
        opts = FinetuneOptions.from_dict(meta.get("options", {}))
        size = model.config.image_size
        tf, policy = run_eval_transform(opts, size), StorePolicy.for_photos(size, opts.crop_pct)
        found = predict_images(model, a.images, meta["classes"], tf, policy, a.top_k, device) if a.images else []
        if a.data is not None:
            found += predict_folder(model, a.data, meta["classes"], a.top_k, device, opts.crop_pct, transform=tf)
        for path, top, why in found:
            if why is not None:  # named on its own line; the others are still answered
                print(f"predict: {printable_name(str(path))}: not predicted, cannot read the image ({why})",
                      file=sys.stderr)
                failed += 1
                continue
            print(printable_name(str(path)))
            for rank, (name, prob) in enumerate(top, 1):
                print(f"  {rank}. {name:<24} {prob:.4f}")
    if failed:
        print(f"predict: {failed} image(s) could not be read (named above)", file=sys.stderr)
    return 1 if failed else 0


def cli(argv=None) -> int:
    return run_main(main, argv, "predict")


if __name__ == "__main__":
    sys.exit(cli())
