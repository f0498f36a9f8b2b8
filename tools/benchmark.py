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
  or an adapter that needs it (RLRR needs the full dYᵀX) trains. See :func:`train_macs`.

examples:
  python tools/benchmark.py                          # ViT-B/16 on CUDA if present (batch 64, 256), else CPU (8)
  python tools/benchmark.py --device cpu --model ViT-S/16 --batch-sizes 8 --repeats 3
  python tools/benchmark.py --device cuda --batch-sizes 64 128 --compile --output-dir runs/benchmark-h100
"""

import os
import sys

# Run from a checkout without installing: put the repository root first on the import path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import vit  # noqa: E402
from vit.config import ViTConfig  # noqa: E402

log = logging.getLogger("benchmark")

MODES = ("head", "mlp", "lora", "rlrr", "rlrr-kernel", "rlrr-official", "full", "merged", "timm", "timm-lora")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFERENCE_ONLY = ("merged",)
RESULT_PREFIX = "BENCH_RESULT "  # a worker prints its result as one JSON line after this marker
LORA_RANK, LORA_TARGETS, RLRR_RANK = 8, ("q", "v"), 1  # peft's defaults; the FLOP count uses the same


# ----------------------------------------------------------------------------------------------------------
# Analytic FLOP count
# ----------------------------------------------------------------------------------------------------------

def forward_macs(config: ViTConfig) -> dict[str, int]:
    """Multiply-adds of one image's forward pass through the plain ViT, by part.

    With N = 1 + patches tokens, D hidden, M mlp_dim, L layers, K classes, C·P² values per patch:
    patch embedding (N−1)·D·C·P²; per block q, k, v, proj 4·N·D², attention scores and weighted sum 2·N²·D,
    MLP 2·N·D·M; head D·K on the CLS token (plus D·R for a pre-logits layer of size R).
    """
    c = config
    n, d, m = 1 + c.num_patches, c.hidden_size, c.mlp_dim
    rep = c.representation_size
    head = (d * rep + rep * c.num_classes) if rep else d * c.num_classes
    return {
        "patch_embed": c.num_patches * d * c.in_channels * c.patch_size ** 2,
        "qkv_proj": c.num_layers * 4 * n * d * d,
        "attention": c.num_layers * 2 * n * n * d,
        "mlp": c.num_layers * 2 * n * d * m,
        "head": head,
    }


@dataclass
class _Linear:
    """One linear layer in the FLOP model: tokens × in × out multiply-adds per matrix product."""
    name: str
    tokens: int
    fan_in: int
    fan_out: int
    weight_trains: bool = False  # full / mlp modes: its own weight gets a gradient
    adapter: str | None = None  # "lora" or "rlrr"


def train_macs(config: ViTConfig, mode: str, batch_size: int = 1, lora_rank: int = LORA_RANK,
               lora_targets=LORA_TARGETS, rlrr_rank: int = RLRR_RANK) -> dict[str, float]:
    """Multiply-adds per image of a forward pass and of a training step (forward + backward) in ``mode``.

    Rules (what autograd must compute, nothing more):
    * forward: :func:`forward_macs`, plus LoRA's two rank-r products per target (tokens·r·(in + out)) and,
      for RLRR, S_out·S_in per adapted layer (out·r·in, once per step, so divided by the batch size; counted
      for the official formula too, where broadcasting does the same multiplications);
    * backward of a linear layer: the activation gradient dX (tokens·in·out) only if its input depends on
      something trainable; the weight gradient dW = dYᵀX (tokens·in·out) if its weight trains or it has RLRR
      (whose scale gradients are built from the full dYᵀX), plus RLRR's two rank-r reductions (2·out·r·in per
      step) and, on the Function path, W' rebuilt for dX; LoRA: dB, d(Ax) and dA (tokens·r·(2·out + in)) and,
      when the input needs a gradient, the branch's dX (tokens·r·in);
    * attention core: dV = Pᵀ dO if V needs a gradient; dP = dO Vᵀ if Q or K does; then dQ, dK each if needed
      (N²·D each); the patch embedding's weight gradient only in full mode (the image never needs one).
    """
    if mode == "timm-lora":  # HF peft's LoRA on timm's fused qkv layer
        mode, lora_targets = "lora", ("qkv",)
    mode = {"merged": "head", "timm": "full"}.get(mode, mode)  # merged: the plain ViT; timm: full fine-tuning
    base_mode = "rlrr" if mode.startswith("rlrr") else mode
    if base_mode not in ("head", "mlp", "lora", "rlrr", "full"):
        raise ValueError(f"no FLOP model for mode {mode!r}")
    c = config
    n, d, m = 1 + c.num_patches, c.hidden_size, c.mlp_dim
    fwd = dict(forward_macs(c))
    per_step = 0.0  # work done once per step whatever the batch size (RLRR's W' and its gradient sums)
    bwd = 0.0

    # Embedding: patch conv (its weight trains only in full mode), CLS and positions (full), SSF (rlrr).
    stream_grad = base_mode in ("full", "rlrr")  # does the residual stream entering block 0 need a gradient?
    if base_mode == "full":
        bwd += fwd["patch_embed"]  # dW of the conv; never dX (the image)

    def linear(lin: _Linear, input_grad: bool) -> bool:
        """Add this layer's forward extras and backward work; return whether its output needs a gradient."""
        nonlocal bwd, per_step
        t, i, o = lin.tokens, lin.fan_in, lin.fan_out
        if input_grad:
            bwd += t * i * o  # dX = dY W
        if lin.weight_trains or lin.adapter == "rlrr":
            bwd += t * i * o  # dW = dYᵀ X
        if lin.adapter == "rlrr":
            per_step += o * rlrr_rank * i  # W' = W ⊙ (1 + S_out S_in) in forward
            per_step += 2 * o * rlrr_rank * i  # (G ⊙ W) S_inᵀ and S_outᵀ (G ⊙ W)
            if mode != "rlrr-official" and input_grad:
                per_step += o * rlrr_rank * i  # the Function rebuilds W' for dX
        if lin.adapter == "lora":
            r = lora_rank
            fwd["lora"] = fwd.get("lora", 0) + t * r * (i + o)
            bwd += t * r * (2 * o + i)  # dB = dYᵀ (A x), d(Ax) = dY B, dA = d(Ax)ᵀ x
            if input_grad:
                bwd += t * r * i  # the branch's share of dX
        return input_grad or lin.weight_trains or lin.adapter is not None

    def adapter_on(name: str) -> str | None:
        if base_mode == "rlrr" or (base_mode == "lora" and name in lora_targets):
            return base_mode
        return None

    mlp_trains = base_mode in ("mlp", "full")
    attn_trains = base_mode == "full"
    for _ in range(c.num_layers):
        # norm1 (+ SSF in rlrr): its output needs a gradient if the stream does or its SSF trains
        h1 = stream_grad or base_mode in ("rlrr", "full")
        if "qkv" in lora_targets and base_mode == "lora":  # one fused (D → 3D) layer, as in timm
            qkv = dict.fromkeys("qkv", linear(_Linear("qkv", n, d, 3 * d, attn_trains, "lora"), h1))
        else:
            qkv = {name: linear(_Linear(name, n, d, d, attn_trains, adapter_on(name)), h1) for name in "qkv"}
        # attention core: scores S = Q Kᵀ, P = softmax(S), O = P V
        if qkv["v"]:
            bwd += n * n * d  # dV = Pᵀ dO
        if qkv["q"] or qkv["k"]:
            bwd += n * n * d  # dP = dO Vᵀ
            bwd += n * n * d * (int(qkv["q"]) + int(qkv["k"]))  # dQ = dS K, dK = dSᵀ Q
        o_grad = any(qkv.values())
        stream_grad = linear(_Linear("proj", n, d, d, attn_trains, adapter_on("proj")), o_grad) or stream_grad
        h2 = stream_grad or base_mode in ("rlrr", "full")
        a = linear(_Linear("fc1", n, d, m, mlp_trains, adapter_on("fc1")), h2)
        stream_grad = linear(_Linear("fc2", n, m, d, mlp_trains, adapter_on("fc2")), a) or stream_grad

    # final norm (+ SSF), CLS token, optional pre-logits, head (always trains)
    feat_grad = stream_grad or base_mode in ("rlrr", "full")
    rep = c.representation_size
    if rep:
        pre = linear(_Linear("pre_logits", 1, d, rep, base_mode == "full"), feat_grad)
        linear(_Linear("head", 1, rep, c.num_classes, True), pre)
    else:
        linear(_Linear("head", 1, d, c.num_classes, True), feat_grad)

    forward = sum(fwd.values())
    if base_mode == "rlrr":
        forward_step = forward + sum(RLRR_RANK * o * i for o, i in _rlrr_shapes(c)) / batch_size
    else:
        forward_step = forward
    return {"forward": float(forward_step), "train": float(forward + bwd + per_step / batch_size)}


