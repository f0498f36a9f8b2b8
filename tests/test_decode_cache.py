"""The decode cache never crashes on a damaged index and never serves a damaged image; one decoder for photo folders
and benchmark lists (16-bit samples by one rule); the one error a bad image raises; a file changed in place is
decoded again. Every file is written by the test."""

import logging
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vit
from loaders.datasets import DatasetError, decode_cached, open_source
from loaders.datasets.vtab import load_vtab
from loaders.images import StorePolicy, decode_for_store, read_image

from conftest import make_model
from npz_factory import write_google_npz

ROOT = Path(__file__).resolve().parents[1]
POLICY = StorePolicy.for_photos(32)  # what finetune and predict --data store for a 32 px model


@pytest.fixture(autouse=True)
def cache_beside_the_data(monkeypatch):
    """Every cache of this file in <data>/.vit-peft-cache, whatever the environment says."""
    monkeypatch.delenv("VIT_PEFT_CACHE", raising=False)


def _tile(k: int, n: int = 12) -> np.ndarray:
    rng = np.random.default_rng(k)
    return rng.integers(0, 256, (n, n + 2, 3), dtype=np.uint8)


def _folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_tile(100 * c + i)).save(root / f"c{c}" / f"{i}.png")
    return root


def _cache_dir(root: Path) -> Path:
    (cache,) = (root / ".vit-peft-cache").glob(f"{root.name}-*-*")
    return cache


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------- a damaged index

def _rewrite(index: Path, **change):
    with np.load(index, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in change.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v(arrays[k]) if callable(v) else v
    with open(index, "wb") as f:
        np.savez(f, **arrays)


DAMAGE = {
    "PK and garbage": lambda ix: ix.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4),  # zipfile.BadZipFile
    "emptied": lambda ix: ix.write_bytes(b""),  # EOFError
    "cut to 100 bytes": lambda ix: ix.write_bytes(ix.read_bytes()[:100]),  # BadZipFile
    "deleted": lambda ix: ix.unlink(),
    "a flipped byte inside": lambda ix: ix.write_bytes(ix.read_bytes()[:300] + bytes([ix.read_bytes()[300] ^ 1])
                                                       + ix.read_bytes()[301:]),
    "version of two elements": lambda ix: _rewrite(ix, version=np.array([1, 1])),  # TypeError
    "version a string": lambda ix: _rewrite(ix, version=np.array("1")),
    "offsets as floats": lambda ix: _rewrite(ix, offsets=lambda a: a.astype(np.float64)),
    "shapes of two columns": lambda ix: _rewrite(ix, shapes=lambda a: a[:, :2]),
    "ok as integers": lambda ix: _rewrite(ix, ok=lambda a: a.astype(np.int64) * 7),
    "crc missing": lambda ix: _rewrite(ix, crc=None),
    "crc one short": lambda ix: _rewrite(ix, crc=lambda a: a[:-1]),
    "crc negative": lambda ix: _rewrite(ix, crc=lambda a: -a - 1),
    "key an integer": lambda ix: _rewrite(ix, key=np.array(5)),
    "entries not JSON": lambda ix: _rewrite(ix, entries=np.array("[[")),
    "entries a JSON number": lambda ix: _rewrite(ix, entries=np.array("3")),
    "entries one short": lambda ix: _rewrite(ix, entries=lambda a: np.array(str(a).rsplit(", [", 1)[0] + "]")),
    "reasons with a bad key": lambda ix: _rewrite(ix, reasons=np.array('{"x": "y"}')),
    "offsets overlapping": lambda ix: _rewrite(ix, offsets=lambda a: np.zeros_like(a)),
    "an object array": lambda ix: _rewrite(ix, shapes=np.array([None, 1], dtype=object)),
}


def _predict_folder(folder):
    from peft.finetune.predict import predict_folder
    model = make_model(0)
    return predict_folder(model, folder, [str(k) for k in range(model.config.num_classes)], top_k=1, workers=1)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_index_is_rebuilt_with_one_warning_in_finetune_and_predict(tmp_path, caplog, damage):
    root = _folder(tmp_path / "photos")
    first = open_source(root, POLICY, workers=1, progress=False)  # what finetune opens
    want = [first.dataset.images.image(i).copy() for i in range(len(first.dataset))]
    answers = _predict_folder(root)  # predict --data reads the same cache (same folder, files and policy)
    for opener in ("finetune", "predict"):
        cache = _cache_dir(root)
        DAMAGE[damage](cache / "index.npz")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            if opener == "finetune":
                again = open_source(root, POLICY, workers=1, progress=False)
                assert again.counts == {"train": {"decoded": 6, "from_cache": 0, "skipped": 0}}
                for i, arr in enumerate(want):
                    np.testing.assert_array_equal(again.dataset.images.image(i), arr)
            else:
                assert _predict_folder(root) == answers
        said = _warnings(caplog)
        assert len(said) == 1 and "fails its checks" in said[0] and str(cache) in said[0], said


