"""Offline quick start: pretrain a small ViT from scratch, then fine-tune it with every mode, on a laptop CPU.

Pretrains ViT-Mini/4 on Fashion-MNIST classes 0-4, exports it in Google's .npz layout, fine-tunes it on classes
5-9 with every registered mode and prints a table (also saved as results.md / results.json). The pipeline is
peft.finetune.quickstart. The same command again continues an interrupted quick start (finished modes are kept,
the others resume from their last epoch); --modes adds or replaces rows of the table; --overwrite starts over.

On a busy machine, pass --threads 1: torch's default of one thread per core spins when another job holds a
core (measured 13-17x slower with 2 threads while another job held one of 2 cores).
"""

from __future__ import annotations

import sys

from ..finetune.distributed import setup_logging
from ..finetune.quickstart import QuickstartOptions, run_quickstart
from .args import parse_options, run_main

EXAMPLES = """examples:
  python tools/quickstart.py                      # about 5-10 minutes on 2 idle CPU cores
  python tools/quickstart.py --threads 1          # a shared, busy machine
  python tools/quickstart.py --modes rlrr,lora    # only some modes (reuses runs/quickstart/pretrained.npz)
  python tools/quickstart.py --retrain            # pretrain again even if pretrained.npz exists
  # interrupted (Ctrl-C, kill, crash)? the same command again continues where it stopped; to start over:
  python tools/quickstart.py --overwrite
"""


def main(argv=None) -> int:
    q = parse_options(argv, QuickstartOptions, description=__doc__, epilog=EXAMPLES, prog="quickstart")
    setup_logging()
    result = run_quickstart(q)
    print("\n" + result["markdown"])
    print(f"saved {result['path']}/results.md and results.json")
    return 0


def cli(argv=None) -> int:
    return run_main(main, argv, "quickstart")


if __name__ == "__main__":
    sys.exit(cli())
