"""Image datasets as in-memory uint8 tensors, without torchvision.

Every loader returns an `ImageDataset`: all images of one split as a uint8 tensor (N, H, W, C) with C in {1, 3},
int64 labels (N,), the class names and a name. Small vision benchmarks fit in memory (CIFAR-10 train is 150 MB),
so batches are plain tensor indexing (`iterate_batches`) and augmentation runs on the training device
(`loaders.transforms.BatchTransform`).

Supported sources (`load_dataset(name, root, split, download)`):
- "cifar10", "cifar100": the official python-pickle archives (cs.toronto.edu/~kriz/cifar.html). The archive's md5
  is checked before anything is read; members are read straight from the tar stream (nothing is extracted), every
  member is checked (no absolute paths, no "..", no links or devices), and the pickles go through a restricted
  unpickler that admits only numpy's array reconstruction. CIFAR-100 uses the 100 fine labels.
- "fashion_mnist": the four idx files, from /usr/share/datasets/fashion-mnist (Debian package
  dataset-fashion-mnist) if present, else from <root>/fashion-mnist, else downloaded. The sha256 of the
  *decompressed* data is checked, so the original and Debian's recompressed .gz files both pass.
- "tiny_imagenet": tiny-imagenet-200 (200 classes, 64x64). The "test" split is the official validation set,
  because the labels of Tiny-ImageNet's own test set were never published. Decoded once, then cached as .npz.
- a folder path: <folder>/<class>/<image>.(png|jpg|jpeg|bmp), or <folder>/{train,test}/<class>/<image>.

The default data root is $VIT_PEFT_DATA, else ~/.cache/vit-peft/data.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import logging
import os
import pickle
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np
import torch

from .atomic import atomic_write
from tqdm import tqdm

logger = logging.getLogger(__name__)

DATA_ENV = "VIT_PEFT_DATA"
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


class DatasetError(ValueError):
    """The data exists but is not what it should be: bad checksum, corrupt archive, malformed file."""


class DataNotFoundError(DatasetError, FileNotFoundError):
    """The data is not on disk and could not (or may not) be downloaded; the message says where to put it."""


def default_data_root() -> Path:
    """$VIT_PEFT_DATA if set, else ~/.cache/vit-peft/data."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vit-peft" / "data"


