"""One run per output folder: a second process into a locked folder stops at once; a fresh run never mixes its
files with another run's; --resume refuses option changes that alter the optimisation, naming them.

What a checkpoint carries through save -> load -> rebuild, on tiny real runs: the GELU chosen by ``--gelu`` reaches
every MLP of the trained and of the rebuilt model (checked against both formulas written out); every registered
method, given non-default values for all its options, is rebuilt with the same settings and computes the trained
model's outputs; a missing or an unexpected key is refused with one line naming it (adapter and full checkpoints);
base weights replaced at the same path (another sha256) stop ``--resume`` and evaluation with one line."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import peft
import vit
from npz_factory import write_google_npz
from peft.cli import evaluate as evaluate_cli
from peft.cli import finetune as finetune_cli
from peft.cli.args import parse_options
from peft.finetune import CheckpointMismatch, FinetuneOptions, OptionsError
from peft.finetune import trainer as training
from peft.finetune.rebuild import load_for_inference, load_model_from_checkpoint
from conftest import FMNIST, images, needs_fmnist, tiny

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; sys.path.insert(0, sys.argv[2]); from peft.finetune.rundir import RunFolder; "
        "held = RunFolder(sys.argv[1], False, False); print('held', flush=True); time.sleep(120)")


def test_a_second_run_into_a_locked_folder_stops_at_once_and_kill_9_frees_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        second = subprocess.run([sys.executable, str(ROOT / "tools" / "finetune.py"), "--weights", "none",
                                 "--mode", "full", "--model", "testing", "--output-dir", str(out)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and time.monotonic() - start < 60
        assert "is in use by another run (pid" in second.stderr and "Traceback" not in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    from peft.finetune.rundir import RunFolder  # the kernel released the lock with the killed process

    RunFolder(out, False, False).release()


@needs_fmnist
def test_fresh_runs_resume_changes_and_overwrite(tmp_path, mini_npz):
    kw = dict(weights=str(mini_npz), mode="lora", epochs=1, max_train_samples=64)
    first = training.run(tiny(tmp_path, **kw))
    with pytest.raises(OptionsError, match="already holds a run .*--resume.*--overwrite"):
        training.run(tiny(tmp_path, **kw))
    argv = ["--weights", str(mini_npz), "--mode", "lora", "--data", "fashion_mnist", "--data-root", str(FMNIST),
            "--classes", "0-4", "--output-dir", str(tmp_path / "run"), "--device", "cpu", "--no-progress"]
    assert finetune_cli.cli(argv) == 2  # the same refusal from the command line, as a usage error
    with pytest.raises(CheckpointMismatch, match=r"--batch-size \(32 -> 16\), --lr \(0\.003 -> 0\.01\) differ"):
        training.run(tiny(tmp_path, resume=True, lr=1e-2, batch_size=16, **kw))
    extended = training.run(tiny(tmp_path, resume=True, **{**kw, "epochs": 2}))  # --epochs may grow
    assert extended["epochs"] == 2
    redo = training.run(tiny(tmp_path, overwrite=True, **{**kw, "max_train_samples": 32}))
    assert redo["num_train"] == 32 != first["num_train"] and redo["epochs"] == 1
    import json

    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["num_train"] == 32


def test_export_never_overwrites_the_weights(tmp_path, mini_npz):
    with pytest.raises(OptionsError, match="--export-npz .* is the --weights file"):
        training.run(tiny(tmp_path, weights=str(mini_npz), mode="lora", export_npz=str(mini_npz)))


def exit_code(argv) -> int:
    try:
        return finetune_cli.cli(argv)
    except SystemExit as e:  # argparse's own errors (unknown choice, bad type)
        return e.code


@pytest.mark.parametrize("flag, value, text", [("--lr", "-1", "--lr must be positive"),
                                                ("--warmup-epochs", "-0.5", "--warmup-epochs must be at least 0"),
                                                ("--weight-decay", "-1e-4", "--weight-decay must be at least 0"),
                                                ("--max-eval-samples", "0", "--max-eval-samples must be at least 1"),
                                                ("--dropout", "1.2", "--dropout must be in [0, 1)"),
                                                ("--classes", "7-3", "--classes '7-3': empty range"),
                                                ("--mode", "prefix", "invalid choice: 'prefix'"),
                                                ("--epochs", "two", "--epochs: invalid int value: 'two'"),
                                                ("--lora-rank", "4", "--lora-rank do(es) not apply to --mode full")])
def test_bad_flags_are_one_line_usage_errors(flag, value, text, capsys):
    argv = ["--weights", "none", "--mode", "full", "--model", "testing", f"{flag}={value}"]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and len(err.splitlines()) == 1, err


def test_truncated_checkpoint_names_the_file(tmp_path):
    import torch

    from peft.finetune.checkpoint import load_checkpoint

    path = tmp_path / "best.pt"
    torch.save({"format": "vit-peft-finetune", "x": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointMismatch, match=rf"{path} is not a readable checkpoint"):
        load_checkpoint(path)


def test_a_run_folder_gives_its_best_checkpoint_else_its_latest(tmp_path):
    """Evaluation and prediction given a run folder read best.pt (the selected model) when there is one, else
    checkpoint.pt (the last epoch); a folder with neither, or a missing file, is an error naming what is absent."""
    import torch

    from peft.finetune import checkpoint as ckpt_io

    for name, epoch in (("checkpoint.pt", 3), ("best.pt", 2)):
        torch.save({"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "epoch": epoch}, tmp_path / name)
    assert ckpt_io.resolve_checkpoint_path(tmp_path) == tmp_path / "best.pt"
    assert ckpt_io.load_checkpoint(tmp_path)["epoch"] == 2
    (tmp_path / "best.pt").unlink()
    assert ckpt_io.load_checkpoint(tmp_path)["epoch"] == 3
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(FileNotFoundError, match="no best.pt or checkpoint.pt in folder"):
        ckpt_io.resolve_checkpoint_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="gone.pt does not exist"):
        ckpt_io.resolve_checkpoint_path(tmp_path / "gone.pt")


@pytest.mark.parametrize("tool, argv, text", [
    ("evaluate", ["x", "--batch-size", "0"], "--batch-size must be at least 1"),
    ("quickstart", ["--modes", "rlrr,nope"], "nope is not one of"),
    ("quickstart", ["--finetune-epochs", "0"], "--finetune-epochs must be at least 1"),
    ("attention_map", ["--discard-ratio", "1.5", "a.png"], "--discard-ratio must be in [0, 1)"),
    ("patch_filters", ["--components", "0"], "--components must be at least 1"),
    ("pos_embed", ["--dpi", "0"], "--dpi must be in 10..1200"),
    ("benchmark", ["--repeats", "0"], "--repeats must be at least 1"),
    ("predict", ["a.png", "--checkpoint", "x", "--top-k", "0"], "--top-k must be at least 1"),
])
def test_every_tool_gives_one_line_and_exit_2_for_a_bad_flag(tool, argv, text, capsys):
    import importlib

    module = importlib.import_module(f"peft.cli.{tool}")
    try:
        code = module.cli(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and text in err and len(err.splitlines()) == 1, err


def test_a_device_that_does_not_exist_is_a_usage_error(capsys):
    assert exit_code(["--weights", "none", "--mode", "full", "--model", "testing", "--device", "tpu"]) == 2
    assert "--device 'tpu': expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err


@needs_fmnist
def test_the_resume_refusal_shows_effective_values_and_only_real_flags(tmp_path, mini_npz):
    import re

    from peft.cli.args import build_parser, method_flags
    from peft.finetune.options import FinetuneOptions

    kw = dict(weights=str(mini_npz), mode="lora", epochs=1, max_train_samples=32, max_eval_samples=32,
              lr=None)  # lr: lora's default
    training.run(tiny(tmp_path, **kw))
    with pytest.raises(CheckpointMismatch) as refused:
        training.run(tiny(tmp_path, resume=True, **{**kw, "lr": 1e-2, "method_options": {"lora_rank": 4}}))
    message = str(refused.value)
    default_lr = FinetuneOptions(mode="lora").resolved_lr()
    assert f"--lr ({default_lr!r} -> 0.01)" in message and "None" not in message
    assert "--lora-rank (8 -> 4)" in message and "--method-options" not in message
    parser = build_parser(FinetuneOptions)
    method_flags(parser)
    real = {s for action in parser._actions for s in action.option_strings}
    named = set(re.findall(r"--[a-z][a-z0-9-]*", message.replace(str(tmp_path), "")))
    assert named and named <= real, named - real  # --explicit was listed, a field no flag sets
    # The default's own value given explicitly (and a method option at its default) change nothing: accepted.
    same = training.run(tiny(tmp_path, resume=True, **{**kw, "lr": default_lr, "method_options": {"lora_rank": 8}}))
    assert same["epochs"] == 1 and same["lr"] == default_lr



def test_a_run_that_recorded_its_folder_relative_resumes_from_the_same_directory(tmp_path, monkeypatch):
    """Runs now record their photo folder absolute; an older run recorded it as given ('photos'). Resumed from the
    directory it was started in, the two name one folder: no change is reported. Another folder still is one."""
    import dataclasses

    from peft.finetune.options import FinetuneOptions, changed_options

    (tmp_path / "photos").mkdir()
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    stored = dataclasses.asdict(FinetuneOptions(mode="lora", data="photos"))
    assert changed_options(stored, FinetuneOptions(mode="lora", data=str(tmp_path / "photos"))) == []
    changed = changed_options(stored, FinetuneOptions(mode="lora", data=str(tmp_path / "other")))
    assert [flag for flag, _, _ in changed] == ["--data"]

# ── what a checkpoint carries ───────────────────────────────────────────────────────────────────────────────

DATA = ["--data", "synthetic", "--classes", "0-1", "--max-train-samples", "32", "--max-eval-samples", "16",
        "--epochs", "1", "--batch-size", "16", "--image-size", "32", "--device", "cpu", "--no-progress",
        "--threads", "1"]


def _train(argv):
    """Run tools/finetune.py's options in-process; returns the Trainer (its model holds the kept epoch's state)."""
    trainer = training.Trainer(parse_options(argv, FinetuneOptions, with_methods=True))
    trainer.run()
    return trainer


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ── the GELU ─────────────────────────────────────────────────────────────────────────────────────────────

def gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def gelu_tanh(x):  # Hendrycks & Gimpel's approximation, Flax nn.gelu's default
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def assert_mlps_compute(model, gelu: str) -> None:
    """Every block's MLP equals fc2(GELU(fc1(x))) with the named formula (float64), and is far from the other."""
    right, wrong = (gelu_erf, gelu_tanh) if gelu == "erf" else (gelu_tanh, gelu_erf)
    x = 3 * torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            mlp = block.mlp
            y = mlp(x).double()
            h = mlp.fc1(x).double()
            w2, b2 = mlp.fc2.weight.double(), mlp.fc2.bias.double()
            err = (y - (right(h) @ w2.T + b2)).abs().max().item()
            other = (y - (wrong(h) @ w2.T + b2)).abs().max().item()
            assert err < 1e-5 and other > 100 * err, (i, gelu, err, other)