def _rlrr_shapes(c: ViTConfig):
    d, m = c.hidden_size, c.mlp_dim
    return [(d, d)] * (4 * c.num_layers) + [(m, d), (d, m)] * c.num_layers


# ----------------------------------------------------------------------------------------------------------
# One measurement (runs inside a worker process)
# ----------------------------------------------------------------------------------------------------------

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
        raise ImportError("this process already imported the project's peft (run with --isolate)")
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO_ROOT]
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
        lora = hf_peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=["qkv"], modules_to_save=["head"])
        model = hf_peft.get_peft_model(model, lora)
        note += f", HF peft {hf_peft.__version__} LoRA r={LORA_RANK} on qkv"
    return model, note


def build_model(mode: str, config: ViTConfig, device: torch.device):
    """(model for ``mode`` on ``device``, note), or (a string saying why the mode cannot run here, note)."""
    if mode in ("timm", "timm-lora"):
        model, note = _timm_model(mode, config)
        return (model if isinstance(model, str) else model.to(device)), note
    peft = vit.require_project_peft()
    if mode == "rlrr-kernel":
        if device.type != "cuda":
            return "rlrr-kernel needs a CUDA device; skipped", ""
        if not peft.kernel_available():
            return "rlrr-kernel: the CUDA extension could not be built here; skipped", ""
    model = vit.VisionTransformer(config).to(device)
    note = ""
    if mode in ("head", "mlp", "lora", "full"):
        peft.apply_mode(model, mode)
    elif mode in ("rlrr", "rlrr-kernel", "merged"):
        peft.set_backend("cuda" if mode == "rlrr-kernel" else "torch")
        peft.apply_mode(model, "rlrr", rlrr_impl="function")
        note = ("RLRRLinearFunction, fused CUDA kernel" if mode == "rlrr-kernel" else
                "RLRRLinearFunction, PyTorch path (W' rebuilt in backward, not kept)")
        if mode == "merged":
            peft.merge_adapters(model)
            note = "RLRR merged into plain layers (peft.merge_adapters): the plain ViT"
    elif mode == "rlrr-official":
        peft.set_backend("torch")
        peft.apply_mode(model, "rlrr", rlrr_impl="official")
        note = "official formula W*s_in*s_out + W; autograd keeps W' per layer"
    else:
        raise ValueError(f"unknown benchmark mode {mode!r}; choose from {', '.join(MODES)}")
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
    if getattr(sys.modules.get("peft"), "__vit_project__", False):
        sys.modules["peft"].set_backend(None)


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
            vit.require_project_peft().set_backend(self.backend)
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
    macs = train_macs(config, base_mode, batch)
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
    backend = {"rlrr-kernel": "cuda", "rlrr": "torch", "rlrr-official": "torch", "merged": None}.get(base_mode)
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
# ----------------------------------------------------------------------------------------------------------

