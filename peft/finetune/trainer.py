"""One fine-tuning run: build, train, select on validation, test once, write the reports.

Reproducibility: every random stream (Python, numpy, torch, CUDA, the data-order generator and the
augmentation generator) is seeded from ``--seed`` and saved in each checkpoint; an interrupted run resumed
with ``--resume`` continues to the same result. Data parallelism (torchrun) splits each global batch into
contiguous per-rank slices, so N processes run the same optimisation as one (see ``distributed``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import loaders
import vit
from loaders.datasets.stream import BatchStream
from loaders.npz import NpzArchive, infer_config

from .. import kernels, registry, state
from . import checkpoint as ckpt_io
from . import distributed as pdist
from . import predict, report, rng
from .build import build_model, resolve_weights
from .data import is_photo_source, prepare_data, run_transforms, write_skipped, write_split_files
from .optim import LRSchedule, build_optimizer
from .options import FinetuneOptions, OptionsError, changed_options, check_options, resumable_flags
from .recipes import apply_recipe, recipe_settings
from .rundir import RunFolder

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def compute_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum (not mean) of per-sample cross-entropies: the caller divides by the global batch size."""
    return F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)




# ------------------------------------------------------------------------------------------------ the run

class Trainer:
    """One fine-tuning run. ``Trainer(opts).run()`` is what ``tools/finetune.py`` does."""

    def __init__(self, opts: FinetuneOptions, ctx: pdist.DistContext | None = None):
        opts = apply_recipe(opts)
        check_options(opts)
        if is_photo_source(opts.data):  # recorded absolute: evaluate/predict find it from any directory
            opts.data = str(Path(opts.data).expanduser().resolve())
        self.opts = opts
        self.ctx = ctx or pdist.init_distributed(opts.device)
        self.out = Path(opts.output_dir)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        kernels.set_backend(opts.kernel)  # None: $VIT_PEFT_KERNEL, else auto

    # -- building ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        opts, ctx = self.opts, self.ctx
        seed_everything(opts.seed)
        # Weights first: a missing download should fail before minutes of data loading. In DDP the first local
        # rank downloads (once per machine, behind the download's own lock); the others wait, then reuse it.
        weights = None
        if not opts.from_scratch:
            if ctx.local_rank == 0:
                weights = resolve_weights(opts.weights)
            pdist.barrier(ctx)
            if weights is None:
                weights = resolve_weights(opts.weights)
        self.data = prepare_data(opts, ctx, self.input_size(weights))
        if self.data.skipped and opts.strict_data:
            first, why = self.data.skipped[0]
            raise loaders.datasets.DatasetError(
                f"--strict-data: {len(self.data.skipped)} image(s) cannot be decoded, e.g. {first} ({why})")
        k = len(self.data.classes)
        self.model, self.base_weights = build_model(opts, k, weights)
        seed_everything(opts.seed)  # adapters initialise identically whatever the data loading consumed
        method = registry.get_method(opts.mode)
        self.method_config = opts.method_config()
        self.full = method.saves_everything  # the checkpoint stores every parameter, not only the trained ones
        changed = method.apply(self.model, self.method_config)
        log.info("mode %s%s: %d modules given adapters", opts.mode,
                 f" {self.method_config}" if method.options else "", len(changed))
        self.model.to(ctx.device)
        self.compute_path = state.runtime_path(self.model, ctx.device)  # the fused-kernel question, asked of the adapters
        if self.compute_path:
            log.info("adapted layers run on the %s", self.compute_path)  # once, with the reason
        self.trainable, self.total = state.trainable_parameters(self.model)
        log.info("trainable parameters: %s of %s (%.3f%%)", f"{self.trainable:,}", f"{self.total:,}",
                 100 * self.trainable / self.total)
        self.train_tf, self.eval_tf = run_transforms(opts, self.data, self.model.config.image_size)
        self.lr = opts.resolved_lr()
        self.optimizer = build_optimizer(self.model, opts, self.lr)
        n_train = len(self.data.train)
        self.steps_per_epoch = n_train // opts.batch_size if opts.drop_last else math.ceil(n_train / opts.batch_size)
        if self.steps_per_epoch == 0:
            raise OptionsError(f"--drop-last: the {n_train} training images make no full batch of --batch-size "
                               f"{opts.batch_size}; lower --batch-size or leave out --drop-last")
        self.total_steps = opts.epochs * self.steps_per_epoch
        self.schedule = LRSchedule(opts, self.lr, self.steps_per_epoch)
        self.lr_per_step: list[float] = []  # the first group's lr as each optimizer step used it
        self.amp_dtype = pdist.autocast_dtype(opts.precision, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype == torch.float16)
        self.generators = {
            "data_order": torch.Generator().manual_seed(opts.seed),
            "augment": torch.Generator(device=ctx.device).manual_seed(opts.seed + 1),
        }
        self.epoch, self.step, self.best_val, self.history = 0, 0, -1.0, []
        self.train_seconds, self.train_images = 0.0, 0
        if opts.resume:
            self.resume()
        self.ddp = self.forward = self.model
        if ctx.distributed:
            # Frozen parameters are not part of DDP's reducer; every trainable one is used in each forward.
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                find_unused_parameters=False)
            self.forward = self.ddp
        if opts.compile:  # the step's forward and backward; evaluation runs the plain model
            self.forward = torch.compile(self.ddp)

    def reseed(self, name: str) -> int:
        """A seed for random stream ``name`` at the resumed step: derived from --seed and the step alone."""
        return (self.opts.seed * 1_000_003 + self.step * 7919 + sum(map(ord, name))) % 2**63

    def input_size(self, weights) -> int:
        """The model's input resolution, before the model is built (it sets a folder's stored resolution)."""
        if self.opts.image_size:
            return self.opts.image_size
        if weights is None:
            return vit.get_config(self.opts.model).image_size
        with NpzArchive(weights[0]) as archive:
            return infer_config(archive, str(weights[0])).image_size

    def plain_mode_options(self) -> dict:
        """The method's config as flat plain-typed options (tuples become lists), as stored in checkpoints."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.method_config.to_options().items()}

    def checkpoint_dict(self, with_training_state: bool) -> dict:
        opts = self.opts
        d = {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
            "model_config": ckpt_io.config_dict(self.model.config),
            "mode": opts.mode, "mode_options": self.plain_mode_options(),
            "base_weights": self.base_weights,
            "state_dict_kind": "full" if self.full else "adapters",
            "state_dict": ckpt_io.trainable_state(self.model, self.full),
            "classes": self.data.classes, "data": opts.data,
            "options": dataclasses.asdict(opts),
            "epoch": self.epoch, "step": self.step, "best_val_accuracy": self.best_val,
            "history": self.history, "trainable_parameters": self.trainable, "total_parameters": self.total,
        }
        if with_training_state:
            d["training_state"] = {
                "optimizer": self.optimizer.state_dict(), "lr_per_step": self.lr_per_step,
                "scaler": self.scaler.state_dict(), "rng": rng.capture_rng(self.generators),
                "train_seconds": self.train_seconds, "train_images": self.train_images,
            }
        return d

    def resume(self) -> None:
        path = self.out / ckpt_io.LATEST
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path} (check --output-dir)")
        ck = ckpt_io.load_checkpoint(path)
        changed = changed_options(ck.get("options", {}), self.opts)
        if changed:
            shown = ", ".join(f"{flag} ({'default' if was is None else repr(was)} -> "
                              f"{'default' if now is None else repr(now)})" for flag, was, now in changed)
            raise ckpt_io.CheckpointMismatch(
                f"--resume: {shown} differ from the run in {self.out}, and they change the optimisation; only "
                f"{', '.join(resumable_flags())} may change on resume (start a new run in another --output-dir "
                "instead)")
        saved_config = registry.configure_method(ck["mode"], **ck["mode_options"]).to_options()
        for key, was, now in (("mode", ck["mode"], self.opts.mode),
                              ("mode_options", saved_config, self.method_config.to_options()),
                              ("model_config", ck["model_config"], ckpt_io.config_dict(self.model.config))):
            if was != now:
                raise ckpt_io.CheckpointMismatch(f"--resume: {path} has {key} {was}, this run has {now}")
        if (ck["base_weights"] or {}).get("sha256") != (self.base_weights or {}).get("sha256"):
            raise ckpt_io.CheckpointMismatch(f"--resume: {path} was trained from other base weights "
                                             f"({ck['base_weights']}) than {self.base_weights}")
        ckpt_io.load_trainable_state(self.model, ck["state_dict"], self.full, str(path))
        ts = ck["training_state"]
        self.optimizer.load_state_dict(ts["optimizer"])  # the schedule is a function of self.step
        self.lr_per_step = list(ts.get("lr_per_step", []))
        self.scaler.load_state_dict(ts["scaler"])
        self.epoch, self.step, self.best_val = ck["epoch"], ck["step"], ck["best_val_accuracy"]
        for note in rng.restore_rng(ts["rng"], self.generators, reseed=self.reseed):
            log.warning("--resume on another device: %s (the run continues reproducibly, not bitwise as it would "
                        "have on the original device)", note)
        self.history = ck["history"]
        self.train_seconds, self.train_images = ts["train_seconds"], ts["train_images"]
        log.info("resumed from %s: epoch %d, step %d, best val accuracy %.4f", path, self.epoch, self.step,
                 self.best_val)

    # -- training ------------------------------------------------------------------------------------------
    def train_epoch(self) -> dict:
        """One pass over the training split; returns mean loss and accuracy over the epoch (all ranks)."""
        opts, ctx, d = self.opts, self.ctx, self.data
        self.ddp.train()
        if opts.frozen_eval:  # VPT: the frozen backbone keeps eval mode (no dropout or drop-path in it)
            state.train_adapters_only(self.model)
        order = torch.randperm(len(d.train), generator=self.generators["data_order"])
        if opts.drop_last:  # the official loaders' drop_last=True: the shuffled tail that fills no batch is skipped
            order = order[:self.steps_per_epoch * opts.batch_size]
        n = len(order)
        batches = BatchStream(d.train, order.split(opts.batch_size), ctx.device, ctx.rank, ctx.world_size)
        totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, count
        # Non-finite losses are flagged on the device (the step index and loss of the first one) and read with the
        # progress numbers every --log-every steps and at the end of the epoch: no host synchronisation per step.
        first_bad = torch.full((2,), -1.0, dtype=torch.float64, device=ctx.device)  # (step, loss)
        step_dev = torch.tensor(float(self.step), dtype=torch.float64, device=ctx.device)  # once per epoch
        bar = tqdm(total=n, desc=f"epoch {self.epoch + 1}/{opts.epochs}", unit="img", leave=False,
                   disable=not (ctx.is_main and opts.progress), dynamic_ncols=True)
        start, done_images = time.perf_counter(), 0
        for index, batch in enumerate(batches):
            n_global = batch.rows[2]
            stats = torch.zeros(3, dtype=torch.float64, device=ctx.device)
            lr = self.schedule(self.step)  # a pure function of the step: resumed runs continue on the same curve
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            # Every rank reads and augments only its contiguous slice of the global batch, drawing the randomness
            # of the whole batch from the shared generator, and splits it into --grad-accum micro-batches: whatever
            # the number of processes and micro-batches, the union is exactly the batch one process would see.
            images = self.train_tf(batch.images, self.generators["augment"], batch.sizes, batch.rows)
            labels = batch.labels
            chunks = list(zip(images.tensor_split(opts.grad_accum), labels.tensor_split(opts.grad_accum)))
            for i, (x, y) in enumerate(chunks):
                sync = i == len(chunks) - 1 or not ctx.distributed
                with contextlib.nullcontext() if sync else self.ddp.no_sync():
                    with torch.autocast(ctx.device.type, dtype=self.amp_dtype or torch.float32,
                                        enabled=self.amp_dtype is not None):
                        logits = self.forward(x)
                    loss_sum = compute_loss(logits, y, opts.label_smoothing)
                    # DDP averages over ranks; × world / n_global makes that the mean over the global batch.
                    self.scaler.scale(loss_sum * (ctx.world_size / n_global)).backward()
                stats[:2] += torch.stack([loss_sum.detach().double(), (logits.argmax(-1) == y).sum().double()])
                stats[2] += y.numel()  # a host number: no host-to-device copy per micro-batch
            pdist.all_reduce_sum(stats, ctx)
            new_bad = (~torch.isfinite(stats[0])) & (first_bad[0] < 0)
            first_bad.copy_(torch.where(new_bad, torch.stack([step_dev, stats[0]]), first_bad))
            step_dev += 1
            self.scaler.unscale_(self.optimizer)
            if opts.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               opts.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_per_step.append(lr)
            self.step += 1
            totals += stats
            done_images += n_global
            last = index == len(batches) - 1
            if (index + 1) % opts.log_every == 0 or last:  # the only host reads of the step loop
                loss, bad_step, bad_loss = stats[0].item(), *first_bad.tolist()
                if bad_step >= 0:
                    bar.close()
                    raise TrainingDiverged(
                        f"loss is {bad_loss} at epoch {self.epoch + 1}, step {int(bad_step) + 1}: training "
                        f"stopped. The last good checkpoint (end of epoch {self.epoch}) is "
                        f"{self.out / ckpt_io.LATEST}. Try a lower --lr (now {self.lr:g}), --precision fp32, or "
                        f"--clip-grad.")
                if bar.disable is False:
                    correct, count = totals[1:].tolist()
                    bar.update(done_images - bar.n)
                    bar.set_postfix(loss=f"{loss / n_global:.4f}", acc=f"{correct / count:.3f}", lr=f"{lr:.2e}",
                                    img_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):.1f}")
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        bar.close()
        self.train_seconds += seconds
        self.train_images += n
        return {"train_loss": totals[0].item() / n, "train_accuracy": totals[1].item() / n,
                "train_seconds": seconds, "train_images_per_second": n / seconds}

    def evaluate(self, ds, desc=None) -> tuple[torch.Tensor, dict]:
        probs = predict.predict(self.model, ds, self.eval_tf, self.opts.eval_batch_size, self.ctx,
                                self.amp_dtype, desc=desc if self.opts.progress else None)
        labels = ds.labels.cpu()
        if labels.numel() == 0:
            return probs, {"loss": float("nan"), "accuracy": float("nan")}
        nll = -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()
        acc = (probs.argmax(-1) == labels).double().mean().item()
        return probs, {"loss": nll, "accuracy": acc}

    def recipe_record(self) -> dict | None:
        """What --recipe set, and which of its values the command line replaced (None for the project's)."""
        o = self.opts
        if o.recipe == "project":
            return None
        settings = recipe_settings(o.recipe, o.data, o.mode)
        return {"name": o.recipe, "set": {k: getattr(o, k) for k in settings},
                "overridden": sorted(k for k in settings if getattr(o, k) != settings[k]),
                "method_options": self.plain_mode_options()}

    def official_test_due(self) -> bool:
        """After this epoch (self.epoch, 1-based now), does the official loop test? (--official-test-from/-every)"""
        o = self.opts
        if not o.official_test_from or len(self.data.test) == 0 or self.epoch < o.official_test_from:
            return False
        return (self.epoch - o.official_test_from) % o.official_test_every == 0 or self.epoch == o.epochs

    def save(self, name: str, with_training_state: bool) -> None:
        if self.ctx.is_main:
            ckpt_io.save_atomic(self.checkpoint_dict(with_training_state), self.out / name)

    def run(self) -> dict:
        """Train, select on validation, test the selected model, write every report; returns metrics."""
        folder = RunFolder(self.out, self.opts.resume, self.opts.overwrite) if self.ctx.is_main else None
        try:
            return self._run()
        finally:
            if folder is not None:
                folder.release()

    def _run(self) -> dict:
        opts, ctx = self.opts, self.ctx
        t0 = time.perf_counter()
        self.setup()
        if ctx.is_main:
            report.write_json(dataclasses.asdict(opts), self.out / "options.json")
            write_split_files(self.data, self.out / "splits")
            if self.data.photos:  # one line per file left out, with the reason
                write_skipped(self.data, self.out / "skipped.txt")
            if self.data.skipped:
                log.warning("%d image(s) could not be decoded and are left out; see %s", len(self.data.skipped),
                            self.out / "skipped.txt")
        has_val = len(self.data.val) > 0
        while self.epoch < opts.epochs:
            if opts.stop_after_epoch is not None and self.epoch >= opts.stop_after_epoch:
                log.info("stopping after epoch %d (--stop-after-epoch); continue with --resume", self.epoch)
                return {"stopped_after_epoch": self.epoch}
            row = {"epoch": self.epoch + 1}
            row.update(self.train_epoch())
            self.epoch += 1
            row["step"] = self.step
            _, val = self.evaluate(self.data.val)
            row.update(val_loss=val["loss"], val_accuracy=val["accuracy"], lr=self.lr_per_step[-1])
            if self.official_test_due():  # the official loops' per-epoch test, reported apart (never selects)
                row["test_accuracy_each_epoch"] = self.evaluate(self.data.test, desc="test (official report)")[1]["accuracy"]
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
        ckpt_io.load_trainable_state(self.model, best["state_dict"], self.full, str(self.out / ckpt_io.BEST))
        # Test once, on the model validation (or the last epoch) chose; without a test split (tuning) the final
        # report is the validation split's.
        has_test = len(self.data.test) > 0
        split = "test" if has_test else "val"
        ds = self.data.test if has_test else self.data.val
        labels = ds.labels
        probs, test = self.evaluate(ds, desc=split)
        metrics = {
            "mode": opts.mode, "mode_options": self.plain_mode_options(),
            "dataset": opts.data, "classes": opts.classes, "weights": opts.weights,
            "data": self.data.counts,  # per split: images decoded now, read from the cache, skipped
            "test_accuracy": test["accuracy"] if has_test else None, "test_loss": test["loss"] if has_test else None,
            "splits": self.data.splits, "selected_on": self.data.splits["val"] or "last epoch (no validation split)",
            "protocol": opts.protocol, "recipe": opts.recipe, "recipe_settings": self.recipe_record(),
            "val_accuracy": best["best_val_accuracy"], "best_epoch": best["epoch"],
            "trainable_parameters": self.trainable, "total_parameters": self.total,
            "epochs": self.epoch, "steps": self.step, "batch_size": opts.batch_size, "lr": self.lr,
            "weight_decay": opts.resolved_weight_decay(), "world_size": ctx.world_size,
            "images_per_second": self.train_images / max(self.train_seconds, 1e-9),
            "train_seconds": self.train_seconds, "time_seconds": seconds,
            "num_train": len(self.data.train), "num_val": len(self.data.val),
            "num_test": len(self.data.test), "device": str(ctx.device),
            "skipped_files": len(self.data.skipped),
            "lr_per_step": self.lr_per_step, "compute_path": self.compute_path, "compiled": self.opts.compile,
        }
        official = [r["test_accuracy_each_epoch"] for r in self.history if "test_accuracy_each_epoch" in r]
        if official:  # the maximum over per-epoch test evaluations: the official loops' number, test-selected
            metrics["test_accuracy_official"] = max(official)
            metrics["test_accuracy_official_epoch"] = next(r["epoch"] for r in self.history
                                                           if r.get("test_accuracy_each_epoch") == max(official))
        if ctx.is_main:
            ev = report.write_evaluation_numbers(self.out, probs.numpy(), labels.cpu().numpy(), self.data.classes,
                                                 self.history, prefix=split)
            metrics.update({f"{split}_macro_f1": ev.summary["macro_f1"], f"{split}_mean_auc": ev.summary["mean_auc"]})
            report.write_json(metrics, self.out / "metrics.json")  # every number on disk before any figure
            report.write_figures(self.out, ev, self.data.classes, self.history, split)
            if opts.export_npz:
                export_npz(self.model, opts.export_npz)
            log.info("%s accuracy %.4f (best val %.4f at epoch %d); reports in %s", split, test["accuracy"],
                     best["best_val_accuracy"], best["epoch"], self.out)
        pdist.barrier(ctx)
        return metrics


def export_npz(model, path) -> Path:
    """Merge the adapters into a copy of the model and save it in Google's .npz layout."""
    merged = copy.deepcopy(model).cpu().float()
    state.merge_adapters(merged)  # in place: plain nn.Linear / LayerNorm / Conv2d with the original names
    path = loaders.save_npz(merged, path)
    log.info("exported the merged model to %s", path)
    return Path(path)


def run(opts: FinetuneOptions, ctx: pdist.DistContext | None = None) -> dict:
    """``tools/finetune.py`` as a function: one complete run (also under torchrun)."""
    trainer = Trainer(opts, ctx)  # checks the options before joining a process group or touching a device
    pdist.setup_logging(trainer.ctx)
    try:
        return trainer.run()
    finally:
        # The DDP wrapper's reducer holds the process group: drop it first, or destroying the group can wait
        # forever for a peer that has already exited (a Gloo thread join in the reducer's destructor).
        trainer.ddp = trainer.forward = None
        pdist.cleanup(trainer.ctx)
