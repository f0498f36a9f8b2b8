"""One run per output folder: a second process into a locked folder stops at once; a fresh run never mixes its
files with another run's; --resume refuses option changes that alter the optimisation, naming them."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peft.cli import finetune as finetune_cli
from peft.finetune import CheckpointMismatch, OptionsError
from peft.finetune import trainer as training
from conftest import FMNIST, needs_fmnist, tiny

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