# ----------------------------------------------------------------------------------------------------------------
# The dataset container
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ImageDataset:
    """One split of an image classification dataset, fully in memory."""

    images: torch.Tensor  # (N, H, W, C) uint8, C in {1, 3}
    labels: torch.Tensor  # (N,) int64 in [0, len(classes))
    classes: list[str]
    name: str = "dataset"

    def __post_init__(self):
        im, lab = self.images, self.labels
        if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.ndim != 4 or im.shape[-1] not in (1, 3):
            raise DatasetError(f"{self.name}: images must be a uint8 tensor (N, H, W, C) with C in {{1, 3}}, got "
                               f"{getattr(im, 'dtype', type(im))} {tuple(getattr(im, 'shape', ()))}")
        if not isinstance(lab, torch.Tensor) or lab.dtype != torch.int64 or lab.ndim != 1 or len(lab) != len(im):
            raise DatasetError(f"{self.name}: labels must be an int64 tensor ({len(im)},), got "
                               f"{getattr(lab, 'dtype', type(lab))} {tuple(getattr(lab, 'shape', ()))}")
        self.classes = [str(c) for c in self.classes]
        if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= len(self.classes)):
            raise DatasetError(f"{self.name}: labels span [{int(lab.min())}, {int(lab.max())}] but there are "
                               f"{len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, images={tuple(self.images.shape)}, "
                f"num_classes={self.num_classes})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return tuple(self.images.shape[1:3])

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    def class_counts(self) -> torch.Tensor:
        """Number of images per class, (num_classes,) int64."""
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes)

    def subset(self, indices: torch.Tensor | Sequence[int], name: str | None = None) -> "ImageDataset":
        """The images at `indices` (same classes and labels)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(self.images[idx.to(self.images.device)], self.labels[idx.to(self.labels.device)],
                            list(self.classes), name or self.name)


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers: checksums, downloads, archive member checks
# ----------------------------------------------------------------------------------------------------------------


def _file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_file(path: Path, algo: str, expected: str | None) -> None:
    if expected is None:
        return
    actual = _file_digest(path, algo)
    if actual != expected.lower():
        raise DatasetError(f"{path}: {algo} is {actual}, expected {expected}. The file is corrupt or incomplete; "
                           f"delete it and download it again.")


def _download(url: str, dest: Path, *, md5: str | None = None, desc: str | None = None) -> Path:
    """Download through loaders.download (resumable, verified); any failure says where to put the file by hand."""
    hint = f"Download {url} yourself and put it at {dest}, or pass download=False once it is there."
    try:
        from loaders.download import DownloadError, download_file
    except ImportError as e:  # pragma: no cover - loaders.download ships with the package
        raise DataNotFoundError(f"{dest} is missing and loaders.download is unavailable ({e}). {hint}") from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(download_file(url, dest, md5=md5, desc=desc or dest.name))
    except DownloadError as e:
        raise DataNotFoundError(f"could not download {url}: {e}\n{hint}") from e


def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    """Reject archive members that would land outside the target folder if extracted."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")) or name == "":
        raise DatasetError(f"{archive}: refusing member {name!r}: its path escapes the archive's folder")
    return path


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarArchive:
    url: str
    filename: str
    md5: str
    folder: str  # top folder inside the archive
    train: tuple[str, ...]  # member files of the train split
    test: tuple[str, ...]
    meta: str  # member holding the class names
    label_key: str  # key of the labels in each batch
    names_key: str  # key of the class names in `meta`


# Module-level so tests (or a mirror) can substitute entries.
CIFAR_ARCHIVES: dict[str, CifarArchive] = {
    "cifar10": CifarArchive(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", filename="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)), test=("test_batch",), meta="batches.meta",
        label_key="labels", names_key="label_names"),
    "cifar100": CifarArchive(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", filename="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
        train=("train",), test=("test",), meta="meta",
        label_key="fine_labels", names_key="fine_label_names"),
}


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: admits only what numpy needs to rebuild an array, nothing else.

    The batches are dicts of bytes, ints, lists and uint8 arrays; the only globals their pickles name are
    numpy.core.multiarray._reconstruct (numpy._core in numpy 2), numpy.ndarray and numpy.dtype. Any other global
    (os.system, builtins.eval, ...) raises pickle.UnpicklingError before it can be called.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, file, source: str = "pickle"):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self.source}: refusing to load global {module}.{name}; only numpy array reconstruction is "
                f"allowed in a CIFAR batch") from None


