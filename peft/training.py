"""The fine-tuning engine behind ``tools/finetune.py``: options, data, model, optimiser, loop, checkpoints.

Recipe (after the RLRR paper's official VTAB code, Dong et al., CVPR 2024): AdamW, linear warmup then cosine
decay per optimizer step, no weight decay on biases, norm parameters and adapter/SSF vectors, inputs at
mean = std = 0.5, bf16 autocast on GPU. Data sits in memory as uint8 and is resized and augmented on the
training device in batches (``loaders.transforms.BatchTransform``), so there are no loader worker processes.

Reproducibility: every random stream (Python, numpy, torch, CUDA, the data-order generator and the
augmentation generator) is seeded from ``--seed`` and saved in each checkpoint; an interrupted run resumed
with ``--resume`` continues to the same result. Data parallelism (torchrun) splits each global batch into
contiguous per-rank slices, so N processes run the same optimisation as one (see ``peft.distributed``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import logging
import math
import random
import re
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt_io
from . import distributed as pdist
from . import evaluation

log = logging.getLogger(__name__)

MODES = ("head", "mlp", "lora", "rlrr", "full")

# Default learning rates for AdamW at the default global batch of 128 (ViT-B/16, i21k weights):
# - head 1e-3: a zero-initialised linear classifier on frozen features. Adam moves each of the D=768 weights by
#   about lr per step, so logits can move by up to ~lr·D ≈ 0.8 per step (1e-2: ~8, too much for a start).
# - mlp 1e-4: fc1/fc2 of every block plus the head (peft.modes): two thirds of the backbone's weights move, so
#   this behaves like full fine-tuning and takes its rate.
# - lora 1e-3: the usual LoRA rate for ViTs with AdamW (B starts at zero, so the start is the base model).
# - rlrr 3e-3: the official RLRR VTAB-1k learning rate for CIFAR-100 (at batch 32; scale vectors need larger
#   steps than weights, and the larger batch here only makes each step less noisy).
# - full 1e-4: every weight moves; larger rates destroy the pretrained features (Google fine-tunes with
#   small steps too). Training from scratch (--weights none) defaults to 1e-3 instead: nothing to preserve.
DEFAULT_LR = {"head": 1e-3, "mlp": 1e-4, "lora": 1e-3, "rlrr": 3e-3, "full": 1e-4}
SCRATCH_LR = 1e-3


@dataclass
class FinetuneOptions:
    CHOICES: typing.ClassVar[dict] = {"mode": MODES, "precision": ("auto", "bf16", "fp16", "fp32"),
                                      "rlrr_init": ("official", "identity")}
    mode: str = "rlrr"  # what trains: head | mlp | lora | rlrr | full
    weights: str = "ViT-B_16"  # base weights: a .npz path, a known name (downloaded once, cached), or none
    model: str = "ViT-B/16"  # model preset for --weights none (training from scratch); else the .npz decides
    data: str = "cifar10"  # cifar10 | cifar100 | fashion_mnist | tiny_imagenet | an image folder (class/x.png)
    data_root: typing.Optional[str] = None  # where datasets are cached (default $VIT_PEFT_DATA or ~/.cache)
    classes: typing.Optional[str] = None  # train/test on a class subset, e.g. 0-4 or 1,3,5 (relabelled 0..k-1)
    image_size: typing.Optional[int] = None  # input resolution (default: the weights' own, 224 for Google's)
    val_fraction: float = 0.1  # share of the training set held out for model selection (never the test set)
    max_train_samples: typing.Optional[int] = None  # use a random subset of the training split (quick runs)
    max_eval_samples: typing.Optional[int] = None  # cap validation and test sets (quick runs)
    epochs: int = 5  # passes over the training split
    warmup_epochs: float = 1.0  # linear warmup length, then cosine decay to zero
    batch_size: int = 128  # global batch per optimizer step (split over processes and --grad-accum)
    grad_accum: int = 1  # micro-batches per optimizer step (same result, less memory)
    lr: typing.Optional[float] = None  # peak learning rate (default per mode, see DEFAULT_LR)
    weight_decay: typing.Optional[float] = None  # AdamW decay on matrices (default 5e-5, official; 0.05 scratch)
    clip_grad: float = 1.0  # clip the global gradient norm (0: off)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    augment: bool = True  # random crop (reflect padding) and horizontal flip of training images
    dropout: typing.Optional[float] = None  # override the model's dropout rate (the official RLRR recipe: 0.1)
    lora_rank: int = 8  # LoRA rank r
    lora_alpha: float = 8.0  # LoRA scale alpha (update scaled by alpha / r)
    lora_targets: str = "q,v"  # comma-separated Linear names that get LoRA (q,k,v,proj,fc1,fc2)
    lora_dropout: float = 0.0  # dropout on the LoRA branch input
    rlrr_rank: int = 1  # RLRR rescaling rank (the official ViT code uses 1)
    rlrr_init: str = "official"  # RLRR init: official (kaiming, not the base model at step 0) | identity
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp16 (with GradScaler) | fp32
    seed: int = 42  # seeds every random stream (the official recipe uses 42)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 (under torchrun each process takes GPU LOCAL_RANK)
    workers: int = 0  # accepted for compatibility only: data is in memory and transforms run on the device
    threads: typing.Optional[int] = None  # CPU threads for torch (default: torch's choice)
    eval_batch_size: int = 256  # images per forward pass when evaluating (per process)
    output_dir: str = "runs/finetune"  # checkpoints, metrics.json, history.csv, plots
    resume: bool = False  # continue from <output-dir>/checkpoint.pt (same options)
    stop_after_epoch: typing.Optional[int] = None  # end the run after this epoch as if interrupted (resumable)
    export_npz: typing.Optional[str] = None  # at the end, write the merged best model as a Google-layout .npz
    progress: bool = True  # tqdm progress bars

    def mode_options(self) -> dict:
        """Keyword arguments for peft.apply_mode (only those that matter for the mode)."""
        if self.mode == "lora":
            return {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha,
                    "lora_targets": tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()),
                    "lora_dropout": self.lora_dropout}
        if self.mode == "rlrr":
            return {"rlrr_rank": self.rlrr_rank, "rlrr_init": self.rlrr_init}
        return {}

    @property
    def from_scratch(self) -> bool:
        return self.weights.lower() == "none"

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return SCRATCH_LR if self.from_scratch else DEFAULT_LR[self.mode]

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.05 if self.from_scratch else 5e-5


class OptionsError(ValueError):
    """A command-line option that cannot work; the message names the flag."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says all (missing files, failed downloads, mismatched checkpoints)."""
    from loaders.datasets import DatasetError
    from loaders.download import DownloadError
    from loaders.npz import CheckpointError

    return (TrainingDiverged, ckpt_io.CheckpointMismatch, CheckpointError, DatasetError, DownloadError,
            FileNotFoundError)


