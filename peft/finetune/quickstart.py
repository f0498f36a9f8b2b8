"""Offline quick start: pretrain a small ViT from scratch, then fine-tune it with every mode, on a laptop CPU.

1. Pretrain "ViT-Mini/4" (28 px, patch 4, D=96, 4 blocks) from scratch on Fashion-MNIST classes 0-4
   (T-shirt, trouser, pullover, dress, coat) and export it in Google's .npz layout: pretrained.npz.
2. Fine-tune that .npz on the five *other* classes (5-9: sandal, shirt, sneaker, bag, ankle boot) with each
   registered mode, a fresh head every time.
3. A table of test accuracy, trainable parameters and training time per mode, saved as results.md/.json.

Everything runs in this process through the engine of tools/finetune.py. Needs only the Fashion-MNIST files
(Debian package dataset-fashion-mnist, or downloaded once into the data cache).

Running the same command again continues where it stopped (Ctrl-C, kill -9, a crash): the pretraining and each
mode resume from their last epoch's checkpoint, finished modes are kept as they are, and a run whose settings or
base weights no longer match is run again from the start. The table holds every mode of the folder finished with
these settings on this pretrained.npz: ``--modes bitfit`` adds or replaces that row and keeps the others.
``--overwrite`` starts everything over.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from loaders.atomic import atomic_write
from loaders.download import file_digest

from .. import fields
from ..fields import option
from ..registry import METHOD_NAMES, get_method
from . import checkpoint as ckpt_io
from .options import FinetuneOptions, OptionsError, changed_options
from .trainer import run

log = logging.getLogger(__name__)


@dataclass
class QuickstartOptions:
    output_dir: str = option("runs/quickstart", "everything goes here: pretrained.npz, one folder per mode, results.md")
    modes: str = option(",".join(METHOD_NAMES), "comma-separated fine-tuning modes to compare")
    pretrain_classes: str = option("0-4", "Fashion-MNIST classes for pretraining from scratch")
    finetune_classes: str = option("5-9", "the other classes, for fine-tuning")
    pretrain_samples: int = option(27000, "training images for pretraining (all 27,000 left after the validation split)", min=1)
    pretrain_epochs: int = option(5, "pretraining epochs", min=1)
    pretrain_lr: float = option(2e-3, "AdamW peak learning rate from scratch", above=0)
    finetune_samples: int = option(1500, "training images per fine-tuning run (a low-data transfer task)", min=1)
    finetune_epochs: int = option(5, "fine-tuning epochs per mode", min=1)
    eval_samples: int = option(1000, "cap on validation and test images per run (validation runs every epoch)", min=1)
    batch_size: int = option(64, "global batch size", min=1)
    augment: bool = option(False, "random crop + flip (off: in runs this short they slow learning more than they help)")
    retrain: bool = option(False, "pretrain again even if pretrained.npz exists (then every mode is fine-tuned again)")
    overwrite: bool = option(False, "start over: pretrain and fine-tune every mode afresh, replacing this folder's results")
    data: str = option("fashion_mnist", "dataset name (Fashion-MNIST is the one that works offline)")
    data_root: str = option("", "dataset cache folder (default: the Debian package, else $VIT_PEFT_DATA)")
    seed: int = option(0, "random seed for every run")
    device: str = option("auto", "auto | cpu | cuda")
    threads: int = option(0, "torch CPU threads (0: torch's default)", min=0)
    progress: bool = option(True, "tqdm progress bars")


# Fine-tuning learning rates for this small model (D=96): higher than ViT-B/16's defaults because the runs are
# only ~70 steps; same ordering and reasons as the registry's rates (peft.registry). A method without an entry
# here gets 3x its registry rate.
QUICKSTART_LR = {"head": 1e-2, "mlp": 1e-3, "lora": 3e-3, "rlrr": 1e-2, "full": 1e-3}


def pretrain(q: QuickstartOptions, out: Path) -> Path:
    npz = out / "pretrained.npz"
    if npz.is_file() and not (q.retrain or q.overwrite):
        log.info("using the existing %s (pass --retrain to pretrain again)", npz)
        return npz
    opts = FinetuneOptions(
        mode="full", weights="none", model="ViT-Mini/4", data=q.data, data_root=q.data_root or None,
        classes=q.pretrain_classes, max_train_samples=q.pretrain_samples, max_eval_samples=q.eval_samples,
        epochs=q.pretrain_epochs, warmup_epochs=0.5, batch_size=q.batch_size, lr=q.pretrain_lr, seed=q.seed,
        augment=q.augment, device=q.device, threads=q.threads or None, output_dir=str(out / "pretrain"), export_npz=str(npz),
        progress=q.progress)
    t = time.perf_counter()
    m = run_or_resume(opts, fresh=q.retrain or q.overwrite)
    log.info("pretrained in %.0f s: test accuracy %.4f on classes %s", time.perf_counter() - t,
             m["test_accuracy"], q.pretrain_classes)
    return npz


def finetune_options(q: QuickstartOptions, npz: Path, mode: str, out: Path) -> FinetuneOptions:
    return FinetuneOptions(
        mode=mode, weights=str(npz), data=q.data, data_root=q.data_root or None, classes=q.finetune_classes,
        max_train_samples=q.finetune_samples, max_eval_samples=q.eval_samples, epochs=q.finetune_epochs,
        warmup_epochs=0.5, batch_size=q.batch_size, lr=QUICKSTART_LR.get(mode, 3 * get_method(mode).lr), seed=q.seed,
        augment=q.augment, device=q.device,
        threads=q.threads or None, output_dir=str(out / mode), progress=q.progress)


def finetune(q: QuickstartOptions, npz: Path, mode: str, out: Path) -> dict:
    opts = finetune_options(q, npz, mode, out)
    if not q.overwrite:
        done = finished_metrics(opts, file_digest(npz, "sha256"))
        if done is not None:
            log.info("%s: already fine-tuned with these settings in %s (kept; --overwrite starts over)", mode,
                     opts.output_dir)
            return done
    return run_or_resume(opts, fresh=q.overwrite)


def run_or_resume(opts: FinetuneOptions, fresh: bool) -> dict:
    """Run ``opts``: continue the run its folder holds if there is one (``fresh``: start over). A stored run that
    cannot continue with these options (other settings or base weights) is replaced by a new one."""
    latest = Path(opts.output_dir) / ckpt_io.LATEST
    if latest.is_file() and not fresh and _epochs_done(latest) <= opts.epochs:  # a longer run is not continued
        try:
            return run(dataclasses.replace(opts, resume=True))
        except ckpt_io.CheckpointMismatch as e:
            log.warning("%s: the run there cannot continue (%s); starting it again", opts.output_dir, e)
    # Nothing to continue (or a best.pt without checkpoint.pt, left by a kill between the two): this folder is
    # the quick start's own, so its earlier files are replaced.
    return run(dataclasses.replace(opts, overwrite=True))


def _epochs_done(path: Path) -> int:
    try:
        return ckpt_io.load_checkpoint(path).get("epoch", 0)
    except ckpt_io.CheckpointMismatch:  # unreadable: resuming refuses it, and the run starts again
        return 0


def finished_metrics(opts: FinetuneOptions, weights_sha256: str) -> dict | None:
    """The metrics of the finished run in ``opts.output_dir`` if it was made with these options (as ``--resume``
    compares them) from weights with this sha256, all its epochs done; else None."""
    folder = Path(opts.output_dir)
    if not ((folder / "metrics.json").is_file() and (folder / ckpt_io.LATEST).is_file()):
        return None  # metrics.json is written last, at the end of a run
    try:
        ck = ckpt_io.load_checkpoint(folder / ckpt_io.LATEST)
    except ckpt_io.CheckpointMismatch:
        return None
    if (changed_options(ck.get("options", {}), opts) or ck.get("epoch") != opts.epochs
            or (ck.get("base_weights") or {}).get("sha256") != weights_sha256):
        return None
    return json.loads((folder / "metrics.json").read_text())


ROW_KEYS = ("mode", "test_accuracy", "val_accuracy", "trainable_parameters", "total_parameters", "train_seconds",
            "time_seconds", "images_per_second", "epochs")


def table_rows(q: QuickstartOptions, npz: Path, out: Path) -> list[dict]:
    """One row per mode (in registry order) whose folder holds a run finished with these settings on ``npz``."""
    sha = file_digest(npz, "sha256")
    rows = []
    for mode in METHOD_NAMES:
        m = finished_metrics(finetune_options(q, npz, mode, out), sha)
        if m is not None:
            rows.append({k: m[k] for k in ROW_KEYS})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| mode | test accuracy | val accuracy | trainable params | % of model | train time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['test_accuracy']:.4f} | {r['val_accuracy']:.4f} | "
                     f"{r['trainable_parameters']:,} | {100 * r['trainable_parameters'] / r['total_parameters']:.2f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def run_quickstart(q: QuickstartOptions) -> dict:
    """The whole quick start: pretrain (or reuse pretrained.npz), fine-tune every mode, write results.md/.json."""
    modes = [m.strip() for m in q.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in METHOD_NAMES]
    if unknown or not modes:  # fail before minutes of pretraining
        raise OptionsError(f"--modes {q.modes!r}: {', '.join(unknown) or 'no mode'} is not one of {', '.join(METHOD_NAMES)}")
    fields.check(q, OptionsError)
    out = Path(q.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    npz = pretrain(q, out)
    for mode in modes:
        finetune(q, npz, mode, out)
    rows = table_rows(q, npz, out)  # these modes and those finished earlier with the same settings
    table = markdown_table(rows)
    total = time.perf_counter() - t0
    header = (f"Fine-tuning ViT-Mini/4 (pretrained from scratch on Fashion-MNIST classes {q.pretrain_classes}) "
              f"on classes {q.finetune_classes}: {q.finetune_samples} training images, {q.finetune_epochs} epochs, "
              f"test on up to {q.eval_samples} images. This command took {total:.0f} s.\n\n")
    result = {"options": dataclasses.asdict(q), "total_seconds": total, "results": rows}
    with atomic_write(out / "results.md", "w") as f:
        f.write(header + table)
    with atomic_write(out / "results.json", "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    return {**result, "markdown": header + table, "path": str(out)}