@pytest.mark.slow
def test_the_finetune_and_predict_command_lines_rebuild_a_damaged_index(tmp_path):
    root = _folder(tmp_path / "photos", per_class=4)
    write_google_npz(tmp_path / "testing.npz", vit.get_config("testing"), seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VIT_PEFT_CACHE", None)
    open_source(root, POLICY, workers=1, progress=False)
    DAMAGE["emptied"](_cache_dir(root) / "index.npz")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "finetune.py"), "--weights", str(tmp_path / "testing.npz"),
                        "--data", str(root), "--mode", "lora", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                        "--workers", "1", "--no-progress", "--output-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("fails its checks") == 1 and "unreadable index.npz (EOFError" in r.stderr
    DAMAGE["PK and garbage"](_cache_dir(root) / "index.npz")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "predict.py"), "--data", str(root), "--checkpoint",
                        str(tmp_path / "run"), "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("fails its checks") == 1 and "BadZipFile" in r.stderr
    assert sorted(line for line in r.stdout.splitlines() if line.endswith(".png")) == \
        sorted(f"c{c}/{i}.png" for c in range(2) for i in range(4))


def test_reading_an_index_raises_only_cache_damaged(tmp_path):
    from loaders.datasets.cache_index import CacheDamaged, read_index
    root = _folder(tmp_path / "photos")
    open_source(root, POLICY, workers=1, progress=False)
    index = _cache_dir(root) / "index.npz"
    good = index.read_bytes()
    assert len(read_index(index).offsets) == 6
    for name, damage in DAMAGE.items():
        index.write_bytes(good)
        damage(index)
        with pytest.raises(CacheDamaged):
            read_index(index)


# ------------------------------------------------------------------------------------------- a damaged image

