"""Run a benchmark suite: VTAB-1k (or FGVC with --suite fgvc) tasks × methods × seeds, resumable task by task,
with results.json / .csv / .md (the paper's rows beside ours) and a figure. Any number of workers may run one
suite (the same command started again, on any machine sharing --output-dir; an sbatch job array); `report DIR`
writes the table of the cells finished so far. The engine is peft.finetune.suite."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from ..finetune import OptionsError
from ..finetune.distributed import setup_logging
from ..finetune.suite import SuiteOptions, run_suite
from ..finetune.workers import CellFailed
from .args import parse_options, run_main

EXAMPLES = """examples:
  python tools/vtab.py --data-root /data/vtab-1k --tasks all --modes rlrr,lora --output-dir runs/vtab
  python tools/vtab.py --data-root /data/vtab-1k --tasks cifar,dtd --modes all --protocol tune --epochs 20
  python tools/vtab.py --suite fgvc --data-root /data/fgvc --tasks cub,flowers --modes rlrr --seeds 42,43
  # one machine, 8 GPUs: 8 cells at once; or start the same command on several machines sharing runs/vtab
  python tools/vtab.py --data-root /data/vtab-1k --modes rlrr,lora,ssf --recipe official --devices \\
      cuda:0,cuda:1,cuda:2,cuda:3,cuda:4,cuda:5,cuda:6,cuda:7 --output-dir runs/vtab
  # SLURM: every task of the array is a worker (sbatch --array=0-31 job.sh, job.sh running the same command)
  # the table so far, with the number of cells still missing
  python tools/vtab.py report runs/vtab
  # offline rehearsal on real Fashion-MNIST, cut VTAB-style, from the quick-start backbone
  python tools/vtab.py --rehearsal --data-root runs/rehearsal-data --weights runs/quickstart/pretrained.npz \\
      --modes all --image-size 28 --epochs 10 --output-dir runs/vtab-rehearsal
"""


def report_options(argv: list[str]) -> SuiteOptions:
    """``report DIR``: the options the suite in DIR was started with (its suite.json), building the report only."""
    if len(argv) != 1 or argv[0].startswith("-"):
        raise OptionsError("usage: vtab report SUITE_DIR (a folder a suite wrote, with its suite.json)")
    path = Path(argv[0]) / "suite.json"
    if not path.is_file():
        raise OptionsError(f"report: {path} not found (is {argv[0]} the --output-dir of a suite?)")
    stored = json.loads(path.read_text())
    known = set(SuiteOptions.__dataclass_fields__)
    return SuiteOptions(**{**{k: v for k, v in stored.items() if k in known}, "output_dir": argv[0], "report": True})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "report":
        o = report_options(argv[1:])
    else:
        o = parse_options(argv, SuiteOptions, description=__doc__, epilog=EXAMPLES, prog="vtab")
    setup_logging()
    # A scheduler ends a job with SIGTERM (scancel, the time limit): unwind, so that this worker's claim is
    # marked released and another worker takes its cell at once (its checkpoint stays), not after the lease.
    before = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        results = run_suite(o)
    except CellFailed as e:
        print(f"vtab: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, before)
    cells = results["cells"]
    print("\n" + (Path(o.output_dir) / "results.md").read_text())
    print(f"wrote {o.output_dir}/results.json, results.csv, results.md, results.png "
          f"({sum(s['tasks_run'] for s in results['summary'].values())} task x mode results; "
          f"{cells['finished']} of {cells['total']} cells finished" +
          (f", {len(cells['missing'])} missing)" if cells["missing"] else ")"))
    return 0


def cli(argv=None) -> int:
    return run_main(main, argv, "vtab")


if __name__ == "__main__":
    sys.exit(cli())
