"""Speed and memory of every fine-tuning mode, side by side with what users would pick instead.

For one model size and one or more batch sizes this measures, per mode:

* inference images/s (``torch.inference_mode``, eval mode),
* training-step images/s (forward, cross-entropy, backward, AdamW step on the trainable parameters),
* peak memory of each phase,
* achieved FLOP/s against an analytic FLOP count of the work the mode must do (:func:`train_macs`).

Modes: ``head``, ``mlp``, ``lora``, ``full`` (peft.apply_method); ``rlrr`` (the memory-lean autograd Function on
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

import logging
import sys

from ..bench.data import run_data_benchmark
from ..bench.loop import run_loop_benchmark
from ..bench.suite import BenchmarkOptions, run
from .. import fields
from ..finetune import OptionsError
from . import args
from .args import run_main



def parse_options(argv=None) -> BenchmarkOptions:
    """The flags of :class:`peft.bench.suite.BenchmarkOptions`, one per field (help from its comment)."""
    return args.parse_options(argv, BenchmarkOptions, prog="benchmark", description=__doc__.split("\n\n")[0],
                              epilog=__doc__.split("examples:")[1].join(["examples:", ""]))


def check(opts: BenchmarkOptions) -> None:
    """Every field against its metadata (:func:`peft.fields.check`, as every options class)."""
    fields.check(opts, OptionsError)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opts = parse_options(argv)
    check(opts)
    if opts.data_dir is not None and not opts.data:
        raise OptionsError("--data-dir only applies with --data")
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
