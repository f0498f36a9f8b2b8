"""One benchmark measurement: build a row's model, time its inference and training steps, read its peak memory.

Each row normally runs in a fresh worker process (``python -m <package>.bench.harness SPEC``), so nothing one
mode allocated or compiled leaks into the next and CPU peak memory can be read from the operating system;
:func:`run_interleaved` instead times several rows round-robin in one process.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import vit
from vit.config import ViTConfig

from .. import kernels, registry, state
from ..base import MethodConfig
from ..lora import LoraConfig
from ..rlrr import RLRRConfig
from .flops import train_macs

log = logging.getLogger(__name__)

ROWS = registry.METHOD_NAMES + ("rlrr-kernel", "rlrr-kernel-keep", "rlrr-kernel-reuse", "rlrr-official", "merged", "timm",
                      "timm-lora")  # every method, and more
INFERENCE_ONLY = ("merged",)
RESULT_PREFIX = "BENCH_RESULT "  # a worker prints its result as one JSON line after this marker
PACKAGE = __name__.split(".")[0]  # "peft" in a checkout, "vit_peft" when installed
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # the folder that holds the package


def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> float | None:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux); returns the current RSS in MiB, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_mib("VmRSS")


def _peak_rss_mib() -> float:
    """Peak resident set size in MiB since the last reset (Linux), else since the process started."""
    peak = _proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _import_hf_peft():
    """Hugging Face's ``peft``, which shares its import name with this project's package (never installed by
    this project; only imported here, in a worker process that has not imported ours)."""
    ours = sys.modules.get("peft")
    if ours is not None and getattr(ours, "__vit_project__", False):
        raise ImportError("this checkout's peft/ holds the import name 'peft'; install the project "
                          "(pip install -e .) so that it runs as vit_peft beside Hugging Face's peft")
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != PACKAGE_PARENT]
    try:
        import peft as hf_peft
    finally:
        sys.path[:] = saved
    if getattr(hf_peft, "__vit_project__", False) or not hasattr(hf_peft, "LoraConfig"):
        sys.modules.pop("peft", None)
        raise ImportError("no Hugging Face peft installed (only this project's peft is importable)")
    return hf_peft


def _timm_model(mode: str, config: ViTConfig):
    """timm's VisionTransformer with our sizes (its defaults otherwise: exact-erf GELU, fused qkv), plus HF
    peft LoRA r=8, α=8 on qkv for ``timm-lora`` (as many LoRA parameters as ours on q and v)."""
    try:
        import timm
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except Exception as e:  # not a dependency: only compared when installed
        return f"timm unavailable: {type(e).__name__}: {e}", ""
    model = TimmViT(img_size=config.image_size, patch_size=config.patch_size, in_chans=config.in_channels,
                    num_classes=config.num_classes, embed_dim=config.hidden_size, depth=config.num_layers,
                    num_heads=config.num_heads, mlp_ratio=config.mlp_dim / config.hidden_size)
    note = f"timm {timm.__version__}"
    if mode == "timm-lora":
        try:
            hf_peft = _import_hf_peft()
        except Exception as e:
            return f"HF peft unavailable: {type(e).__name__}: {e}", note
        ours = LoraConfig()  # the same rank and alpha as this project's LoRA row
        lora = hf_peft.LoraConfig(r=ours.rank, lora_alpha=ours.alpha, target_modules=["qkv"], modules_to_save=["head"])
        model = hf_peft.get_peft_model(model, lora)
        note += f", HF peft {hf_peft.__version__} LoRA r={ours.rank} on qkv"
    return model, note


def row_method(row: str) -> tuple[str, MethodConfig | None]:
    """The registered method, and its config, that a benchmark row computes (the FLOP model's input): the RLRR rows
    are RLRR configs, ``merged`` the plain ViT (a head-only count), ``timm`` full fine-tuning, ``timm-lora`` LoRA on
    one fused qkv layer."""
    if row == "timm-lora":
        return "lora", LoraConfig(targets="qkv")
    if row == "rlrr-official":
        return "rlrr", RLRRConfig(impl="official")
    if row.startswith("rlrr-kernel"):
        return "rlrr", RLRRConfig(weight_memory=row.rsplit("-", 1)[1] if row.endswith(("-keep", "-reuse")) else
                                  "rebuild")
    return {"merged": "head", "timm": "full"}.get(row, row), None


def build_model(mode: str, config: ViTConfig, device: torch.device):
    """(model for ``mode`` on ``device``, note), or (a string saying why the mode cannot run here, note)."""
    if mode in ("timm", "timm-lora"):
        model, note = _timm_model(mode, config)
        return (model if isinstance(model, str) else model.to(device)), note
    if mode.startswith("rlrr-kernel"):
        if device.type != "cuda":
            return f"{mode} needs a CUDA device; skipped", ""
        if not kernels.kernel_available():
            return "rlrr-kernel: the CUDA extension could not be built here; skipped", ""
    model = vit.VisionTransformer(config).to(device)
    note = ""
    if mode in registry.METHOD_NAMES and mode != "rlrr":
        registry.apply_method(model, mode)
    elif mode in ("rlrr", "merged") or mode.startswith("rlrr-kernel"):
        kernels.set_backend("cuda" if mode.startswith("rlrr-kernel") else "torch")
        memory = mode.rsplit("-", 1)[1] if mode.endswith(("-keep", "-reuse")) else "rebuild"
        registry.apply_method(model, "rlrr", rlrr_impl="function", rlrr_weight_memory=memory)
        note = (f"RLRRLinearFunction, fused CUDA kernel, W' {memory}" if mode.startswith("rlrr-kernel") else
                "RLRRLinearFunction, PyTorch path (W' rebuilt in backward, not kept)")
        if mode == "merged":
            state.merge_adapters(model)
            note = "RLRR merged into plain layers (peft.merge_adapters): the plain ViT"
    elif mode == "rlrr-official":
        kernels.set_backend("torch")
        registry.apply_method(model, "rlrr", rlrr_impl="official")
        note = "official formula W*s_in*s_out + W; autograd keeps W' per layer"
    else:
        raise ValueError(f"unknown benchmark mode {mode!r}; choose from {', '.join(ROWS)}")
    return model, note


def _timer(device: torch.device, clock: str = "wall"):
    """A function that runs ``fn`` ``steps`` times and returns seconds per step.

    CUDA: CUDA events. CPU: ``clock="wall"`` (perf_counter) or ``"process"`` (process_time: CPU seconds of all
    this process's threads; with one thread it does not count time the scheduler gave to other programs).
    """
    if device.type == "cuda":
        def run(fn, steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000 / steps
    else:
        now = time.process_time if clock == "process" else time.perf_counter

        def run(fn, steps):
            t0 = now()
            for _ in range(steps):
                fn()
            return (now() - t0) / steps
    return run


def _measure(fn, device, warmup: int, repeats: int, steps: int,
             clock: str = "wall") -> tuple[list[float], float | None]:
    """Seconds per step of each repetition, and the CUDA peak allocated bytes over the timed phase."""
    for _ in range(warmup):
        fn()
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    timer = _timer(device, clock)
    times = [timer(fn, steps) for _ in range(repeats)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    return times, peak


def run_one(spec: dict) -> dict:
    """Measure one (mode, batch size). ``spec`` is the JSON the parent passes to ``--worker``."""
    try:
        bench = prepare(spec)
        if isinstance(bench, dict):  # skipped
            return bench
        cpu = bench.device.type == "cpu"
        for phase in bench.phases():
            bench.model.train(phase == "train")
            start_rss = _reset_peak_rss() if cpu else None
            times, peak = _measure(bench.step(phase), bench.device, spec["warmup"], spec["repeats"], spec["steps"],
                                   spec.get("clock", "wall"))
            bench.record(phase, times, peak / 2**20 if peak is not None else _peak_rss_mib())
            if start_rss is not None:
                bench.result[f"{phase}_growth_mib"] = bench.result[f"{phase}_peak_mib"] - start_rss
        return bench.result
    finally:
        _reset_backend()


def _reset_backend():
    """The RLRR rows choose the kernel backend process-wide: hand the choice back to $VIT_PEFT_KERNEL."""
    kernels.set_backend(None)


@dataclass
class Bench:
    """One prepared row: a model with its inputs, optimizer and step functions, and its result so far."""
    result: dict
    model: torch.nn.Module
    device: torch.device
    images: torch.Tensor
    labels: torch.Tensor
    bf16: bool
    backend: str | None  # RLRR kernel backend this row needs (the choice is process-wide)
    optimizer: torch.optim.Optimizer | None = None

    def phases(self) -> list[str]:
        return ["infer"] if self.optimizer is None else ["infer", "train"]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def step(self, phase: str):
        """A no-argument function running one inference or training step on this row's batch."""
        model, images, labels, opt = self.model, self.images, self.labels, self.optimizer

        def infer():
            with torch.inference_mode(), self._autocast():
                model(images)

        def train():
            with self._autocast():
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fn = infer if phase == "infer" else train
        if self.backend is None:
            return fn

        def with_backend():
            kernels.set_backend(self.backend)
            fn()
        return with_backend

    def record(self, phase: str, times: list[float], peak_mib: float | None) -> None:
        r, batch = self.result, self.result["batch_size"]
        r[f"{phase}_step_s"] = times
        r[f"{phase}_img_s"] = batch / statistics.median(times)
        r[f"{phase}_peak_mib"] = peak_mib
        flops = r["forward_gflop_per_image" if phase == "infer" else "train_gflop_per_image"]
        if flops:
            r[f"{phase}_tflop_s"] = r[f"{phase}_img_s"] * flops / 1e3


def prepare(spec: dict) -> Bench | dict:
    """Build the model, inputs and optimizer of one row; a result dict with "skipped" if it cannot run here."""
    mode, batch = spec["mode"], spec["batch_size"]
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    config = vit.get_config(spec["model"])
    base_mode = mode.removesuffix("+compile")
    result = {"mode": mode, "batch_size": batch}
    torch.manual_seed(0)
    model, note = build_model(base_mode, config, device)
    if isinstance(model, str):
        return {**result, "skipped": model}
    result["note"] = note
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["total_params"] = sum(p.numel() for p in model.parameters())
    macs = train_macs(config, row_method(base_mode)[0], batch, row_method(base_mode)[1])
    result["forward_gflop_per_image"] = 2 * macs["forward"] / 1e9
    result["train_gflop_per_image"] = 2 * macs["train"] / 1e9 if base_mode not in INFERENCE_ONLY else None
    opt = None
    if base_mode not in INFERENCE_ONLY:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if spec["compile"]:
        model = torch.compile(model)
    if device.type == "cuda":
        result["weights_mib"] = torch.cuda.memory_allocated(device) / 2**20  # parameters (and buffers) only
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=g).to(device)
    labels = torch.randint(0, config.num_classes, (batch,), generator=g).to(device)
    if device.type == "cpu":
        result["setup_rss_mib"] = _proc_status_mib("VmRSS")
    backend = "cuda" if base_mode.startswith("rlrr-kernel") else {"rlrr": "torch", "rlrr-official": "torch"}.get(base_mode)
    return Bench(result, model, device, images, labels, spec["bf16"], backend, opt)


def run_interleaved(specs: list[dict]) -> list[dict]:
    """Time several rows round-robin in this process: each repetition steps every row once, so a change in
    the machine's load hits all rows alike. Peak memory is not measured (the rows share one process)."""
    try:
        # HF peft shares its import name with ours: prepare its row last, where it is skipped with a note
        order = sorted(range(len(specs)), key=lambda i: specs[i]["mode"] == "timm-lora")
        benches = [None] * len(specs)
        for i in order:
            benches[i] = prepare(specs[i])
        live = [b for b in benches if isinstance(b, Bench)]
        spec = {**specs[0], "warmup": max(s["warmup"] for s in specs)}
        for phase in ("infer", "train"):
            rows = [b for b in live if phase in b.phases()]
            timer = _timer(rows[0].device, spec.get("clock", "wall")) if rows else None
            times = {id(b): [] for b in rows}
            for b in rows:  # warm-up
                b.model.train(phase == "train")
                for _ in range(spec["warmup"]):
                    b.step(phase)()
            for rep in range(spec["repeats"]):
                for b in rows:
                    b.model.train(phase == "train")
                    times[id(b)].append(timer(b.step(phase), spec["steps"]))
                log.info("%s: repetition %d of %d done for all %d rows", phase, rep + 1, spec["repeats"], len(rows))
            for b in rows:
                b.record(phase, times[id(b)], None)
        return [b.result if isinstance(b, Bench) else b for b in benches]
    finally:
        _reset_backend()


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        result = run_one(spec)
    except Exception as e:  # reported as a row, so one failing mode does not hide the others
        log.exception("mode %s batch %s failed", spec.get("mode"), spec.get("batch_size"))
        result = {"mode": spec.get("mode"), "batch_size": spec.get("batch_size"),
                  "error": f"{type(e).__name__}: {e}"}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------
# The command: jobs, table, JSON, chart


def worker_command(spec: dict) -> tuple[list[str], dict]:
    """The command line and environment of a worker process measuring ``spec``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}
    return [sys.executable, "-m", f"{PACKAGE}.bench.harness", json.dumps(spec)], env


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(worker_main(sys.argv[1]))