def restricted_unpickle(data: bytes, source: str = "pickle"):
    """Unpickle `data` with `RestrictedUnpickler`; dict keys come back as str (the originals are Python 2 str)."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), source).load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:
        raise DatasetError(f"{source}: not a valid pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{source}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_tar_members(archive: Path, wanted: set[str]) -> dict[str, bytes]:
    """Read the `wanted` member files from a tar archive in one pass, checking every member on the way.

    Nothing is extracted to disk; still, an archive holding any member that would be unsafe to extract (absolute
    path, "..", symlink, hard link, device) is rejected as a whole.
    """
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                path = _check_member_name(member.name, archive)
                if not (member.isfile() or member.isdir()):
                    raise DatasetError(f"{archive}: refusing member {member.name!r}: links and special files are "
                                       f"not allowed")
                key = str(path)
                if member.isfile() and key in wanted:
                    found[key] = tf.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        raise DatasetError(f"{archive}: corrupt or unreadable tar archive ({type(e).__name__}: {e}); delete it "
                           f"and download it again") from e
    missing = sorted(wanted - found.keys())
    if missing:
        raise DatasetError(f"{archive}: missing member(s) {missing}")
    return found


def load_cifar(name: str, root: str | Path | None = None, split: str = "train", download: bool = True,
               md5: str | None = None) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 ("cifar10" / "cifar100") from the official python archive in `root`.

    The archive's md5 (`md5`, else the one in CIFAR_ARCHIVES) is checked before any member is read. Images come out
    as (N, 32, 32, 3) uint8: each CIFAR row is 3072 bytes, channel-planar (1024 R, then G, then B, row-major).
    """
    _check_split(split)
    spec = CIFAR_ARCHIVES[name]
    md5 = md5 or spec.md5
    root = Path(root).expanduser() if root is not None else default_data_root()
    archive = root / spec.filename
    if not archive.is_file():
        if not download:
            raise DataNotFoundError(f"{name}: {archive} not found. Download {spec.url} and put it in {root} "
                                    f"(or set ${DATA_ENV}), or allow download=True.")
        _download(spec.url, archive, md5=md5, desc=spec.filename)
    _verify_file(archive, "md5", md5)

    batches = getattr(spec, split)
    wanted = {f"{spec.folder}/{m}" for m in (*batches, spec.meta)}
    members = _read_tar_members(archive, wanted)

    meta = restricted_unpickle(members[f"{spec.folder}/{spec.meta}"], f"{archive}:{spec.meta}")
    if spec.names_key not in meta:
        raise DatasetError(f"{archive}:{spec.meta}: no key {spec.names_key!r} (keys: {sorted(meta)})")
    classes = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in meta[spec.names_key]]

    images, labels = [], []
    for batch in batches:
        source = f"{archive}:{batch}"
        d = restricted_unpickle(members[f"{spec.folder}/{batch}"], source)
        for key in ("data", spec.label_key):
            if key not in d:
                raise DatasetError(f"{source}: no key {key!r} (keys: {sorted(d)})")
        data, lab = d["data"], np.asarray(d[spec.label_key], dtype=np.int64)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{source}: 'data' must be uint8 (N, 3072), got "
                               f"{getattr(data, 'dtype', type(data))} {getattr(data, 'shape', '')}")
        if lab.shape != (len(data),):
            raise DatasetError(f"{source}: {len(data)} images but labels of shape {lab.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(np.concatenate(images))),
                        torch.from_numpy(np.concatenate(labels)), classes, f"{name}-{split}")


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)
# ----------------------------------------------------------------------------------------------------------------

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# sha256 of the decompressed files: valid for the original .gz and for Debian's recompressed copies.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# Searched before <root>/fashion-mnist; where `apt-get install dataset-fashion-mnist` puts the files.
FASHION_MNIST_SYSTEM_DIRS = [Path("/usr/share/datasets/fashion-mnist")]

# idx type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_maybe_gzip(path: Path) -> bytes:
    raw = Path(path).read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path}: corrupt gzip data ({type(e).__name__}: {e})") from e


def parse_idx(data: bytes, source: str = "idx data", ndim: int | None = None) -> np.ndarray:
    """Parse an idx file's bytes strictly: magic (two zero bytes, type code, ndim), dims, exact size."""
    if len(data) < 4:
        raise DatasetError(f"{source}: {len(data)} bytes is too short for an idx header")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{source}: bad idx magic {data[:4].hex()} (expected 0000 + type code + ndim)")
    dtype, n = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    if ndim is not None and n != ndim:
        raise DatasetError(f"{source}: idx file has {n} dimension(s), expected {ndim}")
    header = 4 + 4 * n
    if len(data) < header:
        raise DatasetError(f"{source}: truncated idx header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=n, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(f"{source}: idx size mismatch: dims {dims} need {expected} bytes, file has {len(data)} "
                           f"({'truncated' if len(data) < expected else 'trailing data'})")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path, sha256: str | None = None, ndim: int | None = None) -> np.ndarray:
    """Read an idx file (.gz or plain); if `sha256` is given it must match the decompressed bytes."""
    data = _read_maybe_gzip(Path(path))
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise DatasetError(f"{path}: sha256 of the decompressed data is {actual}, expected {sha256}; the file "
                               f"is corrupt or not the official one")
    return parse_idx(data, str(path), ndim)


