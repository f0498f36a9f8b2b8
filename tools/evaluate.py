#!/usr/bin/env python3
"""`python tools/evaluate.py --help`: the command line is peft/cli/evaluate.py (also `vit-peft evaluate` when installed)."""

import os
import sys

# Run from a checkout without installing: the repository root first, so that `peft` is this project's.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peft.cli.evaluate import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
