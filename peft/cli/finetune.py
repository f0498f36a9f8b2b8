"""Fine-tune a Vision Transformer with one of the registered methods (see --mode).

The engine is peft.finetune; this turns the command line into FinetuneOptions and runs them.
"""

from __future__ import annotations

import sys

from ..finetune import FinetuneOptions, run
from .args import parse_options, run_main

EXAMPLES = """examples:
  # RLRR on CIFAR-10 with Google's ViT-B/16 ImageNet-21k weights (downloaded once, then cached)
  python tools/finetune.py --mode rlrr --data cifar10 --epochs 5 --output-dir runs/cifar10-rlrr
  # LoRA on q,v with rank 16; resume the same run after an interruption
  python tools/finetune.py --mode lora --lora-rank 16 --lora-alpha 16 --output-dir runs/lora
  python tools/finetune.py --mode lora --lora-rank 16 --lora-alpha 16 --output-dir runs/lora --resume
  # from scratch, offline: a small ViT on Fashion-MNIST classes 0-4, exported to Google's .npz layout
  python tools/finetune.py --mode full --weights none --model ViT-Mini/4 --data fashion_mnist \\
      --classes 0-4 --epochs 3 --export-npz runs/mini.npz
  # 4 GPUs (the global --batch-size is split over the processes)
  torchrun --nproc_per_node=4 tools/finetune.py --mode rlrr --batch-size 256
"""


def main(argv=None) -> int:
    opts = parse_options(argv, FinetuneOptions, with_methods=True, description=__doc__, epilog=EXAMPLES,
                         prog="finetune")
    run(opts)
    return 0


def cli(argv=None) -> int:
    return run_main(main, argv, "finetune")


if __name__ == "__main__":
    sys.exit(cli())