def _find_fashion_mnist_file(stem: str, root: Path, download: bool) -> Path:
    folders = [*FASHION_MNIST_SYSTEM_DIRS, root / "fashion-mnist"]
    for folder in folders:
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
    if not download:
        raise DataNotFoundError(
            f"fashion_mnist: {stem}(.gz) not found in {', '.join(map(str, folders))}. Install the Debian package "
            f"(apt-get install dataset-fashion-mnist), or put the four idx .gz files from {FASHION_MNIST_URL} in "
            f"{root / 'fashion-mnist'}, or allow download=True.")
    return _download(FASHION_MNIST_URL + f"{stem}.gz", root / "fashion-mnist" / f"{stem}.gz", desc=f"{stem}.gz")


def load_fashion_mnist(root: str | Path | None = None, split: str = "train", download: bool = True) -> ImageDataset:
    """Fashion-MNIST as (N, 28, 28, 1) uint8, 10 classes; sha256 of the decompressed files checked."""
    _check_split(split)
    root = Path(root).expanduser() if root is not None else default_data_root()
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    image_path = _find_fashion_mnist_file(image_stem, root, download)
    label_path = _find_fashion_mnist_file(label_stem, root, download)
    images = read_idx(image_path, FASHION_MNIST_SHA256[image_stem], ndim=3)
    labels = read_idx(label_path, FASHION_MNIST_SHA256[label_stem], ndim=1)
    if len(images) != len(labels):
        raise DatasetError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    return ImageDataset(torch.from_numpy(images[..., None].copy()), torch.from_numpy(labels.astype(np.int64)),
                        list(FASHION_MNIST_CLASSES), f"fashion_mnist-{split}")


# ----------------------------------------------------------------------------------------------------------------
# Tiny-ImageNet
# ----------------------------------------------------------------------------------------------------------------

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_FILE = "tiny-imagenet-200.zip"
# md5 of the zip as published by cs231n (the value other dataset libraries check against)
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_CACHE_VERSION = 1


class _FolderSource:
    """Read files of an extracted tiny-imagenet-200 folder by relative path."""

    def __init__(self, folder: Path):
        self.folder = folder

    def names(self) -> list[str]:
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def close(self):
        pass


class _ZipSource:
    """Read files of tiny-imagenet-200.zip directly (no extraction), after checking every member."""

    def __init__(self, archive: Path, folder: str):
        self.archive = archive
        try:
            self.zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f"{archive}: corrupt zip archive ({e}); delete it and download it again") from e
        self.prefix = folder + "/"
        self.members = {}
        for info in self.zf.infolist():
            path = _check_member_name(info.filename, archive)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetError(f"{archive}: refusing member {info.filename!r}: symlinks are not allowed")
            if not info.is_dir() and str(path).startswith(self.prefix):
                self.members[str(path)[len(self.prefix):]] = info

    def names(self) -> list[str]:
        return sorted(self.members)

    def read(self, name: str) -> bytes:
        try:
            return self.zf.read(self.members[name])
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # CRC errors are BadZipFile
            raise DatasetError(f"{self.archive}: corrupt member {name} ({e})") from e

    def close(self):
        self.zf.close()


def _decode_image(data: bytes, source: str, mode: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert(mode))
    except Exception as e:
        raise DatasetError(f"{source}: cannot decode image ({type(e).__name__}: {e})") from e