def _many(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(n):
        files.append(root / f"{k:03d}.png")
        Image.fromarray(_tile(k, 6)).save(files[-1])
    return files


def _flip(cache: Path, store, item: int) -> None:
    """One bit of one stored image flipped on disk."""
    at = int(store.offsets[store.index[item]]) + 5
    with open(cache / "pixels.u8", "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def test_one_flipped_byte_in_a_400_image_cache_is_never_served(tmp_path, caplog):
    files = _many(tmp_path / "many", 400)
    store, _ = decode_cached(files, tmp_path / "many", "many", POLICY, workers=1, progress=False)
    want = store.gather(np.arange(400))[0].numpy().copy()
    cache = _cache_dir(tmp_path / "many")
    _flip(cache, store, 237)
    with caplog.at_level(logging.WARNING):
        again, report = decode_cached(files, tmp_path / "many", "many", POLICY, workers=1, progress=False)
        assert report.counts() == {"decoded": 0, "from_cache": 400, "skipped": 0}  # not rebuilt: one image repaired
        np.testing.assert_array_equal(again.gather(np.arange(400))[0].numpy(), want)  # checked before first use
        np.testing.assert_array_equal(again.subset([237]).image(0), want[237])
    said = _warnings(caplog)
    assert len(said) == 1 and "237.png" in said[0] and "does not match its checksum" in said[0], said
    # repaired on disk: the next process finds every image whole and says nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third, _ = decode_cached(files, tmp_path / "many", "many", POLICY, workers=1, progress=False)
        np.testing.assert_array_equal(third.gather(np.arange(400))[0].numpy(), want)
    assert _warnings(caplog) == []


def test_a_damaged_image_of_an_earlier_cache_is_decoded_again_not_copied(tmp_path):
    files = _many(tmp_path / "many", 300)
    store, _ = decode_cached(files, tmp_path / "many", "many", POLICY, workers=1, progress=False)
    want = store.gather(np.arange(300))[0].numpy().copy()
    _flip(_cache_dir(tmp_path / "many"), store, 123)
    Image.fromarray(_tile(999, 6)).save(files[7])  # one file changes: a new cache, built from the earlier one
    os.utime(files[7], ns=(1, 2 * 10**18))
    want[7] = _tile(999, 6)
    new, report = decode_cached(files, tmp_path / "many", "many", POLICY, workers=1, progress=False)
    assert report.counts() == {"decoded": 2, "from_cache": 298, "skipped": 0}  # the changed and the damaged one
    np.testing.assert_array_equal(new.gather(np.arange(300))[0].numpy(), want)


def test_a_damaged_image_whose_file_changed_during_the_run_is_served_as_the_file_is_now(tmp_path, caplog):
    files = _many(tmp_path / "few", 4)
    store, _ = decode_cached(files, tmp_path / "few", "few", POLICY, workers=1, progress=False)
    again, _ = decode_cached(files, tmp_path / "few", "few", POLICY, workers=1, progress=False)
    _flip(_cache_dir(tmp_path / "few"), store, 2)
    Image.fromarray(_tile(77, 6)).save(files[2])  # same shape, other pixels: not written back into the cache
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(again.image(2), _tile(77, 6))
        np.testing.assert_array_equal(again.image(2), _tile(77, 6))
    said = _warnings(caplog)
    assert len(said) == 1 and "could not be repaired" in said[0], said


def test_a_damaged_image_whose_file_is_gone_stops_with_an_error_naming_it(tmp_path):
    files = _many(tmp_path / "few", 4)
    store, _ = decode_cached(files, tmp_path / "few", "few", POLICY, workers=1, progress=False)
    again, _ = decode_cached(files, tmp_path / "few", "few", POLICY, workers=1, progress=False)
    _flip(_cache_dir(tmp_path / "few"), store, 2)
    files[2].write_bytes(b"")  # the file is emptied during the run, after the cache was opened
    with pytest.raises(DatasetError, match="002.png.*no longer decodes"):
        again.image(2)


# ------------------------------------------------------------------------------------------- 16-bit samples

def _png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit PNG of ``values`` (H, W) grey or (H, W, C) with C = 2 grey+alpha, 3 RGB, 4 RGBA), rows cycling
    through the five PNG filters (none, sub, up, average, Paeth) so that the decoder's unfiltering is exercised."""
    a = values[..., None] if values.ndim == 2 else values
    h, w, c = a.shape
    raw = a.astype(">u2").view(np.uint8).reshape(h, w * c * 2).astype(np.int64)
    bpp = 2 * c
    left = np.pad(raw, ((0, 0), (bpp, 0)))[:, :-bpp]
    up = np.pad(raw, ((1, 0), (0, 0)))[:-1]
    up_left = np.pad(up, ((0, 0), (bpp, 0)))[:, :-bpp]
    p = left + up - up_left
    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    predictors = [0 * raw, left, up, (left + up) // 2, paeth]
    lines = b"".join(bytes([y % 5]) + ((raw[y] - predictors[y % 5][y]) % 256).astype(np.uint8).tobytes()
                     for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(lines)) + chunk(b"IEND", b""))


def _values16(shape, seed=0) -> np.ndarray:
    """16-bit samples with the awkward ones: 0, 65535, 511 (high byte 1, rule 2) and both sides of every rounding
    step (257 k ± 128)."""
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 65536, shape)
    special = np.array([0, 65535, 511, 128, 129, 257 * 100 + 128, 257 * 100 + 129, 257 * 254 + 128, 65407, 65408])
    v.reshape(-1)[:len(special)] = special
    return v


