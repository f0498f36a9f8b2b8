"""The optimisation rules of the fine-tuning engine, each pinned by a value: what decays and by how much, the
learning rate at the first and the last step, clipping, that gradient accumulation equals one big batch, which
epoch is kept, and that the loss options reach the loss. Real (tiny) runs of ``peft.finetune.run`` on the seeded
``synthetic`` dataset (no files), one thread, float32."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import peft
import vit
from peft.finetune import checkpoint as ckpt_io
from peft.finetune import optim
from peft.finetune import trainer as training
from peft.finetune.options import FinetuneOptions


pytestmark = pytest.mark.usefixtures("single_process")


def run(tmp_path, name, **kw):
    """The "testing" ViT from scratch on 32 synthetic images (batch 16: two steps per epoch), no augmentation."""
    base = dict(mode="full", weights="none", model="testing", data="synthetic", max_train_samples=32,
                max_eval_samples=16, epochs=2, batch_size=16, lr=1e-2, warmup_epochs=0.5, augment=False,
                precision="fp32", device="cpu", output_dir=str(tmp_path / name), progress=False)
    base.update(kw)
    training.run(FinetuneOptions(**base))
    out = tmp_path / name
    return json.loads((out / "metrics.json").read_text()), torch.load(out / ckpt_io.LATEST, weights_only=True)


def trained_tensors(ck):
    return {k: v for k, v in ck["state_dict"].items() if v.is_floating_point()}


# ── what decays, and by how much ─────────────────────────────────────────────────────────────────────────────

def test_decay_groups_and_values():
    model = vit.VisionTransformer(vit.get_config("testing"))
    peft.apply_method(model, "lora")
    opts = FinetuneOptions(mode="lora")
    opt = optim.build_optimizer(model, opts, 1e-3)
    decay, other = opt.param_groups
    assert decay["weight_decay"] == 5e-5 and other["weight_decay"] == 0.0  # the official RLRR/SSF rate
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad and (n == "head.weight" or "lora_" in n))
    assert sorted(names[id(p)] for p in other["params"]) == ["head.bias"]
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    assert FinetuneOptions(weights="none", mode="full").resolved_weight_decay() == 0.05  # from scratch
    assert FinetuneOptions(weight_decay=0.3).resolved_weight_decay() == 0.3


def test_default_learning_rates():
    """The registry's rate per method (ViT-B/16, batch 128), 1e-3 from scratch, --lr over both."""
    assert {m: FinetuneOptions(mode=m).resolved_lr() for m in ("rlrr", "lora", "full", "head")} == {
        "rlrr": 3e-3, "lora": 1e-3, "full": 1e-4, "head": 1e-3}
    assert FinetuneOptions(weights="none", mode="full").resolved_lr() == 1e-3
    assert FinetuneOptions(mode="rlrr", lr=0.25).resolved_lr() == 0.25


# ── the learning rate of every step ──────────────────────────────────────────────────────────────────────────

def test_first_and_last_step_learning_rates_and_every_group_follows(tmp_path):
    """step-cosine, 3 epochs × 2 steps, 1 warmup epoch: lr_t = lr·(s + (1 − s)(t + 1)/W) for t < W, then
    lr·(e + (1 − e)(1 + cos(π (t − W)/(T − W)))/2), with s = warmup_lr/lr, e = min_lr/lr."""
    lr, warmup_lr, min_lr, total, warmup = 1e-2, 1e-3, 1e-4, 6, 2
    metrics, ck = run(tmp_path, "lr", epochs=3, warmup_epochs=1, lr=lr, warmup_lr=warmup_lr, min_lr=min_lr)
    s, e = warmup_lr / lr, min_lr / lr
    expected = [lr * (s + (1 - s) * (t + 1) / warmup) if t < warmup else
                lr * (e + (1 - e) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))))
                for t in range(total)]
    assert metrics["lr_per_step"] == pytest.approx(expected, rel=1e-12)
    assert metrics["lr_per_step"][0] == pytest.approx(lr * (s + (1 - s) / 2), rel=1e-12)  # not warmup_lr itself
    assert metrics["lr_per_step"][warmup] == pytest.approx(lr, rel=1e-12)  # the peak right after warmup
    groups = ck["training_state"]["optimizer"]["param_groups"]
    assert len(groups) == 2 and all(g["lr"] == metrics["lr_per_step"][-1] for g in groups)