def _tiny_imagenet_classes(source, names: set[str], wnids: list[str]) -> list[str]:
    """Readable names from words.txt (first synonym), falling back to the wnid; duplicates get the wnid added."""
    words = {}
    if "words.txt" in names:
        for line in source.read("words.txt").decode("utf-8").splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    names = [words.get(w) or w for w in wnids]
    counts = collections.Counter(names)
    return [f"{n} ({w})" if counts[n] > 1 else n for n, w in zip(names, wnids)]


def _build_tiny_imagenet(source, split: str, where: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    names = set(source.names())
    if "wnids.txt" not in names:
        raise DatasetError(f"{where}: no wnids.txt, not a tiny-imagenet-200 folder")
    wnids = sorted(w.strip() for w in source.read("wnids.txt").decode("utf-8").split() if w.strip())
    index = {w: i for i, w in enumerate(wnids)}
    items: list[tuple[str, int]] = []
    if split == "train":
        for name in sorted(names):
            parts = name.split("/")
            if (len(parts) == 4 and parts[0] == "train" and parts[2] == "images"
                    and parts[3].lower().endswith(".jpeg")):
                if parts[1] not in index:
                    raise DatasetError(f"{where}: {name} is in class {parts[1]!r}, which wnids.txt does not list")
                items.append((name, index[parts[1]]))
    else:
        if "val/val_annotations.txt" not in names:
            raise DatasetError(f"{where}: no val/val_annotations.txt")
        for n, line in enumerate(source.read("val/val_annotations.txt").decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise DatasetError(f"{where}: val/val_annotations.txt line {n} is malformed or names an unknown "
                                   f"class: {line!r}")
            items.append((f"val/images/{fields[0]}", index[fields[1]]))
        items.sort()
    if not items:
        raise DatasetError(f"{where}: no {split} images found")
    images = np.empty((len(items), 64, 64, 3), np.uint8)
    for i, (name, _) in enumerate(tqdm(items, desc=f"decoding tiny_imagenet {split}", unit="img")):
        if name not in names:
            raise DatasetError(f"{where}: {name} is listed but missing")
        arr = _decode_image(source.read(name), f"{where}:{name}", "RGB")
        if arr.shape != (64, 64, 3):
            raise DatasetError(f"{where}:{name}: expected a 64x64 image, got {arr.shape[1]}x{arr.shape[0]}")
        images[i] = arr
    labels = np.array([label for _, label in items], np.int64)
    return images, labels, _tiny_imagenet_classes(source, names, wnids), wnids


def load_tiny_imagenet(root: str | Path | None = None, split: str = "train", download: bool = True,
                       md5: str | None = None) -> ImageDataset:
    """Tiny-ImageNet-200 as (N, 64, 64, 3) uint8: train 100,000 images, "test" = the 10,000 validation images.

    Tiny-ImageNet's own test labels were never published, so the labelled validation set serves as the test split;
    hold out part of train (split_train_val) for model selection. Sources, in order: the cache
    <root>/tiny-imagenet-200-<split>.npz, an extracted <root>/tiny-imagenet-200/, the zip <root>/tiny-imagenet-200.zip
    (read in place, md5 checked, every member name checked), a download. The first run decodes the JPEGs with PIL
    (greyscale ones converted to RGB) and writes the cache (allow_pickle=False); delete it to rebuild.
    """
    _check_split(split)
    root = Path(root).expanduser() if root is not None else default_data_root()
    cache = root / f"{TINY_IMAGENET_FOLDER}-{split}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if int(z["version"]) == TINY_IMAGENET_CACHE_VERSION:
                    return ImageDataset(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]),
                                        [str(c) for c in z["classes"]], f"tiny_imagenet-{split}")
            logger.info("%s: outdated cache, rebuilding", cache)
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
            logger.warning("%s: unreadable cache (%s), rebuilding", cache, e)

    folder, archive = root / TINY_IMAGENET_FOLDER, root / TINY_IMAGENET_FILE
    if (folder / "wnids.txt").is_file():
        source, where = _FolderSource(folder), str(folder)
    else:
        if not archive.is_file():
            if not download:
                raise DataNotFoundError(f"tiny_imagenet: neither {folder} nor {archive} exists. Download "
                                        f"{TINY_IMAGENET_URL} into {root} (or set ${DATA_ENV}), or allow "
                                        f"download=True.")
            _download(TINY_IMAGENET_URL, archive, md5=md5 or TINY_IMAGENET_MD5, desc=TINY_IMAGENET_FILE)
        _verify_file(archive, "md5", md5 or TINY_IMAGENET_MD5)
        source, where = _ZipSource(archive, TINY_IMAGENET_FOLDER), str(archive)
    try:
        images, labels, classes, wnids = _build_tiny_imagenet(source, split, where)
    finally:
        source.close()

    try:  # a unique temporary name per writer: several ranks may build the cache at once
        with atomic_write(cache) as f:
            np.savez(f, images=images, labels=labels, classes=np.array(classes), wnids=np.array(wnids),
                     version=np.array(TINY_IMAGENET_CACHE_VERSION))
        logger.info("cached decoded tiny_imagenet %s split at %s", split, cache)
    except OSError as e:
        logger.warning("could not write cache %s (%s); the next run decodes again", cache, e)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, f"tiny_imagenet-{split}")


