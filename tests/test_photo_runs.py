"""tools/finetune.py on a folder of mixed photos, as a user runs it: skipped files named, splits held out and
recorded, per-split decode counts, the second run decodes nothing, evaluate reuses the run's splits, bad data
flags are one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest

import vit
from peft.bench.photos import photo, write_photo_folder
from peft.finetune import FinetuneOptions
from peft.finetune import trainer as training
from peft.finetune.data import read_split_files
from peft.finetune.predict import evaluate_checkpoint

from npz_factory import write_google_npz

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("photo-runs")
    write_photo_folder(root / "photos", classes=3, per_class=10, size=(640, 480), small=(200, 150))
    write_google_npz(root / "testing.npz", vit.get_config("testing"), seed=0)
    return root


def _opts(root, out, **kw):
    base = dict(mode="lora", weights=str(root / "testing.npz"), data=str(root / "photos"), epochs=2, batch_size=8,
                device="cpu", progress=False, workers=1, output_dir=str(out))
    return FinetuneOptions(**{**base, **kw})


def test_a_folder_of_mixed_photos_trains_reports_and_evaluates(setup, tmp_path):
    m = training.run(_opts(setup, tmp_path / "run"))
    run = tmp_path / "run"
    assert (run / "skipped.txt").read_text().startswith("class_0/truncated.jpg\tOSError")
    assert m["skipped_files"] == 1
    splits = read_split_files(run / "splits")
    names = [name for lines in splits.values() for name in lines]
    assert len(names) == len(set(names)) == 3 * 10 + 8  # every decodable image in exactly one split
    assert m["num_test"] == len(splits["test"]) == 3 * round(10 * 0.1) + 1  # class_0 holds 18 images
    counts = m["data"]
    assert sum(c["decoded"] + c["from_cache"] for c in counts.values()) == 38 and counts["train"]["skipped"] == 1
    # evaluate: the run's own splits, even after a new image appears in the folder
    photo(300, 200, 1, seed=5).save(setup / "photos" / "class_1" / "new.jpg")
    try:
        again = evaluate_checkpoint(run, split="test", device="cpu")
        assert again["test_accuracy"] == pytest.approx(m["test_accuracy"])
    finally:
        (setup / "photos" / "class_1" / "new.jpg").unlink()
    # a second run decodes nothing
    m2 = training.run(_opts(setup, tmp_path / "again", mode="rlrr", epochs=1))
    assert all(c["decoded"] == 0 for c in m2["data"].values()) and m2["data"]["train"]["from_cache"] > 0


def test_train_and_test_folders_keep_their_test_split(tmp_path, setup):
    for split, n in (("train", 6), ("test", 2)):
        for c in range(2):
            (tmp_path / "tt" / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                photo(120, 90, c, seed=100 * c + i + (50 if split == "test" else 0)).save(
                    tmp_path / "tt" / split / f"c{c}" / f"{i}.png")
    m = training.run(_opts(setup, tmp_path / "run", data=str(tmp_path / "tt"), epochs=1))
    assert m["num_test"] == 4 and m["splits"]["test"] == "test/"
    assert all(p.startswith("test/") for p in read_split_files(tmp_path / "run" / "splits")["test"])


def _cli(*args, timeout=180):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "finetune.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_bad_data_flags_and_strict_data_are_one_line_errors(setup, tmp_path, capsys):
    from peft.cli import finetune as finetune_cli

    common = ["--weights", str(setup / "testing.npz"), "--mode", "lora", "--epochs", "1", "--device", "cpu",
              "--no-progress", "--workers", "1"]
    r = _cli(*common, "--data", str(setup / "photos"), "--strict-data", "--output-dir", str(tmp_path / "s"))
    assert r.returncode == 1 and "truncated.jpg" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s" / "checkpoint.pt").exists()
    # The flags in this process: the tool's own cli() with its exit code and stderr (a process each cost ~4 s).
    for flags, what in ((["--test-fraction", "0.5", "--val-fraction", "0.5"], "--test-fraction"),
                        (["--crop-scale", "0.5,0.2"], "--crop-scale"), (["--crop-pct", "0"], "--crop-pct"),
                        (["--workers", "0"], "--workers")):
        code = finetune_cli.cli([*common, "--data", str(setup / "photos"), *flags, "--output-dir", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code == 2 and what in err and len(err.strip().splitlines()) == 1, err
    few = tmp_path / "few"
    for c, n in (("many", 5), ("lonely", 1)):
        (few / c).mkdir(parents=True)
        for i in range(n):
            photo(64, 48, i, i).save(few / c / f"{i}.png")
    r = _cli(*common, "--data", str(few), "--output-dir", str(tmp_path / "f"))
    assert r.returncode == 1 and "class 'lonely' has 1 image" in r.stderr and "Traceback" not in r.stderr


def test_stratified_holdout_sizes_and_the_last_training_image_of_a_class():
    """Per class, max(1, round(n · fraction)) images go to each held-out split and the rest trains; a class that
    would keep no training image (here 2 images for val and test) is an error naming it and what it needs."""
    import numpy as np

    from loaders.datasets import DatasetError
    from peft.finetune.data import stratified_holdout

    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    parts = stratified_holdout(labels, {"val": 0.1, "test": 0.25}, seed=0, classes=["a", "b", "c"])
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(20))  # disjoint, covering
    assert [np.bincount(labels[parts[s]], minlength=3).tolist() for s in ("train", "val", "test")] == \
        [[7, 1, 4], [1, 1, 1], [2, 1, 2]]  # val: max(1, round(n/10)); test: round(2.5)=2, max(1, round(.75)), round(1.75)
    with pytest.raises(DatasetError, match=r"class 'pair' has 2 image\(s\); --val-fraction 0.1 and --test-fraction "
                                           r"0.25 need at least 3 per class"):
        stratified_holdout(np.array([0] * 5 + [1] * 2), {"val": 0.1, "test": 0.25}, seed=0, classes=["many", "pair"])


def test_evaluate_reads_the_runs_own_val_and_test_files_after_the_folder_grew(setup, tmp_path):
    """tools/evaluate.py --split val|test evaluates exactly the files the run held out, by name, even after new
    photos arrived in the folder (a fresh split of the grown folder would pick others). Classes of 8, 12 and 16
    photos and unequal fractions give val and test different sizes and label sequences, so evaluating one split
    under the other's names cannot pass either."""
    import csv
    import json
    from collections import Counter

    import torch

    from peft.cli import evaluate as evaluate_cli
    from peft.finetune.data import prepare_data
    from peft.finetune.distributed import DistContext

    photos = tmp_path / "photos"
    for c in range(3):
        (photos / f"class_{c}").mkdir(parents=True)
        for i in range(8 + 4 * c):
            photo(64, 48, c, seed=10 * c + i).save(photos / f"class_{c}" / f"img_{i:02d}.png")
    run = tmp_path / "run"
    trainer = training.Trainer(_opts(setup, run, data=str(photos), epochs=1, val_fraction=0.25, test_fraction=0.4))
    trainer.run()
    held = {s: sorted(name for name, _ in trainer.data.files[s]) for s in ("val", "test")}
    support = {s: [Counter(n.split("/")[0] for n in held[s])[f"class_{c}"] for c in range(3)] for s in held}
    assert support == {"val": [2, 3, 4], "test": [3, 5, 6]}  # round(n * fraction) per class
    for c in range(3):
        for i in range(4):
            photo(64, 48, c, seed=900 + 10 * c + i).save(photos / f"class_{c}" / f"new_{i}.png")
    fresh = prepare_data(trainer.opts, DistContext(device=torch.device("cpu")), 32).files
    assert all(sorted(name for name, _ in fresh[s]) != held[s] for s in held)  # the growth would change both
    for split in ("val", "test"):
        out = tmp_path / f"eval-{split}"
        assert evaluate_cli.cli([str(run), "--split", split, "--output-dir", str(out), "--device", "cpu"]) == 0
        per_class = json.loads((out / f"{split}_report.json").read_text())["classes"]
        assert [c["support"] for c in per_class] == support[split], split  # the evaluated labels, per class
        with open(out / f"{split}_predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert sorted(r["file"] for r in rows) == held[split], split
        assert all(r["class"] == r["file"].split("/")[0] for r in rows), split  # each label is its own file's
    # the folder moved and grew: evaluate --data NEW_PLACE still evaluates the run's own files, not a fresh split
    moved = tmp_path / "moved"
    photos.rename(moved)
    out = tmp_path / "eval-moved"
    assert evaluate_cli.cli([str(run), "--data", str(moved), "--output-dir", str(out), "--device", "cpu"]) == 0
    with open(out / "test_predictions.csv", newline="") as f:
        assert sorted(r["file"] for r in csv.DictReader(f)) == held["test"]