def _rule(v):
    return np.round(v * 255 / 65535).astype(np.uint8)  # the documented rule, in floating point


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_samples_follow_one_rule_in_photo_folders_benchmark_lists_and_predict(tmp_path, channels):
    shape = (8, 8) if channels == 1 else (8, 8, channels)
    values = _values16(shape, channels)
    if channels in (2, 4):  # opaque but for the first row, so the colour is checked exactly where alpha is 65535
        values[1:, :, -1] = 65535
    (tmp_path / "photos" / "a").mkdir(parents=True)
    _png16(tmp_path / "photos" / "a" / "x.png", values)
    _png16(tmp_path / "photos" / "a" / "y.png", values[::-1].copy())
    eight = _rule(values)
    colour = eight if channels in (1, 3) else eight[..., :-1]
    colour = colour[..., None] if colour.ndim == 2 else colour
    # a photo folder (alpha composited on white: exact where opaque, within 1 elsewhere)
    src = open_source(tmp_path / "photos", POLICY, workers=1, progress=False)
    got = src.dataset.images.image(src.paths.index("a/x.png"))
    assert got.shape == (8, 8, 1 if channels <= 2 else 3)
    np.testing.assert_array_equal(got[1:], colour[1:])
    if channels in (2, 4):
        a = eight[0, :, -1:].astype(np.float64) / 255
        assert np.abs(got[0] - (colour[0] * a + 255 * (1 - a))).max() <= 1
    else:
        np.testing.assert_array_equal(got[0], colour[0])
    # a VTAB-1k list: the official convert("RGB") after the same depth step (alpha dropped, grey in 3 channels)
    task = tmp_path / "vtab" / "svhn"
    (task / "images").mkdir(parents=True)
    _png16(task / "images" / "x.png", values)
    for split in ("train800", "val200", "train800val200", "test"):
        (task / f"{split}.txt").write_text("images/x.png 3\n")
    ds = load_vtab("svhn", "train800", root=tmp_path / "vtab", image_size=8, workers=1, progress=False)
    np.testing.assert_array_equal(ds.images.image(0), np.broadcast_to(colour, (8, 8, 3)))
    # a single file for tools/predict.py
    single = read_image(tmp_path / "photos" / "a" / "x.png")
    np.testing.assert_array_equal(single[1:], np.broadcast_to(colour, (8, 8, 3))[1:])


def _tiff16(path: Path, a: np.ndarray, order: str, deflate: bool) -> None:
    """A one-strip 16-bit RGB TIFF, byte order "<" or ">", uncompressed (Pillow's raw decoder) or deflated
    (libtiff's)."""
    h, w, _ = a.shape
    data = a.astype(order + "u2").tobytes()
    data = zlib.compress(data) if deflate else data
    bps_at, data_at = 8 + 2 + 12 * 10 + 4, 8 + 2 + 12 * 10 + 4 + 6
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, bps_at), (259, 3, 1, 8 if deflate else 1), (262, 3, 1, 2),
            (273, 4, 1, data_at), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    out = (b"II" if order == "<" else b"MM") + struct.pack(order + "HIH", 42, 8, len(tags))
    for tag, kind, count, value in tags:
        out += struct.pack(order + ("HHIHH" if kind == 3 and count == 1 else "HHII"), tag, kind, count, value,
                           *((0,) if kind == 3 and count == 1 else ()))
    path.write_bytes(out + struct.pack(order + "IHHH", 0, 16, 16, 16) + data)


def test_a_16bit_photo_decodes_the_same_through_every_store_kind_png_and_tiff(tmp_path):
    values = _values16((5, 7, 3), 9)
    files = [tmp_path / "x.png"] + [tmp_path / f"x{order == '<'}{deflate}.tif" for order in "<>" for deflate in (0, 1)]
    _png16(files[0], values)
    for order in "<>":
        for deflate in (0, 1):
            _tiff16(tmp_path / f"x{order == '<'}{deflate}.tif", values, order, bool(deflate))
    for f in files:
        shorter = decode_for_store(f, StorePolicy("shorter", 64))
        square = decode_for_store(f, StorePolicy("square", 64))
        np.testing.assert_array_equal(shorter, _rule(values), err_msg=f.name)
        np.testing.assert_array_equal(square, np.asarray(Image.fromarray(_rule(values)).resize(
            (64, 64), Image.Resampling.BICUBIC)), err_msg=f.name)
    from loaders.images import load_8bit
    for channels in (2, 4):  # the depth step keeps alpha: every sample, alpha too, by the rule
        values = _values16((5, 7, channels), channels)
        _png16(tmp_path / f"a{channels}.png", values)
        with Image.open(tmp_path / f"a{channels}.png") as im:
            np.testing.assert_array_equal(np.asarray(load_8bit(im, tmp_path / f"a{channels}.png")), _rule(values))


# ------------------------------------------------------------------------------------------- bad images

def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of file that cannot become pixels, and the Pillow exception inside."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_tile(1, 40)).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    made = {"truncated": ("truncated.png", data[:len(data) // 2], "OSError"),
            "empty": ("empty.jpg", b"", "UnidentifiedImageError"),
            "not an image": ("notes.jpg", b"shopping list\n", "UnidentifiedImageError")}
    # a decompression bomb: a tiny PNG whose header claims 20000 x 20000 pixels (over twice Pillow's limit)
    header = data[:16] + struct.pack(">II", 20000, 20000) + data[24:29]
    header += struct.pack(">I", zlib.crc32(header[12:29]))
    made["bomb"] = ("bomb.png", header + data[33:], "DecompressionBombError")
    out = {}
    for kind, (name, content, raised) in made.items():
        (folder / name).write_bytes(content)
        out[kind] = (folder / name, raised)
    return out