@dataclass
class BenchmarkOptions:
    model: str = "ViT-B/16"  # model preset (vit.get_config name)
    batch_sizes: list[int] = field(default_factory=list)  # batch sizes (default: 64 256 on CUDA, 8 on CPU)
    device: str = "auto"  # cuda, cpu, or auto (cuda when available)
    modes: list[str] = field(default_factory=lambda: list(MODES))  # which rows to measure
    repeats: int = 5  # timed repetitions per phase (the median is reported)
    warmup: int = 2  # untimed steps before timing each phase
    steps: int = 0  # steps per timed repetition (0: 1 on CPU, 10 on CUDA)
    bf16: bool | None = None  # bfloat16 autocast (default: on for CUDA, off for CPU)
    compile: bool = False  # also measure torch.compile'd twins of --compile-modes
    compile_modes: list[str] = field(default_factory=lambda: ["rlrr-official", "rlrr"])  # modes to compile
    threads: int = 0  # torch CPU threads (0: torch's default)
    cpu_clock: str = "wall"  # CPU timing: wall (perf_counter) or process (CPU time; use with --threads 1)
    isolate: bool = True  # one fresh process per measurement (needed for honest CPU peak memory)
    interleave: bool = False  # time all rows of a batch size round-robin in one process (no memory numbers)
    peak_tflops: float = 0.0  # the device's peak TFLOP/s for the chosen precision, for the "% peak" column
    output_dir: str = "runs/benchmark"  # where benchmark.json and benchmark.png go