# ── clipping, accumulation ───────────────────────────────────────────────────────────────────────────────────

def test_the_global_gradient_norm_is_clipped(tmp_path):
    """One plain SGD step (no momentum, no decay) with clipping at c moves the parameters by exactly lr · c."""
    lr, clip = 0.5, 1e-3
    kw = dict(epochs=1, max_train_samples=16, optimizer="sgd", momentum=0.0, weight_decay=0.0, warmup_epochs=0,
              lr=lr, clip_grad=clip)
    _, before = run(tmp_path, "none", **{**kw, "lr": 1e-30})  # the same initial model, (practically) not moved
    _, after = run(tmp_path, "clip", **kw)
    a, b = trained_tensors(after), trained_tensors(before)
    moved = math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a))
    assert moved == pytest.approx(lr * clip, rel=1e-4)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """SGD (sensitive to the gradient's scale, unlike Adam): 4 micro-batches of 4 give the step of one batch of 16."""
    kw = dict(epochs=1, optimizer="sgd", momentum=0.9, lr=0.3, clip_grad=0.0, warmup_epochs=0)
    _, one = run(tmp_path, "one", grad_accum=1, **kw)
    _, four = run(tmp_path, "four", grad_accum=4, **kw)
    a, b = trained_tensors(one), trained_tensors(four)
    _, start = run(tmp_path, "start", grad_accum=1, **{**kw, "lr": 1e-30})
    assert max((a[k] - start["state_dict"][k]).abs().max().item() for k in a) > 1e-3  # the steps did move
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# ── which epoch is kept ──────────────────────────────────────────────────────────────────────────────────────

def test_the_first_epoch_with_the_best_validation_accuracy_is_kept(tmp_path):
    """With a learning rate too small to change any prediction, every epoch ties on validation accuracy: the
    first one is kept (a later epoch must be strictly better to replace it)."""
    metrics, last = run(tmp_path, "ties", epochs=3, lr=1e-30)
    best = torch.load(tmp_path / "ties" / ckpt_io.BEST, weights_only=True)
    assert len({row["val_accuracy"] for row in last["history"]}) == 1 and len(last["history"]) == 3
    assert best["epoch"] == 1 and metrics["best_epoch"] == 1


def test_a_strictly_better_epoch_replaces_the_kept_one_and_is_the_one_tested(tmp_path):
    from peft.finetune.predict import evaluate_checkpoint

    metrics, last = run(tmp_path, "better", epochs=4, lr=3e-2, max_train_samples=64, max_eval_samples=16, seed=5)
    accs = [row["val_accuracy"] for row in last["history"]]
    first_best = accs.index(max(accs)) + 1
    assert metrics["best_epoch"] == first_best
    assert torch.load(tmp_path / "better" / ckpt_io.BEST, weights_only=True)["epoch"] == first_best
    assert first_best < 4  # this seed's best epoch is not the last, so the next lines tell them apart
    best = evaluate_checkpoint(tmp_path / "better" / ckpt_io.BEST, tmp_path / "eval-best", device="cpu")
    latest = evaluate_checkpoint(tmp_path / "better" / ckpt_io.LATEST, tmp_path / "eval-last", device="cpu")
    assert metrics["test_mean_auc"] == pytest.approx(best["test_mean_auc"], abs=1e-12)  # tested once, the best
    assert metrics["test_mean_auc"] != pytest.approx(latest["test_mean_auc"], abs=1e-6)


# ── the loss options reach the loss ──────────────────────────────────────────────────────────────────────────

def test_label_smoothing_reaches_the_loss(tmp_path, monkeypatch):
    seen = []
    real = training.compute_loss

    def spy(logits, labels, label_smoothing=0.0):
        seen.append(label_smoothing)
        return real(logits, labels, label_smoothing)

    monkeypatch.setattr(training, "compute_loss", spy)
    run(tmp_path, "smooth", epochs=1, label_smoothing=0.2)
    assert seen and set(seen) == {0.2}
    logits, labels = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    logp = logits.log_softmax(-1)
    by_hand = -(0.8 * logp.gather(1, labels[:, None]).squeeze(1) + 0.2 * logp.mean(-1)).sum()
    assert real(logits, labels, 0.2).item() == pytest.approx(by_hand.item(), rel=1e-6)  # a sum, in float32


# ── resume: every random stream ──────────────────────────────────────────────────────────────────────────────

