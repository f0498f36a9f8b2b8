"""Run a benchmark suite: VTAB-1k (or FGVC with --suite fgvc) tasks × methods × seeds, resumable task by task,
with results.json / .csv / .md (the paper's rows beside ours) and a figure. The engine is peft.finetune.suite."""

from __future__ import annotations

import sys
from pathlib import Path

from ..finetune.distributed import setup_logging
from ..finetune.suite import SuiteOptions, run_suite
from .args import parse_options, run_main

EXAMPLES = """examples:
  python tools/vtab.py --data-root /data/vtab-1k --tasks all --modes rlrr,lora --output-dir runs/vtab
  python tools/vtab.py --data-root /data/vtab-1k --tasks cifar,dtd --modes all --protocol tune --epochs 20
  python tools/vtab.py --suite fgvc --data-root /data/fgvc --tasks cub,flowers --modes rlrr --seeds 42,43
  # offline rehearsal on real Fashion-MNIST, cut VTAB-style, from the quick-start backbone
  python tools/vtab.py --rehearsal --data-root runs/rehearsal-data --weights runs/quickstart/pretrained.npz \\
      --modes all --image-size 28 --epochs 10 --output-dir runs/vtab-rehearsal
"""


def main(argv=None) -> int:
    o = parse_options(argv, SuiteOptions, description=__doc__, epilog=EXAMPLES, prog="vtab")
    setup_logging()
    results = run_suite(o)
    print("\n" + (Path(o.output_dir) / "results.md").read_text())
    print(f"wrote {o.output_dir}/results.json, results.csv, results.md, results.png "
          f"({sum(s['tasks_run'] for s in results['summary'].values())} task x mode results)")
    return 0


def cli(argv=None) -> int:
    return run_main(main, argv, "vtab")


if __name__ == "__main__":
    sys.exit(cli())
