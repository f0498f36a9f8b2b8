"""The options of one fine-tuning run, with their defaults and the checks that make them fail early.

The project's recipe: AdamW, linear warmup then cosine decay per optimizer step, weight decay on weight matrices
only (never on biases, norm parameters, CLS/positions or adapter/SSF vectors; the official codes decay other
sets, see ``decay_groups``), inputs at mean = std = 0.5, bf16 autocast on GPU. ``--recipe NAME`` takes a method's
official run for VTAB-1k and FGVC instead (``peft.finetune.recipes``). Each field's trailing comment is its
``--help`` text.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from loaders.datasets import parse_class_spec
from loaders.datasets.fgvc import FGVC_SETS
from loaders.datasets.vtab import task_info
from loaders.npz import CheckpointError, NpzArchive, infer_config
from vit.config import DROP_PATH_MODES, GELU_KINDS, get_config
from vit.model import RESIZE_METHODS

from ..modes import METHODS, MODES, get_method

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PROTOCOLS = ("final", "tune")
DECAY_GROUPS = ("project", "rlrr", "timm", "vpt", "all")
SCHEDULES = ("step-cosine", "epoch-cosine", "epoch-restarts", "epoch-warmup-cosine")
OPTIMIZERS = ("adamw", "sgd")
NORMALISERS = {"half": (0.5, 0.5), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}  # (mean, std)
NORMALISATIONS = tuple(NORMALISERS)
# "project" plus one official run per method (tables in peft/finetune/recipes.py, which checks this list)
RECIPES = ("project", "rlrr-official", "ssf-official", "lora-noah", "adapter-noah", "fact-official", "vpt-official")
HEAD_INITS = ("zero", "trunc-normal", "linear")
SCRATCH_LR = 1e-3  # training from scratch (--weights none): nothing pretrained to preserve


@dataclass
class FinetuneOptions:
    CHOICES: typing.ClassVar[dict] = {"mode": MODES, "precision": PRECISIONS, "pos_embed_resize": RESIZE_METHODS,
                                      "protocol": PROTOCOLS, "decay_groups": DECAY_GROUPS, "recipe": RECIPES,
                                      "drop_path_mode": DROP_PATH_MODES, "gelu": GELU_KINDS,
                                      "schedule": SCHEDULES, "optimizer": OPTIMIZERS, "normalise": NORMALISATIONS,
                                      "kernel": ("auto", "cuda", "torch"), "head_init": HEAD_INITS}
    mode: str = "rlrr"  # what trains: one of the registered methods (peft/modes.py)
    weights: str = "ViT-B_16"  # base weights: a .npz path, a known name (downloaded once, cached), or none
    model: str = "ViT-B/16"  # model preset for --weights none (training from scratch); else the .npz decides
    data: str = "cifar10"  # cifar10 | cifar100 | fashion_mnist | tiny_imagenet | vtab-1k:TASK | fgvc:NAME | a folder
    protocol: str = "final"  # benchmarks: final (train800val200 / FGVC trainval, test once at the end) | tune (train800 / train, select on val)
    recipe: str = "project"  # project, or a method's official run: rlrr-official, ssf-official, lora-noah, adapter-noah, fact-official, vpt-official (see README)
    data_root: typing.Optional[str] = None  # where datasets are cached (default $VIT_PEFT_DATA or ~/.cache)
    classes: typing.Optional[str] = None  # train/test on a class subset: indices or names, e.g. 0-4, 1,3,5 or cat,dog (relabelled 0..k-1 in that order)
    image_size: typing.Optional[int] = None  # input resolution (default: the weights' own, 224 for Google's)
    pos_embed_resize: str = "google"  # position-grid resize at another resolution: google (scipy zoom) | bilinear | bicubic
    val_fraction: float = 0.1  # share of the training set held out for model selection (never the test set)
    test_fraction: float = 0.1  # a flat image folder or CSV list: share of each class held out as the test split
    workers: typing.Optional[int] = None  # processes decoding images into the cache (default: the available cores)
    strict_data: bool = False  # stop before training if any image cannot be decoded (default: skip it, see skipped.txt)
    drop_empty_classes: bool = False  # leave out class folders without a readable image (default: such a folder is an error)
    crop_scale: str = "0.08,1"  # photos: area range of the random resized crop, "min,max" (timm's default)
    crop_pct: float = 0.875  # photos: evaluation resizes the shorter side to image_size / crop_pct, then centre-crops
    store_size: typing.Optional[int] = None  # photos: shorter side kept in the decode cache (default image_size / crop_pct)
    max_train_samples: typing.Optional[int] = None  # use a random subset of the training split (quick runs)
    max_eval_samples: typing.Optional[int] = None  # cap validation and test sets (quick runs)
    epochs: int = 5  # passes over the training split
    schedule: str = "step-cosine"  # step-cosine (per optimizer step) | epoch-cosine (timm's, per epoch) | epoch-restarts | epoch-warmup-cosine (VPT's)
    warmup_epochs: float = 1.0  # linear warmup length, then cosine decay to --min-lr
    warmup_lr: float = 0.0  # learning rate the warmup starts from (the official recipe: 1e-7)
    min_lr: float = 0.0  # learning rate the cosine ends at (the official recipe: 1e-8)
    cooldown_epochs: int = 0  # epoch schedules: the last epochs held at --min-lr after the cosine (timm's cooldown)
    schedule_lag: int = 0  # epoch schedules: epoch e trains at the schedule's value for e - lag (official RLRR loop: 1)
    restart_epochs: int = 5  # epoch-restarts: period of the cosine warm restarts (T_0), from --lr to --min-lr
    optimizer: str = "adamw"  # adamw | sgd (with --momentum)
    momentum: float = 0.9  # sgd momentum
    batch_size: int = 128  # global batch per optimizer step (split over processes and --grad-accum)
    grad_accum: int = 1  # micro-batches per optimizer step (same result, less memory)
    drop_last: bool = False  # skip each epoch's last partial batch (the NOAH and FacT loaders' drop_last=True)
    lr: typing.Optional[float] = None  # peak learning rate (default: the mode's, peft.modes)
    weight_decay: typing.Optional[float] = None  # AdamW decay (default 5e-5, the official rate; 0.05 from scratch)
    decay_groups: str = "project"  # what decays: project (matrices only) | rlrr (RLRR code) | timm (not 1-D, not bias: SSF, NOAH) | vpt (all but the head bias) | all (every trainable tensor: FacT)
    clip_grad: float = 1.0  # clip the global gradient norm (0: off)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    augment: bool = True  # augment training images (--crop, --flip)
    crop: bool = True  # with --augment: random crop (photos: random resized crop; small images: after padding by size/8)
    flip: bool = True  # with --augment: random horizontal flip
    dropout: typing.Optional[float] = None  # override the model's dropout rate
    head_init: str = "zero"  # the new head's start: zero (Google's) | trunc-normal (std 0.02, zero bias: NOAH) | linear (nn.Linear's default: FacT)
    drop_path: float = 0.0  # residual-branch drop rate of the last block (linear from 0 at the first)
    drop_path_mode: str = "sample"  # sample: stochastic depth | sample-floor: the same drawn as timm 0.4 (FacT's runs) | element: per-element dropout (what the RLRR code does)
    gelu: str = "tanh"  # MLP activation: tanh (what Google's JAX model computes) | erf (the PyTorch code of the PEFT papers)
    normalise: str = "half"  # input normalisation: half (mean = std = 0.5, Google's) | imagenet (ImageNet mean/std: NOAH, VPT)
    frozen_eval: bool = False  # keep the frozen backbone in eval mode while training (no dropout/drop-path in it: VPT)
    official_test_from: int = 0  # also test after epochs from this one (1-based, every --official-test-every) and report the maximum as the official code does (0: never)
    official_test_every: int = 1  # with --official-test-from: test every this many epochs (and after the last)
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp16 (with GradScaler) | fp32
    kernel: typing.Optional[str] = None  # RLRR path: auto (fused CUDA kernel when it builds) | cuda (the kernel or an error) | torch (default: $VIT_PEFT_KERNEL, else auto)
    compile: bool = False  # torch.compile the training forward and backward (the RLRR kernel stays one opaque op)
    seed: int = 42  # seeds every random stream (the official recipe uses 42)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 (under torchrun each process takes GPU LOCAL_RANK)
    threads: typing.Optional[int] = None  # CPU threads for torch (default: torch's choice)
    eval_batch_size: int = 256  # images per forward pass when evaluating (per process)
    output_dir: str = "runs/finetune"  # checkpoints, metrics.json, history.csv, plots
    resume: bool = False  # continue from <output-dir>/checkpoint.pt (same options; --epochs may grow)
    overwrite: bool = False  # start afresh in an --output-dir that holds another run (its files are replaced)
    stop_after_epoch: typing.Optional[int] = None  # end the run after this epoch as if interrupted (resumable)
    export_npz: typing.Optional[str] = None  # at the end, write the merged best model as a Google-layout .npz
    progress: bool = True  # tqdm progress bars
    log_every: int = 50  # steps between the host reads of the loop (progress numbers, the non-finite-loss check)
    # The chosen method's own options (--lora-rank, --rlrr-init, ...: the flags come from the registry,
    # peft.modes); only options of --mode are allowed, unset ones take the method's published default.
    method_options: dict = dataclasses.field(default_factory=dict)
    # Fields given on the command line (filled by the CLI): they win over --recipe. Empty: those differing from
    # the defaults win (the Python API).
    explicit: list = dataclasses.field(default_factory=list)

    def method_config(self):
        """The :class:`peft.base.MethodConfig` of --mode from the method flags (unset ones: the published defaults)."""
        try:
            return get_method(self.mode).config.from_options(self.method_options)
        except (TypeError, ValueError) as e:  # a value the method cannot use: the message names the flag
            raise OptionsError(str(e)) from None

    def crop_scale_range(self) -> tuple[float, float]:
        """--crop-scale as (min, max); "0.3" means (0.3, 1)."""
        parts = [p.strip() for p in str(self.crop_scale).split(",")]
        try:
            lo, hi = (float(parts[0]), 1.0) if len(parts) == 1 else (float(parts[0]), float(parts[1]))
        except (ValueError, IndexError):
            raise OptionsError(f"--crop-scale {self.crop_scale!r}: expected 'min,max', e.g. 0.08,1") from None
        if len(parts) > 2 or not 0 < lo <= hi <= 1:
            raise OptionsError(f"--crop-scale {self.crop_scale!r}: expected 0 < min <= max <= 1, e.g. 0.08,1")
        return lo, hi

    @property
    def from_scratch(self) -> bool:
        return self.weights.lower() == "none"

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return SCRATCH_LR if self.from_scratch else get_method(self.mode).lr

    @classmethod
    def from_dict(cls, stored: dict) -> "FinetuneOptions":
        """Options as stored in a checkpoint or options.json (keys this version does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.05 if self.from_scratch else 5e-5


class OptionsError(ValueError):
    """A command-line option that cannot work; the message names the flag."""


# What --resume lets change: how long to train (the schedule is recomputed for the new length), where and how
# results are shown. Everything else (lr, batch size, schedule, seed, data, mode and its options, ...) alters
# the optimisation, and a resume that changes it is refused, naming the options.
RESUMABLE = ("epochs", "resume", "overwrite", "stop_after_epoch", "export_npz", "progress", "device", "threads",
             "eval_batch_size", "output_dir", "workers", "strict_data", "explicit", "kernel", "compile", "log_every")


def effective_options(opts: "FinetuneOptions") -> dict:
    """The options as the run uses them: a default learning rate or weight decay (None) as its value, and the
    method's options one per flag (``lora_rank``), its defaults filled in, instead of ``method_options``."""
    values = dataclasses.asdict(opts)
    values.update(lr=opts.resolved_lr(), weight_decay=opts.resolved_weight_decay())
    folder = Path(opts.data).expanduser()
    if not folder.is_absolute() and folder.is_dir():  # runs record their folder absolute; older ones as given
        values["data"] = str(folder.resolve())
    values.pop("method_options")
    try:
        values.update(opts.method_config().to_options())
    except OptionsError:  # options this version's method refuses: compared as they were given
        values.update(opts.method_options)
    return values


def resumable_flags() -> list[str]:
    """The flags that may differ on --resume (RESUMABLE less the two that choose resuming and those no flag sets)."""
    return [_flag(k) for k in RESUMABLE if k not in ("resume", "overwrite", "explicit")]


def changed_options(stored: dict, opts: "FinetuneOptions") -> list[tuple[str, typing.Any, typing.Any]]:
    """(flag, stored value, value now) for each option that may not change on resume and differs in the value the
    run uses (a default learning rate counts as its value; options a stored run did not record are not compared)."""
    if not stored:
        return []
    was, now = effective_options(FinetuneOptions.from_dict(stored)), effective_options(opts)
    recorded = set(stored) | (set(was) - {f.name for f in dataclasses.fields(FinetuneOptions)})
    return [(_flag(k), was[k], now[k]) for k in now
            if k not in RESUMABLE and k in recorded and was[k] != now[k]]


def parse_device(name: str | None) -> torch.device:
    """The one reading of every tool's ``--device``: auto/None (a GPU if CUDA is available, else the CPU), cpu,
    cuda, cuda:N; anything else, or CUDA on a machine without it, is an OptionsError naming the flag."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise OptionsError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise OptionsError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionsError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return device


SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 64-bit values and the run seeds seed + 1


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_numbers(opts: FinetuneOptions) -> None:
    """Every float option finite (inf and nan cannot train, nor end a schedule); the seed in the generators' range."""
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionsError(f"{_flag(f.name)} must be a finite number, got {value}")
    for key, value in opts.method_options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionsError(f"{_flag(key)} must be a finite number, got {value}")
    if not 0 <= opts.seed < SEED_LIMIT:
        raise OptionsError(f"--seed must be in [0, 2**63), got {opts.seed}")


def _check_architecture(opts: FinetuneOptions) -> None:
    """--image-size against the patch size, before anything is loaded: the preset's (--weights none) or the one in
    the .npz header (a local file; a known name is checked once it is downloaded)."""
    if not opts.image_size:
        return
    if opts.from_scratch:
        try:
            patch = get_config(opts.model).patch_size
        except KeyError as e:
            raise OptionsError(f"--model {opts.model!r}: {e.args[0]}") from None
        source = f"--model {opts.model}"
    else:
        path = Path(opts.weights).expanduser()
        if not path.is_file():
            return
        try:
            with NpzArchive(path) as archive:
                patch = infer_config(archive, str(path)).patch_size
        except CheckpointError:
            return  # the loader reports a bad file with its own one-line message
        source = f"--weights {path.name}"
    if opts.image_size % patch:
        raise OptionsError(f"--image-size {opts.image_size} is not a multiple of the patch size {patch} of {source}; "
                           f"use e.g. {max(patch, opts.image_size // patch * patch)}")


def check_options(opts: FinetuneOptions) -> None:
    _check_numbers(opts)
    if opts.mode not in MODES:
        raise OptionsError(f"--mode {opts.mode!r}: choose one of {', '.join(MODES)}")
    if opts.from_scratch and not get_method(opts.mode).saves_everything:
        every = " or ".join(f"--mode {m.name}" for m in METHODS.values() if m.saves_everything)
        raise OptionsError(
            f"--weights none trains from scratch, which needs a mode that trains every parameter ({every}; got "
            f"--mode {opts.mode}): {opts.mode} fine-tunes a small part of a pretrained model, and a random backbone "
            f"has nothing to adapt. Pass --weights PATH|NAME, or {every}.")
    for flag, value, low in (("--epochs", opts.epochs, 1), ("--batch-size", opts.batch_size, 1),
                             ("--grad-accum", opts.grad_accum, 1), ("--eval-batch-size", opts.eval_batch_size, 1),
                             ("--max-train-samples", opts.max_train_samples, 1),
                             ("--max-eval-samples", opts.max_eval_samples, 1), ("--image-size", opts.image_size, 1),
                             ("--threads", opts.threads, 1), ("--stop-after-epoch", opts.stop_after_epoch, 0),
                             ("--log-every", opts.log_every, 1)):
        if value is not None and value < low:
            raise OptionsError(f"{flag} must be at least {low}, got {value}")
    for flag, value, lo, hi in (("--warmup-epochs", opts.warmup_epochs, 0, None), ("--lr", opts.lr, 0, None),
                                ("--weight-decay", opts.weight_decay, 0, None), ("--clip-grad", opts.clip_grad, 0, None),
                                ("--label-smoothing", opts.label_smoothing, 0, 1), ("--dropout", opts.dropout, 0, 1)):
        if value is None:
            continue
        if value < lo or (hi is not None and value >= hi) or (flag == "--lr" and value == 0) or value != value:
            bounds = f"in [{lo}, {hi})" if hi is not None else ("positive" if flag == "--lr" else "at least 0")
            raise OptionsError(f"{flag} must be {bounds}, got {value}")
    if not 0 <= opts.drop_path < 1:
        raise OptionsError(f"--drop-path must be in [0, 1), got {opts.drop_path}")
    if opts.warmup_lr < 0 or opts.min_lr < 0:
        raise OptionsError("--warmup-lr and --min-lr must be at least 0")
    for flag, value, low in (("--cooldown-epochs", opts.cooldown_epochs, 0), ("--schedule-lag", opts.schedule_lag, 0),
                             ("--restart-epochs", opts.restart_epochs, 1),
                             ("--official-test-from", opts.official_test_from, 0),
                             ("--official-test-every", opts.official_test_every, 1)):
        if value < low:
            raise OptionsError(f"{flag} must be at least {low}, got {value}")
    if opts.schedule != "step-cosine" and opts.cooldown_epochs >= opts.epochs:
        raise OptionsError(f"--cooldown-epochs {opts.cooldown_epochs} leaves no epoch of --epochs {opts.epochs} "
                           "for the schedule")
    if not 0 <= opts.momentum < 1:
        raise OptionsError(f"--momentum must be in [0, 1), got {opts.momentum}")
    if opts.data.startswith(("vtab-1k:", "fgvc:")):
        try:
            benchmark_task(opts.data)
        except ValueError as e:  # DataNotFoundError: unknown task
            raise OptionsError(f"--data {opts.data}: {e}") from None
        if opts.classes:
            raise OptionsError("--classes does not apply to vtab-1k/fgvc tasks (they are used whole)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and opts.device not in ("auto", "cpu", "cuda"):
        raise OptionsError(f"--device {opts.device}: under torchrun each process takes the GPU of its LOCAL_RANK "
                           "(one GPU per process); use --device cuda or auto, and CUDA_VISIBLE_DEVICES to choose GPUs")
    parse_device(opts.device)
    if opts.kernel == "cuda" and (opts.device == "cpu" or not torch.cuda.is_available()):
        raise OptionsError("--kernel cuda runs the fused RLRR kernel, which needs a CUDA device; use --kernel auto "
                           "or torch here")
    if opts.classes:
        try:
            parse_class_spec(opts.classes, None)  # the syntax: the data names its own classes
        except ValueError as e:
            raise OptionsError(f"--classes {opts.classes!r}: {str(e).split(': ', 1)[-1]}") from None
    if opts.export_npz and not opts.from_scratch and Path(opts.export_npz).expanduser().resolve() == \
            Path(opts.weights).expanduser().resolve():
        raise OptionsError(f"--export-npz {opts.export_npz} is the --weights file: it would overwrite the base "
                           "weights; choose another path")
    method = get_method(opts.mode)
    if opts.export_npz and not method.mergeable:  # refused before training, not after it
        why = next(w.CANNOT_MERGE for w in method.wrappers if w.CANNOT_MERGE is not None)
        raise OptionsError(f"--export-npz writes a merged plain ViT, but --mode {opts.mode} cannot be merged: {why} "
                           "(the run folder's checkpoints hold it)")
    if opts.batch_size % opts.grad_accum:
        raise OptionsError(f"--batch-size {opts.batch_size} is not divisible by --grad-accum {opts.grad_accum}")
    if not 0 <= opts.val_fraction < 1:
        raise OptionsError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    if not 0 <= opts.test_fraction < 1 or opts.val_fraction + opts.test_fraction >= 1:
        raise OptionsError(f"--test-fraction must be in [0, 1) and leave images to train with --val-fraction "
                           f"{opts.val_fraction:g}, got {opts.test_fraction}")
    opts.crop_scale_range()
    if not 0 < opts.crop_pct <= 1:
        raise OptionsError(f"--crop-pct must be in (0, 1], got {opts.crop_pct}")
    for flag, value in (("--workers", opts.workers), ("--store-size", opts.store_size)):
        if value is not None and value < 1:
            raise OptionsError(f"{flag} must be at least 1, got {value}")
    if opts.precision not in PRECISIONS:
        raise OptionsError(f"--precision {opts.precision!r}: choose one of {', '.join(PRECISIONS)}")
    _check_architecture(opts)
    method = get_method(opts.mode)
    foreign = sorted(set(opts.method_options) - set(method.options))
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise OptionsError(f"{flags} do(es) not apply to --mode {opts.mode}; its options are "
                           f"{', '.join(o.flag for o in method.options.values()) or 'none'}")
    opts.method_config()


def benchmark_task(data: str):
    """The :class:`loaders.datasets.vtab.Task` of ``vtab-1k:TASK`` / ``fgvc:NAME`` (None for other data)."""
    kind, _, name = data.partition(":")
    if kind == "vtab-1k":
        return task_info(name)
    if kind == "fgvc":
        if name not in FGVC_SETS:
            raise OptionsError(f"--data fgvc:{name}: the FGVC sets are {', '.join(FGVC_SETS)}")
        return FGVC_SETS[name].task
    return None
