"""Your own images: decoding semantics, the decode cache (reuse, invalidation, checks, locking, kill -9), lists that
must stay inside their root, CSV lists, the photo transforms against numpy references, streamed batches."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import loaders.datasets as D
from loaders.datasets import DatasetError, load_dataset, open_source
from loaders.datasets.fgvc import load_fgvc
from loaders.datasets.stream import BatchStream
from loaders.datasets.vtab import load_vtab
from loaders.transforms import BatchTransform
from peft.bench.photos import photo, write_photo_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    made = write_photo_folder(root, classes=3, per_class=4, size=(1200, 900), small=(300, 225))
    return root, made


def _item(src, rel):
    return src.dataset.images.image(src.paths.index(rel))


def test_every_kind_of_file_decodes_as_a_person_sees_it(photos, tmp_path, monkeypatch):
    root, made = photos
    monkeypatch.setenv("VIT_PEFT_CACHE", str(tmp_path / "cache"))
    src = open_source(root, workers=1, progress=False)
    assert len(src.dataset) == 3 * 4 + 8 and src.dataset.classes == ["class_0", "class_1", "class_2"]
    assert [p for p, _ in src.skipped] == ["class_0/truncated.jpg"] and "truncated" in src.skipped[0][1]
    assert not any(".hidden" in p or "notes" in p or "DS_Store" in p for p in src.paths)
    assert {"class_0/scan.TIF", "class_0/portrait.JPG", "class_0/photo.webp", "class_0/anim.gif"} <= set(src.paths)
    # shorter side stored at 256, aspect kept; small images never enlarged
    assert _item(src, "class_1/img_0000.jpg").shape == (256, 341, 3)
    assert _item(src, "class_1/img_0001.jpg").shape == (225, 300, 3)
    # EXIF orientation 6: stored 1200x900 landscape, shown (and stored) portrait
    assert _item(src, "class_0/portrait.JPG").shape == (341, 256, 3)
    with Image.open(made["exif_rotated"]) as im:
        upright = np.asarray(im.convert("RGB").transpose(Image.Transpose.ROTATE_270).resize((256, 341),
                                                                                           Image.Resampling.BILINEAR))
    assert np.abs(_item(src, "class_0/portrait.JPG").astype(int) - upright).mean() < 4  # draft-decoded vs full
    # 16-bit greyscale: scaled to 8 bits (round(v * 255 / 65535)), not clipped at 255
    g16 = np.asarray(Image.open(made["grey16"])).astype(np.int64)
    np.testing.assert_array_equal(_item(src, "class_0/grey16.png")[..., 0], (g16 * 255 + 32767) // 65535)
    # alpha composited on white: out = a * rgb + (1 - a) * 255
    rgba = np.asarray(Image.open(made["rgba"])).astype(np.float64)
    ref = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)
    assert np.abs(_item(src, "class_0/alpha.png").astype(np.float64) - ref).max() <= 1
    # CMYK converted; greyscale kept as one channel
    with Image.open(made["cmyk"]) as im:
        cmyk_rgb = np.asarray(im.convert("RGB").resize((341, 256), Image.Resampling.BILINEAR))
    assert np.abs(_item(src, "class_0/cmyk.jpg").astype(int) - cmyk_rgb).mean() < 4
    assert _item(src, "class_0/grey.jpg").shape[-1] == 1 and src.dataset.images.channels == 3


def test_second_open_decodes_nothing_and_a_changed_file_is_decoded_again(tmp_path, monkeypatch):
    monkeypatch.delenv("VIT_PEFT_CACHE", raising=False)
    write_photo_folder(tmp_path / "p", classes=2, per_class=3, size=(600, 400), small=(300, 200), awkward=False)
    first = open_source(tmp_path / "p", workers=1, progress=False)
    assert first.counts == {"train": {"decoded": 6, "from_cache": 0, "skipped": 0}}
    assert len(list((tmp_path / "p" / ".vit-peft-cache").glob("p-*-*"))) == 1
    second = open_source(tmp_path / "p", workers=1, progress=False)
    assert second.counts == {"train": {"decoded": 0, "from_cache": 6, "skipped": 0}}
    changed = tmp_path / "p" / "class_1" / "img_0001.jpg"
    photo(300, 200, 0, seed=999).save(changed, quality=90)  # other pixels, same name
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = open_source(tmp_path / "p", workers=1, progress=False)
    assert third.counts == {"train": {"decoded": 1, "from_cache": 5, "skipped": 0}}
    new = third.dataset.images.image(third.paths.index("class_1/img_0001.jpg"))
    np.testing.assert_array_equal(new, np.asarray(Image.open(changed).convert("RGB")))
    for rel in third.paths:  # unchanged images copied from the previous cache, bit for bit
        if rel != "class_1/img_0001.jpg":
            np.testing.assert_array_equal(third.dataset.images.image(third.paths.index(rel)),
                                          first.dataset.images.image(first.paths.index(rel)))
    assert len(list((tmp_path / "p" / ".vit-peft-cache").glob("p-*-*"))) == 1  # the old version was replaced


@pytest.mark.parametrize("damage", ["pixels", "truncate", "extend", "index"])
def test_a_cache_that_fails_its_checks_is_rebuilt_with_one_warning(tmp_path, caplog, damage):
    write_photo_folder(tmp_path / "p", classes=2, per_class=2, size=(300, 200), small=(300, 200), awkward=False)
    good = open_source(tmp_path / "p", workers=1, progress=False)
    expected = [good.dataset.images.image(i).copy() for i in range(len(good.dataset))]
    (cache,) = (tmp_path / "p" / ".vit-peft-cache").glob("p-*-*")
    pixels = cache / "pixels.u8"
    if damage == "pixels":  # right key, right size, other pixels
        data = bytearray(pixels.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pixels.write_bytes(bytes(data))
    elif damage == "truncate":
        pixels.write_bytes(pixels.read_bytes()[:-10])
    elif damage == "extend":  # bytes beyond what the index describes: not the file the index was written with
        pixels.write_bytes(pixels.read_bytes() + bytes(10))
    else:
        (cache / "index.npz").write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING):
        again = open_source(tmp_path / "p", workers=1, progress=False)
        for i, arr in enumerate(expected):
            np.testing.assert_array_equal(again.dataset.images.image(i), arr)
    # a damaged image is decoded again on first use (the other three are served from the cache); a damaged
    # index or file size rebuilds the whole cache
    said = "does not match its checksum" if damage == "pixels" else "fails its checks"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and said in warnings[0] and str(cache) in warnings[0], warnings
    assert again.counts["train"]["decoded"] == (0 if damage == "pixels" else 4)


def test_cache_folder_that_is_a_file_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    write_photo_folder(tmp_path / "p", classes=1, per_class=2, size=(300, 200), small=(300, 200), awkward=False)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("VIT_PEFT_CACHE", str(blocker))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with caplog.at_level(logging.WARNING):
        src = open_source(tmp_path / "p", workers=1, progress=False)
    assert len(src.dataset) == 2 and any("is a file" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "home" / ".cache" / "vit-peft" / "decoded").glob("p-*-*"))


_OPEN = ("import sys, json; sys.path.insert(0, {root!r}); from loaders.datasets import open_source; "
         "s = open_source({folder!r}, workers=1, progress=False); print(json.dumps(s.counts['train']))")


def test_concurrent_runs_share_one_build(tmp_path):
    write_photo_folder(tmp_path / "p", classes=2, per_class=6, size=(900, 600), small=(300, 200), awkward=False)
    code = _OPEN.format(root=str(ROOT), folder=str(tmp_path / "p"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert sorted(o["decoded"] for o in outs) == [0, 12] and sorted(o["from_cache"] for o in outs) == [0, 12]


def test_a_killed_build_leaves_no_half_cache(tmp_path):
    write_photo_folder(tmp_path / "p", classes=2, per_class=40, size=(1600, 1200), small=(1600, 1200),
                       awkward=False)
    cache = tmp_path / "p" / ".vit-peft-cache"
    proc = subprocess.Popen([sys.executable, "-c", _OPEN.format(root=str(ROOT), folder=str(tmp_path / "p"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not list(cache.glob(".tmp-*/pixels.u8")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the build finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not list(cache.glob("p-*-*"))  # nothing half-written was put in place
    src = open_source(tmp_path / "p", workers=1, progress=False)
    assert src.counts["train"] == {"decoded": 80, "from_cache": 0, "skipped": 0}
    assert not list(cache.glob(".tmp-*"))  # the interrupted build's leftovers are gone


# ---------------------------------------------------------------------------------------------- lists and paths

def _vtab_task(root: Path, lines: str) -> Path:
    task = root / "svhn"
    (task / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(task / "images" / "a.png")
    for name in ("train800", "val200", "train800val200", "test"):
        (task / f"{name}.txt").write_text("images/a.png 1\n")
    (task / "test.txt").write_bytes(lines.encode("utf-8") if isinstance(lines, str) else lines)
    return task


@pytest.mark.parametrize("line,message", [
    ("../../outside.png 1", "climbs out with '..'"),
    ("/etc/passwd 1", "absolute path"),
    ("images/a.png ³", "not a plain decimal integer"),
    ("images/a.png --3", "not a plain decimal integer"),
    ("link/secret.png 1", "leads outside"),
])
def test_vtab_lists_cannot_leave_their_task_folder(tmp_path, line, message):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "secret.png")
    task = _vtab_task(tmp_path / "vtab", "images/a.png 1\n" + line + "\n")
    (task / "link").symlink_to(outside)
    with pytest.raises(DatasetError, match=message) as e:
        load_vtab("svhn", "test", tmp_path / "vtab", image_size=8, progress=False)
    assert "test.txt:2" in str(e.value)


def test_list_files_must_be_utf8_and_json_shallow(tmp_path):
    _vtab_task(tmp_path / "vtab", b"images/a.png 1\nimages/\xff.png 1\n")
    with pytest.raises(DatasetError, match=r"test.txt:2: not UTF-8"):
        load_vtab("svhn", "test", tmp_path / "vtab", image_size=8, progress=False)
    flowers = tmp_path / "fgvc" / "OxfordFlower"
    flowers.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flowers / "a.png")
    ids = {f"a{c}.png": c for c in range(1, 103)}  # Oxford Flowers has 102 classes
    for split in ("train", "val", "test"):
        (flowers / f"{split}.json").write_text(json.dumps(ids))
    (flowers / "val.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DatasetError, match="nested deeper"):
        load_fgvc("flowers", "train", tmp_path / "fgvc", image_size=8, progress=False)
    (flowers / "val.json").write_text(json.dumps({**ids, "../../x.png": 1}))
    with pytest.raises(DatasetError, match="climbs out"):
        load_fgvc("flowers", "val", tmp_path / "fgvc", image_size=8, progress=False)


def test_csv_lists_with_class_names_header_and_paths_inside(tmp_path):
    for i, c in enumerate(["dog", "cat", "dog"]):
        photo(64, 48, i, i).save(tmp_path / f"{i}.png")
    (tmp_path / "list.csv").write_text("path,label\n0.png,dog\n1.png,cat\n\"2.png\",dog\n")
    ds = load_dataset(str(tmp_path / "list.csv"))
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [1, 0, 1] and ds.on_disk
    (tmp_path / "ids.tsv").write_text("0.png\t2\n1.png\t0\n")
    assert load_dataset(str(tmp_path / "ids.tsv")).classes == ["0", "1", "2"]
    (tmp_path / "bad.csv").write_text("0.png,dog\n../x.png,cat\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2: path '../x.png' climbs out"):
        load_dataset(str(tmp_path / "bad.csv"))


# ------------------------------------------------------------------------------------------------- transforms

def _bilinear_reference(img: np.ndarray, box, S: int, flip=False) -> np.ndarray:
    """Independent numpy bilinear sampling of an S x S output from box (y0, x0, h, w) of img (H, W, C) in [0, 1],
    pixel centres, positions clamped to the image (as the transform promises)."""
    H, W = img.shape[:2]
    y0, x0, h, w = box
    f = (np.arange(S) + 0.5) / S
    ys = np.clip(y0 + f * h - 0.5, 0, H - 1)
    xs = np.clip(x0 + (1 - f if flip else f) * w - 0.5, 0, W - 1)
    y_lo, x_lo = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y_hi, x_hi = np.minimum(y_lo + 1, H - 1), np.minimum(x_lo + 1, W - 1)
    wy, wx = (ys - y_lo)[:, None, None], (xs - x_lo)[None, :, None]
    top = img[y_lo][:, x_lo] * (1 - wx) + img[y_lo][:, x_hi] * wx
    bottom = img[y_hi][:, x_lo] * (1 - wx) + img[y_hi][:, x_hi] * wx
    return top * (1 - wy) + bottom * wy


def test_centre_crop_of_a_stored_photo_is_its_exact_centre_pixels():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (256, 341, 3), np.uint8), rng.integers(0, 256, (300, 256, 3), np.uint8)
    canvas = torch.zeros(2, 300, 341, 3, dtype=torch.uint8)
    canvas[0, :256, :341], canvas[1, :300, :256] = torch.from_numpy(a), torch.from_numpy(b)
    out = BatchTransform(224, train=False, resize="center", mean=0, std=1)(canvas, sizes=torch.tensor([[256, 341],
                                                                                                     [300, 256]]))
    # timm: shorter side to floor(224 / 0.875) = 256 (already), centre crop 224 with rounded offsets
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), a[16:240, 58:282] / 255, atol=1e-6)
    np.testing.assert_allclose(out[1].permute(1, 2, 0).numpy(), b[38:262, 16:240] / 255, atol=1e-6)
    c = rng.integers(0, 256, (259, 256, 3), np.uint8)  # (259 - 224) / 2 = 17.5: rounded (half to even), not floored
    out = BatchTransform(224, train=False, resize="center", mean=0, std=1)(torch.from_numpy(c)[None])
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), c[18:242, 16:240] / 255, atol=1e-6)


def test_random_resized_crop_boxes_follow_timms_rules_and_the_canvas_padding_never_leaks():
    tf = BatchTransform(32, train=True, crop="resized", mean=0, std=1)
    sizes = torch.tensor([[40, 90], [64, 64], [100, 30], [8, 200]] * 64)
    boxes, flips = tf.boxes(sizes, torch.Generator().manual_seed(0))
    y0, x0, h, w = boxes.unbind(1)
    H, W = sizes[:, 0].double(), sizes[:, 1].double()
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= H + 1e-9).all() and (x0 + w <= W + 1e-9).all()
    area = h * w / (H * W)
    ratio = w / h
    fits = (area >= 0.08 - 1e-9) & (area <= 1 + 1e-9) & (ratio >= 3 / 4 - 1e-9) & (ratio <= 4 / 3 + 1e-9)
    strips = sizes[:, 1] == 200
    assert fits[~strips].all()  # every box drawn for an ordinary image obeys scale and ratio
    strip = boxes[3]  # aspect 25 > 4/3: the fallback is the full height, width h * 4/3, centred
    assert torch.allclose(strip, torch.tensor([0, (200 - 8 * 4 / 3) / 2, 8, 8 * 4 / 3], dtype=torch.float64))
    assert 0.35 < flips.float().mean() < 0.65
    # one image inside two canvases padded differently gives the same crops (positions stay on its pixels)
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.integers(0, 256, (4, 40, 90, 3), np.uint8))
    small = torch.zeros(4, 40, 90, 3, dtype=torch.uint8)
    big = torch.full((4, 70, 120, 3), 255, dtype=torch.uint8)
    small[:], big[:, :40, :90] = img, img
    s = torch.tensor([[40, 90]] * 4)
    o1 = tf(small, torch.Generator().manual_seed(5), s)
    o2 = tf(big, torch.Generator().manual_seed(5), s)
    assert torch.equal(o1, o2)
    # against the numpy reference, box by box
    b, f = tf.boxes(s, torch.Generator().manual_seed(5))
    for i in range(4):
        ref = _bilinear_reference(img[i].numpy() / 255.0, b[i].tolist(), 32, bool(f[i]))
        np.testing.assert_allclose(o1[i].permute(1, 2, 0).numpy(), ref, atol=2e-6)


def test_a_ranks_rows_equal_its_slice_of_the_one_process_batch():
    rng = np.random.default_rng(2)
    canvas = torch.from_numpy(rng.integers(0, 256, (7, 50, 60, 3), np.uint8))
    sizes = torch.tensor([[50, 60], [40, 60], [50, 33], [20, 20], [50, 60], [45, 55], [30, 60]])
    for tf in (BatchTransform(16, train=True, crop="resized"), BatchTransform(16, train=True)):
        whole = tf(canvas, torch.Generator().manual_seed(3), sizes if tf.crop == "resized" else None)
        part = tf(canvas[2:5], torch.Generator().manual_seed(3), sizes[2:5] if tf.crop == "resized" else None,
                  rows=(2, 5, 7))
        assert torch.equal(part, whole[2:5])


# ------------------------------------------------------------------------------------------------ streaming

def test_streamed_batches_are_the_stored_images(photos, tmp_path, monkeypatch):
    root, _ = photos
    monkeypatch.setenv("VIT_PEFT_CACHE", str(tmp_path / "cache"))
    ds = open_source(root, workers=1, progress=False).dataset
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in BatchStream(ds, order.split(6), "cpu", rank=1, world_size=2):
        lo, hi, n = batch.rows
        assert batch.images.shape[0] == hi - lo and n <= 6
        for j in range(hi - lo):
            h, w = batch.sizes[j].tolist() if batch.sizes is not None else batch.images.shape[1:3]
            seen.append(batch.images[j, :h, :w].numpy())
        assert (batch.labels >= 0).all()
    mine = torch.cat([b[D.shard_bounds(len(b), 1, 2)[0]:D.shard_bounds(len(b), 1, 2)[1]] for b in order.split(6)])
    assert len(seen) == len(mine)
    for arr, i in zip(seen, mine.tolist()):
        np.testing.assert_array_equal(arr, np.broadcast_to(ds.images.image(i), arr.shape))
    it = iter(BatchStream(ds, order.split(2), "cpu"))
    next(it)
    it.close()  # stopping early ends the reading thread
    time.sleep(0.2)
    assert not any(t.name == "vit-peft-batches" and t.is_alive() for t in __import__("threading").enumerate())


def test_a_panorama_is_stored_as_its_centre_at_the_aspect_limit(tmp_path):
    """Sides longer than max_aspect x the shorter one are centre-cropped to that before the shorter side is reduced:
    the stored pixels are exactly the centre columns (or rows), offsets floor((long - limit) / 2)."""
    from loaders.images import StorePolicy, decode_for_store

    rng = np.random.default_rng(0)
    policy = StorePolicy("shorter", size=10, max_aspect=4.0)  # limit 4 x 10 = 40 pixels
    for h, w, rows, cols in ((10, 53, slice(0, 10), slice(6, 46)), (47, 10, slice(3, 43), slice(0, 10)),
                             (10, 40, slice(0, 10), slice(0, 40))):  # wide, tall, at the limit (kept whole)
        a = rng.integers(0, 256, (h, w, 3), np.uint8)
        Image.fromarray(a).save(tmp_path / "p.png")
        np.testing.assert_array_equal(decode_for_store(tmp_path / "p.png", policy), a[rows, cols], err_msg=f"{h}x{w}")
    Image.fromarray(rng.integers(0, 256, (20, 120, 3), np.uint8)).save(tmp_path / "big.png")
    assert decode_for_store(tmp_path / "big.png", policy).shape == (10, 40, 3)  # cropped to 80 x 20, then reduced