@pytest.mark.slow
@pytest.mark.parametrize("gelu", ["erf", "tanh"])
@pytest.mark.parametrize("kind", ["adapters", "full"])
def test_the_chosen_gelu_reaches_the_trained_and_the_rebuilt_models(testing_npz, tmp_path, gelu, kind):
    base = ["--mode", "lora", "--weights", str(testing_npz)] if kind == "adapters" else \
        ["--mode", "full", "--weights", "none", "--model", "testing"]
    run = tmp_path / "run"
    trainer = _train([*base, "--gelu", gelu, "--output-dir", str(run), *DATA])
    assert_mlps_compute(trainer.model, gelu)  # what trained
    model, meta = load_model_from_checkpoint(run)  # what tools/evaluate.py and tools/predict.py rebuild
    assert meta["state_dict_kind"] == kind and model.config.gelu == gelu
    assert_mlps_compute(model, gelu)
    assert_mlps_compute(load_for_inference(run).model, gelu)


# ── every method's options through a checkpoint ──────────────────────────────────────────────────────────

# A value other than the published default for every option of every registered method (flags as typed); some are
# zero where the default is not, since a zero read back as "not given" silently becomes the default again.
NON_DEFAULT = {
    "head": {}, "mlp": {}, "full": {}, "bitfit": {},
    "vpt": {"vpt_tokens": 3, "vpt_dropout": 0.0},
    "vpt-shallow": {"vpt_shallow_tokens": 4, "vpt_shallow_dropout": 0.25},
    "adaptformer": {"adaptformer_dim": 5, "adaptformer_scale": 0.7, "adaptformer_dropout": 0.0},
    "adapter": {"adapter_dim": 5, "adapter_placement": "both", "adapter_init": "trunc-normal",
                "adapter_dropout": 0.15},
    "lora": {"lora_rank": 3, "lora_alpha": 5.0, "lora_targets": "q,k,v", "lora_dropout": 0.2, "lora_variant": "noah"},
    "dora": {"dora_rank": 3, "dora_alpha": 5.0, "dora_targets": "q,k,v"},
    "fact-tt": {"fact_rank": 3, "fact_scale": 0.5, "fact_dropout": 0.0},
    "ssf": {"ssf_init": "identity"},
    "rlrr": {"rlrr_rank": 2, "rlrr_init": "identity", "rlrr_impl": "official", "rlrr_weight_memory": "keep"},
}