def test_every_random_stream_is_captured_and_restored():
    """Python's, numpy's, torch's global streams and the run's own generators repeat their draws after a restore
    (through a weights_only save and load, as a checkpoint carries them)."""
    import io
    import random

    import numpy as np

    from peft.finetune import rng

    gens = {"augment": torch.Generator().manual_seed(3)}
    random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gens["augment"])  # mid-stream
    np.random.randn(), random.gauss(0, 1)  # one of a pair drawn: the other waits in numpy's / Python's cache
    buffer = io.BytesIO()
    torch.save(rng.capture_rng(gens), buffer)

    def draws():
        return (random.random(), float(np.random.rand()), np.random.randn(), random.gauss(0, 1), torch.rand(2).tolist(),
                torch.rand(2, generator=gens["augment"]).tolist())

    first = draws()
    rng.restore_rng(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), gens)
    assert draws() == first


# ── every bound of every number the run takes ────────────────────────────────────────────────────────────────

BOUNDS = [  # (options, the start of the one-line error): just past each documented bound
    (dict(epochs=0), "--epochs must be at least 1"), (dict(batch_size=0), "--batch-size must be at least 1"),
    (dict(grad_accum=0), "--grad-accum must be at least 1"), (dict(eval_batch_size=0), "--eval-batch-size must be"),
    (dict(max_train_samples=0), "--max-train-samples must be"), (dict(max_eval_samples=0), "--max-eval-samples must"),
    (dict(image_size=0), "--image-size must be at least 1"), (dict(threads=0), "--threads must be at least 1"),
    (dict(stop_after_epoch=-1), "--stop-after-epoch must be at least 0"), (dict(log_every=0), "--log-every must be"),
    (dict(warmup_epochs=-0.5), "--warmup-epochs must be at least 0"), (dict(lr=0.0), "--lr must be positive"),
    (dict(weight_decay=-1e-4), "--weight-decay must be at least 0"), (dict(clip_grad=-1.0), "--clip-grad must be"),
    (dict(label_smoothing=1.0), "--label-smoothing must be in [0, 1)"), (dict(dropout=1.0), "--dropout must be in"),
    (dict(drop_path=1.0), "--drop-path must be in [0, 1)"), (dict(warmup_lr=-1e-6), "--warmup-lr must be at least 0"),
    (dict(min_lr=-1e-6), "--min-lr must be at least 0"), (dict(cooldown_epochs=-1), "--cooldown-epochs must be"),
    (dict(schedule_lag=-1), "--schedule-lag must be at least 0"), (dict(restart_epochs=0), "--restart-epochs must"),
    (dict(official_test_from=-1), "--official-test-from must be"), (dict(official_test_every=0), "--official-test-every"),
    (dict(schedule="epoch-cosine", epochs=5, cooldown_epochs=5), "--cooldown-epochs 5 leaves no epoch"),
    (dict(momentum=1.0), "--momentum must be in [0, 1)"), (dict(batch_size=10, grad_accum=3), "--batch-size 10 is not"),
    (dict(val_fraction=1.0), "--val-fraction must be in [0, 1)"), (dict(test_fraction=1.0), "--test-fraction must be"),
    (dict(val_fraction=0.5, test_fraction=0.5), "--test-fraction must be in [0, 1) and leave images"),
    (dict(crop_pct=0.0), "--crop-pct must be in (0, 1]"), (dict(workers=0), "--workers must be at least 1"),
    (dict(store_size=0), "--store-size must be at least 1"), (dict(crop_scale="0.5,0.2"), "--crop-scale '0.5,0.2'"),
]


@pytest.mark.parametrize("options, message", BOUNDS, ids=[next(iter(o)) + "=" + str(next(iter(o.values())))
                                                         for o, _ in BOUNDS])
def test_every_numeric_option_is_checked_at_its_bound(options, message):
    from peft.finetune import OptionsError, check_options

    good = dict(weights="none", mode="full", model="testing", data="synthetic", device="cpu")
    check_options(FinetuneOptions(**good))  # the baseline passes
    with pytest.raises(OptionsError, match="^" + re.escape(message)):
        check_options(FinetuneOptions(**{**good, **options}))