def test_a_bad_image_raises_image_decode_error_naming_the_file_and_what_pillow_raised(tmp_path):
    from loaders.images import ImageDecodeError
    for kind, (path, raised) in _bad_files(tmp_path / "bad").items():
        for policy in (StorePolicy("shorter", 32), StorePolicy("square", 32)):
            with pytest.raises(ImageDecodeError) as e:
                decode_for_store(path, policy)
            assert isinstance(e.value, DatasetError) and str(path) in str(e.value), kind
            assert e.value.reason.startswith(raised + ":"), (kind, e.value.reason)
            assert str(pickle.loads(pickle.dumps(e.value))) == str(e.value)  # as a decode worker would send it
        with pytest.raises(ImageDecodeError, match=raised):  # the single-file path of tools/predict.py
            read_image(path)


def test_bad_images_in_a_folder_are_skipped_and_named_alike_in_a_benchmark_list_an_error(tmp_path, caplog):
    bad = _bad_files(tmp_path / "photos" / "a")
    Image.fromarray(_tile(2, 40)).save(tmp_path / "photos" / "a" / "other.png")
    with caplog.at_level(logging.WARNING):
        src = open_source(tmp_path / "photos", POLICY, workers=1, progress=False)
    assert sorted(src.paths) == ["a/other.png", "a/whole.png"]
    reasons = dict(src.skipped)
    for kind, (path, raised) in bad.items():
        assert reasons[f"a/{path.name}"].startswith(raised + ":"), (kind, reasons)
        assert any(f"skipped {path}: {raised}:" in m for m in _warnings(caplog)), kind
    task = tmp_path / "vtab" / "svhn"
    _bad_files(task)
    for split in ("train800", "val200", "train800val200", "test"):
        (task / f"{split}.txt").write_text("whole.png 1\nbomb.png 2\n")
    with pytest.raises(DatasetError, match="bomb.png is listed in .*DecompressionBombError"):
        load_vtab("svhn", "train800", root=tmp_path / "vtab", image_size=32, workers=1, progress=False)


# ------------------------------------------------------------------------------------------- the cache key

