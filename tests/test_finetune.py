"""The fine-tuning engine on real Fashion-MNIST with tiny models: learning, exact resume, divergence handling,
checkpoint contents, option errors, rebuilding a model from a checkpoint, and the tools' command lines."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from peft.cli import evaluate as evaluate_cli
from peft.cli import finetune as finetune_cli
from peft.cli import predict as predict_cli
from peft.cli import quickstart as quickstart_cli
from peft.finetune import OptionsError
from peft.finetune import checkpoint as ckpt_io
from peft.finetune import rebuild
from peft.finetune import trainer as training
from peft.finetune import optim
from peft.finetune.options import FinetuneOptions
from conftest import FMNIST, needs_fmnist, tiny

ROOT = Path(__file__).resolve().parents[1]

TOOLS = {"finetune": finetune_cli, "evaluate": evaluate_cli, "predict": predict_cli, "quickstart": quickstart_cli}


def final_state(out: Path) -> dict:
    return torch.load(out / ckpt_io.LATEST, weights_only=True)


@needs_fmnist
def test_training_reduces_the_loss_on_real_fashion_mnist(tmp_path):
    metrics = training.run(tiny(tmp_path, epochs=3, max_train_samples=512, lr=1e-2, augment=False))
    hist = final_state(tmp_path / "run")["history"]
    # The zero-initialised head starts at exactly ln(5); 48 steps must do clearly better.
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] < math.log(5), hist
    assert hist[-1]["train_loss"] < 0.85 * math.log(5), hist
    assert hist[-1]["val_loss"] < 0.9 * math.log(5), hist
    assert metrics["test_accuracy"] > 0.35  # chance is 0.2 (96 test images: 0.35 is 3.7 sigma above it)
    assert metrics["trainable_parameters"] == metrics["total_parameters"]
    out = tmp_path / "run"
    for name in ("metrics.json", "history.csv", "curves.png", "test_confusion.png", "test_report.txt",
                 "test_report.json", "test_report.csv", "test_roc.png", "best.pt", "checkpoint.pt"):
        assert (out / name).is_file(), name


@needs_fmnist
@pytest.mark.parametrize("mode", ["full", "rlrr"])
def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, mode, mini_npz):
    kw = {} if mode == "full" else dict(mode=mode, weights=str(mini_npz), max_train_samples=128, lr=1e-2)
    kw.update(epochs=3, grad_accum=2)
    training.run(tiny(tmp_path, "straight", **kw))
    stopped = training.run(tiny(tmp_path, "interrupted", stop_after_epoch=1, **kw))
    assert stopped == {"stopped_after_epoch": 1}
    assert final_state(tmp_path / "interrupted")["epoch"] == 1
    training.run(tiny(tmp_path, "interrupted", resume=True, **kw))
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "interrupted")
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 3
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        # bitwise equal on the machines tried; 1e-6 leaves room for other CPUs' kernels
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], abs=1e-6)
        assert ha["val_accuracy"] == hb["val_accuracy"]


@needs_fmnist
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = training.compute_loss
    calls = {"n": 0}
    steps_per_epoch = 256 // 32

    def poisoned(logits, labels, label_smoothing=0.0):
        calls["n"] += 1
        loss = real(logits, labels, label_smoothing)
        return loss * float("nan") if calls["n"] > steps_per_epoch + 2 else loss  # in epoch 2

    monkeypatch.setattr(training, "compute_loss", poisoned)
    with pytest.raises(training.TrainingDiverged, match=r"loss is nan at epoch 2.*last good checkpoint"):
        training.run(tiny(tmp_path))
    ck = final_state(tmp_path / "run")
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())


def test_weights_none_needs_mode_full(tmp_path):
    with pytest.raises(OptionsError, match="--weights none.*--mode full"):
        training.run(tiny(tmp_path, mode="lora"))
    assert finetune_cli.cli(["--mode", "rlrr", "--weights", "none"]) == 2


@needs_fmnist
def test_peft_checkpoint_holds_only_adapters_and_rebuilds_the_model(tmp_path, mini_npz, capsys):
    import peft

    opts = tiny(tmp_path, mode="lora", weights=str(mini_npz), epochs=1, max_train_samples=64, lr=1e-2,
                export_npz=str(tmp_path / "merged.npz"))
    metrics = training.run(opts)
    ck = final_state(tmp_path / "run")
    sd = ck["state_dict"]
    assert ck["state_dict_kind"] == "adapters"
    assert sum(v.numel() for v in sd.values()) == metrics["trainable_parameters"] < metrics["total_parameters"] / 5
    assert not any(k.endswith("attn.k.weight") or k == "pos_embed" for k in sd), sorted(sd)
    assert ck["base_weights"]["sha256"] and ck["base_weights"]["path"] == str(mini_npz.resolve())
    full_size = mini_npz.stat().st_size
    assert (tmp_path / "run" / "best.pt").stat().st_size < full_size / 3

    model, meta = rebuild.load_model_from_checkpoint(tmp_path / "run")
    assert meta["mode"] == "lora" and meta["classes"][0].lower().startswith("t-shirt")
    reference = peft.adapter_state_dict(model)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["state_dict"]
    for k in best:
        torch.testing.assert_close(reference[k], best[k], rtol=0, atol=0)
    x = torch.randn(3, 3, 28, 28)
    base_only = training.build_model(FinetuneOptions(weights=str(mini_npz)), 5)[0].eval()
    assert not torch.allclose(model(x), base_only(x))  # the adapters and head are really applied
    import loaders

    merged = loaders.load_npz(tmp_path / "merged.npz")  # --export-npz: adapters folded into plain weights
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)

    # tools/evaluate.py re-creates the reports from best.pt on the same test subset; predict.py reads files.
    assert evaluate_cli.main([str(tmp_path / "run"), "--output-dir", str(tmp_path / "eval")]) == 0
    import json

    again = json.loads((tmp_path / "eval" / "test_evaluation.json").read_text())
    assert again["test_accuracy"] == metrics["test_accuracy"]
    for name in ("test_confusion.png", "test_roc.png", "test_report.txt", "curves.png", "history.csv"):
        assert (tmp_path / "eval" / name).is_file(), name
    from PIL import Image

    from loaders.datasets import load_dataset

    image = load_dataset("fashion_mnist", root=str(FMNIST), split="test").images[0, :, :, 0].numpy()
    Image.fromarray(image).save(tmp_path / "shoe.png")
    capsys.readouterr()
    assert predict_cli.main([str(tmp_path / "shoe.png"), "--checkpoint", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith("shoe.png") and len(printed) == 6 and printed[1].strip().startswith("1.")
    probs = [float(line.split()[-1]) for line in printed[1:]]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-3)  # 5 of 5 classes

    copy = tmp_path / "changed.npz"
    copy.write_bytes(mini_npz.read_bytes() + b"\0")  # one more byte: another sha256
    with pytest.raises(ckpt_io.CheckpointMismatch, match="sha256"):
        rebuild.load_model_from_checkpoint(tmp_path / "run", weights=copy)


def test_no_weight_decay_on_vectors_norms_and_biases():
    import vit

    model = vit.VisionTransformer(vit.get_config("testing"))
    groups = optim.param_groups(model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        expect = name.endswith("weight") and p.ndim >= 2  # Linear and conv matrices only
        assert (id(p) in decayed) == expect, name

    import peft

    for mode, opts in (("rlrr", {"rlrr_rank": 2}), ("lora", {"lora_rank": 1})):
        model = vit.VisionTransformer(vit.get_config("testing"))
        peft.apply_method(model, mode, **opts)
        groups = optim.param_groups(model, 0.1)
        decayed = {id(p) for p in groups[0]["params"]}
        for name, p in model.named_parameters():
            if p.requires_grad:
                expect = name == "head.weight" or "lora" in name.lower()
                assert (id(p) in decayed) == expect, (mode, name, tuple(p.shape))


def test_warmup_cosine_schedule():
    f = optim.warmup_cosine(4, 12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5)
    assert f(12) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("tool", ["finetune", "evaluate", "predict", "quickstart"])
def test_tools_have_help_with_an_example(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TOOLS[tool].main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text and f"tools/{tool}.py" in text


@needs_fmnist
def test_quickstart_pipeline_end_to_end_on_a_tiny_budget(tmp_path):
    """Pretrain from scratch → export .npz → fine-tune it with two modes → results table (tiny sizes)."""
    import json

    qs = quickstart_cli
    out = tmp_path / "qs"
    assert qs.main(["--output-dir", str(out), "--modes", "head,rlrr", "--pretrain-samples", "96",
                    "--pretrain-epochs", "1", "--finetune-samples", "64", "--finetune-epochs", "1",
                    "--eval-samples", "48", "--data-root", str(FMNIST), "--no-progress", "--threads", "1"]) == 0
    import loaders

    pretrained = loaders.load_npz(out / "pretrained.npz")
    assert pretrained.config.hidden_size == 96 and pretrained.config.num_classes == 5
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["mode"] for r in results] == ["head", "rlrr"]
    head, rlrr = results
    assert head["trainable_parameters"] == 96 * 5 + 5  # the new head only
    assert head["trainable_parameters"] < rlrr["trainable_parameters"] < head["total_parameters"] / 10
    assert "| rlrr |" in (out / "results.md").read_text()
    assert (out / "rlrr" / "best.pt").is_file()


@needs_fmnist
def test_several_adapter_checkpoints_share_one_backbone_in_evaluate_and_predict(tmp_path, mini_npz, capsys):
    from PIL import Image

    from peft.finetune.rebuild import load_tasks
    from peft.finetune.predict import evaluate_tasks

    runs = {}
    for mode in ("lora", "vpt"):
        opts = tiny(tmp_path, mode, mode=mode, weights=str(mini_npz), epochs=1, max_train_samples=64, lr=1e-2)
        runs[mode] = training.run(opts)
    model, metas = load_tasks([tmp_path / "lora", tmp_path / "vpt"])
    assert list(metas) == ["lora", "vpt"] and sum(1 for _ in model.blocks) == 4  # one backbone
    results = evaluate_tasks([tmp_path / "lora", tmp_path / "vpt"], tmp_path / "eval")
    for r in results:  # each task, on its own data, scores what its own run reported
        assert r["test_accuracy"] == pytest.approx(runs[r["task"]]["test_accuracy"], abs=1e-12), r["task"]
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "shoe.png")
    assert predict_cli.main(["--checkpoint", str(tmp_path / "lora"), "--checkpoint", str(tmp_path / "vpt"),
                             str(tmp_path / "shoe.png")]) == 0  # images after the flags: unambiguous
    out = capsys.readouterr().out
    assert "== lora (lora, 5 classes)" in out and "== vpt (vpt, 5 classes)" in out


# The quick start as a user runs it: an interrupted one (Ctrl-C, kill -9) continues when the same command is
# run again, --overwrite starts over, and a run of some modes adds or replaces rows of the table, keeping the others.
# Tiny settings: 2 epochs of 2 steps for pretraining and for each mode, 32 images to validate and test.
QS_TINY = ["--pretrain-samples", "64", "--pretrain-epochs", "2", "--finetune-samples", "64", "--finetune-epochs", "2",
        "--eval-samples", "32", "--batch-size", "32", "--data-root", str(FMNIST), "--no-progress", "--threads", "1"]


def _epochs(run: Path) -> list[int]:
    """The epochs a run's history records, in order (each once if it continued where it stopped)."""
    return [row["epoch"] for row in torch.load(run / "checkpoint.pt", weights_only=True)["history"]]


