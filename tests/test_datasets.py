"""Datasets: fake CIFAR archives in the original pickle format, idx files, the real Fashion-MNIST, image folders,
a fake Tiny-ImageNet zip, class selection, validation split and batch iteration."""

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import loaders.datasets as D
from loaders.datasets import (DataNotFoundError, DatasetError, ImageDataset, load_dataset, select_classes,
                              split_indices, split_train_val)

# ------------------------------------------------------------------------------------------------------------
# Fake CIFAR archives, byte-compatible with the originals (Python 2 cPickle, protocol 2)
# ------------------------------------------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 `str` (SHORT_BINSTRING / BINSTRING), as the original CIFAR files do;
    Python 3's protocol 2 would otherwise emit `_codecs.encode` calls that the originals never contain."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        obj = obj.encode("latin-1") if isinstance(obj, str) else obj
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_bytes


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 names its module numpy._core; the originals (numpy 1, Python 2) say numpy.core
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def make_tar(path: Path, members: dict[str, bytes], folder: str | None = None, extra: list[tarfile.TarInfo] = ()):
    with tarfile.open(path, "w:gz") as tf:
        if folder:
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar_reference(data: np.ndarray) -> np.ndarray:
    """(N, 3072) channel-planar rows -> (N, 32, 32, 3) by explicit index arithmetic: R plane, G, B, row-major."""
    r, c, ch = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return data[:, ch * 1024 + r * 32 + c]


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    folder = "cifar-10-batches-py"
    batches, members = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = int(rng.integers(3, 7))
        data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        batches[name] = (data, labels)
        members[f"{folder}/{name}"] = py2_dumps({b"batch_label": b"fake " + name.encode(), b"labels": labels,
                                                 b"data": data, b"filenames": [b"x.png"] * n})
    names = [f"class{i}" for i in range(10)]
    members[f"{folder}/batches.meta"] = py2_dumps({b"num_cases_per_batch": 10000,
                                                   b"label_names": [s.encode() for s in names], b"num_vis": 3072})
    root = tmp_path / "data"
    root.mkdir()
    md5 = make_tar(root / "cifar-10-python.tar.gz", members, folder)
    monkeypatch.setitem(D.CIFAR_ARCHIVES, "cifar10", dataclasses.replace(D.CIFAR_ARCHIVES["cifar10"], md5=md5))
    return root, batches, names, members


def test_fake_pickle_is_in_the_original_format(fake_cifar10):
    _, _, _, members = fake_cifar10
    blob = members["cifar-10-batches-py/data_batch_1"]
    assert blob.startswith(b"\x80\x02}")  # protocol 2, a dict
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in blob and b"_codecs" not in blob
    assert b"U\x04data" in blob  # the key as a Python 2 SHORT_BINSTRING


def test_cifar10_images_and_labels_exact(fake_cifar10):
    root, batches, names, _ = fake_cifar10
    train = load_dataset("cifar10", root, "train", download=False)
    want = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(train.images.numpy(), np.concatenate([cifar_reference(d) for d, _ in want]))
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == sum((lab for _, lab in want), [])
    assert train.classes == names
    test = load_dataset("CIFAR-10", root, "test", download=False)
    np.testing.assert_array_equal(test.images.numpy(), cifar_reference(batches["test_batch"][0]))
    assert test.labels.tolist() == batches["test_batch"][1]
    # a pixel by hand: image 0, row 1, column 2, green = byte 1024 + 1 * 32 + 2
    assert int(test.images[0, 1, 2, 1]) == int(batches["test_batch"][0][0, 1024 + 32 + 2])