# ----------------------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------------------

_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(path: str | Path, split: str = "train", name: str | None = None) -> ImageDataset:
    """Images from <path>/<class>/<file> (png, jpg, jpeg, bmp; searched recursively inside each class folder).

    If <path>/train and <path>/test both exist, the requested split is read from there (classes taken from train);
    otherwise <path> is the train split and asking for "test" is an error (hold out data with split_train_val).
    Classes are the sub-folder names, sorted. Channels: if every image is greyscale, C = 1; otherwise every image is
    converted to RGB (C = 3; alpha dropped). Sizes: images of a size other than the most common one are resized to
    it with PIL bilinear filtering (aspect ratio not kept), with a warning saying how many.
    """
    from PIL import Image

    _check_split(split)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"image folder {path} does not exist")
    if (path / "train").is_dir() and (path / "test").is_dir():
        classes = [d.name for d in _class_dirs(path / "train")]
        folder = path / split
        extra = sorted({d.name for d in _class_dirs(folder)} - set(classes))
        if extra:
            raise DatasetError(f"{folder}: class folder(s) {extra} do not exist in {path / 'train'}")
    elif split == "test":
        raise DataNotFoundError(f"{path} has no train/ and test/ sub-folders, so it has no test split; use "
                                f"split_train_val on the train split, or create {path}/train and {path}/test")
    else:
        folder = path
        classes = [d.name for d in _class_dirs(folder)]
    if not classes:
        raise DataNotFoundError(f"{folder}: no class sub-folders (expected {folder}/<class>/<image>.png)")

    files = [(f, label) for label, c in enumerate(classes) if (folder / c).is_dir()
             for f in _image_files(folder / c)]
    if not files:
        raise DataNotFoundError(f"{folder}: no images with extension {'/'.join(IMAGE_EXTENSIONS)} in the class "
                                f"folders {classes}")
    pil = []
    for f, _ in tqdm(files, desc=f"reading {folder.name}", unit="img", disable=len(files) < 1000):
        try:
            with Image.open(f) as im:
                im.load()
                pil.append(im.copy() if im.mode not in ("P", "PA") else im.convert("RGBA"))
        except Exception as e:
            raise DatasetError(f"{f}: cannot decode image ({type(e).__name__}: {e})") from e
    grey = all(im.mode in _GREY_MODES for im in pil)
    mode = "L" if grey else "RGB"
    sizes = collections.Counter(im.size for im in pil)
    target = max(sizes, key=lambda s: (sizes[s], s[0] * s[1], s))  # most common; ties: the larger
    if len(sizes) > 1:
        logger.warning("%s: %d of %d images are not %dx%d; resized (bilinear)", folder,
                       len(pil) - sizes[target], len(pil), *target)
    images = np.empty((len(pil), target[1], target[0], 1 if grey else 3), np.uint8)
    for i, im in enumerate(pil):
        im = im.convert(mode)
        if im.size != target:
            im = im.resize(target, Image.BILINEAR)
        images[i] = np.asarray(im).reshape(images.shape[1:])
    labels = np.array([label for _, label in files], np.int64)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes,
                        name or f"{path.name}-{split}")


