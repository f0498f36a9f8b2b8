"""The first GPU run, made safe and fast where the CPU can show it: no host read per training step, each rank
augmenting only its slice, --device under torchrun, resuming on another device, the kernel build lock (stale and
held), and the GPU check's time budget and its one line on a machine without a GPU."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vit
from benchmark_trees import write_vtab_tree
from loaders.transforms import BatchTransform
from npz_factory import write_google_npz
from peft.cli import finetune as finetune_cli
from peft.finetune import checkpoint as ckpt_io
from peft.finetune import rng as rng_io
from peft.finetune.options import FinetuneOptions
from peft.finetune.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_path")
    write_vtab_tree(root / "vtab", "eurosat", 10, sizes=(12, 6, 10))
    write_google_npz(root / "testing.npz", vit.get_config("testing"), seed=0)
    return root


def _opts(tree, out, **kw):
    base = dict(mode="rlrr", weights=str(tree / "testing.npz"), data="vtab-1k:eurosat", data_root=str(tree / "vtab"),
                image_size=32, batch_size=2, epochs=2, device="cpu", progress=False, output_dir=str(out))
    return FinetuneOptions(**{**base, **kw})


PROJECT = tuple(str(ROOT / d) for d in ("peft", "loaders", "vit"))


def _host_reads_in_one_epoch(trainer, monkeypatch) -> int:
    """Calls from this project's code that read a tensor on the host (on a GPU each one waits for the device):
    .item(), .tolist(), bool(tensor). (torch's AdamW reads its step counters, which it keeps on the CPU.)"""
    count = {"n": 0}
    for owner, name in ((torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "__bool__")):
        real = getattr(owner, name)

        def counted(*a, _real=real, **k):
            if sys._getframe(1).f_code.co_filename.startswith(PROJECT):
                count["n"] += 1
            return _real(*a, **k)
        monkeypatch.setattr(owner, name, counted)
    trainer.train_epoch()
    monkeypatch.undo()
    return count["n"]


def test_the_training_step_reads_nothing_on_the_host(tree, tmp_path, monkeypatch):
    """Host reads per epoch do not grow with the number of steps (they happen every --log-every steps and at the
    end of the epoch). Before: six per step (.item() x3, isfinite, two tensors built on the device)."""
    reads = {}
    for samples in (4, 18):  # 2 and 9 steps of batch 2
        t = Trainer(_opts(tree, tmp_path / f"run{samples}", max_train_samples=samples, log_every=50))
        t.setup()
        reads[samples] = _host_reads_in_one_epoch(t, monkeypatch)
    assert reads[4] == reads[18] <= 6, reads


def test_each_rank_augments_only_its_slice():
    x = torch.randint(0, 256, (10, 40, 40, 3), dtype=torch.uint8)
    for tf in (BatchTransform(32, train=True), BatchTransform(32, train=True, crop="resized", resize="center"),
               BatchTransform(32, train=True, crop="random")):
        whole = tf(x, torch.Generator().manual_seed(3))
        part = tf(x[4:7], torch.Generator().manual_seed(3), rows=(4, 7, 10))  # rank's rows 4..6 of a batch of 10
        assert part.shape[0] == 3 and torch.equal(part, whole[4:7])


def test_device_index_under_torchrun_is_a_usage_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert finetune_cli.cli(["--device", "cuda:1", "--output-dir", str(tmp_path / "r")]) == 2
    assert "under torchrun each process takes the GPU of its LOCAL_RANK" in capsys.readouterr().err


def test_resume_on_another_kind_of_device_reseeds_the_augmentation_stream(tree, tmp_path, caplog):
    out = tmp_path / "run"
    Trainer(_opts(tree, out, stop_after_epoch=1)).run()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    rng = ck["training_state"]["rng"]
    rng["generators"]["augment"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state (16 bytes)
    rng["generator_devices"] = {**rng.get("generator_devices", {}), "augment": "cuda"}
    ckpt_io.save_atomic(ck, out / "checkpoint.pt")
    with caplog.at_level(logging.WARNING):
        m = Trainer(_opts(tree, out, resume=True)).run()
    assert m["epochs"] == 2 and "random stream 'augment' was saved on cuda and is re-seeded" in caplog.text
    with pytest.raises(ckpt_io.CheckpointMismatch, match="saved on another device"):
        rng_io.restore_rng(rng, {"augment": torch.Generator()})  # without a re-seed rule: one clear error


def test_a_stale_build_lock_is_cleared_and_a_held_one_times_out(tmp_path, monkeypatch, caplog):
    from peft.kernels import preflight

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    folder = preflight.build_directory("probe_ext")
    (folder / "lock").write_text("")  # torch's baton, left by a killed build: torch would wait on it forever
    with caplog.at_level(logging.WARNING):
        with preflight.build_lock("probe_ext", timeout=5):
            assert not (folder / "lock").exists()
    assert "a build lock left by a killed build" in caplog.text
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); print('held', "
        "flush=True); time.sleep(60)"), str(folder.parent / "probe_ext.vit-peft.lock")], stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(preflight.BuildLockTimeout, match="another process has been building"):
            with preflight.build_lock("probe_ext", timeout=1.5):
                pass
        assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with preflight.build_lock("probe_ext", timeout=5):  # its holder died: the OS released the lock
        pass


def test_the_gpu_check_fits_its_budget_and_says_no_gpu_in_one_line(tmp_path):
    script = (ROOT / "tools" / "gpu_check.sh").read_text()
    quick = script.split('if [ "$full" -eq 1 ]')[0]
    budgets = [int(s) for s in re.findall(r"^step \S+ (\d+) ", quick, re.M)]
    assert len(budgets) >= 4 and sum(budgets) <= 480, budgets  # the README's 8 minutes
    bench = re.search(r"tools/benchmark.py (.*?)--output-dir", quick, re.S).group(1)
    modes = re.search(r"--modes ((?:[a-z][\w-]* )+)", bench).group(1).split()
    sizes = re.search(r"--batch-sizes ((?:\d+ )+)", bench).group(1).split()
    assert len(modes) * len(sizes) <= 4 and "--compile" not in bench  # one process per row, nothing compiled
    if subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available()"],
                      capture_output=True).returncode == 0:
        pytest.skip("a GPU is present: the no-GPU line is not what this machine prints")
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(tmp_path / "gc")], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "no CUDA device here" in r.stderr and not (tmp_path / "gc").exists()
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "8 minutes" in r.stdout


def test_the_gpu_check_help_is_its_header_comment_and_nothing_else():
    script = (ROOT / "tools" / "gpu_check.sh").read_text().splitlines()
    header = []
    for line in script[1:]:  # after the shebang, up to the first line that is not a comment
        if not line.startswith("#"):
            break
        header.append(line[2:] if line.startswith("# ") else line[1:])
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.splitlines() == header and "Usage: bash tools/gpu_check.sh" in header[-1]