def _interrupt_when(argv: list[str], marker: Path, sig: int) -> subprocess.CompletedProcess:
    """Start the quick start, send ``sig`` as soon as ``marker`` exists (a checkpoint: mid-run), wait for it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "quickstart.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    try:
        while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if not marker.is_file():
            ended = proc.poll() is not None and f"it ended with {proc.returncode}: {proc.communicate()[1][-1500:]}"
            pytest.fail(f"{marker} never appeared; {ended or 'still running'}")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@needs_fmnist
def test_an_interrupted_quickstart_continues_with_the_same_command(tmp_path, single_process, caplog):
    out = tmp_path / "qs"
    argv = ["--output-dir", str(out), "--modes", "head", *QS_TINY]
    # Ctrl-C during pretraining, after its first epoch.
    r = _interrupt_when(argv, out / "pretrain" / "checkpoint.pt", signal.SIGINT)
    assert r.returncode == 130, r.stderr[-2000:]
    assert not (out / "pretrained.npz").exists() and _epochs(out / "pretrain") == [1]
    # The same command continues the pretraining; kill -9 once the mode has its first epoch's checkpoint.
    r = _interrupt_when(argv, out / "head" / "checkpoint.pt", signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]  # it was refusing with exit 2 ("--resume")
    assert f"resumed from {out / 'pretrain' / 'checkpoint.pt'}: epoch 1" in r.stderr
    assert (out / "pretrained.npz").is_file() and _epochs(out / "pretrain") == [1, 2]
    assert _epochs(out / "head") == [1] and not (out / "head" / "metrics.json").exists()
    # Once more (the same code in this process): the mode resumes where it was killed, the table has its row.
    caplog.set_level("INFO")
    assert quickstart_cli.main(argv) == 0
    assert "using the existing" in caplog.text and f"resumed from {out / 'head' / 'checkpoint.pt'}" in caplog.text
    assert _epochs(out / "head") == [1, 2]
    assert [row["mode"] for row in json.loads((out / "results.json").read_text())["results"]] == ["head"]
    # --overwrite starts over: pretraining and the mode run afresh, nothing is resumed or kept.
    caplog.clear()
    before = (out / "pretrained.npz").stat().st_mtime_ns
    assert quickstart_cli.main([*argv, "--overwrite"]) == 0
    assert "resumed from" not in caplog.text and "using the existing" not in caplog.text
    assert "already fine-tuned" not in caplog.text and caplog.text.count("epoch 1/2:") == 2  # both from epoch 1
    assert (out / "pretrained.npz").stat().st_mtime_ns != before and _epochs(out / "head") == [1, 2]


@needs_fmnist
def test_some_modes_add_or_replace_rows_and_keep_the_table(tmp_path, single_process):
    out = tmp_path / "qs"

    def quickstart(*argv) -> list[dict]:
        assert quickstart_cli.main(["--output-dir", str(out), *QS_TINY, *argv]) == 0
        rows = json.loads((out / "results.json").read_text())["results"]
        md = (out / "results.md").read_text()
        assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and
                "---" not in line][1:] == [row["mode"] for row in rows]  # the table shows the same rows
        return rows

    first = quickstart("--modes", "head,bitfit")
    assert [row["mode"] for row in first] == ["head", "bitfit"]
    added = quickstart("--modes", "lora")  # it replaced the table with the one lora row
    assert [row["mode"] for row in added] == ["head", "bitfit", "lora"]  # registry order
    assert added[:2] == first  # the earlier rows as they were
    again = quickstart("--modes", "bitfit,head")
    assert again == added  # finished with these settings: kept, not trained again, not duplicated
    (out / "bitfit" / "metrics.json").unlink()  # as if killed while testing: bitfit runs again, its row replaced
    replaced = quickstart("--modes", "bitfit")
    assert [row["mode"] for row in replaced] == ["head", "bitfit", "lora"] and replaced[0] == first[0]
    assert replaced[1]["test_accuracy"] == first[1]["test_accuracy"]  # a deterministic run on the CPU
    # Rows of other settings are not mixed into one table: a table's header states one setting.
    other = quickstart("--modes", "head", "--finetune-epochs", "1")
    assert [(row["mode"], row["epochs"]) for row in other] == [("head", 1)]