# ----------------------------------------------------------------------------------------------------------------
# Entry point, class selection, validation split
# ----------------------------------------------------------------------------------------------------------------

_ALIASES = {"cifar10": "cifar10", "cifar100": "cifar100", "fashionmnist": "fashion_mnist",
            "tinyimagenet": "tiny_imagenet", "tinyimagenet200": "tiny_imagenet"}
DATASETS = ("cifar10", "cifar100", "fashion_mnist", "tiny_imagenet")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def load_dataset(name: str, root: str | Path | None = None, split: str = "train",
                 download: bool = True) -> ImageDataset:
    """Load one split of a dataset by name ("cifar10", "cifar100", "fashion_mnist", "tiny_imagenet"; "-" and
    "_" optional) or from an image folder path. `root` defaults to $VIT_PEFT_DATA or ~/.cache/vit-peft/data.
    With download=False a missing dataset raises DataNotFoundError saying where to put the files."""
    _check_split(split)
    key = _ALIASES.get(str(name).lower().replace("-", "").replace("_", ""))
    if key in CIFAR_ARCHIVES:
        return load_cifar(key, root, split, download)
    if key == "fashion_mnist":
        return load_fashion_mnist(root, split, download)
    if key == "tiny_imagenet":
        return load_tiny_imagenet(root, split, download)
    if Path(name).expanduser().is_dir():
        return load_image_folder(name, split)
    raise DataNotFoundError(f"unknown dataset {name!r}: expected one of {DATASETS} or an existing folder "
                            f"<folder>/<class>/<image>.png")


def parse_class_spec(spec: str | int | Sequence[int | str], classes: Sequence[str]) -> list[int]:
    """Class indices from "0-4" (inclusive range), "1,3,5", "0-2,7", an int, or a list of indices/class names."""
    k = len(classes)
    if isinstance(spec, str):
        tokens = [t.strip() for t in spec.split(",")]
        if not spec.strip() or any(not t for t in tokens):
            raise ValueError(f"bad class spec {spec!r}: expected e.g. '0-4', '1,3,5' or '0-2,7'")
        out = []
        for t in tokens:
            lo, dash, hi = t.partition("-")
            try:
                a, b = (int(lo), int(hi)) if dash else (int(t), int(t))
            except ValueError:
                raise ValueError(f"bad class spec {spec!r}: {t!r} is neither an index nor a range a-b") from None
            if a > b:
                raise ValueError(f"bad class spec {spec!r}: empty range {t!r}")
            out.extend(range(a, b + 1))
    elif isinstance(spec, int):
        out = [spec]
    else:
        out = []
        for s in spec:
            if isinstance(s, str) and s in classes:
                out.append(list(classes).index(s))
            elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
                out.append(int(s))
            else:
                raise ValueError(f"bad class spec entry {s!r}: not an index nor one of the class names")
    if not out:
        raise ValueError(f"class spec {spec!r} selects no class")
    bad = [c for c in out if not 0 <= c < k]
    if bad:
        raise ValueError(f"class spec {spec!r}: index(es) {bad} out of range for {k} classes (0-{k - 1})")
    dup = sorted(c for c, n in collections.Counter(out).items() if n > 1)
    if dup:
        raise ValueError(f"class spec {spec!r}: class(es) {dup} selected twice")
    return out