def test_the_epochs_train_loss_and_accuracy_are_per_image_means(tmp_path):
    """From scratch the head is zero, so every logit is 0 and every image's loss is ln 10 (10 synthetic classes);
    with a learning rate too small to move anything the epoch's mean loss is exactly that, and the accuracy is a
    count over the 32 images."""
    _, ck = run(tmp_path, "means", epochs=1, lr=1e-30)
    row = ck["history"][0]
    assert row["train_loss"] == pytest.approx(math.log(10), rel=1e-6)
    assert 0 <= row["train_accuracy"] <= 1 and (row["train_accuracy"] * 32) == pytest.approx(
        round(row["train_accuracy"] * 32), abs=1e-9)


class _Payload:
    """A pickle that runs code when loaded (writes a file): what weights_only=True exists to refuse."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "payload": _Payload(str(marker))}, path)
    with pytest.raises(ckpt_io.CheckpointMismatch, match="evil.pt is not a readable checkpoint"):
        ckpt_io.load_checkpoint(path)
    assert not marker.exists()


def test_sweeping_a_method_option_sets_the_methods_option():
    from peft.finetune import OptionsError
    from peft.finetune.sweep import apply_point, parse_grid

    grid = parse_grid(["lora_rank=2,4", "lr=1e-3"])
    assert grid == [("lora_rank", [2, 4]), ("lr", [1e-3])]
    kw = apply_point({"mode": "lora", "method_options": {"lora_alpha": 4.0}}, {"lora_rank": 4, "lr": 1e-3})
    assert kw["method_options"] == {"lora_alpha": 4.0, "lora_rank": 4} and kw["lr"] == 1e-3 and "lora_rank" not in kw
    assert FinetuneOptions(**kw).method_config() == peft.LoraConfig(rank=4, alpha=4.0)
    with pytest.raises(OptionsError, match="--sweep lora_rank: not an option of --mode rlrr"):
        apply_point({"mode": "rlrr"}, {"lora_rank": 4})


def test_a_sweep_breaks_ties_by_grid_order_and_lists_each_value_once():
    """The documented tie rule: the highest mean validation accuracy wins, a tie goes to the point listed first
    (the first --sweep varying slowest); a value given twice is one grid point."""
    from peft.finetune import sweep

    grid = sweep.parse_grid(["lr=1e-3,3e-3,1e-3", "weight_decay=0,1e-4"])
    assert grid == [("lr", [1e-3, 3e-3]), ("weight_decay", [0.0, 1e-4])]
    points = sweep.grid_points(grid)
    assert points == [{"lr": 1e-3, "weight_decay": 0.0}, {"lr": 1e-3, "weight_decay": 1e-4},
                      {"lr": 3e-3, "weight_decay": 0.0}, {"lr": 3e-3, "weight_decay": 1e-4}]
    scores = [{"point": p, "val_accuracy": a} for p, a in zip(points, (0.5, 0.75, 0.75, 0.25))]
    assert sweep.choose(scores)["point"] == points[1]  # tied with points[2]: the earlier one
    assert sweep.choose(scores[2:])["point"] == points[2]


def test_sgd_takes_the_momentum_flag():
    model = vit.VisionTransformer(vit.get_config("testing"))
    opt = optim.build_optimizer(model, FinetuneOptions(optimizer="sgd", momentum=0.5, weights="none", mode="full"), 0.1)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.5 and opt.defaults["lr"] == 0.1


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path):
    path = tmp_path / "new.pt"
    torch.save({"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION + 1}, path)
    with pytest.raises(ckpt_io.CheckpointMismatch, match=f"format version {ckpt_io.VERSION + 1}; this code reads up to"):
        ckpt_io.load_checkpoint(path)


def test_evaluation_crops_photos_by_crop_pct():
    """--crop-pct 0.5 at 32 px: the shorter side goes to 64 (a 64-px photo is not resampled) and the centre 32 × 32
    is cut: exactly the photo's middle pixels, normalised."""
    from peft.finetune.predict import eval_transform

    photo = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = eval_transform(32, photos=True, crop_pct=0.5)(photo)
    expected = (photo[:, 16:48, 16:48].permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


def test_an_infinite_loss_stops_the_run_like_nan(tmp_path, monkeypatch):
    real = training.compute_loss

    def infinite(logits, labels, label_smoothing=0.0):
        return real(logits, labels, label_smoothing) * float("inf")

    monkeypatch.setattr(training, "compute_loss", infinite)
    with pytest.raises(training.TrainingDiverged, match=r"loss is inf at epoch 1, step 1"):
        run(tmp_path, "inf", epochs=1)