def test_cifar100_uses_fine_labels_and_meta_names(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    folder, members, content = "cifar-100-python", {}, {}
    for split in ("train", "test"):
        n = 7
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine, coarse = rng.integers(0, 100, n).tolist(), rng.integers(0, 20, n).tolist()
        content[split] = (data, fine)
        members[f"{folder}/{split}"] = py2_dumps({b"filenames": [b"f"] * n, b"batch_label": b"b", b"data": data,
                                                  b"fine_labels": fine, b"coarse_labels": coarse})
    fine_names = [f"fine{i}" for i in range(100)]
    members[f"{folder}/meta"] = py2_dumps({b"fine_label_names": [s.encode() for s in fine_names],
                                           b"coarse_label_names": [b"c%d" % i for i in range(20)]})
    md5 = make_tar(tmp_path / "cifar-100-python.tar.gz", members, folder)
    monkeypatch.setitem(D.CIFAR_ARCHIVES, "cifar100", dataclasses.replace(D.CIFAR_ARCHIVES["cifar100"], md5=md5))
    for split in ("train", "test"):
        ds = load_dataset("cifar100", tmp_path, split, download=False)
        np.testing.assert_array_equal(ds.images.numpy(), cifar_reference(content[split][0]))
        assert ds.labels.tolist() == content[split][1]
        assert ds.classes == fine_names and ds.num_classes == 100


def test_cifar_md5_argument_overrides_table(fake_cifar10):
    root, batches, _, _ = fake_cifar10
    md5 = hashlib.md5((root / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    D.CIFAR_ARCHIVES["cifar10"] = dataclasses.replace(D.CIFAR_ARCHIVES["cifar10"], md5="0" * 32)
    ds = D.load_cifar("cifar10", root, "test", download=False, md5=md5)
    assert ds.labels.tolist() == batches["test_batch"][1]


def test_cifar_wrong_checksum_raises_and_extracts_nothing(fake_cifar10, monkeypatch):
    root, _, _, _ = fake_cifar10
    monkeypatch.setitem(D.CIFAR_ARCHIVES, "cifar10",
                        dataclasses.replace(D.CIFAR_ARCHIVES["cifar10"], md5="0123456789abcdef0123456789abcdef"))
    before = sorted(root.rglob("*"))
    with pytest.raises(DatasetError, match="md5"):
        load_dataset("cifar10", root, download=False)
    assert sorted(root.rglob("*")) == before == [root / "cifar-10-python.tar.gz"]


def test_cifar_corrupt_archive(tmp_path, fake_cifar10, monkeypatch):
    root, _, _, _ = fake_cifar10
    archive = root / "cifar-10-python.tar.gz"
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2])  # truncated download, with the checksum of what is there
    monkeypatch.setitem(D.CIFAR_ARCHIVES, "cifar10", dataclasses.replace(
        D.CIFAR_ARCHIVES["cifar10"], md5=hashlib.md5(archive.read_bytes()).hexdigest()))
    with pytest.raises(DatasetError, match="corrupt"):
        load_dataset("cifar10", root, download=False)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_rejects_code(tmp_path, fake_cifar10, monkeypatch):
    marker = tmp_path / "pwned"
    evil = py2_dumps({b"data": _Evil(marker), b"labels": []})
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global (posix|nt|os).system"):
        D.restricted_unpickle(evil, "evil")
    for payload in (pickle.dumps(eval, protocol=2), pickle.dumps(dataclasses.replace, protocol=4),
                    b"cbuiltins\nexec\n(S'1'\ntR."):
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            D.restricted_unpickle(payload, "evil")
    # the same payload inside an otherwise valid archive
    root, _, _, members = fake_cifar10
    members = dict(members, **{"cifar-10-batches-py/test_batch": evil})
    md5 = make_tar(root / "cifar-10-python.tar.gz", members, "cifar-10-batches-py")
    monkeypatch.setitem(D.CIFAR_ARCHIVES, "cifar10", dataclasses.replace(D.CIFAR_ARCHIVES["cifar10"], md5=md5))
    with pytest.raises(pickle.UnpicklingError):
        load_dataset("cifar10", root, "test", download=False)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_tar_members_escaping_are_rejected(fake_cifar10, monkeypatch, kind):
    root, _, _, members = fake_cifar10
    if kind in ("dotdot", "absolute"):
        name = "../evil" if kind == "dotdot" else "/tmp/evil"
        members = dict(members, **{name: b"x"})
        extra = []
    else:
        info = tarfile.TarInfo("cifar-10-batches-py/link")
        info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        info.linkname = "/etc/passwd"
        extra = [info]
    md5 = make_tar(root / "cifar-10-python.tar.gz", members, "cifar-10-batches-py", extra)
    monkeypatch.setitem(D.CIFAR_ARCHIVES, "cifar10", dataclasses.replace(D.CIFAR_ARCHIVES["cifar10"], md5=md5))
    with pytest.raises(DatasetError, match="refusing member"):
        load_dataset("cifar10", root, download=False)
    assert sorted(p.name for p in root.parent.rglob("*evil*")) == []


def test_cifar_missing_without_download_says_where(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("cifar100", tmp_path, download=False)
    assert str(tmp_path) in str(e.value) and "cifar-100-python.tar.gz" in str(e.value)


def test_cifar_download_goes_through_loaders_download(tmp_path, fake_cifar10, monkeypatch):
    import loaders.download

    src, batches, _, _ = fake_cifar10
    calls = []

    def fake_download(url, dest, *, sha256=None, md5=None, size=None, desc=None):
        calls.append((url, Path(dest), md5))
        Path(dest).write_bytes((src / "cifar-10-python.tar.gz").read_bytes())
        return Path(dest)

    monkeypatch.setattr(loaders.download, "download_file", fake_download)
    dest_root = tmp_path / "fresh"
    ds = load_dataset("cifar10", dest_root, "test", download=True)
    assert ds.labels.tolist() == batches["test_batch"][1]
    spec = D.CIFAR_ARCHIVES["cifar10"]
    assert calls == [(spec.url, dest_root / spec.filename, spec.md5)]

    def failing_download(url, dest, **kw):
        raise loaders.download.DownloadError("no network")

    monkeypatch.setattr(loaders.download, "download_file", failing_download)
    with pytest.raises(DataNotFoundError, match="no network"):
        load_dataset("cifar10", tmp_path / "other", download=True)


def test_default_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VIT_PEFT_DATA", str(tmp_path))
    assert D.default_data_root() == tmp_path
    monkeypatch.delenv("VIT_PEFT_DATA")
    assert D.default_data_root() == Path.home() / ".cache" / "vit-peft" / "data"


def test_unknown_dataset_name():
    with pytest.raises(DataNotFoundError, match="unknown dataset"):
        load_dataset("imagenet-99k", download=False)
    with pytest.raises(ValueError, match="split"):
        load_dataset("cifar10", split="val")


# ------------------------------------------------------------------------------------------------------------
# idx files and Fashion-MNIST
# ------------------------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def test_idx_parser_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(D.read_idx(path, ndim=3), images)
    plain = tmp_path / "x-idx3-ubyte"
    plain.write_bytes(idx_bytes(images))
    np.testing.assert_array_equal(D.read_idx(plain), images)
    ints = rng.integers(-1000, 1000, (4, 2)).astype(np.int32)
    np.testing.assert_array_equal(D.parse_idx(idx_bytes(ints, 0x0C)), ints)


def test_idx_parser_errors(tmp_path):
    good = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    cases = {
        "magic": b"\x01" + good[1:],
        "type": good[:2] + b"\x07" + good[3:],
        "truncated": good[:-1],
        "trailing": good + b"\x00",
        "header": good[:9],
        "short": good[:3],
    }
    for what, blob in cases.items():
        path = tmp_path / f"{what}.gz"
        path.write_bytes(gzip.compress(blob))
        with pytest.raises(DatasetError) as e:
            D.read_idx(path)
        assert str(path) in str(e.value), what
    with pytest.raises(DatasetError, match="dimension"):
        D.parse_idx(good, ndim=1)
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(gzip.compress(good)[:-8])
    with pytest.raises(DatasetError, match="gzip"):
        D.read_idx(bad_gz)
    ok = tmp_path / "ok.gz"
    ok.write_bytes(gzip.compress(good))
    with pytest.raises(DatasetError, match="sha256"):
        D.read_idx(ok, sha256="0" * 64)
    assert D.read_idx(ok, sha256=hashlib.sha256(good).hexdigest()).shape == (3, 4, 4)


def test_fashion_mnist_local_file_checked_and_missing_error(tmp_path, monkeypatch):
    monkeypatch.setattr(D.fashion_mnist, "FASHION_MNIST_SYSTEM_DIRS", [tmp_path / "nowhere"])
    with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion_mnist", tmp_path, download=False)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for stem in D.FASHION_MNIST_FILES["test"]:
        arr = np.zeros((2, 28, 28) if "images" in stem else (2,), np.uint8)
        (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    with pytest.raises(DatasetError, match="sha256"):  # a look-alike is not Fashion-MNIST
        load_dataset("fashion_mnist", tmp_path, "test", download=False)


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed (/usr/share/datasets/fashion-mnist)")
def test_real_fashion_mnist():
    train = load_dataset("fashion_mnist", split="train", download=False)  # sha256 verified inside
    test = load_dataset("fashion-mnist", split="test", download=False)
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.class_counts().tolist() == [6000] * 10
    assert test.class_counts().tolist() == [1000] * 10
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    # independent read of the last test image and label straight from the files
    raw = gzip.decompress((FASHION_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    lab = gzip.decompress((FASHION_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert len(raw) == 7_840_016 and hashlib.sha256(raw).hexdigest() == D.fashion_mnist.FASHION_MNIST_SHA256["t10k-images-idx3-ubyte"]
    np.testing.assert_array_equal(test.images[-1, :, :, 0].numpy(), np.frombuffer(raw[-784:], np.uint8).reshape(28, 28))
    assert int(test.labels[-1]) == lab[-1]
    assert 60 < float(train.images.float().mean()) < 90  # mostly dark background, as the real set


# ------------------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------------------


def _save(path: Path, arr: np.ndarray, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


# Image folders, CSV lists and the decode cache: tests/test_image_data.py


# ------------------------------------------------------------------------------------------------------------
# Tiny-ImageNet
# ------------------------------------------------------------------------------------------------------------


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _decode_rgb(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


@pytest.fixture
def fake_tiny(tmp_path):
    rng = np.random.default_rng(0)
    wnids = ["n03", "n01", "n02"]  # deliberately unsorted
    files = {"tiny-imagenet-200/wnids.txt": "\n".join(wnids).encode() + b"\n",
             "tiny-imagenet-200/words.txt": b"n01\tgoldfish, Carassius auratus\nn02\tcat\nn03\tcrane\nn99\tother\n"}
    train = {}
    for w in wnids:
        for i in range(2):
            shape = (64, 64) if (w, i) == ("n02", 1) else (64, 64, 3)  # one greyscale JPEG, as in the real set
            blob = _jpeg(rng.integers(0, 256, shape, dtype=np.uint8))
            name = f"train/{w}/images/{w}_{i}.JPEG"
            files[f"tiny-imagenet-200/{name}"] = blob
            train[name] = (blob, sorted(wnids).index(w))
        files[f"tiny-imagenet-200/train/{w}/{w}_boxes.txt"] = b"ignored\n"
    val, lines = {}, []
    for i, w in enumerate(["n02", "n01", "n03", "n02"]):
        blob = _jpeg(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        files[f"tiny-imagenet-200/val/images/val_{i}.JPEG"] = blob
        val[f"val_{i}.JPEG"] = (blob, sorted(wnids).index(w))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    files["tiny-imagenet-200/val/val_annotations.txt"] = ("\n".join(lines) + "\n").encode()
    files["tiny-imagenet-200/test/images/test_0.JPEG"] = _jpeg(np.zeros((64, 64, 3), np.uint8))
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, blob in files.items():
            zf.writestr(name, blob)
    return tmp_path, train, val, hashlib.md5(archive.read_bytes()).hexdigest()


def test_tiny_imagenet_from_zip_then_cache(fake_tiny):
    root, train, val, md5 = fake_tiny
    ds = D.load_tiny_imagenet(root, "train", download=False, md5=md5)
    assert ds.classes == ["goldfish", "cat", "crane"]  # sorted wnids n01, n02, n03; first synonym
    assert ds.images.shape == (6, 64, 64, 3)
    names = sorted(train)
    assert ds.labels.tolist() == [train[n][1] for n in names]
    for i, n in enumerate(names):
        np.testing.assert_array_equal(ds.images[i].numpy(), _decode_rgb(train[n][0]))
    test = D.load_tiny_imagenet(root, "test", download=False, md5=md5)
    assert test.labels.tolist() == [val[n][1] for n in sorted(val)]
    np.testing.assert_array_equal(test.images[2].numpy(), _decode_rgb(val["val_2.JPEG"][0]))
    assert (root / "tiny-imagenet-200-train.npz").is_file()
    (root / "tiny-imagenet-200.zip").unlink()  # the second run needs only the cache
    again = load_dataset("tiny-imagenet", root, "train", download=False)
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)
    assert again.classes == ds.classes
    np.load(root / "tiny-imagenet-200-train.npz", allow_pickle=False)  # no object arrays in the cache


def test_tiny_imagenet_from_extracted_folder(fake_tiny):
    root, train, _, _ = fake_tiny
    with zipfile.ZipFile(root / "tiny-imagenet-200.zip") as zf:
        zf.extractall(root)  # trusted: built by the fixture
    (root / "tiny-imagenet-200.zip").unlink()
    ds = D.load_tiny_imagenet(root, "train", download=False)
    assert ds.labels.tolist() == [train[n][1] for n in sorted(train)]


def test_tiny_imagenet_rejects_bad_zip(tmp_path, fake_tiny):
    root, _, _, _ = fake_tiny
    archive = root / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("../evil.txt", b"x")
    with pytest.raises(DatasetError, match="refusing member"):
        D.load_tiny_imagenet(root, "train", download=False, md5=hashlib.md5(archive.read_bytes()).hexdigest())
    assert not (root.parent / "evil.txt").exists()
    with pytest.raises(DatasetError, match="md5"):
        D.load_tiny_imagenet(root, "train", download=False, md5="1" * 32)
    archive.unlink()
    with pytest.raises(DataNotFoundError, match="tiny-imagenet-200"):
        D.load_tiny_imagenet(root, "train", download=False)


# ------------------------------------------------------------------------------------------------------------
# select_classes, split_train_val, batch streams
# ------------------------------------------------------------------------------------------------------------


def small_dataset(n_per_class=(5, 7, 3, 9, 1), seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    images = torch.randint(0, 256, (len(labels), 4, 4, 3), dtype=torch.uint8, generator=g)
    images[:, 0, 0, 0] = torch.arange(len(labels), dtype=torch.uint8)  # identifies each image
    return ImageDataset(images, labels, [f"c{i}" for i in range(len(n_per_class))], "small")


@pytest.mark.parametrize("spec,keep", [("1-3", [1, 2, 3]), ("3,1", [3, 1]), ("0-1,4", [0, 1, 4]),
                                       ([4, "c0"], [4, 0]), (2, [2])])
def test_select_classes(spec, keep):
    ds = small_dataset()
    sub = select_classes(ds, spec)
    assert sub.classes == [ds.classes[k] for k in keep]
    mask = torch.isin(ds.labels, torch.tensor(keep))
    assert torch.equal(sub.images, ds.images[mask])  # order preserved
    old = ds.labels[mask]
    assert sub.labels.tolist() == [keep.index(int(o)) for o in old]
    assert sub.class_counts().tolist() == [int((ds.labels == k).sum()) for k in keep]


@pytest.mark.parametrize("spec", ["", "3-1", "a", "0-5", "1,1", "1,,2", "-1", [7], ["nope"], [True]])
def test_select_classes_bad_spec(spec):
    with pytest.raises(ValueError):
        select_classes(small_dataset(), spec)


def test_split_train_val_properties():
    ds = small_dataset((20, 31, 3, 9, 1))
    tr, va = split_train_val(ds, 0.2, seed=3)
    ids_tr, ids_va = tr.images[:, 0, 0, 0].tolist(), va.images[:, 0, 0, 0].tolist()
    assert not set(ids_tr) & set(ids_va) and sorted(ids_tr + ids_va) == list(range(len(ds)))
    counts = ds.class_counts().tolist()
    want_val = [0 if n < 2 else min(max(round(n * 0.2), 1), n - 1) for n in counts]
    assert va.class_counts().tolist() == want_val == [4, 6, 1, 2, 0]
    assert tr.classes == va.classes == ds.classes
    tr2, va2 = split_train_val(ds, 0.2, seed=3)
    assert torch.equal(va.images, va2.images) and torch.equal(tr.labels, tr2.labels)
    _, va3 = split_train_val(ds, 0.2, seed=4)
    assert not torch.equal(va.images, va3.images)
    with pytest.raises(ValueError):
        split_indices(ds.labels, 1.0)


def test_random_subset_keeps_the_original_order_and_depends_on_the_seed_only():
    """--max-train-samples / --max-eval-samples: a seeded choice of n items, in their original order (sorted
    indices: the first item of the subset is the earliest chosen), the whole set when n covers it."""
    ds = small_dataset((20, 31, 3, 9, 1))
    sub = D.random_subset(ds, 17, seed=5)
    ids = sub.images[:, 0, 0, 0].tolist()
    assert len(ids) == len(set(ids)) == 17 and ids == sorted(ids)
    assert torch.equal(sub.labels, ds.labels[torch.tensor(ids)])
    assert D.random_subset(ds, 17, seed=5).images[:, 0, 0, 0].tolist() == ids
    assert D.random_subset(ds, 17, seed=6).images[:, 0, 0, 0].tolist() != ids
    assert D.random_subset(ds, len(ds), seed=5) is ds and D.random_subset(ds, None, seed=5) is ds


def test_batch_stream_shards_every_global_batch_exactly():
    from loaders.datasets.stream import BatchStream

    ds = small_dataset()  # 25 images
    n = len(ds)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    for world in (1, 2, 3, 4):
        seen = []
        for rank in range(world):
            for batch in BatchStream(ds, order.split(6), "cpu", rank, world):
                ids = batch.images[:, 0, 0, 0].long()
                assert torch.equal(batch.labels, ds.labels[ids])
                start, stop, total = batch.rows
                assert stop - start == len(ids) and total in (6, n % 6)
                seen += ids.tolist()
        assert sorted(seen) == list(range(n))  # each index exactly once over all ranks
        assert seen == order.tolist() or world > 1
    with pytest.raises(ValueError, match="rank"):
        next(iter(BatchStream(ds, order.split(6), "cpu", 2, 2)))
    # an empty index batch (the shard of a rank that got no test image: arange(0).split(b)) is no batch at all
    assert len(BatchStream(ds, torch.arange(0).split(4), "cpu")) == 0 and not list(BatchStream(ds, (order[:0],), "cpu"))
    kept = list(BatchStream(ds, [order[:3], order[:0], order[3:5]], "cpu"))
    assert [b.images[:, 0, 0, 0].tolist() for b in kept] == [order[:3].tolist(), order[3:5].tolist()]


def test_image_dataset_validation():
    with pytest.raises(DatasetError, match="uint8"):
        ImageDataset(torch.zeros(2, 4, 4, 3), torch.zeros(2, dtype=torch.int64), ["a"])
    with pytest.raises(DatasetError, match="labels"):
        ImageDataset(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ["a"])
    with pytest.raises(DatasetError, match="classes"):
        ImageDataset(torch.zeros(2, 4, 4, 1, dtype=torch.uint8), torch.tensor([0, 2]), ["a", "b"])