def _flags(mode: str) -> list[str]:
    """NON_DEFAULT[mode] as typed on the command line: --lora-rank 3 ..."""
    return [a for k, v in NON_DEFAULT[mode].items() for a in ("--" + k.replace("_", "-"), str(v))]


def test_every_registered_method_and_option_has_a_non_default_value_here():
    assert sorted(NON_DEFAULT) == sorted(peft.METHODS), "add the new method's options to NON_DEFAULT"
    for name, method in peft.METHODS.items():
        assert sorted(_flags(name)[::2]) == sorted(o.flag for o in method.options.values()), name
        opts = parse_options(["--mode", name, *_flags(name)], FinetuneOptions, with_methods=True)
        config, default = opts.method_config(), method.config()
        changed = [k for k, v in config.to_options().items() if v == default.to_options()[k]]
        assert not changed, f"{name}: {changed} still at the default"


def _settings(model) -> dict:
    """Each module's class and plain settings (numbers, strings, flags, tuples): what a method's options set."""
    return {name: (type(m).__name__, {k: v for k, v in vars(m).items() if k != "training" and not k.startswith("_")
                                      and isinstance(v, (bool, int, float, str, tuple))})
            for name, m in model.named_modules()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(peft.METHODS))
def test_a_methods_options_survive_the_checkpoint_and_the_rebuilt_model_computes_the_same(testing_npz, tmp_path, mode):
    run = tmp_path / "run"
    trainer = _train(["--mode", mode, *_flags(mode), "--weights", str(testing_npz), "--output-dir", str(run),
                      *DATA])
    trained = trainer.model.eval()
    model, meta = load_model_from_checkpoint(run)
    assert meta["mode"] == mode
    assert {k: meta["mode_options"][k] for k in NON_DEFAULT[mode]} == NON_DEFAULT[mode]  # what was asked for
    assert peft.METHODS[mode].config.from_options(meta["mode_options"]) == trainer.method_config  # as recorded
    assert repr(model) == repr(trained)  # same modules, sizes, dropout rates
    assert _settings(model) == _settings(trained)  # same scales, ranks, variants, implementations
    x = images(seed=3, n=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x), rtol=1e-6, atol=1e-6)


