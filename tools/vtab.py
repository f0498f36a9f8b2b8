#!/usr/bin/env python3
"""`python tools/vtab.py --help`: the command line is peft/cli/vtab.py (also `vit-peft vtab` when installed)."""

import os
import sys

# Run from a checkout without installing: the repository root first, so that `peft` is this project's.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peft.cli.vtab import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
