"""Speed and memory of every fine-tuning mode, side by side with what users would pick instead.

``flops`` (the analytic FLOP model), ``harness`` (one measured row, in a worker process), ``suite`` (all rows,
the environment, table and JSON), ``plots`` (the chart). The command line is ``tools/benchmark.py``.
"""

from .flops import forward_macs, train_macs
from .suite import BenchmarkOptions, format_table, run

__all__ = ["BenchmarkOptions", "format_table", "forward_macs", "run", "train_macs"]