# ── missing and unexpected keys ──────────────────────────────────────────────────────────────────────────

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["adapters", "full"])
def test_a_checkpoint_missing_a_key_or_with_an_extra_one_is_refused_naming_it(testing_npz, tmp_path, kind, capsys):
    base = ["--mode", "lora", "--weights", str(testing_npz)] if kind == "adapters" else \
        ["--mode", "full", "--weights", "none", "--model", "testing"]
    run = tmp_path / "run"
    assert finetune_cli.cli([*base, "--output-dir", str(run), *DATA]) == 0
    ck = torch.load(run / "best.pt", weights_only=True)
    assert ck["state_dict_kind"] == kind
    gone = next(k for k in ck["state_dict"] if ("lora_B" if kind == "adapters" else "norm2.bias") in k)
    extra = "blocks.0.attn.q.extra_scale"
    for damage, key, word in (("missing", gone, "missing"), ("unexpected", extra, "unexpected")):
        state = dict(ck["state_dict"])
        if damage == "missing":
            del state[gone]
        else:
            state[extra] = torch.zeros(3)
        path = tmp_path / f"{damage}.pt"
        torch.save({**ck, "state_dict": state}, path)
        capsys.readouterr()
        assert evaluate_cli.cli([str(path), "--output-dir", str(tmp_path / "eval")]) == 1, damage
        line = _one_line(capsys.readouterr().err)
        assert word in line and key in line, line
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            load_model_from_checkpoint(path)


# ── other base weights at the same path ──────────────────────────────────────────────────────────────────

@pytest.mark.slow
def test_other_base_weights_at_the_same_path_stop_resume_and_evaluation(tmp_path, capsys):
    npz = tmp_path / "weights" / "base.npz"
    npz.parent.mkdir()
    write_google_npz(npz, vit.get_config("testing"), seed=0)
    run = tmp_path / "run"
    argv = ["--mode", "lora", "--weights", str(npz), "--output-dir", str(run), *DATA, "--epochs", "2"]
    assert finetune_cli.cli([*argv, "--stop-after-epoch", "1"]) == 0
    before = (run / "checkpoint.pt").read_bytes()
    write_google_npz(npz, vit.get_config("testing"), seed=1)  # same path, same shapes, other numbers
    capsys.readouterr()
    assert finetune_cli.cli([*argv, "--resume"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "--resume" in line and "base weights" in line and "sha256" in line, line
    assert (run / "checkpoint.pt").read_bytes() == before  # nothing trained on the wrong base, nothing lost
    assert evaluate_cli.cli([str(run), "--output-dir", str(tmp_path / "eval")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert str(npz) in line and "sha256" in line, line
