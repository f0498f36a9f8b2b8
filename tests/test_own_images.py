"""Folders a person really has, through the real command line: a class folder without a readable image, file
names that are not UTF-8 or hold a newline, photos beside the class folders, notes.txt anywhere, a run without a
test split, a relative --data evaluated from elsewhere, --classes by name or out of range, predict with a bad
file among good ones, the same PNG predicted as a file and from a folder, many classes in the reports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vit
from conftest import FMNIST, needs_fmnist
from loaders.datasets import DatasetError, open_source, parse_class_spec
from loaders.images import StorePolicy
from npz_factory import write_google_npz
from peft.bench.photos import photo
from peft.finetune import FinetuneOptions
from peft.finetune import plots
from peft.finetune import trainer as training
from peft.finetune.predict import predict_folder, predict_images, run_eval_transform
from peft.finetune.rebuild import load_model_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LATIN1 = b"caf\xe9.png"  # a Latin-1 name from an old zip: not valid UTF-8
NEWLINE = "two\nlines.png"


def _pngs(folder: Path, label: int, n: int, size=(40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo(*size, label, seed=1000 * label + i).save(folder / f"{i}.png")


def _tool(name: str, *args, cwd=ROOT, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _evaluate(capsys, monkeypatch, cwd, *args) -> tuple[int, list[str], str]:
    """tools/evaluate.py's command line, in this process, started in ``cwd``: (exit code, error lines, stdout)."""
    from peft.cli import evaluate as evaluate_cli

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = evaluate_cli.cli([str(a) for a in args])
    out = capsys.readouterr()
    return code, _errors(out.err), out.out


def _errors(stderr: str) -> list[str]:
    """The lines a tool printed besides its log (whose lines carry a level name: "12:00:00 WARNING name: ...")."""
    return [line for line in stderr.splitlines()
            if line.strip() and not re.match(r"^(\d\d:\d\d:\d\d )?(WARNING|INFO) ", line)]


COMMON = ("--mode", "lora", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-progress", "--workers", "1",
          "--threads", "1")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("own-weights") / "testing.npz"
    write_google_npz(path, vit.get_config("testing"), seed=0)
    return path


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory, weights):
    """A run of tools/finetune.py, started in work/ with a relative --data photos and --test-fraction 0, on a folder
    with a photo and a notes.txt beside the class folders."""
    work = tmp_path_factory.mktemp("own-work")
    photos = work / "photos"
    _pngs(photos / "cat", 0, 5)
    _pngs(photos / "dog", 1, 5)
    photo(40, 30, 1, seed=79).save(photos / "stray.png")
    (photos / "notes.txt").write_text("shot in 2019\n")
    r = _tool("finetune", "--data", "photos", "--weights", weights, "--output-dir", "run", "--test-fraction", "0",
              "--val-fraction", "0.3", *COMMON, cwd=work)
    return work, work / "run", r


