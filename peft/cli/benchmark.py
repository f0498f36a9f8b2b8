"""Speed and memory of every fine-tuning mode, side by side with what users would pick instead.

For one model size and one or more batch sizes this measures, per mode:

* inference images/s (``torch.inference_mode``, eval mode),
* training-step images/s (forward, cross-entropy, backward, AdamW step on the trainable parameters),
* peak memory of each phase,
* achieved FLOP/s against an analytic FLOP count of the work the mode must do (:func:`train_macs`).

Modes: ``head``, ``mlp``, ``lora``, ``full`` (peft.apply_mode); ``rlrr`` (the memory-lean autograd Function on
its PyTorch path); ``rlrr-kernel`` (the same Function with the fused CUDA kernel; CUDA only, skipped with a note
elsewhere); ``rlrr-official`` (the official code's three-pass formula, autograd keeping W'); ``merged`` (RLRR
merged back into a plain ViT with peft.merge_adapters: inference only, should cost what the plain ViT costs);
``timm`` (timm's VisionTransformer with the same sizes, full fine-tuning; only when timm is importable).
``--compile`` adds torch.compile twins of the ``--compile-modes`` rows.

How it measures (honest about what each number is):

* Each (mode, batch size) runs in a fresh Python process, so nothing one mode allocated or compiled leaks
  into the next and CPU peak memory can be read from the operating system.
* Timing: ``--warmup`` untimed steps, then ``--repeats`` timed repetitions of ``--steps`` steps each; the table
  shows the median repetition. CUDA: CUDA events around each repetition. CPU: wall clock (``perf_counter``),
  or with ``--cpu-clock process`` the process's CPU time (with ``--threads 1`` it ignores time the scheduler
  gives to other programs). On a machine shared with other work, ``--interleave`` times all rows round-robin
  in one process so that load changes hit every row alike (memory is then not measured).
* Memory, CUDA: ``torch.cuda.max_memory_allocated`` over the timed phase (weights, gradients, optimizer
  state, activations and temporaries: everything the caching allocator handed out).
  CPU (Linux): the process's peak resident set size over each phase (``VmHWM`` in /proc/self/status, reset
  before the phase through /proc/self/clear_refs), so it counts the model, gradients, optimizer state and the
  largest set of activations and temporaries alive at once, plus the interpreter and torch (~0.3 GiB); the JSON
  also has the growth over the resident size at the start of the phase. (``ru_maxrss`` is not used: a process
  started with vfork inherits its parent's peak there.) Elsewhere: ``ru_maxrss``, process peak so far.
  the peak after building the model. Inference runs first, so the training peak is the process peak.
* FLOPs: 2 per multiply-add; only matrix products are counted (patch embedding, the linear layers, the two
  attention products, the head, LoRA's and RLRR's rank-r products). LayerNorm, softmax, GELU, bias and
  residual adds, SSF and the optimizer are not counted. The backward pass is counted layer by layer: the
  activation gradient only where something below still needs it, the weight gradient only where the weight
  or an adapter that needs it (RLRR needs the full dYᵀX) trains. See peft/bench/flops.py. The harness is peft.bench; this is its command line.

examples:
  python tools/benchmark.py                          # ViT-B/16 on CUDA if present (batch 64, 256), else CPU (8)
  python tools/benchmark.py --device cpu --model ViT-S/16 --batch-sizes 8 --repeats 3
  python tools/benchmark.py --device cuda --batch-sizes 64 128 --compile --output-dir runs/benchmark-h100
  python tools/benchmark.py --data                   # the data layer: decode, cached delivery, RssAnon 1x vs 10x
  python tools/benchmark.py --loop --device cuda     # the training loop: --log-every 1 vs 50 (host syncs per step)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from ..bench.data import run_data_benchmark
from ..bench.loop import run_loop_benchmark
from ..bench.harness import ROWS
from ..bench.suite import BenchmarkOptions, run
from ..finetune import OptionsError
from .args import Parser, run_main



def parse_options(argv=None) -> BenchmarkOptions:
    p = Parser(prog="benchmark", description=__doc__.split("\n\n")[0],
               epilog=__doc__.split("examples:")[1].join(["examples:", ""]))
    d = BenchmarkOptions()
    p.add_argument("--model", default=d.model, help=f"model preset (default: {d.model})")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=d.batch_sizes,
                   help="batch sizes (default: 64 256 on CUDA, 8 on CPU)")
    p.add_argument("--device", default=d.device, help="cuda, cpu or auto (default: auto)")
    p.add_argument("--modes", nargs="+", default=d.modes, choices=ROWS, metavar="MODE",
                   help=f"rows to measure, from: {', '.join(ROWS)} (default: all)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed repetitions, median reported (default: 5)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed warm-up steps per phase (default: 2)")
    p.add_argument("--steps", type=int, default=d.steps, help="steps per repetition (default: 1 CPU, 10 CUDA)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on for CUDA, off for CPU)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows for --compile-modes")
    p.add_argument("--compile-modes", nargs="+", default=d.compile_modes, choices=ROWS, metavar="MODE",
                   help="modes that get a +compile row (default: rlrr-official rlrr)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cpu-clock", choices=("wall", "process"), default=d.cpu_clock,
                   help="CPU timing: wall clock, or process CPU time (with --threads 1: robust to other load)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=d.isolate,
                   help="one fresh process per measurement (default: on; off: CPU memory is not per mode)")
    p.add_argument("--interleave", action="store_true",
                   help="time all rows round-robin in one process, so changing load hits every row alike "
                        "(for noisy shared machines; peak memory is then not measured)")
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                   help="peak TFLOP/s of the device, to print the achieved fraction")
    p.add_argument("--output-dir", default=d.output_dir, help=f"output folder (default: {d.output_dir})")
    p.add_argument("--data", action="store_true",
                   help="measure the data layer instead (decode, cached delivery, RssAnon at 1x and 10x a folder)")
    p.add_argument("--data-photos", type=int, default=100,
                   help="500x375 photos of the data benchmark's 1x folder (10x: ten copies; default: 100)")
    p.add_argument("--data-dir", default=None, help="where the data benchmark writes its photos (default: a temp dir)")
    p.add_argument("--loop", action="store_true",
                   help="measure the training loop instead: tools/finetune.py steps of --model with --log-every 1 "
                        "vs 50 (the cost of reading the loop's numbers back every step), synthetic data, 32 px")
    a = p.parse_args(argv)
    opts = BenchmarkOptions(**{f.name: getattr(a, f.name) for f in dataclasses.fields(BenchmarkOptions)})
    opts.data, opts.data_photos, opts.data_dir, opts.loop = a.data, a.data_photos, a.data_dir, a.loop
    return opts




def check(opts: BenchmarkOptions) -> None:
    for flag, value in (("--repeats", opts.repeats), ("--threads", opts.threads + 1), ("--steps", opts.steps + 1),
                        ("--warmup", opts.warmup + 1)):
        if value < 1:
            raise OptionsError(f"{flag} must be positive (0 allowed where it means the default), got {value}")
    bad = [b for b in opts.batch_sizes if b < 1]
    if bad:
        raise OptionsError(f"--batch-sizes must be positive, got {bad}")
    if opts.peak_tflops < 0:
        raise OptionsError(f"--peak-tflops must not be negative, got {opts.peak_tflops}")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opts = parse_options(argv)
    check(opts)
    if opts.data:
        if opts.data_photos < 4:
            raise OptionsError(f"--data-photos must be at least 4, got {opts.data_photos}")
        run_data_benchmark(opts.output_dir, opts.data_photos, data_dir=opts.data_dir)
        return 0
    if opts.loop:
        run_loop_benchmark(opts.output_dir, opts.model, opts.device, opts.repeats,
                           batch_size=(opts.batch_sizes or [64])[0], threads=opts.threads or None)
        return 0
    run(opts)
    return 0


def cli(argv=None) -> int:
    return run_main(main, argv, "benchmark")


if __name__ == "__main__":
    sys.exit(cli())
