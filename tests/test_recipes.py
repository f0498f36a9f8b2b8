"""The official runs, exactly: the learning rate of every step against the official schedulers re-derived here
(timm's CosineLRScheduler written out from its source, torch's own CosineAnnealingWarmRestarts and LambdaLR), the
erf-GELU RLRR model and one AdamW step against the official RLRR code re-implemented functionally, NOAH's LoRA,
merging in float64, the recipes as data, and the suite's official column."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import peft
import vit
from benchmark_trees import write_fgvc_tree, write_vtab_tree
from loaders import load_npz
from npz_factory import write_google_npz
from peft.cli import finetune as finetune_cli
from peft.finetune import OptionsError
from peft.finetune import checkpoint as ckpt_io
from peft.finetune.optim import LRSchedule, param_groups
from peft.finetune.options import FinetuneOptions
from peft.finetune.recipes import RECIPE_TABLE, apply_recipe, recipe_settings


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "testing.npz"
    write_google_npz(path, vit.get_config("testing"), seed=0)
    return path


# ---------------------------------------------------------------------------------------- the schedulers

class TimmCosine:
    """timm 0.9.8 ``CosineLRScheduler`` (t_in_epochs=True) as ``create_scheduler`` builds it for the official
    RLRR / SSF / NOAH runs (one cycle, cycle_decay 0.5, no noise, warmup not a prefix), written out from timm's
    ``scheduler/cosine_lr.py`` and ``scheduler/scheduler.py``."""

    def __init__(self, base, t_initial, warmup_t, warmup_lr_init, lr_min, cycle_limit=1, cycle_decay=0.5):
        self.base, self.t_initial, self.warmup_t = base, t_initial, warmup_t
        self.warmup_lr_init, self.lr_min = warmup_lr_init, lr_min
        self.cycle_limit, self.cycle_decay = cycle_limit, cycle_decay
        self.warmup_steps = (base - warmup_lr_init) / warmup_t if warmup_t else 1
        self.lr = warmup_lr_init if warmup_t else base  # __init__: update_groups(warmup_lr_init)

    def _get_lr(self, t):
        if t < self.warmup_t:
            return self.warmup_lr_init + t * self.warmup_steps
        i = t // self.t_initial
        t_curr = t - self.t_initial * i
        lr_max = self.base * self.cycle_decay ** i
        if i < self.cycle_limit:
            return self.lr_min + 0.5 * (lr_max - self.lr_min) * (1 + math.cos(math.pi * t_curr / self.t_initial))
        return self.lr_min

    def step_update(self, num_updates):  # t_in_epochs: per-update values are None, nothing changes
        pass

    def step(self, epoch):
        self.lr = self._get_lr(epoch)


def official_rlrr_lrs(base, steps_per_epoch, epochs=100, warmup=10, cooldown=10, warmup_lr=1e-7, min_lr=1e-8):
    """The lr of every optimizer step of train_vtab.py's loop: train, step_update(epoch), step(epoch)."""
    sched = TimmCosine(base, epochs, warmup, warmup_lr, min_lr)
    lrs = []
    for epoch in range(epochs + cooldown):  # num_epochs = get_cycle_length() + cooldown_epochs
        lrs += [sched.lr] * steps_per_epoch
        sched.step_update(epoch)
        sched.step(epoch)
    return lrs


def _close(ours, reference, rel=1e-12):
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=rel, atol=0)