@pytest.mark.slow
def test_odd_file_names_train_and_their_split_lists_round_trip_every_name(tmp_path, weights, capsys, monkeypatch):
    photos = tmp_path / "photos"
    _pngs(photos / "cat", 0, 4)
    _pngs(photos / "dog", 1, 5)
    photo(40, 30, 0, seed=77).save(os.fsencode(photos / "cat") + b"/" + LATIN1, format="PNG")
    photo(40, 30, 0, seed=78).save(photos / "cat" / NEWLINE, format="PNG")
    run = tmp_path / "run"
    r = _tool("finetune", "--data", photos, "--weights", weights, "--output-dir", run, "--test-fraction", "0.4",
              *COMMON)
    assert r.returncode == 0, r.stderr[-2000:]
    lists = {s: json.loads((run / "splits" / f"{s}.json").read_text())["files"] for s in ("train", "val", "test")}
    listed = sorted(p for rows in lists.values() for p, _ in rows)
    on_disk = sorted(f"{c}/{os.fsdecode(n)}" for c in ("cat", "dog") for n in os.listdir(os.fsencode(photos / c)))
    assert listed == on_disk and len(listed) == 11  # every name, byte for byte, in exactly one split
    assert "cat/" + os.fsdecode(LATIN1) in listed and "cat/" + NEWLINE in listed
    # evaluate reads the lists back: the very same test images (a lost name would be "gone" or re-split)
    (photos / "dog" / "late.png").write_bytes((photos / "dog" / "0.png").read_bytes())  # the folder grew since
    code, err, _ = _evaluate(capsys, monkeypatch, tmp_path, run, "--output-dir", tmp_path / "ev")
    assert code == 0, err
    ev = json.loads((tmp_path / "ev" / "test_evaluation.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert ev["test_num_samples"] == len(lists["test"]) == metrics["num_test"]
    assert ev["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-12)


@pytest.mark.slow
def test_photos_beside_the_class_folders_are_reported_counted_and_warned(odd_run):
    work, run, r = odd_run
    assert r.returncode == 0, r.stderr[-2000:]
    skipped = (run / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == ["stray.png"] and "outside any class" in skipped[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["train"]["outside_classes"] == 1
    assert "1 image(s) lie beside the class folders" in r.stderr
    assert "ignored 1 file(s) that are not images" in r.stderr and ".txt: 1" in r.stderr  # notes.txt at the root


@pytest.mark.slow
def test_no_test_split_is_said_in_one_line_never_a_fake_accuracy(odd_run, tmp_path, capsys, monkeypatch):
    work, run, r = odd_run
    assert r.returncode == 0, r.stderr[-2000:]
    code, err, out = _evaluate(capsys, monkeypatch, work, run)  # --test-fraction 0; started where the run was
    assert code == 2 and len(err) == 1 and "this run has no test split" in err[0] and "--split val" in err[0], err
    assert "0.0000" not in out and not (run / "test_evaluation.json").exists()


@pytest.mark.slow
def test_relative_data_evaluated_from_elsewhere_and_moved(odd_run, tmp_path, capsys, monkeypatch):
    work, run, r = odd_run
    assert r.returncode == 0, r.stderr[-2000:]
    opts = json.loads((run / "options.json").read_text())
    assert opts["data"] == str((work / "photos").resolve())  # recorded absolute
    code, err, _ = _evaluate(capsys, monkeypatch, tmp_path, run, "--split", "val", "--output-dir", tmp_path / "ev")
    assert code == 0, err
    ev = json.loads((tmp_path / "ev" / "val_evaluation.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert ev["val_num_samples"] == metrics["num_val"] == len(json.loads((run / "splits" / "val.json").read_text())["files"])
    assert ev["val_accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-12)
    (work / "photos").rename(work / "moved")  # the folder moves: said in one line, naming where it was
    try:
        code, err, _ = _evaluate(capsys, monkeypatch, tmp_path, run, "--split", "val", "--output-dir", tmp_path / "e2")
        assert code == 1 and len(err) == 1 and "not there any more" in err[0] and str(work / "photos") in err[0], err
    finally:
        (work / "moved").rename(work / "photos")


@pytest.mark.slow
def test_predict_answers_every_good_file_and_names_each_bad_one(odd_run, tmp_path, capsys, caplog):
    from peft.cli import predict as predict_cli

    work, run, r = odd_run
    assert r.returncode == 0, r.stderr[-2000:]
    photo(50, 40, 1, seed=5).save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    capsys.readouterr()
    code = predict_cli.cli([str(tmp_path / "good.png"), str(tmp_path / "bad.jpg"), str(tmp_path / "gone.png"),
                            "--checkpoint", str(run), "--device", "cpu"])
    printed = capsys.readouterr()
    assert code == 1, printed.err
    out = printed.out.splitlines()
    assert out[0] == str(tmp_path / "good.png") and out[1].strip().startswith("1.") and len(out) == 3  # 2 classes
    bad = [line for line in printed.err.splitlines() if "bad.jpg" in line]
    gone = [line for line in printed.err.splitlines() if "gone.png" in line]
    assert len(bad) == 1 and len(gone) == 1 and "gone.png" not in bad[0]  # each on its own line
    # a folder read by predict --data: the readme.txt there is warned about, as in training
    (tmp_path / "few").mkdir()
    photo(50, 40, 1, seed=5).save(tmp_path / "few" / "good.png")
    (tmp_path / "few" / "readme.txt").write_text("x")
    caplog.clear()
    assert predict_cli.cli(["--data", str(tmp_path / "few"), "--checkpoint", str(run), "--device", "cpu"]) == 0
    assert any("ignored 1 file(s) that are not images" in m for m in caplog.messages), caplog.messages


@pytest.mark.slow
def test_a_png_predicted_as_a_file_and_from_a_folder_gives_the_same_probabilities(odd_run, tmp_path, capsys):
    from peft.cli import predict as predict_cli

    work, run, r = odd_run
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "one").mkdir()
    photo(333, 250, 0, seed=9).save(tmp_path / "one" / "x.png")  # larger than the stored side: resized on decode
    printed = []
    for args in ([tmp_path / "one" / "x.png"], ["--data", tmp_path / "one"]):
        capsys.readouterr()
        assert predict_cli.main([*map(str, args), "--checkpoint", str(run), "--top-k", "2", "--device", "cpu"]) == 0
        printed.append(capsys.readouterr().out.splitlines()[1:])
    assert printed[0] == printed[1] and len(printed[0]) == 2  # both classes, the same probabilities
    # and in the library, bit for bit
    model, meta = load_model_from_checkpoint(run, device="cpu")
    opts = FinetuneOptions.from_dict(meta["options"])
    tf = run_eval_transform(opts, model.config.image_size)
    policy = StorePolicy.for_photos(model.config.image_size, opts.crop_pct)
    [(_, as_file, _)] = predict_images(model, [tmp_path / "one" / "x.png"], meta["classes"], tf, policy, top_k=2)
    [(_, from_folder, _)] = predict_folder(model, tmp_path / "one", meta["classes"], top_k=2, crop_pct=opts.crop_pct,
                                           transform=tf)
    assert as_file == from_folder  # class names and float probabilities, bit for bit


def test_a_class_folder_without_a_readable_image_is_named(tmp_path):
    for kind, fill in (("notes", lambda d: (d / "notes.txt").write_text("todo")),
                       ("heic", lambda d: (d / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))),
                       ("broken", lambda d: (d / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated"))):
        root = tmp_path / kind
        _pngs(root / "a", 0, 2)
        _pngs(root / "b", 1, 2)
        (root / "bird").mkdir()
        fill(root / "bird")
        with pytest.raises(DatasetError, match=r"bird.*--drop-empty-classes") as e:
            open_source(root, workers=1, progress=False)
        assert "\n" not in str(e.value)
        src = open_source(root, workers=1, progress=False, drop_empty=True)
        assert src.dataset.classes == ["a", "b"] and src.dropped == ["bird"]
        assert sorted(src.dataset.labels.tolist()) == [0, 0, 1, 1]


def _finetune(capsys, *args) -> tuple[int, str]:
    """tools/finetune.py's command line, in this process: (exit code, the error lines it printed)."""
    from peft.cli import finetune as finetune_cli

    capsys.readouterr()
    code = finetune_cli.cli([str(a) for a in args])
    return code, _errors(capsys.readouterr().err)


def test_phantom_class_and_bad_classes_are_one_line_errors_that_create_nothing(tmp_path, weights, capsys):
    photos = tmp_path / "photos"
    for c, name in enumerate(("a", "b", "c")):
        _pngs(photos / name, c, 3)
    (photos / "bird").mkdir()
    (photos / "bird" / "notes.txt").write_text("no pictures yet")
    code, err = _finetune(capsys, "--data", photos, "--weights", weights, "--output-dir", tmp_path / "p", *COMMON)
    assert code == 1 and len(err) == 1 and "bird" in err[0] and "notes.txt" in err[0], err
    assert not (tmp_path / "p").exists()
    (photos / "bird" / "notes.txt").unlink()
    (photos / "bird").rmdir()
    for spec, named in (("0-5", "[3, 4, 5]"), ("a,zebra", "'zebra'")):
        code, err = _finetune(capsys, "--data", photos, "--weights", weights, "--classes", spec, "--output-dir",
                              tmp_path / "q", *COMMON)
        assert code == 2 and len(err) == 1 and named in err[0] and "0 a, 1 b, 2 c" in err[0], err
        assert not (tmp_path / "q").exists()


@needs_fmnist
def test_classes_out_of_range_on_a_named_dataset_is_one_line(tmp_path, capsys):
    code, err = _finetune(capsys, "--data", "fashion_mnist", "--data-root", FMNIST, "--weights", "none", "--model",
                          "testing", "--mode", "full", "--classes", "0-12", "--output-dir", tmp_path / "f", "--device",
                          "cpu", "--no-progress")
    assert code == 2 and len(err) == 1, err
    assert "[10, 11, 12]" in err[0] and "0 T-shirt/top" in err[0] and not (tmp_path / "f").exists()


def test_class_names_select_classes_and_name_the_ones_that_exist():
    classes = ["bird", "cat", "dog", "7"]
    assert parse_class_spec("dog,bird", classes) == [2, 0]
    assert parse_class_spec("cat,0,3", classes) == [1, 0, 3]  # names and indices mixed, in the order given
    assert parse_class_spec("dog,0", classes) == [2, 0]
    assert parse_class_spec("3", classes) == [3]  # digits are an index, as they always were
    with pytest.raises(ValueError, match=r"no class named 'cow'.*0 bird, 1 cat, 2 dog, 3 7"):
        parse_class_spec("cow,dog", classes)
    with pytest.raises(ValueError, match="selected twice"):
        parse_class_spec("bird,0", classes)
    assert parse_class_spec("cow,1-2", None) == [-1, 1, 2]  # syntax only: names are looked up by the data


def _photo_opts(photos, out, weights, **kw):
    return FinetuneOptions(mode="lora", weights=str(weights), data=str(photos), epochs=1, batch_size=4, device="cpu",
                           progress=False, workers=1, output_dir=str(out), **kw)


@pytest.mark.slow
def test_classes_by_name_and_dropped_empty_classes_in_a_run(tmp_path, weights):
    photos = tmp_path / "photos"
    for c, name in enumerate(("a", "b", "c")):
        _pngs(photos / name, c, 4)
    (photos / "empty").mkdir()
    (photos / "empty" / "notes.txt").write_text("later")
    training.run(_photo_opts(photos, tmp_path / "run", weights, classes="c,a", drop_empty_classes=True))
    report = json.loads((tmp_path / "run" / "test_report.json").read_text())
    assert [c["class"] for c in report["classes"]] == ["c", "a"]  # relabelled 0, 1 in the order named


@pytest.mark.slow
def test_a_figure_that_fails_loses_no_number(tmp_path, weights, monkeypatch):
    photos = tmp_path / "photos"
    for c, name in enumerate(("a", "b")):
        _pngs(photos / name, c, 4)

    def no_memory(*args, **kw):
        raise MemoryError("cannot allocate the figure")

    monkeypatch.setattr(plots, "plot_confusion", no_memory)
    m = training.run(_photo_opts(photos, tmp_path / "run", weights))
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] == m["test_accuracy"]
    assert (run / "test_report.json").is_file() and (run / "test_confusion.csv").is_file()
    assert (run / "test_roc.png").is_file() and not (run / "test_confusion.png").exists()  # the others drawn


_MANY = textwrap.dedent("""
    import resource, sys, numpy as np
    sys.path.insert(0, {root!r})
    from peft.finetune import report
    vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))  # 1 GiB above what is mapped now
    k, n = 200, 600
    g = np.random.default_rng(0)
    labels = np.arange(n) % k
    probs = g.dirichlet(np.ones(k), n)
    probs[np.arange(n), labels] += 0.5 * (g.random(n) < 0.6)
    report.write_evaluation_report({out!r}, probs / probs.sum(1, keepdims=True), labels, [f"class_{{i}}" for i in range(k)])
""")


@pytest.mark.slow
def test_two_hundred_classes_report_within_a_memory_cap(tmp_path):
    r = subprocess.run([sys.executable, "-c", _MANY.format(root=str(ROOT), out=str(tmp_path))], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with Image.open(tmp_path / "test_confusion.png") as im:
        assert max(im.size) <= plots.MAX_INCHES * 120  # bounded, whatever the number of classes
    top = (tmp_path / "test_top_confusions.csv").read_text().splitlines()
    assert top[0] == "true,predicted,count,share_of_true" and 1 < len(top) <= 51
    cm = np.loadtxt(tmp_path / "test_confusion.csv", delimiter=",", dtype=np.int64)
    true, pred, count = top[1].split(",")[:3]
    off = cm - np.diag(np.diag(cm))
    assert int(count) == off.max() == cm[int(true.split("_")[1]), int(pred.split("_")[1])]
