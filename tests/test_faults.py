"""Bad inputs and faults end in one line and the documented exit code, with nothing lost: flags that cannot work
(exit 2), a full or read-only disk (exit 1, earlier files intact, no temporary files), broken adapter states, npz
dtypes and byte orders, a run that fails before training (no lock left), and the fused kernel's missing build
tools named. Each family drives the real command lines (``cli(argv)`` in-process, or a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import vit
from loaders import load_npz, save_npz
from loaders.datasets import DatasetError
from loaders.datasets.fashion_mnist import parse_idx
from loaders.npz import CheckpointError
from npz_factory import write_google_npz
from peft.cli import evaluate as evaluate_cli
from peft.cli import finetune as finetune_cli
from peft.cli import vtab as vtab_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "fashion_mnist", "--classes", "0-1", "--max-train-samples", "32", "--max-eval-samples", "32",
        "--epochs", "1", "--batch-size", "16", "--image-size", "32", "--device", "cpu", "--no-progress",
        "--threads", "1"]


@pytest.fixture
def weights(testing_npz):
    return testing_npz


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, flag", [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--warmup-lr", "nan"], "--warmup-lr must be a finite number"),
    (["--min-lr", "inf"], "--min-lr must be a finite number"),
    (["--seed", str(2**70)], "--seed must be in [0, 2**63)"),
    (["--mode", "lora", "--lora-alpha", "nan"], "--lora-alpha must be a finite number"),
    (["--weights", "none", "--mode", "full", "--model", "testing", "--image-size", "30"],
     "--image-size 30 is not a multiple of the patch size 8 of --model testing"),
    (["--image-size", "30", "--weights", "WEIGHTS"], "--image-size 30 is not a multiple of the patch size 8"),
    (["--kernel", "cuda"], "--kernel cuda runs the fused RLRR kernel, which needs a CUDA device"),
    (["--schedule-lag", "-1"], "--schedule-lag must be at least 0"),
    (["--mode", "vpt", "--recipe", "vpt-official", "--data", "vtab-1k:cifar"], "Pass --lr, or use tools/vtab.py"),
    (["--mode", "adaptformer", "--export-npz", "out.npz"], "--mode adaptformer cannot be merged: its adapter has a ReLU"),
    (["--mode", "lora", "--lora-rank", "0"], "--lora-rank must be at least 1, got 0"),
    (["--mode", "vpt-shallow", "--vpt-shallow-tokens", "0"], "--vpt-shallow-tokens must be at least 1"),
])
def test_flags_that_cannot_work_are_one_line_usage_errors(argv, flag, weights, tmp_path, capsys):
    argv = [str(weights) if a == "WEIGHTS" else a for a in argv]
    code = finetune_cli.cli(argv + ["--output-dir", str(tmp_path / "run"), "--device", "cpu"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and flag in line, line
    assert not (tmp_path / "run").exists()  # checked before anything was created


def test_a_run_that_fails_before_training_leaves_no_lock_and_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = finetune_cli.cli(["--weights", str(tmp_path / "missing.npz"), "--output-dir", str(out)] + TINY)
    assert code == 2 and "neither an existing .npz file" in _one_line(capsys.readouterr().err)
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a folder the user made: kept, only the lock goes
    finetune_cli.cli(["--weights", str(tmp_path / "missing.npz"), "--output-dir", str(out)] + TINY)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def _mount_tmpfs(where: Path, size: str, readonly: bool = False) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _run(args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    if not _mount_tmpfs(where, "64k"):
        pytest.skip("cannot mount a small tmpfs here (needs root): the disk-full and read-only cases are not run")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def test_a_full_or_read_only_disk_is_one_line_and_loses_nothing(weights, small_disk, tmp_path):
    out = small_disk / "run"
    r = _run(["tools/finetune.py", "--weights", str(weights), "--output-dir", str(out), *TINY])
    assert r.returncode == 1, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "the disk is full (No space left on device)" in line and str(out) in line and "Traceback" not in r.stderr
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
    assert torch.load(out / "best.pt", weights_only=True)["format"]  # what was written before is whole
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, capture_output=True, timeout=30)
    r = _run(["tools/finetune.py", "--weights", str(weights), "--output-dir", str(out), "--resume", *TINY])
    assert r.returncode == 1 and "read-only" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    run = tmp_path / "good"
    assert finetune_cli.cli(["--weights", str(weights), "--output-dir", str(run), *TINY]) == 0  # a run to evaluate
    r = _run(["tools/evaluate.py", str(run), "--output-dir", str(small_disk / "eval")])
    assert r.returncode == 1 and "read-only" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


def test_broken_adapter_states_are_refused_naming_the_key(weights, tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune_cli.cli(["--weights", str(weights), "--mode", "lora", "--output-dir", str(run)] + TINY) == 0
    ck = torch.load(run / "best.pt", weights_only=True)
    key = next(k for k in ck["state_dict"] if "lora_A" in k)
    cases = {"nan": lambda c: c["state_dict"][key].fill_(float("nan")),
             "one inf": lambda c: c["state_dict"][key].view(-1)[3:4].fill_(float("inf")),
             "list": lambda c: c["state_dict"].__setitem__(key, [1.0, 2.0]),
             "other method": lambda c: c.update(mode="rlrr", mode_options={})}
    expected = {"nan": f"adapter state key {key!r} holds non-finite values",
                "one inf": f"adapter state key {key!r} holds non-finite values",
                "list": f"adapter state key {key!r} holds a list, not a tensor",
                "other method": "adapter state does not fit this model"}
    for name, damage in cases.items():
        bad = {**ck, "state_dict": {k: v.clone() for k, v in ck["state_dict"].items()}}
        damage(bad)
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(bad, path)
        capsys.readouterr()
        assert evaluate_cli.cli([str(path), "--output-dir", str(tmp_path / "eval")]) == 1, name
        assert expected[name] in _one_line(capsys.readouterr().err), name


def test_npz_byte_order_and_dtypes(weights, tmp_path):
    arrays = dict(np.load(weights))
    big = tmp_path / "big_endian.npz"
    np.savez(big, **{k: v.astype(v.dtype.newbyteorder(">")) for k, v in arrays.items()})
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_npz(big)(x), load_npz(weights)(x))  # the same numbers, another byte order
    odd = tmp_path / "longdouble.npz"
    np.savez(odd, **{k: v.astype(np.longdouble) if k == "cls" else v for k, v in arrays.items()})
    with pytest.raises(CheckpointError, match="array 'cls' has dtype float128"):
        load_npz(odd)
    with pytest.raises(CheckpointError, match="it is a folder"):
        save_npz(load_npz(weights), tmp_path)
    header = bytes([0, 0, 8, 4]) + np.array([2**32 - 1] * 4, ">u4").tobytes()
    with pytest.raises(DatasetError, match="idx size mismatch"):
        parse_idx(header + b"\0" * 16, "huge.idx")


def test_suite_flags_are_checked_before_any_run(tmp_path, capsys):
    assert vtab_cli.cli(["--data-root", str(tmp_path), "--sweep", "lr=fast"]) == 2
    assert "--sweep 'lr=fast': every value of lr must be a float" in _one_line(capsys.readouterr().err)
    # the second mode's recipe cannot run: found before the first mode's run starts, nothing written
    out = tmp_path / "suite"
    assert vtab_cli.cli(["--data-root", str(tmp_path), "--tasks", "cifar", "--modes", "rlrr,vpt", "--recipe",
                         "official", "--output-dir", str(out)]) == 2
    assert "Pass --lr, or use tools/vtab.py --sweep" in _one_line(capsys.readouterr().err) and not out.exists()


def test_the_kernel_build_names_what_is_missing_and_training_falls_back(monkeypatch, tmp_path, caplog):
    import peft.kernels as kernels
    from peft.kernels import preflight
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU build" in preflight.build_problem()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no ninja, no nvcc on the path
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert preflight.build_problem().startswith("ninja is not installed")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ninja").write_text("#!/bin/sh\necho 1.11\n")
    (fake / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    assert preflight.build_problem().startswith("no CUDA compiler (nvcc) found: install the CUDA toolkit 12.x")
    toolkit = tmp_path / "cuda-11"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 11.8, V11.8.89'\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(toolkit))
    assert "is CUDA 11.8, but torch was built with CUDA 12.8" in preflight.build_problem()
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.1'\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(preflight, "_writable", lambda folder: False)
    assert f"the extensions folder {tmp_path / 'ext'} is not writable" in preflight.build_problem()
    monkeypatch.setattr(preflight, "_writable", lambda folder: True)
    assert preflight.build_problem() is None
    # the fallback: on a "GPU machine" without ninja, auto takes the PyTorch path and says once what to install
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setattr(kernels, "_warned", set())
    kernels.set_backend("auto")
    try:
        with caplog.at_level("WARNING"):
            assert kernels.use_kernel("cuda", "cuda", 1, torch.float32, torch.float32) is False
        assert "ninja is not installed" in caplog.text and "using the PyTorch RLRR path" in caplog.text
        kernels.set_backend("cuda")
        with pytest.raises(kernels.KernelUnavailableError, match="ninja is not installed"):
            kernels.use_kernel("cuda", "cuda", 1, torch.float32, torch.float32)
    finally:
        kernels.set_backend(None)


def test_kernel_and_compile_flags_are_recorded_and_compile_trains_the_same(tmp_path):
    # One block instead of the fixture's two: tracing and compiling the step is most of this test's time, and it
    # grows with the blocks, while one block already holds every layer kind that compiles (attention, MLP, RLRR).
    weights = tmp_path / "one-block.npz"
    write_google_npz(weights, vit.get_config("testing", num_layers=1), seed=0)
    common = ["--weights", str(weights)] + TINY
    assert finetune_cli.cli(common + ["--output-dir", str(tmp_path / "eager"), "--kernel", "torch"]) == 0
    assert finetune_cli.cli(common + ["--output-dir", str(tmp_path / "compiled"), "--compile"]) == 0
    eager, compiled = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("eager", "compiled"))
    assert eager["compute_path"] == "RLRR PyTorch path (VIT_PEFT_KERNEL=torch)" and compiled["compiled"] is True
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-4)
    assert json.loads((tmp_path / "eager" / "options.json").read_text())["kernel"] == "torch"


def test_every_tool_resolves_devices_the_same_way(capsys, tmp_path):
    from peft.cli import benchmark as benchmark_cli
    from peft.cli import predict as predict_cli

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda works here")
    for cli, argv in ((benchmark_cli.cli, ["--device", "cuda"]),
                      (predict_cli.cli, ["x.png", "--checkpoint", str(tmp_path), "--device", "cuda"]),
                      (finetune_cli.cli, ["--device", "cuda", "--output-dir", str(tmp_path / "r")]),
                      (benchmark_cli.cli, ["--device", "tpu"])):
        assert cli(argv) == 2, argv
        line = _one_line(capsys.readouterr().err)
        assert "--device" in line and ("CUDA is not available" in line or "expected auto, cpu, cuda" in line), line