def test_the_rlrr_official_vtab_run_records_the_official_lr_of_every_step(weights, tmp_path):
    root = tmp_path / "vtab"
    write_vtab_tree(root, "cifar", 100, sizes=(12, 6, 10))
    out = tmp_path / "run"
    code = finetune_cli.cli(["--recipe", "rlrr-official", "--data", "vtab-1k:cifar", "--data-root", str(root),
                             "--weights", str(weights), "--image-size", "32", "--batch-size", "9", "--device", "cpu",
                             "--no-progress", "--output-dir", str(out), "--threads", "1"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    # 18 train800val200 images, batches of 9: two steps per epoch (the fewest that still show the lr held within
    # an epoch), 220 steps over the recipe's 110 epochs
    assert m["epochs"] == 110 and m["steps"] == 110 * 2
    reference = official_rlrr_lrs(3e-3, 2)
    _close(m["lr_per_step"], reference)
    assert reference[0] == reference[3] == 1e-7 and max(reference) == pytest.approx(2.9266e-3, rel=1e-4)
    assert set(reference[-18:]) == {1e-8} and reference[-19] > 1e-8  # cooldown: epochs 101-109 (lag 1)
    rec = m["recipe_settings"]
    assert rec["overridden"] == ["batch_size", "image_size"] and rec["set"]["gelu"] == "erf"
    ck = ckpt_io.load_checkpoint(out / "best.pt")
    tested = [r["epoch"] for r in ck["history"] if "test_accuracy_each_epoch" in r]
    assert tested == list(range(2, 111))  # after every epoch > 0 (0-based), as train_vtab.py:174
    assert m["test_accuracy_official"] == max(r["test_accuracy_each_epoch"] for r in ck["history"]
                                              if "test_accuracy_each_epoch" in r)
    assert m["selected_on"].startswith("last epoch") and m["best_epoch"] == 110  # the honest number: never test


@pytest.mark.slow
def test_the_fact_official_vtab_run_records_facts_schedule_and_drops_the_last_batch(weights, tmp_path):
    """fact_tt.py's loop: CosineLRScheduler(t_initial=100, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6) stepped
    with step(ep) after each of 100 epochs (timm 0.4.12's _get_lr is the formula of TimmCosine for one cycle),
    DataLoader(drop_last=True), a test when ep % 10 == 9, the task's rank and scale from configs/tt."""
    root = tmp_path / "vtab"
    write_vtab_tree(root, "dtd", 47, sizes=(12, 6, 10))
    out = tmp_path / "run"
    code = finetune_cli.cli(["--recipe", "fact-official", "--mode", "fact-tt", "--data", "vtab-1k:dtd",
                             "--data-root", str(root), "--weights", str(weights), "--image-size", "32",
                             "--batch-size", "8", "--device", "cpu", "--no-progress", "--output-dir", str(out),
                             "--threads", "1"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_train"] == 18 and m["epochs"] == 100 and m["steps"] == 100 * 2  # 18 // 8: the last 2 dropped
    sched, expected = TimmCosine(1e-3, 100, 10, 1e-6, 1e-5), []
    for epoch in range(100):
        expected += [sched.lr] * 2
        sched.step(epoch)
    _close(m["lr_per_step"], expected)
    assert expected[:4] == [1e-6] * 4 and max(expected) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 10)) / 2
                                                                          + 1e-5 * (1 - math.cos(math.pi / 10)) / 2)
    rec = m["recipe_settings"]
    assert rec["overridden"] == ["batch_size", "image_size"]
    assert (rec["method_options"]["fact_rank"], rec["method_options"]["fact_scale"]) == (8, 0.01)  # configs/tt/dtd
    assert rec["set"]["decay_groups"] == "all" and rec["set"]["drop_path_mode"] == "sample-floor"
    ck = ckpt_io.load_checkpoint(out / "best.pt")
    assert [r["epoch"] for r in ck["history"] if "test_accuracy_each_epoch" in r] == list(range(10, 101, 10))
    cfg = vit.get_config("testing")  # U, V; per block q, k, v, proj (r × r), fc1 (c·r × r), fc2 (r × c·r); head
    c = cfg.mlp_dim // cfg.hidden_size
    assert m["trainable_parameters"] == 2 * 16 * 8 + cfg.num_layers * (4 * 64 + 2 * c * 64) + 16 * 47 + 47


@pytest.mark.parametrize("recipe, mode", [("lora-noah", "lora"), ("adapter-noah", "adapter")])
def test_noahs_recipes_run_with_their_dropouts_and_drop_the_last_batch(weights, tmp_path, recipe, mode):
    root = tmp_path / "vtab"
    write_vtab_tree(root, "eurosat", 10, sizes=(12, 6, 10))
    out = tmp_path / "run"
    code = finetune_cli.cli(["--recipe", recipe, "--mode", mode, "--data", "vtab-1k:eurosat", "--data-root", str(root),
                             "--weights", str(weights), "--image-size", "32", "--batch-size", "8", "--epochs", "3",
                             "--device", "cpu", "--no-progress", "--output-dir", str(out), "--threads", "1"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 * 2 and m["epochs"] == 3  # 18 images, batches of 8: the last 2 of each epoch dropped
    options = m["recipe_settings"]["method_options"]
    assert options[f"{mode}_dropout"] == 0.1 and m["recipe_settings"]["set"]["head_init"] == "trunc-normal"
    assert [r["epoch"] for r in ckpt_io.load_checkpoint(out / "best.pt")["history"]
            if "test_accuracy_each_epoch" in r] == [1, 3]  # epoch % 10 == 0 (0-based) and the last


def test_the_recipes_start_the_head_as_their_official_code(weights):
    """NOAH: reset_classifier's trunc_normal_(std=.02) and zero bias; FacT (timm 0.4.12): a new nn.Linear,
    U(±1/√in) for weight and bias; the project: zero. Checked on a 4,000-way head by KS test (p > 1e-3)."""
    stats = pytest.importorskip("scipy.stats")
    from peft.finetune.build import build_model

    heads = {}
    for recipe, mode in (("lora-noah", "lora"), ("adapter-noah", "adapter"), ("fact-official", "fact-tt"),
                         ("project", "lora")):
        opts = apply_recipe(FinetuneOptions(mode=mode, data="vtab-1k:dtd", recipe=recipe, weights=str(weights),
                                            image_size=32))
        torch.manual_seed(0)
        heads[recipe] = build_model(opts, 4000, (weights, "testing.npz"))[0].head
    for recipe in ("lora-noah", "adapter-noah"):
        w, b = heads[recipe].weight.detach().flatten().double().numpy(), heads[recipe].bias
        assert stats.kstest(w, "norm", args=(0, 0.02)).pvalue > 1e-3 and not b.any() and abs(w).max() <= 2
    bound = 1 / math.sqrt(16)  # testing config: D = 16
    for t in (heads["fact-official"].weight, heads["fact-official"].bias):
        v = t.detach().flatten().double().numpy()
        assert stats.kstest(v, "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3
    assert not heads["project"].weight.any() and not heads["project"].bias.any()


def test_drop_last_without_one_full_batch_is_a_usage_error(weights, tmp_path, capsys):
    root = tmp_path / "vtab"
    write_vtab_tree(root, "dtd", 47, sizes=(12, 6, 10))
    code = finetune_cli.cli(["--mode", "head", "--data", "vtab-1k:dtd", "--data-root", str(root), "--weights",
                             str(weights), "--image-size", "32", "--batch-size", "64", "--drop-last", "--epochs", "1",
                             "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / "run"), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--drop-last: the 18 training images make no full batch of --batch-size 64" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_fact_recipe_takes_each_tasks_rank_and_scale_and_the_tables_print_the_mean_count():
    from peft.finetune.recipes import FACT_TT_TASKS
    from peft.finetune.suite import markdown, summarise

    for task, (rank, scale) in FACT_TT_TASKS.items():
        o = apply_recipe(FinetuneOptions(mode="fact-tt", data=f"vtab-1k:{task}", recipe="fact-official"))
        assert o.method_options == {"fact_dropout": 0.1, "fact_rank": rank, "fact_scale": scale}
        assert (o.lr, o.weight_decay, o.batch_size, o.drop_last, o.normalise) == (1e-3, 1e-4, 64, True, "imagenet")
    mine = apply_recipe(FinetuneOptions(mode="fact-tt", data="vtab-1k:svhn", recipe="fact-official",
                                        method_options={"fact_rank": 4}))
    assert mine.method_options["fact_rank"] == 4 and mine.method_options["fact_scale"] == 100.0  # explicit wins
    counts = {}
    for rank in sorted({r for r, _ in FACT_TT_TASKS.values()}):  # ViT-B/16, head excluded, built on meta
        with torch.device("meta"):
            big = vit.VisionTransformer(vit.get_config("ViT-B/16"))
        peft.apply_method(big, "fact-tt", fact_rank=rank)
        counts[rank] = sum(p.numel() for n, p in big.named_parameters() if p.requires_grad and not n.startswith("head"))
        assert counts[rank] == 2 * 768 * rank + 12 * (4 * rank**2 + 2 * 4 * rank**2)
    per_task = {t: counts[r] for t, (r, _) in FACT_TT_TASKS.items()}
    assert (counts[4], counts[8], counts[16]) == (8_448, 21_504, 61_440)
    mean = sum(per_task.values()) / 19
    assert round(mean) == 39_734 and f"{mean / 1e6:.3f}M" == "0.040M"  # FacT-TT's "0.040M" in the VTAB tables
    rows = [{"task": t, "mode": "fact-tt", "test_accuracy": 0.5, "val_accuracy": None, "splits": {"test": "test"},
             "trainable_parameters": n, "epochs": 1, "time_seconds": 1.0} for t, n in per_task.items()]
    results = summarise(rows)
    s = results["summary"]["fact-tt"]
    assert s["trainable_parameters_per_task"] == per_task and s["trainable_parameters_mean"] == pytest.approx(mean)
    from peft.finetune.suite import SuiteOptions
    assert "39,734 (mean; per task: 61,440, 21,504," in markdown(SuiteOptions(), results)


class Param:
    def __init__(self, lr):
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.opt = torch.optim.SGD([self.p], lr=lr)


def _schedule(data, mode="rlrr", recipe="rlrr-official", steps=2, **kw):
    opts = apply_recipe(FinetuneOptions(mode=mode, data=data, recipe=recipe, **kw))
    return opts, LRSchedule(opts, opts.resolved_lr(), steps)


def test_fgvc_schedules_equal_timm_and_torchs_warm_restarts():
    opts, ours = _schedule("fgvc:flowers")
    assert opts.epochs == 60
    _close([ours(s) for s in range(60 * 2)], official_rlrr_lrs(3e-3, 2, epochs=50))
    for name in ("cub", "dogs"):  # train_fgvc.py:163-172: timm's scheduler built, then replaced
        opts, ours = _schedule(f"fgvc:{name}")
        ref = Param(opts.lr)
        group = ref.opt.param_groups[0]
        group.setdefault("initial_lr", group["lr"])  # timm's Scheduler.__init__
        group["lr"] = 1e-7  # timm's warmup_lr_init, then overwritten by the restarts' first step
        restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(ref.opt, T_0=5, T_mult=1, eta_min=0)
        expected = []
        for epoch in range(60):
            expected += [group["lr"]] * 2
            restarts.step(epoch)
        _close([ours(s) for s in range(120)], expected)
        assert expected[0] == opts.lr  # no warmup: the first epoch runs at the full rate


def test_noah_ssf_and_vpt_schedules_follow_their_loops():
    _, noah = _schedule("vtab-1k:cifar", mode="lora", recipe="lora-noah")  # 100 epochs, step(epoch), no cooldown
    sched, expected = TimmCosine(1e-3, 100, 10, 1e-6, 1e-5), []
    for epoch in range(100):
        expected += [sched.lr] * 2
        sched.step(epoch)
    _close([noah(s) for s in range(200)], expected)
    _, ssf = _schedule("vtab-1k:cifar", mode="ssf", recipe="ssf-official")  # timm train.py: step(epoch + 1)
    sched, expected = TimmCosine(5e-3, 100, 10, 1e-7, 1e-8), []
    for epoch in range(110):
        expected += [sched.lr] * 2
        sched.step(epoch + 1)
    _close([ssf(s) for s in range(220)], expected)
    opts, vpt = _schedule("fgvc:cub", mode="vpt", recipe="vpt-official")  # LambdaLR stepped per epoch
    ref = Param(opts.lr)

    def lr_lambda(step, warmup=10, total=100):  # KMnP/vpt src/solver/lr_scheduler.py WarmupCosineSchedule
        if step < warmup:
            return float(step) / float(max(1.0, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1. + math.cos(math.pi * 0.5 * 2.0 * progress)))

    lam = torch.optim.lr_scheduler.LambdaLR(ref.opt, lr_lambda)
    expected = []
    for _ in range(100):
        expected += [ref.opt.param_groups[0]["lr"]] * 2
        ref.opt.step()
        lam.step()
    _close([vpt(s) for s in range(200)], expected)
    assert opts.lr == pytest.approx(0.1 * 128 / 256) and opts.optimizer == "sgd" and opts.frozen_eval


# -------------------------------------------------------------- the official RLRR model, re-implemented

def official_names(model) -> dict:
    """Our RLRR parameters under the official code's names (zstarN70/RLRR models/networks.py), with its shapes."""
    out = {}
    lin = {"attn.q": "attn.query", "attn.k": "attn.key", "attn.v": "attn.value", "attn.proj": "attn.out",
           "mlp.fc1": "ffn.fc1", "mlp.fc2": "ffn.fc2"}
    emb = "transformer.embeddings."
    for name, p in model.named_parameters():
        t = p
        if name in ("cls_token", "pos_embed"):
            key = emb + {"cls_token": "cls_token", "pos_embed": "position_embeddings"}[name]
        elif name.startswith("patch_embed."):
            key = emb + {"weight": "patch_embeddings.weight", "bias": "patch_embeddings.bias",
                         "ssf.scale": "ssf_scale_patch", "ssf.shift": "ssf_shift_patch"}[name[len("patch_embed."):]]
        elif name.startswith("norm."):
            key = "transformer.encoder." + {"weight": "encoder_norm.weight", "bias": "encoder_norm.bias",
                                            "ssf.scale": "ssf_scale_enc_norm",
                                            "ssf.shift": "ssf_shift_enc_norm"}[name[len("norm."):]]
        elif name.startswith("head."):
            key = name
        else:
            _, i, rest = name.split(".", 2)
            pre = f"transformer.encoder.layer.{i}."
            norms = {"norm1": ("attention_norm", "attn_norm"), "norm2": ("ffn_norm", "ffn_norm")}
            part, leaf = rest.rsplit(".", 1) if not rest.endswith(("ssf.scale", "ssf.shift")) else \
                (rest.split(".")[0], rest.split(".", 1)[1])
            if part in norms:
                key = pre + (f"{norms[part][0]}.{leaf}" if leaf in ("weight", "bias") else
                             f"ssf_{leaf.split('.')[1]}_{norms[part][1]}")
            else:
                key = pre + lin[part] + "." + {"weight": "mlp.weight", "bias": "mlp.bias", "s_in": "scale_col",
                                               "s_out": "scale_line", "f": "shift_bias"}[leaf]
                if leaf == "f":
                    t = p.view(1, -1)
        out[key] = t
    return out


def official_forward(P: dict, x: torch.Tensor, heads: int, layers: int) -> torch.Tensor:
    """RLRRVisionTransformer.forward of the official code, functionally: separate query/key/value RLRRLinears
    (W ⊙ scale_col ⊙ scale_line + W, b + shift_bias), SSF after each norm and the patch embedding, erf GELU."""
    def lin(pre, h):
        w = P[pre + ".mlp.weight"]
        return F.linear(h, w * P[pre + ".scale_col"] * P[pre + ".scale_line"] + w, P[pre + ".mlp.bias"] +
                        P[pre + ".shift_bias"])

    def ln(pre, h):
        return F.layer_norm(h, h.shape[-1:], P[pre + ".weight"], P[pre + ".bias"], eps=1e-6)

    e = "transformer.embeddings."
    h = F.conv2d(x, P[e + "patch_embeddings.weight"], P[e + "patch_embeddings.bias"],
                 stride=P[e + "patch_embeddings.weight"].shape[-1]).flatten(2).transpose(-1, -2)
    h = h * P[e + "ssf_scale_patch"] + P[e + "ssf_shift_patch"]
    h = torch.cat([P[e + "cls_token"].expand(x.shape[0], -1, -1), h], 1) + P[e + "position_embeddings"]
    for i in range(layers):
        pre = f"transformer.encoder.layer.{i}."
        a = ln(pre + "attention_norm", h) * P[pre + "ssf_scale_attn_norm"] + P[pre + "ssf_shift_attn_norm"]
        B, N, D = a.shape
        q, k, v = (lin(pre + f"attn.{n}", a).view(B, N, heads, D // heads).permute(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), -1)
        h = h + lin(pre + "attn.out", (probs @ v).permute(0, 2, 1, 3).reshape(B, N, D))
        f = ln(pre + "ffn_norm", h) * P[pre + "ssf_scale_ffn_norm"] + P[pre + "ssf_shift_ffn_norm"]
        h = h + lin(pre + "ffn.fc2", F.gelu(lin(pre + "ffn.fc1", f)))  # nn.GELU(): erf
    enc = "transformer.encoder."
    h = ln(enc + "encoder_norm", h) * P[enc + "ssf_scale_enc_norm"] + P[enc + "ssf_shift_enc_norm"]
    return F.linear(h[:, 0], P["head.weight"], P["head.bias"])


def _rlrr_model(weights, dtype=torch.float64, gelu="erf"):
    model = load_npz(weights, num_classes=5)
    torch.manual_seed(3)
    peft.apply_method(model, "rlrr")
    with torch.no_grad():
        for n, p in model.named_parameters():  # every trainable tensor away from its init (head, f included)
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    vit.set_gelu(model, gelu)
    return model.to(dtype).eval()


def test_erf_gelu_model_equals_the_official_rlrr_model_in_float64(weights):
    model = _rlrr_model(weights)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    cfg = model.config
    official = official_forward(official_names(model), x, cfg.num_heads, cfg.num_layers)
    ours = model(x)
    assert (ours - official).abs().max().item() <= 1e-12 * official.abs().max().item()
    vit.set_gelu(model, "tanh")  # Google's function differs measurably: the comparison can fail
    assert (model(x) - official).abs().max().item() > 1e-6 * official.abs().max().item()


def test_one_official_adamw_step_equals_the_official_codes_step(weights, tmp_path):
    """Same weights, same batch: three optimizer steps of --recipe rlrr-official (epochs 0-2 of 110: lr 1e-7,
    1e-7, then the first warmup increment) against the official loop re-implemented: AdamW on
    get_parameters' groups, NativeScaler (GradScaler), CrossEntropyLoss mean; float32, no dropout (resisc45)."""
    root = tmp_path / "vtab"
    write_vtab_tree(root, "resisc45", 45, sizes=(12, 6, 10))
    opts = FinetuneOptions(mode="rlrr", weights=str(weights), data="vtab-1k:resisc45", data_root=str(root),
                           recipe="rlrr-official", image_size=32, batch_size=18, precision="fp32", weight_decay=0.5,
                           device="cpu", progress=False, output_dir=str(tmp_path / "run"))
    from peft.finetune.trainer import Trainer
    trainer = Trainer(opts)
    trainer.setup()
    start = copy.deepcopy(trainer.model)
    P = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in official_names(start).items()}
    trainable = [k for k in P if any(s in k for s in ("head", "scale", "shift"))]  # frozen_param(['head', ...])
    groups = [{"params": [P[k] for k in trainable if not ("bias" in k or "norm" in k)], "lr": 3e-3, "weight_decay": 0.5},
              {"params": [P[k] for k in trainable if "bias" in k or "norm" in k], "lr": 3e-3, "weight_decay": 0.}]
    optimizer = torch.optim.AdamW(groups)
    for g in optimizer.param_groups:
        g["lr"] = 1e-7
    scaler = torch.amp.GradScaler("cpu")
    sched = TimmCosine(3e-3, 100, 10, 1e-7, 1e-8)
    data = trainer.data.train
    x = trainer.eval_tf(data.images.to_tensor())  # no crop, no flip for resisc45: the training input is this
    y = data.labels
    for epoch in range(3):
        for g in optimizer.param_groups:
            g["lr"] = sched.lr
        loss = F.cross_entropy(official_forward(P, x, start.config.num_heads, start.config.num_layers), y)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sched.step(epoch)
    while trainer.epoch < 3:
        trainer.train_epoch()
        trainer.epoch += 1
    ours, first = official_names(trainer.model), official_names(start)
    flat = lambda d: torch.cat([d[k].detach().flatten() for k in trainable])  # noqa: E731
    assert (flat(ours) - flat(P)).norm() <= 1e-6 * flat(P).norm()  # the parameters after the steps
    for k in trainable:
        a, b, before = ours[k].detach(), P[k].detach(), first[k].detach()
        if ".attn.key.shift_bias" in k:
            continue  # softmax ignores a shift of every key by the same vector: its gradient is 0 up to rounding,
            # which Adam normalises to ±lr noise (in both codes alike)
        assert (a - b).norm() <= 1e-4 * (b - before).norm(), k  # the update itself, not only the weights
    assert trainer.lr_per_step == [1e-7, 1e-7, pytest.approx(1e-7 + (3e-3 - 1e-7) / 10, rel=1e-12)]


# ------------------------------------------------------------------------------- the comparison methods

def test_noah_lora_is_one_unscaled_pair_on_the_fused_qkv():
    """NOAH's LoRA (supernet_vision_transformer_timm.py): qkv = x (W_qkv + (A B)ᵀ)ᵀ + b with A (in, r), B (r, 3·D),
    re-derived on the fused weight and compared with our separate q, k, v (training: test_official_training)."""
    big = vit.VisionTransformer(vit.get_config("ViT-B/16", num_classes=10))
    peft.apply_method(big, "lora", lora_variant="noah")
    assert sum(p.numel() for n, p in big.named_parameters() if p.requires_grad and not n.startswith("head")) == 294_912
    a = big.blocks[0].attn.q.lora_A
    assert a.shape == (768, 8) and big.blocks[0].attn.v.lora_B.shape == (8, 768)
    model = vit.VisionTransformer(vit.get_config("testing")).double().eval()
    base = copy.deepcopy(model)
    peft.apply_method(model, "lora", lora_variant="noah", lora_rank=4)
    attn, ref = model.blocks[0].attn, base.blocks[0].attn
    with torch.no_grad():
        for part in ("q", "k", "v"):
            getattr(attn, part).lora_B.normal_()
    A = attn.q.lora_A
    assert attn.k.lora_A is A and attn.v.lora_A is A  # one A per block
    B = torch.cat([attn.q.lora_B, attn.k.lora_B, attn.v.lora_B], 1)  # (r, 3D)
    W = torch.cat([ref.q.weight, ref.k.weight, ref.v.weight])  # the fused (3D, D) weight
    b = torch.cat([ref.q.bias, ref.k.bias, ref.v.bias])
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    fused = F.linear(x, W + (A @ B).T, b)  # no alpha / r
    ours = torch.cat([attn.q(x), attn.k(x), attn.v(x)], -1)
    assert (ours - fused).abs().max().item() < 1e-12 and (ours - F.linear(x, W, b)).abs().max().item() > 0.1
    merged = copy.deepcopy(model)
    peft.merge_adapters(merged)
    y = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert (merged(y) - model(y)).abs().max().item() < 1e-12


def test_merge_keeps_float64(weights):
    model = _rlrr_model(weights, dtype=torch.float64, gelu="tanh")
    merged = copy.deepcopy(model)
    peft.merge_adapters(merged)
    assert all(p.dtype == torch.float64 for p in merged.parameters())
    q = model.blocks[0].attn.q
    assert torch.equal(merged.blocks[0].attn.q.bias, q.bias + q.f)  # no float32 rounding of b + f
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert (merged(x) - model(x)).abs().max().item() <= 1e-12 * model(x).abs().max().item()


def test_recipes_are_data_with_sources_and_refuse_what_they_do_not_cover():
    fields = {f for f in FinetuneOptions.__dataclass_fields__}
    for recipe in RECIPE_TABLE.values():
        for kind in recipe.benchmarks:
            data = "vtab-1k:cifar" if kind == "vtab-1k" else "fgvc:cub"
            settings = recipe_settings(recipe.name, data, recipe.method)
            assert set(settings) <= fields and settings["epochs"] >= 100 or kind == "fgvc"
    src = open(peft.finetune.recipes.__file__).read()
    assert src.count("zstarN70") >= 1 and src.count(".py:") >= 20  # values cite file and line
    with pytest.raises(OptionsError, match="official run of --mode lora, not --mode rlrr"):
        apply_recipe(FinetuneOptions(mode="rlrr", data="vtab-1k:cifar", recipe="lora-noah"))
    with pytest.raises(OptionsError, match="no official fgvc run"):
        apply_recipe(FinetuneOptions(mode="lora", data="fgvc:cub", recipe="lora-noah"))
    with pytest.raises(OptionsError, match="Pass --lr, or use tools/vtab.py --sweep"):
        apply_recipe(FinetuneOptions(mode="vpt", data="vtab-1k:cifar", recipe="vpt-official"))
    vpt = apply_recipe(FinetuneOptions(mode="vpt", data="vtab-1k:cifar", recipe="vpt-official", lr=0.05))
    assert (vpt.optimizer, vpt.momentum, vpt.batch_size, vpt.method_options["vpt_dropout"]) == ("sgd", 0.9, 128, 0.0)
    noah = apply_recipe(FinetuneOptions(mode="lora", data="vtab-1k:cifar", recipe="lora-noah"))
    assert noah.method_options == {"lora_variant": "noah", "lora_rank": 8, "lora_dropout": 0.1}  # :207 default
    assert noah.normalise == "imagenet" and noah.drop_last and noah.drop_path == 0.1  # :275-281, :59
    adapter = apply_recipe(FinetuneOptions(mode="adapter", data="vtab-1k:dtd", recipe="adapter-noah"))
    assert adapter.method_options == {"adapter_dim": 8, "adapter_placement": "mlp", "adapter_init": "trunc-normal",
                                      "adapter_dropout": 0.1}
    assert {k: getattr(adapter, k) for k in ("lr", "weight_decay", "batch_size", "epochs", "drop_last")} == \
        {k: getattr(noah, k) for k in ("lr", "weight_decay", "batch_size", "epochs", "drop_last")}
    ssf_model = vit.VisionTransformer(vit.get_config("testing"))
    peft.apply_method(ssf_model, "ssf")
    decayed = {id(p) for p in param_groups(ssf_model, 0.1, "timm")[0]["params"]}
    assert {n for n, p in ssf_model.named_parameters() if id(p) in decayed} == {"head.weight"}  # SSF's own groups
    vpt_model = vit.VisionTransformer(vit.get_config("testing"))
    peft.apply_method(vpt_model, "vpt")
    no_decay = {id(p) for p in param_groups(vpt_model, 0.1, "vpt")[1]["params"]}
    assert {n for n, p in vpt_model.named_parameters() if id(p) in no_decay} == {"head.bias"}


def test_command_line_flags_win_over_the_recipe_even_at_their_default():
    from peft.cli.args import parse_options
    opts = parse_options(["--recipe", "rlrr-official", "--data", "vtab-1k:dtd", "--batch-size", "128",
                          "--lora-rank", "4", "--mode", "lora"], FinetuneOptions, with_methods=True)
    assert "batch_size" in opts.explicit and "epochs" not in opts.explicit
    resolved = apply_recipe(opts)
    assert resolved.batch_size == 128 and resolved.epochs == 110 and resolved.method_options == {"lora_rank": 4}


def test_frozen_eval_keeps_the_backbone_deterministic_but_the_prompt_dropout_on():
    model = vit.VisionTransformer(vit.get_config("testing", dropout_rate=0.5))
    peft.apply_method(model, "vpt", vpt_dropout=0.5)
    model.train()
    peft.state.train_adapters_only(model)
    dropouts = {n: m.training for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert any(dropouts.values()) and all(on == n.endswith("prompt_dropout") for n, on in dropouts.items())


def test_fgvc_final_trains_on_trainval_with_the_official_crops(weights, tmp_path):
    from PIL import Image

    from loaders.datasets.fgvc import load_fgvc

    root = tmp_path / "fgvc"
    folder = write_fgvc_tree(root, "StanfordDogs", range(120), per_split=(1, 1, 1))  # the official folder name
    big = folder / "000.class" / "train_0.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8)).save(big)
    ds = load_fgvc("dogs", "trainval", root, image_size=224, progress=False)
    assert len(ds) == 240
    i = ds.labels.tolist().index(0)  # 000.class/train_0.jpg is the first sorted path
    with Image.open(big) as im:
        expected = np.asarray(im.convert("RGB").resize((256, 256), Image.Resampling.BILINEAR))
    stored = ds.images.to_tensor()[i].numpy()
    assert np.array_equal(stored, expected)  # torchvision Resize((256, 256)) on a PIL image: PIL's bilinear
    from peft.finetune.data import run_transforms

    class D:
        stored, photos = 256, False
    opts = apply_recipe(FinetuneOptions(mode="rlrr", data="fgvc:dogs", recipe="rlrr-official"))
    train_tf, eval_tf = run_transforms(opts, D, 224)
    u8 = ds.images.to_tensor()[:6]
    centre = eval_tf(u8)
    raw = (u8[:, 16:240, 16:240].permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5  # CenterCrop(224) of 256
    assert (centre - raw).abs().max().item() < 1e-6
    g = torch.Generator().manual_seed(0)
    crops = train_tf(u8, g)
    full = (u8.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    for k in range(6):  # every crop is a whole-pixel 224 window of the 256² image, maybe flipped
        hits = [(y, x, fl) for y in range(33) for x in range(33) for fl in (False, True)
                if (crops[k] - (full[k, :, y:y + 224, x:x + 224].flip(-1) if fl else
                                full[k, :, y:y + 224, x:x + 224])).abs().max() < 1e-6]
        assert len(hits) >= 1
    m = finetune_cli.cli(["--recipe", "rlrr-official", "--mode", "head", "--data", "fgvc:dogs", "--data-root", str(root),
                          "--weights", str(weights), "--image-size", "32", "--epochs", "2", "--device", "cpu",
                          "--no-progress", "--output-dir", str(tmp_path / "run"), "--threads", "1"])
    assert m == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["splits"] == {"train": "trainval", "val": None, "test": "test"} and metrics["num_train"] == 240
    assert metrics["test_accuracy_official"] is not None and len(metrics["lr_per_step"]) == 2 * 8


def test_an_interrupted_recipe_run_resumes_onto_the_same_steps(weights, tmp_path):
    root = tmp_path / "vtab"
    write_vtab_tree(root, "dtd", 47, sizes=(12, 6, 10))
    base = ["--recipe", "rlrr-official", "--data", "vtab-1k:dtd", "--data-root", str(root), "--weights", str(weights),
            "--image-size", "32", "--batch-size", "8", "--epochs", "6", "--device", "cpu", "--no-progress",
            "--threads", "1", "--precision", "fp32"]
    assert finetune_cli.cli(base + ["--output-dir", str(tmp_path / "whole")]) == 0
    assert finetune_cli.cli(base + ["--output-dir", str(tmp_path / "cut"), "--stop-after-epoch", "3"]) == 0
    assert finetune_cli.cli(base + ["--output-dir", str(tmp_path / "cut"), "--resume"]) == 0
    whole, cut = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "cut"))
    assert whole["lr_per_step"] == cut["lr_per_step"] and len(whole["lr_per_step"]) == 18
    assert whole["test_accuracy_official"] == cut["test_accuracy_official"]
    a, b = (ckpt_io.load_checkpoint(tmp_path / d / "best.pt")["state_dict"] for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise the same run


@pytest.mark.parametrize("flags, epochs, expected", [
    # NOAH tests after 0-based epoch e when e % 10 == 0 or e == epochs - 1 (supernet_train_prompt.py:427-430):
    # 13 epochs are off the every-10 grid, so the last (1-based 13) is tested on its own.
    (["--recipe", "lora-noah", "--mode", "lora"], 13, [e + 1 for e in range(13) if e % 10 == 0 or e == 12]),
    # the flags alone: from epoch 3, every 4th, and the last (1-based 3, 7, 8)
    (["--mode", "lora", "--official-test-from", "3", "--official-test-every", "4"], 8, [3, 7, 8]),
])
def test_the_official_per_epoch_test_includes_the_last_epoch_off_the_grid(weights, tmp_path, flags, epochs, expected):
    root = tmp_path / "vtab"
    write_vtab_tree(root, "cifar", 100, sizes=(8, 4, 6))
    out = tmp_path / "run"
    code = finetune_cli.cli([*flags, "--epochs", str(epochs), "--data", "vtab-1k:cifar", "--data-root", str(root),
                             "--weights", str(weights), "--image-size", "32", "--batch-size", "8", "--device", "cpu",
                             "--no-progress", "--output-dir", str(out), "--threads", "1"])
    assert code == 0
    history = ckpt_io.load_checkpoint(out / "checkpoint.pt")["history"]
    assert [r["epoch"] for r in history if "test_accuracy_each_epoch" in r] == expected
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_accuracy_official"] == max(r["test_accuracy_each_epoch"] for r in history
                                              if "test_accuracy_each_epoch" in r)
