"""The quick start as a user runs it: an interrupted one (Ctrl-C, kill -9) continues when the same command is run
again, --overwrite starts over, and a run of some modes adds or replaces rows of the table, keeping the others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peft.cli import quickstart as quickstart_cli
from conftest import FMNIST, needs_fmnist

ROOT = Path(__file__).resolve().parents[1]
# Tiny settings: 2 epochs of 2 steps for pretraining and for each mode, 32 images to validate and test.
TINY = ["--pretrain-samples", "64", "--pretrain-epochs", "2", "--finetune-samples", "64", "--finetune-epochs", "2",
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
    argv = ["--output-dir", str(out), "--modes", "head", *TINY]
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
        assert quickstart_cli.main(["--output-dir", str(out), *TINY, *argv]) == 0
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