def parse_options(argv=None) -> BenchmarkOptions:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("examples:")[1].join(
        ["examples:", ""]), formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchmarkOptions()
    p.add_argument("--model", default=d.model, help=f"model preset (default: {d.model})")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=d.batch_sizes,
                   help="batch sizes (default: 64 256 on CUDA, 8 on CPU)")
    p.add_argument("--device", default=d.device, help="cuda, cpu or auto (default: auto)")
    p.add_argument("--modes", nargs="+", default=d.modes, choices=MODES, metavar="MODE",
                   help=f"rows to measure, from: {', '.join(MODES)} (default: all)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed repetitions, median reported (default: 5)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed warm-up steps per phase (default: 2)")
    p.add_argument("--steps", type=int, default=d.steps, help="steps per repetition (default: 1 CPU, 10 CUDA)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on for CUDA, off for CPU)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows for --compile-modes")
    p.add_argument("--compile-modes", nargs="+", default=d.compile_modes, choices=MODES, metavar="MODE",
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
    a = p.parse_args(argv)
    return BenchmarkOptions(**{f.name: getattr(a, f.name) for f in dataclasses.fields(BenchmarkOptions)})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu)")
    return device


def _run_job(spec: dict, isolate: bool) -> dict:
    if not isolate:
        return run_one(spec)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
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


def plot(results: list[dict], path: Path, title: str) -> None:
    """Grouped bars: inference img/s, training img/s and training peak memory per mode, one colour per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "skipped" not in r and "error" not in r]
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    batches = sorted({r["batch_size"] for r in ok})
    panels = [("infer_img_s", "inference images/s"), ("train_img_s", "training images/s"),
              ("train_peak_mib", "training peak memory (MiB)")]
    fig, axes = plt.subplots(1, 3, figsize=(min(24, 6 + 1.2 * len(modes)), 4.5))
    width = 0.8 / max(1, len(batches))
    for ax, (key, label) in zip(axes, panels):
        for j, b in enumerate(batches):
            vals = [next((r.get(key) or 0 for r in ok if r["mode"] == m and r["batch_size"] == b), 0) for m in modes]
            xs = [i + (j - (len(batches) - 1) / 2) * width for i in range(len(modes))]
            ax.bar(xs, vals, width, label=f"batch {b}")
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(modes, rotation=45, ha="right")
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    if ok:
        axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
        modes += [f"{m}+compile" for m in opts.compile_modes if m in modes and m != "rlrr-kernel"]
    jobs = [dict(mode=m, batch_size=b, model=opts.model, device=str(device), bf16=bf16,
                 compile=m.endswith("+compile"), repeats=opts.repeats, warmup=max(opts.warmup, 2 if
                 m.endswith("+compile") else 0), steps=steps, threads=opts.threads, clock=opts.cpu_clock)
            for b in batch_sizes for m in modes]
    results = []
    if opts.interleave:
        for b in tqdm(batch_sizes, desc="benchmark (interleaved)", unit="batch size"):
            results += run_interleaved([j for j in jobs if j["batch_size"] == b])
    for spec in tqdm([] if opts.interleave else jobs, desc="benchmark", unit="run"):
        results.append(_run_job(spec, opts.isolate))
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
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out / "benchmark.png", f"{opts.model}, {env['precision']}, "
                                         f"{env.get('gpu') or env['cpu']} ({env['torch_threads']} threads)")
    memory_label = "peak MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"\n{opts.model} on {env.get('gpu') or env['cpu']}, {env['precision']}, torch {env['torch']}, "
          f"median of {opts.repeats} x {steps} step(s); 1-min load average {_fmt(load_before, 2)} -> "
          f"{_fmt(_loadavg(), 2)}\n"
          f"memory: {env['memory']}")
    print(format_table(results, opts.peak_tflops, memory_label))
    for mode, note in dict.fromkeys((r["mode"], r["note"]) for r in results if r.get("note")):
        print(f"  {mode}: {note}")
    log.info("wrote %s and %s", out / "benchmark.json", out / "benchmark.png")
    return report


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    run(parse_options(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
