"""The options of one fine-tuning run, with their defaults and the checks that make them fail early.

The project's recipe: AdamW, linear warmup then cosine decay per optimizer step, weight decay on weight matrices
only (never on biases, norm parameters, CLS/positions or adapter/SSF vectors; the official codes decay other
sets, see ``decay_groups``), inputs at mean = std = 0.5, bf16 autocast on GPU. ``--recipe NAME`` takes a method's
official run for VTAB-1k and FGVC instead (``peft.finetune.recipes``). Each field's trailing comment is its
``--help`` text.
"""

from __future__ import annotations

import dataclasses
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

from ..registry import METHODS, METHOD_NAMES, get_method
from .. import fields
from ..fields import option

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
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 64-bit values and the run seeds seed + 1


@dataclass
class FinetuneOptions:
    mode: str = option("rlrr", "what trains: one of the registered methods (peft/registry.py)", choices=METHOD_NAMES)
    weights: str = option("ViT-B_16", "base weights: a .npz path, a known name (downloaded once, cached), or none")
    model: str = option("ViT-B/16", "model preset for --weights none (training from scratch); else the .npz decides")
    data: str = option("cifar10", "cifar10 | cifar100 | fashion_mnist | tiny_imagenet | vtab-1k:TASK | fgvc:NAME | a folder")
    protocol: str = option("final", "benchmarks: final (train800val200 / FGVC trainval, test once at the end) | tune (train800 / train, select on val)", choices=PROTOCOLS)
    recipe: str = option("project", "project, or a method's official run: rlrr-official, ssf-official, lora-noah, adapter-noah, fact-official, vpt-official (see README)", choices=RECIPES)
    data_root: typing.Optional[str] = option(None, "where datasets are cached (default $VIT_PEFT_DATA or ~/.cache)")
    classes: typing.Optional[str] = option(None, "train/test on a class subset: indices or names, e.g. 0-4, 1,3,5 or cat,dog (relabelled 0..k-1 in that order)")
    image_size: typing.Optional[int] = option(None, "input resolution (default: the weights' own, 224 for Google's)", min=1)
    pos_embed_resize: str = option("google", "position-grid resize at another resolution: google (scipy zoom) | bilinear | bicubic", choices=RESIZE_METHODS)
    val_fraction: float = option(0.1, "share of the training set held out for model selection (never the test set)", min=0, below=1)
    test_fraction: float = option(0.1, "a flat image folder or CSV list: share of each class held out as the test split", min=0, below=1)
    workers: typing.Optional[int] = option(None, "processes decoding images into the cache (default: the available cores)", min=1)
    strict_data: bool = option(False, "stop before training if any image cannot be decoded (default: skip it, see skipped.txt)")
    drop_empty_classes: bool = option(False, "leave out class folders without a readable image (default: such a folder is an error)")
    crop_scale: str = option("0.08,1", "photos: area range of the random resized crop, \"min,max\" (timm's default)")
    crop_pct: float = option(0.875, "photos: evaluation resizes the shorter side to image_size / crop_pct, then centre-crops", above=0, max=1)
    store_size: typing.Optional[int] = option(None, "photos: shorter side kept in the decode cache (default image_size / crop_pct)", min=1)
    max_train_samples: typing.Optional[int] = option(None, "use a random subset of the training split (quick runs)", min=1)
    max_eval_samples: typing.Optional[int] = option(None, "cap validation and test sets (quick runs)", min=1)
    epochs: int = option(5, "passes over the training split", min=1)
    schedule: str = option("step-cosine", "step-cosine (per optimizer step) | epoch-cosine (timm's, per epoch) | epoch-restarts | epoch-warmup-cosine (VPT's)", choices=SCHEDULES)
    warmup_epochs: float = option(1.0, "linear warmup length, then cosine decay to --min-lr", min=0)
    warmup_lr: float = option(0.0, "learning rate the warmup starts from (the official recipe: 1e-7)", min=0)
    min_lr: float = option(0.0, "learning rate the cosine ends at (the official recipe: 1e-8)", min=0)
    cooldown_epochs: int = option(0, "epoch schedules: the last epochs held at --min-lr after the cosine (timm's cooldown)", min=0)
    schedule_lag: int = option(0, "epoch schedules: epoch e trains at the schedule's value for e - lag (official RLRR loop: 1)", min=0)
    restart_epochs: int = option(5, "epoch-restarts: period of the cosine warm restarts (T_0), from --lr to --min-lr", min=1)
    optimizer: str = option("adamw", "adamw | sgd (with --momentum)", choices=OPTIMIZERS)
    momentum: float = option(0.9, "sgd momentum", min=0, below=1)
    batch_size: int = option(128, "global batch per optimizer step (split over processes and --grad-accum)", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step (same result, less memory)", min=1)
    drop_last: bool = option(False, "skip each epoch's last partial batch (the NOAH and FacT loaders' drop_last=True)")
    lr: typing.Optional[float] = option(None, "peak learning rate (default: the mode's, peft.registry)", above=0)
    weight_decay: typing.Optional[float] = option(None, "AdamW decay (default 5e-5, the official rate; 0.05 from scratch)", min=0)
    decay_groups: str = option("project", "what decays: project (matrices only) | rlrr (RLRR code) | timm (not 1-D, not bias: SSF, NOAH) | vpt (all but the head bias) | all (every trainable tensor: FacT)", choices=DECAY_GROUPS)
    clip_grad: float = option(1.0, "clip the global gradient norm (0: off)", min=0)
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", min=0, below=1)
    augment: bool = option(True, "augment training images (--crop, --flip)")
    crop: bool = option(True, "with --augment: random crop (photos: random resized crop; small images: after padding by size/8)")
    flip: bool = option(True, "with --augment: random horizontal flip")
    dropout: typing.Optional[float] = option(None, "override the model's dropout rate", min=0, below=1)
    head_init: str = option("zero", "the new head's start: zero (Google's) | trunc-normal (std 0.02, zero bias: NOAH) | linear (nn.Linear's default: FacT)", choices=HEAD_INITS)
    drop_path: float = option(0.0, "residual-branch drop rate of the last block (linear from 0 at the first)", min=0, below=1)
    drop_path_mode: str = option("sample", "sample: stochastic depth | sample-floor: the same drawn as timm 0.4 (FacT's runs) | element: per-element dropout (what the RLRR code does)", choices=DROP_PATH_MODES)
    gelu: str = option("tanh", "MLP activation: tanh (what Google's JAX model computes) | erf (the PyTorch code of the PEFT papers)", choices=GELU_KINDS)
    normalise: str = option("half", "input normalisation: half (mean = std = 0.5, Google's) | imagenet (ImageNet mean/std: NOAH, VPT)", choices=NORMALISATIONS)
    frozen_eval: bool = option(False, "keep the frozen backbone in eval mode while training (no dropout/drop-path in it: VPT)")
    official_test_from: int = option(0, "also test after epochs from this one (1-based, every --official-test-every) and report the maximum as the official code does (0: never)", min=0)
    official_test_every: int = option(1, "with --official-test-from: test every this many epochs (and after the last)", min=1)
    precision: str = option("auto", "auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp16 (with GradScaler) | fp32", choices=PRECISIONS)
    kernel: typing.Optional[str] = option(None, "RLRR path: auto (fused CUDA kernel when it builds) | cuda (the kernel or an error) | torch (default: $VIT_PEFT_KERNEL, else auto)", choices=("auto", "cuda", "torch"))
    compile: bool = option(False, "torch.compile the training forward and backward (the RLRR kernel stays one opaque op)")
    seed: int = option(42, "seeds every random stream (the official recipe uses 42)", min=0, below=SEED_LIMIT, range_text="in [0, 2**63)")
    device: str = option("auto", "auto | cpu | cuda | cuda:1 (under torchrun each process takes GPU LOCAL_RANK)")
    threads: typing.Optional[int] = option(None, "CPU threads for torch (default: torch's choice)", min=1)
    eval_batch_size: int = option(256, "images per forward pass when evaluating (per process)", min=1)
    output_dir: str = option("runs/finetune", "checkpoints, metrics.json, history.csv, plots")
    resume: bool = option(False, "continue from <output-dir>/checkpoint.pt (same options; --epochs may grow)")
    overwrite: bool = option(False, "start afresh in an --output-dir that holds another run (its files are replaced)")
    stop_after_epoch: typing.Optional[int] = option(None, "end the run after this epoch as if interrupted (resumable)", min=0)
    export_npz: typing.Optional[str] = option(None, "at the end, write the merged best model as a Google-layout .npz")
    progress: bool = option(True, "tqdm progress bars")
    log_every: int = option(50, "steps between the host reads of the loop (progress numbers, the non-finite-loss check)", min=1)
    # The chosen method's own options (--lora-rank, --rlrr-init, ...: the flags come from the registry,
    # peft.registry); only options of --mode are allowed, unset ones take the method's published default.
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
    return [fields.flag(k) for k in RESUMABLE if k not in ("resume", "overwrite", "explicit")]


def changed_options(stored: dict, opts: "FinetuneOptions") -> list[tuple[str, typing.Any, typing.Any]]:
    """(flag, stored value, value now) for each option that may not change on resume and differs in the value the
    run uses (a default learning rate counts as its value; options a stored run did not record are not compared)."""
    if not stored:
        return []
    was, now = effective_options(FinetuneOptions.from_dict(stored)), effective_options(opts)
    recorded = set(stored) | (set(was) - {f.name for f in dataclasses.fields(FinetuneOptions)})
    return [(fields.flag(k), was[k], now[k]) for k in now
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
    """Every field against its metadata (:func:`peft.fields.check`: bounds, choices, finite numbers), then the
    rules that relate several options or look outside them; the first problem raises an OptionsError naming it."""
    fields.check(opts, OptionsError)
    if opts.from_scratch and not get_method(opts.mode).saves_everything:
        every = " or ".join(f"--mode {m.name}" for m in METHODS.values() if m.saves_everything)
        raise OptionsError(
            f"--weights none trains from scratch, which needs a mode that trains every parameter ({every}; got "
            f"--mode {opts.mode}): {opts.mode} fine-tunes a small part of a pretrained model, and a random backbone "
            f"has nothing to adapt. Pass --weights PATH|NAME, or {every}.")
    if opts.schedule != "step-cosine" and opts.cooldown_epochs >= opts.epochs:
        raise OptionsError(f"--cooldown-epochs {opts.cooldown_epochs} leaves no epoch of --epochs {opts.epochs} "
                           "for the schedule")
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
    if opts.val_fraction + opts.test_fraction >= 1:
        raise OptionsError(f"--test-fraction must be in [0, 1) and leave images to train with --val-fraction "
                           f"{opts.val_fraction:g}, got {opts.test_fraction}")
    opts.crop_scale_range()
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
