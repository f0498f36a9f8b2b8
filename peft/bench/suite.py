"""The benchmark as a whole: every (batch size, row), the environment it ran in, the table, JSON and chart."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import subprocess
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import vit

from ..finetune.distributed import resolve_device
from .harness import RESULT_PREFIX, ROWS, _proc_status_mib, run_interleaved, run_one, worker_command
from .plots import plot
from ..fields import option

log = logging.getLogger(__name__)


@dataclass
class BenchmarkOptions:
    """The benchmark's options; each field's trailing comment is its ``--help`` (peft.cli.args.build_parser)."""

    model: str = option("ViT-B/16", "model preset (vit.get_config name)")
    batch_sizes: list[int] = option(help="batch sizes (default: 64 256 on CUDA, 8 on CPU)", min=1, default_factory=list)
    device: str = option("auto", "cuda, cpu, or auto (cuda when available)")
    modes: list[str] = option(help="which rows to measure", default_factory=lambda: list(ROWS), choices=ROWS)
    repeats: int = option(5, "timed repetitions per phase (the median is reported)", min=1)
    warmup: int = option(2, "untimed steps before timing each phase", min=0)
    steps: int = option(0, "steps per timed repetition (0: 1 on CPU, 10 on CUDA)", min=0)
    bf16: bool | None = option(None, "bfloat16 autocast (default: on for CUDA, off for CPU)")
    compile: bool = option(False, "also measure torch.compile'd twins of --compile-modes")
    compile_modes: list[str] = option(help="modes to compile", default_factory=lambda: ["rlrr-official", "rlrr"], choices=ROWS)
    threads: int = option(0, "torch CPU threads (0: torch's default)", min=0)
    cpu_clock: str = option("wall", "CPU timing: wall (perf_counter) or process (CPU time; use with --threads 1)", choices=("wall", "process"))
    isolate: bool = option(True, "one fresh process per measurement (needed for honest CPU peak memory)")
    interleave: bool = option(False, "time all rows of a batch size round-robin in one process (no memory numbers)")
    peak_tflops: float = option(0.0, "the device's peak TFLOP/s for the chosen precision, for the \"% peak\" column", min=0)
    output_dir: str = option("runs/benchmark", "where benchmark.json and benchmark.png go")
    data: bool = option(False, "measure the data layer instead (decode, cached delivery, RssAnon at 1x and 10x a folder)")
    data_photos: int = option(100, "500x375 photos of the data benchmark's 1x folder (10x: ten copies)")
    data_dir: str | None = option(None, "where the data benchmark writes its photos (default: a temporary folder)")
    loop: bool = option(False, "measure the training loop instead: finetune steps of --model with --log-every 1 vs 50, synthetic data, 32 px")



def _run_job(spec: dict, isolate: bool) -> dict:
    if not isolate:
        return run_one(spec)
    cmd, env = worker_command(spec)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"mode": spec["mode"], "batch_size": spec["batch_size"],
            "error": f"worker exited with status {proc.returncode}: {tail}"}


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, opts: BenchmarkOptions, bf16: bool) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": opts.threads or torch.get_num_threads(),
           "precision": "bf16 autocast" if bf16 else "fp32", "time": datetime.datetime.now(
               datetime.timezone.utc).isoformat(timespec="seconds"),
           "timing": "CUDA events" if device.type == "cuda" else
           "wall clock (perf_counter)" if opts.cpu_clock == "wall" else "process CPU time (process_time)",
           "memory": ("not measured (--interleave: all rows share one process)" if opts.interleave else
                      "torch.cuda.max_memory_allocated over the timed phase" if device.type == "cuda" else
                      ("peak RSS per phase in a fresh process per mode (VmHWM, reset per phase)" if
                       _proc_status_mib("VmHWM") is not None else
                       "peak RSS of a fresh process per mode (getrusage ru_maxrss)") if opts.isolate else
                      "peak RSS of the one shared process (not per mode: run with --isolate)")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import timm

        env["timm"] = timm.__version__
    except Exception as e:
        env["timm"] = f"unavailable: {type(e).__name__}: {e}"
    return env


def _fmt(v, digits=1):
    """Thousands separators; small floats keep three significant digits instead of printing 0.00."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if v == 0 or abs(v) >= 1 else f"{v:.3g}"
    return f"{v:,}"


