"""Re-create a fine-tuning run's evaluation files from its checkpoint: confusion matrix, per-class report,
ROC curves, training curves. The engine is peft.finetune.predict.evaluate_checkpoint."""

from __future__ import annotations

import sys
import typing
from dataclasses import dataclass

from ..finetune import OptionsError
from ..finetune.distributed import setup_logging
from ..finetune.predict import evaluate_checkpoint, evaluate_tasks
from .args import parse_options, run_main
from .. import fields
from ..fields import option

EXAMPLES = """examples:
  python tools/evaluate.py runs/cifar10-rlrr                 # best.pt of a run, files into that folder
  python tools/evaluate.py runs/cifar10-rlrr/checkpoint.pt --split val --output-dir runs/eval-latest
  python tools/evaluate.py runs/quickstart/rlrr --weights moved/pretrained.npz
  python tools/evaluate.py runs/quickstart/rlrr,runs/quickstart/lora,runs/quickstart/vpt   # one backbone
"""


@dataclass
class EvaluateOptions:
    checkpoint: str = option("", "a checkpoint file or a run folder (its best.pt); several, comma-separated: one backbone")
    split: str = option("test", "test | val (the held-out validation split of the run)", choices=("test", "val"))
    weights: typing.Optional[str] = option(None, "base .npz if it moved since training (sha256 must match)")
    data: typing.Optional[str] = option(None, "dataset (default: the one the run used)")
    data_root: typing.Optional[str] = option(None, "dataset cache folder")
    output_dir: typing.Optional[str] = option(None, "where the files go (default: the checkpoint's folder)")
    batch_size: int = option(256, "images per forward pass", min=1)
    max_samples: int = option(-1, "cap the split (-1: as in the run; 0: the whole split)", min=-1, range_text="-1 (as in the run), 0 (the whole split) or positive")
    device: str = option("auto", "auto | cpu | cuda")


def main(argv=None) -> int:
    o = parse_options(argv, EvaluateOptions, description=__doc__, epilog=EXAMPLES, positional=("checkpoint",),
                      prog="evaluate")
    fields.check(o, OptionsError)
    setup_logging()
    cap = None if o.max_samples == 0 else o.max_samples
    paths = [c for c in o.checkpoint.split(",") if c]
    if len(paths) > 1:  # several adapter checkpoints over one backbone in memory, each on its own data
        for r in evaluate_tasks(paths, o.output_dir, o.split, o.weights, o.data_root, o.device, o.batch_size, cap):
            print(f"{r['task']}: {o.split} accuracy {r[o.split + '_accuracy']:.4f} (mode {r['mode']})")
        return 0
    result = evaluate_checkpoint(o.checkpoint, o.output_dir, o.split, o.weights, o.data, o.data_root,
                                 o.device, o.batch_size, cap)
    print(f"{o.split} accuracy {result[o.split + '_accuracy']:.4f} (mode {result['mode']}, epoch {result['epoch']})")
    return 0


def cli(argv=None) -> int:
    return run_main(main, argv, "evaluate")


if __name__ == "__main__":
    sys.exit(cli())