def select_classes(ds: ImageDataset, spec) -> ImageDataset:
    """Keep only the classes in `spec` (see parse_class_spec); they are relabelled 0..k-1 in the order of the spec
    and keep their names. Image order is preserved."""
    keep = parse_class_spec(spec, ds.classes)
    mapping = torch.full((ds.num_classes,), -1, dtype=torch.int64)
    mapping[torch.tensor(keep)] = torch.arange(len(keep))
    new = mapping[ds.labels.cpu()]
    idx = (new >= 0).nonzero().squeeze(1)
    return ImageDataset(ds.images[idx.to(ds.images.device)], new[idx].to(ds.labels.device),
                        [ds.classes[c] for c in keep], ds.name)


def split_indices(labels: torch.Tensor, val_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified train/val index split (sorted index tensors, disjoint, covering all). Each class with n >= 2
    images gives round(n * val_fraction) of them to val, at least 1 and at most n - 1; the choice depends only on
    (labels, val_fraction, seed)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = 0 if len(idx) < 2 else min(max(round(len(idx) * val_fraction), 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def split_train_val(ds: ImageDataset, val_fraction: float = 0.1, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Stratified, deterministic (train, val) split of a train set, for choosing checkpoints without the test set."""
    train_idx, val_idx = split_indices(ds.labels, val_fraction, seed)
    return ds.subset(train_idx, f"{ds.name}:train"), ds.subset(val_idx, f"{ds.name}:val")


# ----------------------------------------------------------------------------------------------------------------
# Batches (single process or DDP)
# ----------------------------------------------------------------------------------------------------------------


def shard_indices(indices: torch.Tensor, rank: int = 0, world_size: int = 1, even: bool = False) -> torch.Tensor:
    """This rank's share of `indices`: indices[rank::world_size].

    even=False (evaluation): every index goes to exactly one rank, nothing duplicated or dropped; ranks may differ
    by one element. even=True (training): the tail is first cut to a multiple of world_size (at most
    world_size - 1 indices dropped), so every rank gets the same count and runs the same number of steps.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if even:
        indices = indices[: len(indices) - len(indices) % world_size]
    return indices[rank::world_size]


def count_batches(n: int, batch_size: int, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                  even: bool = False) -> int:
    """How many batches iterate_batches yields for n indices with these settings."""
    m = len(shard_indices(torch.empty(n), rank, world_size, even))
    return m // batch_size if drop_last else -(-m // batch_size)


def iterate_batches(ds: ImageDataset | tuple[torch.Tensor, torch.Tensor], batch_size: int, shuffle: bool = False,
                    generator: torch.Generator | None = None, drop_last: bool = False,
                    indices: torch.Tensor | Sequence[int] | None = None, rank: int = 0, world_size: int = 1,
                    even: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images uint8 (b, H, W, C), labels int64 (b,)) batches by indexing the in-memory tensors.

    Order: `indices` (default 0..N-1), permuted by torch.randperm(generator=generator) if shuffle. The generator is
    a CPU generator; call it with the same seed (e.g. seed + epoch) on every rank so all ranks see the same
    permutation. Then the rank keeps shard_indices(order, rank, world_size, even) (see there: even=False shards
    exactly, each index on one rank once; even=True equalises counts for training) and cuts it into consecutive
    batches of batch_size, the last one smaller unless drop_last. Batches live on the device of the tensors, so a
    dataset moved to the GPU once yields GPU batches. For training with DDP use shuffle=True, even=True,
    drop_last=True (same number of steps on every rank); for evaluation use the defaults and sum counts over ranks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images, labels = (ds.images, ds.labels) if isinstance(ds, ImageDataset) else ds
    order = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices, dtype=torch.int64).cpu()
    if shuffle:
        if world_size > 1 and generator is None:
            raise ValueError("shuffle with world_size > 1 needs an explicitly seeded generator, identical on all "
                             "ranks, or the ranks' shards overlap")
        order = order[torch.randperm(len(order), generator=generator)]
    order = shard_indices(order, rank, world_size, even)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield images[idx.to(images.device)], labels[idx.to(labels.device)]
