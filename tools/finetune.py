#!/usr/bin/env python3
"""Fine-tune a Vision Transformer with one of five modes: head, mlp, lora, rlrr (default) or full.

The engine lives in peft/training.py; this file only turns the command line into FinetuneOptions.
"""

import os
import sys

# Let `python tools/finetune.py` work from a checkout without `pip install -e .`: put the repo root first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import logging  # noqa: E402

import vit  # noqa: E402

vit.require_project_peft()  # fail clearly if Hugging Face's peft shadows ours
from peft import training  # noqa: E402

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
    opts = training.parse_options(argv, description=__doc__, epilog=EXAMPLES)
    try:
        training.run(opts)
    except training.OptionsError as e:
        logging.getLogger("finetune").error("%s", e)
        return 2
    except training.EXPECTED_ERRORS as e:  # missing data or weights, bad files, divergence: no traceback
        logging.getLogger("finetune").error("%s: %s", type(e).__name__, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