def markdown_table(results: list[dict], peak_tflops: float = 0.0, memory_label: str = "peak MiB") -> str:
    """The README's table: one row per (batch, mode), skipped and failed rows with their reason."""
    head = ["batch", "mode", "infer img/s", "train img/s", f"train {memory_label}", "GFLOP/img train", "train TFLOP/s"]
    if peak_tflops:
        head.append("train % peak")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['batch_size']} | {r['mode']} | {r.get('skipped') or 'error: ' + r['error']} |")
            continue
        row = [str(r["batch_size"]), r["mode"], _fmt(r.get("infer_img_s"), 1), _fmt(r.get("train_img_s"), 1),
               _fmt(r.get("train_peak_mib"), 0), _fmt(r.get("train_gflop_per_image"), 1), _fmt(r.get("train_tflop_s"), 1)]
        if peak_tflops:
            row.append(_fmt(100 * r["train_tflop_s"] / peak_tflops if r.get("train_tflop_s") else None, 0))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def format_table(results: list[dict], peak_tflops: float = 0.0, memory_label: str = "peak MiB") -> str:
    head = ["batch", "mode", "infer img/s", "train img/s", f"infer {memory_label}", f"train {memory_label}",
            "GFLOP/img fwd", "GFLOP/img train", "infer TFLOP/s", "train TFLOP/s", "trainable"]
    if peak_tflops:
        head[-1:-1] = ["infer % peak", "train % peak"]
    rows = []
    for r in results:
        if "skipped" in r or "error" in r:
            rows.append([str(r["batch_size"]), r["mode"], r.get("skipped") or "ERROR " + r["error"]])
            continue
        row = [str(r["batch_size"]), r["mode"], _fmt(r.get("infer_img_s"), 2), _fmt(r.get("train_img_s"), 2),
               _fmt(r.get("infer_peak_mib"), 0), _fmt(r.get("train_peak_mib"), 0),
               _fmt(r.get("forward_gflop_per_image"), 2), _fmt(r.get("train_gflop_per_image"), 2),
               _fmt(r.get("infer_tflop_s"), 3), _fmt(r.get("train_tflop_s"), 3)]
        if peak_tflops:
            row += [_fmt(100 * r["infer_tflop_s"] / peak_tflops if r.get("infer_tflop_s") else None, 0),
                    _fmt(100 * r["train_tflop_s"] / peak_tflops if r.get("train_tflop_s") else None, 0)]
        rows.append(row + [_fmt(r.get("trainable_params"))])
    widths = [max([len(head[i])] + [len(row[i]) for row in rows if len(row) == len(head)])
              for i in range(len(head))]
    lines = [" | ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    for row in rows:
        if len(row) == len(head):
            lines.append(" | ".join(c.rjust(w) for c, w in zip(row, widths)))
        else:
            lines.append(" | ".join([row[0].rjust(widths[0]), row[1].rjust(widths[1]), row[2]]))
    return "\n".join(lines)


def run(opts: BenchmarkOptions) -> dict:
    """Measure every (batch size, mode); write benchmark.json and benchmark.png; return the report."""
    device = resolve_device(opts.device)
    config = vit.get_config(opts.model)  # fails early on an unknown name
    bf16 = device.type == "cuda" if opts.bf16 is None else opts.bf16
    steps = opts.steps or (10 if device.type == "cuda" else 1)
    batch_sizes = opts.batch_sizes or ([64, 256] if device.type == "cuda" else [8])
    load_before = _loadavg()
    modes = list(dict.fromkeys(opts.modes))
    if opts.compile:
        modes += [f"{m}+compile" for m in opts.compile_modes if m in modes]  # the kernel is a custom op: compiles too
    jobs = [dict(mode=m, batch_size=b, model=opts.model, device=str(device), bf16=bf16,
                 compile=m.endswith("+compile"), repeats=opts.repeats, warmup=max(opts.warmup, 2 if
                 m.endswith("+compile") else 0), steps=steps, threads=opts.threads, clock=opts.cpu_clock)
            for b in batch_sizes for m in modes]
    results = []
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.jsonl"  # one line per finished measurement: a killed run keeps what it measured
    rows_file.write_text("")
    if opts.interleave:
        for b in tqdm(batch_sizes, desc="benchmark (interleaved)", unit="batch size"):
            results += run_interleaved([j for j in jobs if j["batch_size"] == b])
    for spec in tqdm([] if opts.interleave else jobs, desc="benchmark", unit="run"):
        results.append(_run_job(spec, opts.isolate))
        with open(rows_file, "a") as f:
            f.write(json.dumps(results[-1]) + "\n")
    for r in results:
        if "skipped" in r or "error" in r:
            log.info("batch %d %s: %s", r["batch_size"], r["mode"], r.get("skipped") or r["error"])
        else:
            log.info("batch %d %s: inference %.2f img/s, training %s img/s", r["batch_size"], r["mode"],
                     r["infer_img_s"], _fmt(r.get("train_img_s"), 2))
    env = environment(device, opts, bf16)
    env["loadavg_1min_before_after"] = [load_before, _loadavg()]  # other work on the machine skews CPU timings
    report = {"options": dataclasses.asdict(opts), "config": dataclasses.asdict(config), "environment": env,
              "steps_per_repeat": steps, "results": results}
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out / "benchmark.png", f"{opts.model}, {env['precision']}, "
                                         f"{env.get('gpu') or env['cpu']} ({env['torch_threads']} threads)")
    memory_label = "peak MiB" if device.type == "cuda" else "peak RSS MiB"
    (out / "benchmark.md").write_text(markdown_table(results, opts.peak_tflops, memory_label))
    print(f"\n{opts.model} on {env.get('gpu') or env['cpu']}, {env['precision']}, torch {env['torch']}, "
          f"median of {opts.repeats} x {steps} step(s); 1-min load average {_fmt(load_before, 2)} -> "
          f"{_fmt(_loadavg(), 2)}\n"
          f"memory: {env['memory']}")
    print(format_table(results, opts.peak_tflops, memory_label))
    for mode, note in dict.fromkeys((r["mode"], r["note"]) for r in results if r.get("note")):
        print(f"  {mode}: {note}")
    log.info("wrote %s and %s", out / "benchmark.json", out / "benchmark.png")
    return report