@pytest.mark.parametrize("change", ["same size, new time", "new size, same time"])
def test_a_file_changed_in_place_is_decoded_again(tmp_path, change):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    files = [root / "a" / f"{k}.bmp" for k in range(3)]  # BMP: the file size depends on the image size only
    for k, f in enumerate(files):
        Image.fromarray(_tile(k)).save(f)
    decode_cached(files, root, "photos", POLICY, workers=1, progress=False)
    before = os.stat(files[1])
    new = _tile(50, 12 if change.startswith("same size") else 14)
    Image.fromarray(new).save(files[1])
    if change.startswith("same size"):
        assert os.stat(files[1]).st_size == before.st_size
        os.utime(files[1], ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    else:
        os.utime(files[1], ns=(before.st_atime_ns, before.st_mtime_ns))
    store, report = decode_cached(files, root, "photos", POLICY, workers=1, progress=False)
    assert report.counts() == {"decoded": 1, "from_cache": 2, "skipped": 0}
    np.testing.assert_array_equal(store.image(1), new)
    np.testing.assert_array_equal(store.image(0), _tile(0))


def test_a_pixel_store_gathers_a_zero_padded_canvas_and_subsets_compose():
    """PixelStore without a cache file: items of several sizes gather into a canvas of the largest (zeros outside
    each image, even in a reused buffer) with their sizes; items of one size fill the canvas (sizes None); a subset
    of a subset indexes the items of the subset it was taken from."""
    import torch

    from loaders.datasets.store import PixelStore

    rng = np.random.default_rng(0)
    images = [rng.integers(1, 256, shape, np.uint8) for shape in ((4, 6, 3), (5, 3, 3), (4, 6, 3), (2, 2, 3))]
    pixels = np.concatenate([a.reshape(-1) for a in images])
    offsets = np.cumsum([0] + [a.size for a in images[:-1]]).astype(np.int64)
    store = PixelStore(pixels, offsets, np.array([a.shape for a in images], np.int64))
    out = torch.full((3, 5, 6, 3), 255, dtype=torch.uint8)  # a reused buffer holding an earlier batch
    canvas, sizes = store.gather([1, 3, 0], out=out)
    assert canvas is out and sizes.tolist() == [[5, 3], [2, 2], [4, 6]]
    for b, i in enumerate([1, 3, 0]):
        h, w, _ = images[i].shape
        expected = np.zeros((5, 6, 3), np.uint8)
        expected[:h, :w] = images[i]
        np.testing.assert_array_equal(canvas[b].numpy(), expected)
    canvas, sizes = store.gather([2, 0])
    assert sizes is None and canvas.shape == (2, 4, 6, 3)
    np.testing.assert_array_equal(canvas.numpy(), np.stack([images[2], images[0]]))
    sub = store.subset([3, 1, 2]).subset([2, 0])  # items 2 and 3 of the first store
    assert len(sub) == 2 and sub.fixed is None
    np.testing.assert_array_equal(sub.image(0), images[2])
    np.testing.assert_array_equal(sub.image(1), images[3])


def test_an_error_while_prefetching_a_disk_batch_reaches_the_training_loop():
    """The batches of a disk-backed set are read on a prefetch thread: an image failing its checksum there (no
    repair possible) is raised in the loop that iterates, never an epoch that silently ends early."""
    import torch

    from loaders.datasets import ImageDataset
    from loaders.datasets.cache_index import CacheDamaged
    from loaders.datasets.store import PixelStore
    from loaders.datasets.stream import BatchStream

    a = np.arange(6 * 4 * 4 * 3, dtype=np.uint8).reshape(6, 4, 4, 3)
    crc = np.array([zlib.crc32(np.ascontiguousarray(x)) for x in a], np.int64)
    crc[3] ^= 1  # item 3's bytes do not match their checksum
    store = PixelStore(a.reshape(-1), np.arange(6, dtype=np.int64) * 48, np.tile([4, 4, 3], (6, 1)), crc=crc)
    ds = ImageDataset(store, torch.zeros(6, dtype=torch.int64), ["a"])
    seen = []
    with pytest.raises(CacheDamaged, match="stored image 3 does not match its checksum"):
        for batch in BatchStream(ds, torch.arange(6).split(2), "cpu"):
            seen.append(batch.images.shape[0])
    assert seen == [2]  # the first batch arrived; the second raised


def test_another_store_size_never_reuses_images_stored_at_the_old_size(tmp_path):
    """A run at another image size (another stored shorter side) decodes its own images: the earlier cache of the
    same files at another size is a different family, never a source of images to copy."""
    from peft.bench.photos import write_photo_folder

    write_photo_folder(tmp_path / "p", classes=2, per_class=2, size=(120, 90), small=(120, 90), awkward=False)
    small = open_source(tmp_path / "p", StorePolicy("shorter", 32), workers=1, progress=False)
    assert small.counts["train"]["decoded"] == 4
    large = open_source(tmp_path / "p", StorePolicy("shorter", 64), workers=1, progress=False)
    assert large.counts["train"] == {"decoded": 4, "from_cache": 0, "skipped": 0}
    assert sorted({min(large.dataset.images.image(i).shape[:2]) for i in range(4)}) == [64]
    again = open_source(tmp_path / "p", StorePolicy("shorter", 32), workers=1, progress=False)
    assert again.counts["train"]["from_cache"] == 4  # both sizes' caches stay


def test_many_damaged_images_are_warned_about_one_by_one_then_at_powers_of_ten(tmp_path, caplog):
    """The first five repairs of a cache each give a warning; after that only the 10th, 100th, ... (with the count
    so far), so a badly damaged disk does not flood the log, and every image is still served right."""
    files = _many(tmp_path / "many", 24)
    store, _ = decode_cached(files, tmp_path / "many", "many", POLICY, workers=1, progress=False)
    want = store.gather(np.arange(24))[0].numpy().copy()
    cache = _cache_dir(tmp_path / "many")
    for item in range(12):  # 12 damaged images
        _flip(cache, store, item)
    with caplog.at_level(logging.WARNING):
        again, _ = decode_cached(files, tmp_path / "many", "many", POLICY, workers=1, progress=False)
        np.testing.assert_array_equal(again.gather(np.arange(24))[0].numpy(), want)
    said = _warnings(caplog)
    assert [int(w.split("/")[-1][:3]) for w in said] == [0, 1, 2, 3, 4, 9], said  # repairs 1-5 and the 10th
    assert "[10 damaged images so far]" in said[-1] and "so far" not in said[0]
