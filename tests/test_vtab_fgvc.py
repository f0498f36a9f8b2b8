"""VTAB-1k and FGVC: the datasets in their real layouts, the protocol done right, the official recipe as data,
and the suite runner (every task × mode, resumable, means as named) on trees written by the test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import vit
from benchmark_trees import write_fgvc_tree, write_vtab_tree
from loaders.datasets import DataNotFoundError, DatasetError
from loaders.datasets.fgvc import load_fgvc
from loaders.datasets.vtab import VTAB_TASKS, load_vtab
from npz_factory import write_google_npz
from peft.finetune import OptionsError
from peft.finetune import trainer as training
from peft.finetune.options import FinetuneOptions
from peft.finetune.recipes import apply_recipe
from peft.finetune.suite import SuiteOptions, run_suite, summarise


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    write_vtab_tree(root / "vtab", "svhn", 10, seed=1)
    write_vtab_tree(root / "vtab", "eurosat", 10, seed=2)
    write_fgvc_tree(root / "fgvc", "OxfordFlower", range(1, 103))
    weights = root / "testing.npz"
    write_google_npz(weights, vit.get_config("testing"), seed=0)
    return root


def test_the_vtab_table_is_the_official_recipe():
    assert len(VTAB_TASKS) == 19 and sum(t.classes for t in VTAB_TASKS.values()) == 940  # REFERENCE §9
    assert {g: sum(t.group == g for t in VTAB_TASKS.values()) for g in ("Natural", "Specialized", "Structured")} == \
        {"Natural": 7, "Specialized": 4, "Structured": 8}
    assert VTAB_TASKS["cifar"] == (VTAB_TASKS["cifar"].__class__("Natural", 100, 3e-3, 0.1, 5e-5, False))
    assert VTAB_TASKS["clevr_dist"].lr == 1e-2 and VTAB_TASKS["kitti"].weight_decay == 5e-2


def test_vtab_lists_sizes_labels_and_the_decode_cache(trees, monkeypatch):
    ds = load_vtab("svhn", "train800val200", trees / "vtab", image_size=32)
    assert ds.images.shape == (18, 32, 32, 3) and ds.num_classes == 10  # sizes from the lists, not their names
    assert ds.load_counts == {"decoded": 18, "from_cache": 0, "skipped": 0}
    import loaders.datasets.cache as C

    monkeypatch.setattr(C, "_decode_one", lambda job: (_ for _ in ()).throw(AssertionError("decoded again")))
    again = load_vtab("svhn", "train800val200", trees / "vtab", image_size=32)  # from the uint8 cache
    assert again.load_counts == {"decoded": 0, "from_cache": 18, "skipped": 0}
    assert torch.equal(again.images.to_tensor(), ds.images.to_tensor()) and torch.equal(again.labels, ds.labels)


def test_vtab_errors_name_the_file(trees, tmp_path):
    with pytest.raises(DataNotFoundError, match=r"VTAB-1k task folder .*dtd not found"):
        load_vtab("dtd", "test", trees / "vtab")
    with pytest.raises(DataNotFoundError, match="unknown VTAB-1k task 'cifar10'"):
        load_vtab("cifar10", "test", trees / "vtab")
    bad = write_vtab_tree(tmp_path, "svhn", 10)
    (bad / "val200.txt").unlink()
    with pytest.raises(DataNotFoundError, match=r"val200.txt not found"):
        load_vtab("svhn", "val200", tmp_path)
    (bad / "test.txt").write_text("images/test/0000.png 10\n")  # svhn has 10 classes: 0..9
    with pytest.raises(DatasetError, match=r"labels span 10..10, but svhn has 10 classes"):
        load_vtab("svhn", "test", tmp_path)


def test_fgvc_ids_remapped_in_sorted_order(trees):
    train = load_fgvc("flowers", "train", trees / "fgvc", image_size=16)
    assert train.num_classes == 102 and len(train) == 204 and train.classes[0] == "1"
    assert int(train.labels.min()) == 0 and int(train.labels.max()) == 101
    with pytest.raises(DataNotFoundError, match="CUB_200_2011 not found"):
        load_fgvc("cub", "train", trees / "fgvc")


def test_the_official_recipe_fills_what_the_command_line_left_at_default():
    o = apply_recipe(FinetuneOptions(mode="rlrr", data="vtab-1k:dtd", recipe="rlrr-official", epochs=20))
    assert (o.lr, o.weight_decay, o.drop_path, o.drop_path_mode, o.flip, o.crop) == (2e-3, 5e-5, 0.1, "element", True, False)
    # --epochs 20 given: the 10 warmup and 10 cooldown epochs of 110 shrink in proportion (rounded)
    assert (o.batch_size, o.epochs, o.warmup_epochs, o.cooldown_epochs, o.warmup_lr, o.min_lr, o.decay_groups) == \
        (32, 20, 2, 2, 1e-7, 1e-8, "rlrr")
    assert (o.schedule, o.schedule_lag, o.precision, o.gelu, o.official_test_from) == ("epoch-cosine", 1, "fp16", "erf", 2)
    lora = apply_recipe(FinetuneOptions(mode="lora", data="vtab-1k:dtd", recipe="rlrr-official"))
    assert lora.lr is None and lora.epochs == 110  # LoRA keeps its own rate under the same protocol
    explicit = apply_recipe(FinetuneOptions(mode="rlrr", data="vtab-1k:dtd", recipe="rlrr-official", batch_size=128,
                                            explicit=["batch_size", "precision"]))
    assert explicit.batch_size == 128 and explicit.precision == "auto"  # given on the command line: they win
    with pytest.raises(OptionsError, match="needs --data vtab-1k:TASK or fgvc:NAME"):
        apply_recipe(FinetuneOptions(data="cifar10", recipe="rlrr-official"))


def test_official_weight_decay_grouping_and_drop_path_modes():
    import peft
    from peft.finetune.optim import param_groups

    model = vit.VisionTransformer(vit.get_config("testing"))
    peft.apply_method(model, "rlrr")
    decayed = {id(p) for p in param_groups(model, 0.1, "rlrr")[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "head.weight" in names and "patch_embed.ssf.scale" in names and "blocks.0.attn.q.s_in" in names
    assert not any(n.endswith((".f", "norm1.ssf.scale", "head.bias")) for n in names)
    vit.set_drop_path(model, 0.3, "element")
    assert [b.drop_path1.p for b in model.blocks] == [0.0, pytest.approx(0.3, rel=1e-7)]  # linear from 0 (float32)
    x = torch.ones(4, 5, 6)
    element, sample = vit.DropPath(0.5, "element").train(), vit.DropPath(0.5, "sample").train()
    torch.manual_seed(0)
    e, s = element(x), sample(x)
    assert set(e.unique().tolist()) == {0.0, 2.0} and not all(e[i].eq(e[i][0, 0]).all() for i in range(4))
    assert all(s[i].eq(s[i][0, 0]).all() for i in range(4))  # a whole sample's branch kept or dropped


def _count_test_evaluations(monkeypatch):
    calls = []
    real = training.Trainer.evaluate

    def evaluate(self, ds, desc=None):
        calls.append("test" if ds is self.data.test and len(ds) else "other")
        return real(self, ds, desc)

    monkeypatch.setattr(training.Trainer, "evaluate", evaluate)
    return calls


@pytest.mark.parametrize("protocol", ["final", "tune"])
def test_the_protocol_never_selects_on_test_and_tests_once(trees, tmp_path, monkeypatch, protocol):
    calls = _count_test_evaluations(monkeypatch)
    m = training.run(FinetuneOptions(mode="lora", weights=str(trees / "testing.npz"), data="vtab-1k:svhn",
                                     data_root=str(trees / "vtab"), protocol=protocol, image_size=32, epochs=2,
                                     batch_size=4, device="cpu", progress=False, output_dir=str(tmp_path / "run")))
    if protocol == "final":
        assert m["splits"] == {"train": "train800val200", "val": None, "test": "test"}
        assert m["num_train"] == 18 and calls.count("test") == 1 and calls[-1] == "test"
        assert m["selected_on"].startswith("last epoch") and m["best_epoch"] == 2
    else:
        assert m["splits"] == {"train": "train800", "val": "val200", "test": None}
        assert m["num_train"] == 12 and calls.count("test") == 0 and m["test_accuracy"] is None


def test_suite_runs_every_task_and_mode_resumes_and_computes_the_means(trees, tmp_path, monkeypatch):
    o = SuiteOptions(data_root=str(trees / "vtab"), tasks="svhn", modes="head,lora", weights=str(trees / "testing.npz"),
                     output_dir=str(tmp_path / "suite"), image_size=32, epochs=1, batch_size=4, device="cpu",
                     progress=False, threads=1)
    run_suite(o)
    first = (tmp_path / "suite" / "svhn" / "lora" / "seed-42" / "metrics.json").stat().st_mtime_ns
    ran = []
    real_run = training.run
    monkeypatch.setattr("peft.finetune.suite.run", lambda opts: (ran.append(opts.output_dir), real_run(opts))[1])
    results = run_suite(SuiteOptions(**{**o.__dict__, "tasks": "svhn,eurosat"}))  # svhn: finished, skipped
    assert all("eurosat" in r for r in ran) and len(ran) == 2
    assert (tmp_path / "suite" / "svhn" / "lora" / "seed-42" / "metrics.json").stat().st_mtime_ns == first
    saved = json.loads((tmp_path / "suite" / "results.json").read_text())
    for mode in ("head", "lora"):
        per_task = [saved["tasks"][t][mode]["test_accuracy"] for t in ("svhn", "eurosat")]
        s = saved["summary"][mode]
        assert s["mean_of_tasks"] == pytest.approx(np.mean(per_task))
        assert s["groups"] == pytest.approx({"Natural": per_task[0], "Specialized": per_task[1]})
        assert s["mean_of_groups"] == pytest.approx(np.mean(per_task))
        assert math.isfinite(s["mean_of_tasks"]) and 0 <= s["mean_of_tasks"] <= 1
    md = (tmp_path / "suite" / "results.md").read_text()
    assert "| rlrr (paper) | 82.7 | 85.8 | 61.8 | 74.5 | 76.75 |" in md and "mean of group means" in md
    assert (tmp_path / "suite" / "results.csv").read_text().count("\n") == 5
    assert (tmp_path / "suite" / "results.png").stat().st_size > 1000
    assert results["summary"]["lora"]["tasks_run"] == 2


def test_means_of_groups_differ_from_means_of_tasks():
    rows = [{"task": t, "mode": "rlrr", "test_accuracy": a, "val_accuracy": None, "splits": {"test": "test"},
             "trainable_parameters": 1, "epochs": 1, "time_seconds": 1.0}
            for t, a in (("cifar", 0.9), ("dtd", 0.7), ("eurosat", 0.5))]
    s = summarise(rows)["summary"]["rlrr"]
    assert s["mean_of_tasks"] == pytest.approx(0.7) and s["mean_of_groups"] == pytest.approx((0.8 + 0.5) / 2)


def test_sweep_chooses_on_validation_then_tests_once_and_resumes(trees, tmp_path, monkeypatch):
    from peft.finetune import sweep as sweeps

    calls = _count_test_evaluations(monkeypatch)
    o = SuiteOptions(data_root=str(trees / "vtab"), tasks="svhn", modes="head", weights=str(trees / "testing.npz"),
                     output_dir=str(tmp_path / "suite"), image_size=32, epochs=2, batch_size=4, device="cpu",
                     progress=False, threads=1, recipe="official", sweep=["lr=1e-3,0.3", "weight_decay=0"])
    results = run_suite(o)
    rec = results["chosen"]["svhn"]["head"]
    assert [s["point"] for s in rec["scores"]] == [{"lr": 1e-3, "weight_decay": 0.0}, {"lr": 0.3, "weight_decay": 0.0}]
    for s in rec["scores"]:  # every grid point is a tuning run: train800 -> val200, never the test list
        m = json.loads((tmp_path / "suite" / "svhn" / "head" / "sweep" / sweeps.point_name(s["point"]) / "seed-42" /
                        "metrics.json").read_text())
        assert m["splits"] == {"train": "train800", "val": "val200", "test": None}
        assert s["val_accuracy"] == m["val_accuracy"]
    best = max(rec["scores"], key=lambda s: s["val_accuracy"])
    assert rec["chosen"] == (rec["scores"][0] if rec["scores"][0]["val_accuracy"] == best["val_accuracy"] else best)["point"]
    final = json.loads((tmp_path / "suite" / "svhn" / "head" / "seed-42" / "options.json").read_text())
    assert final["lr"] == rec["chosen"]["lr"] and final["protocol"] == "final" and final["recipe"] == "rlrr-official"
    # the final run tests once for the honest number, and once per epoch >= 2 for the official-style report
    assert calls.count("test") == 2
    entry = results["tasks"]["svhn"]["head"]
    assert entry["test_accuracy_official"] is not None and entry["test_accuracy"] is not None
    md = (tmp_path / "suite" / "results.md").read_text()
    assert "Hyper-parameters chosen on validation" in md and "test_accuracy_official (%)" in md
    assert sweeps.choose([{"point": {"lr": 1}, "val_accuracy": 0.5}, {"point": {"lr": 2}, "val_accuracy": 0.5}]) == \
        {"point": {"lr": 1}, "val_accuracy": 0.5}  # ties: the point listed first
    ran = []
    monkeypatch.setattr("peft.finetune.suite.run", lambda opts: ran.append(opts))
    run_suite(o)
    assert ran == []  # every grid point and the final run were finished: nothing runs again
    with pytest.raises(OptionsError, match="not an option that can be swept"):
        run_suite(SuiteOptions(**{**o.__dict__, "sweep": ["colour=red"]}))
    with pytest.raises(OptionsError, match="must be a float"):
        run_suite(SuiteOptions(**{**o.__dict__, "sweep": ["lr=fast"]}))