EXPECTED_ERRORS = _expected_errors()


def check_options(opts: FinetuneOptions) -> None:
    if opts.mode not in MODES:
        raise OptionsError(f"--mode {opts.mode!r}: choose one of {', '.join(MODES)}")
    if opts.from_scratch and opts.mode != "full":
        raise OptionsError(
            f"--weights none trains from scratch, which needs --mode full (got --mode {opts.mode}): "
            f"{opts.mode} fine-tunes a small part of a pretrained model, and a random backbone has nothing "
            "to adapt. Pass --weights PATH|NAME, or --mode full.")
    for flag, value, low in (("--epochs", opts.epochs, 1), ("--batch-size", opts.batch_size, 1),
                             ("--grad-accum", opts.grad_accum, 1), ("--eval-batch-size", opts.eval_batch_size, 1)):
        if value < low:
            raise OptionsError(f"{flag} must be at least {low}, got {value}")
    if opts.batch_size % opts.grad_accum:
        raise OptionsError(f"--batch-size {opts.batch_size} is not divisible by --grad-accum {opts.grad_accum}")
    if not 0 <= opts.val_fraction < 1:
        raise OptionsError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise OptionsError(f"--precision {opts.precision!r}: choose auto, bf16, fp16 or fp32")


# ------------------------------------------------------------------------------------ options → argparse

