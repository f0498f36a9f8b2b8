"""The benchmark (peft.bench, tools/benchmark.py): the tool runs every CPU mode and writes its report; the analytic FLOP count is exact.

No timing assertions: the numbers depend on the machine and on what else runs on it.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vit

import peft
from peft.bench import flops, harness, suite
from peft.bench.harness import row_method
from peft.rlrr import RLRRLinear
from peft.cli import benchmark
CPU_MODES = ["head", "mlp", "lora", "rlrr", "rlrr-official", "full", "merged"]


def _check_rows(results, modes, batch):
    by_mode = {r["mode"]: r for r in results}
    assert set(modes) <= set(by_mode)
    for mode in modes:
        r = by_mode[mode]
        assert "error" not in r, r
        assert "skipped" not in r, r
        assert r["batch_size"] == batch
        assert r["infer_img_s"] > 0 and r["infer_peak_mib"] > 0 and r["infer_tflop_s"] > 0
        assert r["forward_gflop_per_image"] > 0 and r["trainable_params"] > 0
        if mode == "merged":  # inference only
            assert "train_img_s" not in r and r["train_gflop_per_image"] is None
        else:
            assert r["train_img_s"] > 0 and r["train_peak_mib"] > 0 and r["train_tflop_s"] > 0
            assert r["train_gflop_per_image"] > r["forward_gflop_per_image"]
    return by_mode


def test_every_cpu_mode_in_one_process(tmp_path, capsys):
    backend_before = peft.kernels.get_backend()
    opts = benchmark.parse_options(["--model", "testing", "--device", "cpu", "--batch-sizes", "2", "--repeats", "1",
                                    "--warmup", "0", "--no-isolate", "--output-dir", str(tmp_path),
                                    "--modes", *CPU_MODES, "rlrr-kernel"])
    report = suite.run(opts)
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["results"] == report["results"]
    by_mode = _check_rows(saved["results"], CPU_MODES, 2)
    assert "CUDA" in by_mode["rlrr-kernel"]["skipped"]  # skipped with a note on CPU, not an error
    # the RLRR rows pick the kernel backend process-wide; afterwards the previous choice holds again
    assert peft.kernels.get_backend() == backend_before
    # the plain ViT and the RLRR-merged one do the same work; RLRR adds only its per-step rank-1 products
    assert by_mode["merged"]["forward_gflop_per_image"] == by_mode["head"]["forward_gflop_per_image"]
    assert by_mode["rlrr"]["trainable_params"] == by_mode["rlrr-official"]["trainable_params"]
    png = tmp_path / "benchmark.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    for mode in CPU_MODES + ["rlrr-kernel"]:
        assert f" {mode} |" in table


def test_isolated_worker_processes_report_peak_rss(tmp_path):
    opts = benchmark.parse_options(["--model", "testing", "--device", "cpu", "--batch-sizes", "2", "--repeats", "1",
                                    "--warmup", "0", "--output-dir", str(tmp_path), "--modes", "lora", "merged"])
    assert opts.isolate
    report = suite.run(opts)
    by_mode = _check_rows(report["results"], ["lora", "merged"], 2)
    for r in by_mode.values():  # a fresh interpreter with torch imported and a model built
        assert r["infer_peak_mib"] > 50
        if sys.platform == "linux":  # peak reset per phase: at least the resident size when the phase began
            assert r["infer_growth_mib"] >= 0 and r["infer_peak_mib"] >= r["setup_rss_mib"] - 1
    assert "fresh process" in report["environment"]["memory"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_rss_is_per_process_and_resettable():
    """A child started by subprocess (vfork + exec) must not report its parent's peak, and a reset must work."""
    ballast = torch.ones(64 * 2**20 // 4)  # 64 MiB resident in this (parent) process
    ballast.add_(1)
    assert harness._peak_rss_mib() >= 64
    code = "import sys; sys.path.insert(0, sys.argv[1]); from peft.bench import harness; print(harness._peak_rss_mib())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True,
                         text=True, check=True).stdout
    child_peak = float(out.split()[-1])
    assert child_peak < harness._peak_rss_mib()  # the child's own peak (~its torch import), not ours
    del ballast
    current = harness._reset_peak_rss()
    assert current is not None and harness._peak_rss_mib() <= current + 8


