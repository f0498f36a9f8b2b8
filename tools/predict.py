#!/usr/bin/env python3
"""Top-5 classes for image files, from a fine-tuning checkpoint (base weights + adapters)."""

import os
import sys

# Let `python tools/predict.py` work from a checkout without `pip install -e .`: put the repo root first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import logging  # noqa: E402

import vit  # noqa: E402

vit.require_project_peft()  # fail clearly if Hugging Face's peft shadows ours
from peft import evaluation  # noqa: E402
from peft.checkpoint import load_model_from_checkpoint  # noqa: E402
from peft.distributed import resolve_device  # noqa: E402

EXAMPLES = """examples:
  python tools/predict.py cat.png dog.jpg --checkpoint runs/cifar10-rlrr
  python tools/predict.py shoe.png --checkpoint runs/quickstart/rlrr/best.pt --top-k 3
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files (any format PIL reads; resized like evaluation)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file or a run folder (its best.pt)")
    p.add_argument("--weights", default=None, help="base .npz if it moved since training (sha256 must match)")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(a.device)
    model, meta = load_model_from_checkpoint(a.checkpoint, weights=a.weights, device=device)
    for path, top in zip(a.images, evaluation.predict_files(model, a.images, meta["classes"], a.top_k, device)):
        print(path)
        for rank, (name, prob) in enumerate(top, 1):
            print(f"  {rank}. {name:<24} {prob:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