def _field_comments(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field line in the dataclass source: one place for the help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s+(\w+):[^#]*#\s*(.*)$")
    return {m.group(1): m.group(2) for m in map(pattern.match, source.splitlines()) if m}


def build_parser(cls=FinetuneOptions, description: str | None = None, epilog: str | None = None,
                 positional: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag-name`` per dataclass field, default and help from the class."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    helps = _field_comments(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
        if optional:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        help_text = helps.get(f.name, "") + ("" if f.default is None else " (default: %(default)s)")
        choices = getattr(cls, "CHOICES", {}).get(f.name)
        if f.name in positional:
            parser.add_argument(f.name, type=kind, help=help_text)
        elif kind is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, choices=choices,
                                metavar=None if choices else f.name.upper(), help=help_text)
    return parser


def parse_options(argv=None, cls=FinetuneOptions, **parser_kw):
    parser = build_parser(cls, **parser_kw)
    return cls(**vars(parser.parse_args(argv)))


# ------------------------------------------------------------------------------------------------ setup

def setup_logging(ctx: pdist.DistContext | None = None, level=logging.INFO) -> None:
    """Messages from the main process only (others log warnings and errors)."""
    main = ctx is None or ctx.is_main
    logging.basicConfig(level=level if main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


@dataclass
class Data:
    train_images: torch.Tensor  # uint8 (N, H, W, C) on the training device
    train_labels: torch.Tensor  # int64 (N,) on the training device
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    name: str


def _subset(ds, n: int | None, seed: int):
    """A seeded random subset of n items (all of them when n is None or larger)."""
    if n is None or n >= len(ds.labels):
        return ds
    g = torch.Generator().manual_seed(seed)
    return ds.subset(torch.randperm(len(ds.labels), generator=g)[:n].sort().values)


def prepare_data(opts: FinetuneOptions, ctx: pdist.DistContext) -> Data:
    """Train/val/test splits as uint8 tensors on the device; the validation split is held out from train."""
    from loaders.datasets import load_dataset, select_classes, split_train_val

    def load(split):
        ds = load_dataset(opts.data, root=opts.data_root, split=split)
        return select_classes(ds, opts.classes) if opts.classes else ds

    if ctx.is_main:  # the main process downloads; the others wait, then read the cache
        train = load("train")
    pdist.barrier(ctx)
    if not ctx.is_main:
        train = load("train")
    test = load("test")
    if opts.val_fraction > 0:
        train, val = split_train_val(train, opts.val_fraction, opts.seed)
    else:
        log.warning("--val-fraction 0: no validation split, the last epoch is kept (test set never selects)")
        val = train.subset(torch.zeros(0, dtype=torch.int64))
    train = _subset(train, opts.max_train_samples, opts.seed)
    val = _subset(val, opts.max_eval_samples, opts.seed + 1)
    test = _subset(test, opts.max_eval_samples, opts.seed + 2)
    log.info("data %s%s: %d train, %d val, %d test images, %d classes, %s pixels", opts.data,
             f" classes {opts.classes}" if opts.classes else "", len(train.labels), len(val.labels),
             len(test.labels), len(train.classes), "x".join(map(str, train.images.shape[1:])))
    dev = ctx.device
    return Data(train.images.to(dev), train.labels.to(dev), val.images.to(dev), val.labels.to(dev),
                test.images.to(dev), test.labels.to(dev), list(train.classes), train.name)


def resolve_weights(spec: str) -> tuple[Path, str]:
    """``--weights`` → (local .npz path, name): an existing file as is, else a known name fetched and cached."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path, path.name
    from loaders.weights import KNOWN_WEIGHTS, fetch_weights

    if spec in KNOWN_WEIGHTS:
        return Path(fetch_weights(spec)), spec
    raise OptionsError(f"--weights {spec!r} is neither an existing .npz file nor a known name "
                       f"({', '.join(KNOWN_WEIGHTS)}), nor 'none'")


def build_model(opts: FinetuneOptions, num_classes: int, weights: tuple[Path, str] | None = None):
    """The model before adapters and a record of its base weights (None when training from scratch).

    ``weights``: an already resolved (path, name) for ``opts.weights``.
    """
    import vit

    if opts.from_scratch:
        overrides = {"num_classes": num_classes}
        if opts.image_size:
            overrides["image_size"] = opts.image_size
        if opts.dropout is not None:
            overrides.update(dropout_rate=opts.dropout)
        model = vit.VisionTransformer(vit.get_config(opts.model, **overrides))
        return model, None
    import loaders
    from loaders.download import file_digest

    path, name = weights or resolve_weights(opts.weights)
    model = loaders.load_npz(path, num_classes=num_classes, image_size=opts.image_size)
    if opts.dropout is not None:
        set_dropout(model, opts.dropout)
    base = {"name": name, "path": str(path.resolve()), "sha256": file_digest(path, "sha256")}
    return model, base


def set_dropout(model, rate: float) -> None:
    """Change every dropout rate (a fresh config records it too); attention-probability dropout is left as is."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout) and not name.endswith("attn_drop"):
            m.p = rate
    model.config = model.config.replace(dropout_rate=rate)


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norm parameters, RLRR/SSF scale and shift vectors, CLS and position embeddings: no weight decay.

    RLRR's s_out, s_in, f and SSF's scale, shift are excluded by name (at rank > 1 the RLRR factors are
    matrices, still rescaling vectors in spirit); otherwise a tensor with at most one dimension larger than 1
    is a vector. LoRA factors stay decayed even at rank 1 because they are weight matrices.
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("s_out", "s_in", "f") or ".ssf." in name or name in ("cls_token", "pos_embed"):
        return True
    if "lora" in name.lower():
        return False
    return sum(d > 1 for d in p.shape) <= 1 or leaf == "bias" or ".norm" in name or name.startswith("norm")


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (other if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier per optimizer step: linear warmup from 1/warmup to 1, then cosine to zero at the end."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def compute_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum (not mean) of per-sample cross-entropies: the caller divides by the global batch size."""
    return F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)


def trainable_state(model, mode_is_full: bool) -> dict:
    peft = _peft()
    if mode_is_full:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return peft.adapter_state_dict(model)


def load_trainable_state(model, state: dict, mode_is_full: bool, source: str) -> None:
    if mode_is_full:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ckpt_io.CheckpointMismatch(f"{source}: missing keys {missing}, unexpected keys {unexpected}")
    else:
        _peft().load_adapter_state_dict(model, state)


def _peft():
    import vit

    return vit.require_project_peft()


# ------------------------------------------------------------------------------------------------ the run

class Trainer:
    """One fine-tuning run. ``Trainer(opts).run()`` is what ``tools/finetune.py`` does."""

    def __init__(self, opts: FinetuneOptions, ctx: pdist.DistContext | None = None):
        check_options(opts)
        self.opts = opts
        self.ctx = ctx or pdist.init_distributed(opts.device)
        self.out = Path(opts.output_dir)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        if opts.workers:
            log.info("--workers %d ignored: data is in memory and transforms run on the device", opts.workers)

    # -- building ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from loaders.transforms import BatchTransform

        opts, ctx = self.opts, self.ctx
        peft = _peft()
        seed_everything(opts.seed)
        # Weights first: a missing download should fail before minutes of data loading.
        weights = None if opts.from_scratch else resolve_weights(opts.weights)
        self.data = prepare_data(opts, ctx)
        k = len(self.data.classes)
        self.model, self.base_weights = build_model(opts, k, weights)
        seed_everything(opts.seed)  # adapters initialise identically whatever the data loading consumed
        self.mode_options = opts.mode_options()
        self.full = opts.mode == "full"
        changed = peft.apply_mode(self.model, opts.mode, **self.mode_options)
        log.info("mode %s%s: %d modules given adapters", opts.mode,
                 f" {self.mode_options}" if self.mode_options else "", len(changed))
        self.model.to(ctx.device)
        self.trainable, self.total = peft.trainable_parameters(self.model)
        log.info("trainable parameters: %s of %s (%.3f%%)", f"{self.trainable:,}", f"{self.total:,}",
                 100 * self.trainable / self.total)
        image_size = self.model.config.image_size
        self.train_tf = BatchTransform(image_size, train=opts.augment)
        self.eval_tf = BatchTransform(image_size, train=False)

        self.lr = opts.resolved_lr()
        self.optimizer = torch.optim.AdamW(param_groups(self.model, opts.resolved_weight_decay()), lr=self.lr,
                                           betas=(0.9, 0.999))
        self.steps_per_epoch = math.ceil(len(self.data.train_labels) / opts.batch_size)
        self.total_steps = opts.epochs * self.steps_per_epoch
        warmup = min(self.total_steps, round(opts.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(warmup, self.total_steps))
        self.amp_dtype = autocast_dtype(opts.precision, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype == torch.float16)
        self.generators = {
            "data_order": torch.Generator().manual_seed(opts.seed),
            "augment": torch.Generator(device=ctx.device).manual_seed(opts.seed + 1),
        }
        self.epoch, self.step, self.best_val, self.history = 0, 0, -1.0, []
        self.train_seconds, self.train_images = 0.0, 0
        if opts.resume:
            self.resume()
        self.ddp = self.model
        if ctx.distributed:
            # Frozen parameters are not part of DDP's reducer; every trainable one is used in each forward.
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                find_unused_parameters=False)

    def plain_mode_options(self) -> dict:
        """Mode options as plain types (tuples become lists), as stored in checkpoints."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.mode_options.items()}

    def checkpoint_dict(self, with_training_state: bool) -> dict:
        opts = self.opts
        d = {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
            "model_config": ckpt_io.config_dict(self.model.config),
            "mode": opts.mode, "mode_options": self.plain_mode_options(),
            "base_weights": self.base_weights,
            "state_dict_kind": "full" if self.full else "adapters",
            "state_dict": trainable_state(self.model, self.full),
            "classes": self.data.classes, "data": opts.data,
            "options": dataclasses.asdict(opts),
            "epoch": self.epoch, "step": self.step, "best_val_accuracy": self.best_val,
            "history": self.history, "trainable_parameters": self.trainable, "total_parameters": self.total,
        }
        if with_training_state:
            d["training_state"] = {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": ckpt_io.capture_rng(self.generators),
                "train_seconds": self.train_seconds, "train_images": self.train_images,
            }
        return d

    def resume(self) -> None:
        path = self.out / ckpt_io.LATEST
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path} (check --output-dir)")
        ck = ckpt_io.load_checkpoint(path)
        for key, now in (("mode", self.opts.mode), ("mode_options", self.plain_mode_options()),
                         ("model_config", ckpt_io.config_dict(self.model.config))):
            if ck[key] != now:
                raise ckpt_io.CheckpointMismatch(f"--resume: {path} has {key} {ck[key]}, this run has {now}")
        if (ck["base_weights"] or {}).get("sha256") != (self.base_weights or {}).get("sha256"):
            raise ckpt_io.CheckpointMismatch(f"--resume: {path} was trained from other base weights "
                                             f"({ck['base_weights']}) than {self.base_weights}")
        load_trainable_state(self.model, ck["state_dict"], self.full, str(path))
        ts = ck["training_state"]
        self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        self.scaler.load_state_dict(ts["scaler"])
        ckpt_io.restore_rng(ts["rng"], self.generators)
        self.epoch, self.step, self.best_val = ck["epoch"], ck["step"], ck["best_val_accuracy"]
        self.history = ck["history"]
        self.train_seconds, self.train_images = ts["train_seconds"], ts["train_images"]
        log.info("resumed from %s: epoch %d, step %d, best val accuracy %.4f", path, self.epoch, self.step,
                 self.best_val)

    # -- training ------------------------------------------------------------------------------------------
    def train_epoch(self) -> dict:
        """One pass over the training split; returns mean loss and accuracy over the epoch (all ranks)."""
        from tqdm.auto import tqdm

        opts, ctx, d = self.opts, self.ctx, self.data
        self.ddp.train()
        n = len(d.train_labels)
        order = torch.randperm(n, generator=self.generators["data_order"]).to(ctx.device)
        totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, count
        bar = tqdm(total=n, desc=f"epoch {self.epoch + 1}/{opts.epochs}", unit="img", leave=False,
                   disable=not (ctx.is_main and opts.progress), dynamic_ncols=True)
        start = time.perf_counter()
        for first in range(0, n, opts.batch_size):
            batch = order[first:first + opts.batch_size]
            n_global = batch.numel()
            stats = torch.zeros(3, dtype=torch.float64, device=ctx.device)
            # Every rank augments the whole global batch with the shared generator, keeps its contiguous slice
            # and splits that into --grad-accum micro-batches: whatever the number of processes and
            # micro-batches, the union is exactly the batch one process would see, random crops included.
            images = pdist.rank_slice(self.train_tf(d.train_images[batch], generator=self.generators["augment"]),
                                      ctx)
            labels = pdist.rank_slice(d.train_labels[batch], ctx)
            chunks = list(zip(images.tensor_split(opts.grad_accum), labels.tensor_split(opts.grad_accum)))
            for i, (x, y) in enumerate(chunks):
                sync = i == len(chunks) - 1 or not ctx.distributed
                with contextlib.nullcontext() if sync else self.ddp.no_sync():
                    with torch.autocast(ctx.device.type, dtype=self.amp_dtype or torch.float32,
                                        enabled=self.amp_dtype is not None):
                        logits = self.ddp(x)
                    loss_sum = compute_loss(logits, y, opts.label_smoothing)
                    # DDP averages over ranks; × world / n_global makes that the mean over the global batch.
                    self.scaler.scale(loss_sum * (ctx.world_size / n_global)).backward()
                stats += torch.stack([loss_sum.detach().double(), (logits.argmax(-1) == y).sum().double(),
                                      torch.tensor(y.numel(), dtype=torch.float64, device=ctx.device)])
            pdist.all_reduce_sum(stats, ctx)
            if not torch.isfinite(stats[0]):
                self.optimizer.zero_grad(set_to_none=True)
                bar.close()
                raise TrainingDiverged(
                    f"loss is {stats[0].item()} at epoch {self.epoch + 1}, step {self.step + 1}: training "
                    f"stopped. The last good checkpoint (end of epoch {self.epoch}) is "
                    f"{self.out / ckpt_io.LATEST}. Try a lower --lr (now {self.lr:g}), --precision fp32, or "
                    f"--clip-grad.")
            self.scaler.unscale_(self.optimizer)
            if opts.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               opts.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.step += 1
            totals += stats
            elapsed = time.perf_counter() - start
            bar.update(n_global)
            bar.set_postfix(loss=f"{stats[0].item() / n_global:.4f}", acc=f"{totals[1].item() / totals[2].item():.3f}",
                            lr=f"{lr:.2e}", img_s=f"{bar.n / max(elapsed, 1e-9):.1f}")
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        bar.close()
        self.train_seconds += seconds
        self.train_images += n
        return {"train_loss": totals[0].item() / n, "train_accuracy": totals[1].item() / n,
                "train_seconds": seconds, "train_images_per_second": n / seconds}

    def evaluate(self, images, labels, desc=None) -> tuple[torch.Tensor, dict]:
        probs = evaluation.predict(self.model, images, self.eval_tf, self.opts.eval_batch_size, self.ctx,
                                   self.amp_dtype, desc=desc if self.opts.progress else None)
        labels = labels.cpu()
        if labels.numel() == 0:
            return probs, {"loss": float("nan"), "accuracy": float("nan")}
        nll = -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()
        acc = (probs.argmax(-1) == labels).double().mean().item()
        return probs, {"loss": nll, "accuracy": acc}

    def save(self, name: str, with_training_state: bool) -> None:
        if self.ctx.is_main:
            ckpt_io.save_atomic(self.checkpoint_dict(with_training_state), self.out / name)

    def run(self) -> dict:
        """Train, select on validation, test the selected model, write every report; returns metrics."""
        opts, ctx = self.opts, self.ctx
        t0 = time.perf_counter()
        self.setup()
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "options.json").write_text(json.dumps(dataclasses.asdict(opts), indent=2) + "\n")
        has_val = len(self.data.val_labels) > 0
        while self.epoch < opts.epochs:
            if opts.stop_after_epoch is not None and self.epoch >= opts.stop_after_epoch:
                log.info("stopping after epoch %d (--stop-after-epoch); continue with --resume", self.epoch)
                return {"stopped_after_epoch": self.epoch}
            row = {"epoch": self.epoch + 1}
            row.update(self.train_epoch())
            self.epoch += 1
            row["step"] = self.step
            _, val = self.evaluate(self.data.val_images, self.data.val_labels)
            row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], lr=self.scheduler.get_last_lr()[0])
            self.history.append(row)
            log.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f img/s", self.epoch,
                     opts.epochs, row["train_loss"], row["train_accuracy"], val["loss"], val["accuracy"],
                     row["train_images_per_second"])
            improved = (val["accuracy"] > self.best_val) if has_val else True
            if improved:
                self.best_val = val["accuracy"] if has_val else float("nan")
                self.save(ckpt_io.BEST, with_training_state=False)
            self.save(ckpt_io.LATEST, with_training_state=True)
            pdist.barrier(ctx)
        return self.finish(time.perf_counter() - t0)

    def finish(self, seconds: float) -> dict:
        """Load the best-on-validation model, evaluate it on the test split, write reports and the .npz."""
        opts, ctx = self.opts, self.ctx
        best = ckpt_io.load_checkpoint(self.out / ckpt_io.BEST)
        load_trainable_state(self.model, best["state_dict"], self.full, str(self.out / ckpt_io.BEST))
        probs, test = self.evaluate(self.data.test_images, self.data.test_labels, desc="test")
        metrics = {
            "mode": opts.mode, "mode_options": self.plain_mode_options(),
            "data": opts.data, "classes": opts.classes, "weights": opts.weights,
            "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "val_accuracy": best["best_val_accuracy"], "best_epoch": best["epoch"],
            "trainable_parameters": self.trainable, "total_parameters": self.total,
            "epochs": self.epoch, "steps": self.step, "batch_size": opts.batch_size, "lr": self.lr,
            "weight_decay": opts.resolved_weight_decay(), "world_size": ctx.world_size,
            "images_per_second": self.train_images / max(self.train_seconds, 1e-9),
            "train_seconds": self.train_seconds, "time_seconds": seconds,
            "num_train": len(self.data.train_labels), "num_val": len(self.data.val_labels),
            "num_test": len(self.data.test_labels), "device": str(ctx.device),
        }
        if ctx.is_main:
            summary = evaluation.write_evaluation_report(self.out, probs.numpy(), self.data.test_labels.cpu().numpy(),
                                                         self.data.classes, self.history, prefix="test")
            metrics.update(test_macro_f1=summary["macro_f1"], test_mean_auc=summary["mean_auc"])
            evaluation.write_json(metrics, self.out / "metrics.json")
            if opts.export_npz:
                export_npz(self.model, opts.export_npz)
            log.info("test accuracy %.4f (best val %.4f at epoch %d); reports in %s", test["accuracy"],
                     best["best_val_accuracy"], best["epoch"], self.out)
        pdist.barrier(ctx)
        return metrics


def export_npz(model, path) -> Path:
    """Merge the adapters into a copy of the model and save it in Google's .npz layout."""
    import loaders

    merged = copy.deepcopy(model).cpu().float()
    _peft().merge_adapters(merged)  # in place: plain nn.Linear / LayerNorm / Conv2d with the original names
    path = loaders.save_npz(merged, path)
    log.info("exported the merged model to %s", path)
    return Path(path)


def run(opts: FinetuneOptions, ctx: pdist.DistContext | None = None) -> dict:
    """``tools/finetune.py`` as a function: one complete run (also under torchrun)."""
    ctx = ctx or pdist.init_distributed(opts.device)
    setup_logging(ctx)
    try:
        return Trainer(opts, ctx).run()
    finally:
        pdist.cleanup(ctx)