def test_interleaved_rows_are_timed_round_robin_without_memory(tmp_path):
    opts = benchmark.parse_options(["--model", "testing", "--device", "cpu", "--batch-sizes", "2", "--repeats", "2",
                                    "--warmup", "0", "--interleave", "--output-dir", str(tmp_path),
                                    "--modes", "rlrr", "merged", "rlrr-kernel"])
    results = suite.run(opts)["results"]
    assert [r["mode"] for r in results] == ["rlrr", "merged", "rlrr-kernel"]
    assert "skipped" in results[2]
    for r in results[:2]:
        assert len(r["infer_step_s"]) == 2 and r["infer_img_s"] > 0 and r["infer_peak_mib"] is None
    assert len(results[0]["train_step_s"]) == 2 and results[0]["train_img_s"] > 0


def test_unknown_mode_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_options(["--modes", "prefix-tuning"])
    assert exit_info.value.code == 2  # a usage error, not a clean exit
    assert "prefix-tuning" in capsys.readouterr().err


def _counted_flops(model, images, labels, train):
    """Matrix-product FLOPs that torch's own FlopCounterMode sees on a real forward (+ backward) pass."""
    with FlopCounterMode(display=False) as counter:
        if train:
            F.cross_entropy(model(images), labels).backward()
        else:
            with torch.no_grad():
                model(images)
    return counter.get_total_flops()


def test_forward_flops_of_vit_b16_match_the_published_count():
    macs = flops.forward_macs(vit.get_config("ViT-B/16"))
    assert sum(macs.values()) == pytest.approx(17.56e9, rel=1e-3)  # 17.56 GMACs = 35.1 GFLOPs (timm, fvcore)


@pytest.mark.parametrize("mode", peft.METHOD_NAMES)
@pytest.mark.parametrize("pre_logits", [None, 12])
def test_analytic_flops_equal_torch_flop_counter(mode, pre_logits):
    """The analytic per-mode count equals what FlopCounterMode counts on a forward and a training step.

    The manual attention path is used because FlopCounterMode has no formula for the CPU flash-attention
    kernel; its two batched products are what the analytic count's 2·N²·D per block stands for. Both counts
    leave out elementwise work (LayerNorm, softmax, GELU, bias, SSF): FlopCounterMode only counts matrix
    products and convolutions, so equality is exact, backward included (autograd skips the gradients that
    nothing needs, and so does the analytic count).
    """
    config = vit.get_config("testing").replace(representation_size=pre_logits)
    batch = 3
    torch.manual_seed(0)
    model = vit.VisionTransformer(config)
    peft.apply_method(model, mode)
    vit.set_fused_attention(model, False)
    images = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
    labels = torch.randint(0, config.num_classes, (batch,))
    analytic = flops.train_macs(config, mode, batch)
    assert _counted_flops(model, images, labels, train=False) == pytest.approx(2 * analytic["forward"] * batch)
    assert _counted_flops(model, images, labels, train=True) == pytest.approx(2 * analytic["train"] * batch)


def test_official_rlrr_differs_only_by_its_elementwise_rank1_products():
    """The official formula builds W' = W·s_in·s_out + W by broadcasting: FlopCounterMode does not see those
    3·out·in multiplications per layer and step, which the analytic count includes; nothing else differs."""
    config = vit.get_config("testing")
    batch = 2
    model = vit.VisionTransformer(config)
    peft.apply_method(model, "rlrr", rlrr_impl="official")
    vit.set_fused_attention(model, False)
    images = torch.randn(batch, 3, config.image_size, config.image_size)
    labels = torch.randint(0, config.num_classes, (batch,))
    analytic = flops.train_macs(config, "rlrr", batch, row_method("rlrr-official")[1])
    rank1 = sum(m.weight.numel() for m in model.modules() if isinstance(m, RLRRLinear))  # one multiply per weight
    assert _counted_flops(model, images, labels, train=False) == 2 * (analytic["forward"] * batch - rank1)
    assert _counted_flops(model, images, labels, train=True) == 2 * (analytic["train"] * batch - 3 * rank1)


def test_loop_benchmark_times_real_runs_with_both_log_intervals(tmp_path):
    from loaders.datasets import load_dataset
    from peft.bench.loop import run_loop_benchmark

    a, b = load_dataset("synthetic", split="train"), load_dataset("synthetic", split="train")
    assert a.images.shape == (2048, 32, 32, 3) and torch.equal(a.images, b.images)  # seeded: the same every time
    assert not torch.equal(load_dataset("synthetic", split="test").images[:8], a.images[:8])
    result = run_loop_benchmark(str(tmp_path), model="testing", device="cpu", repeats=1, batch_size=256, threads=1)
    saved = json.loads((tmp_path / "loop.json").read_text())
    assert saved == json.loads(json.dumps(result)) and set(saved["train_images_per_second"]) == {"1", "50"}
    assert all(v > 0 for v in saved["train_images_per_second"].values())
