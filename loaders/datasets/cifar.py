"""CIFAR-10 and CIFAR-100 from the official python archives (cs.toronto.edu/~kriz/cifar.html).

The archive's md5 is checked before anything is read; the needed members are read from the tar stream; the
pickled batches go through a restricted unpickler that admits only numpy's array reconstruction.
CIFAR-100 uses the 100 fine labels.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .archives import fetch, read_tar_members, verify_file
from .base import DATA_ENV, DataNotFoundError, DatasetError, ImageDataset, check_split, data_root


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



def load_cifar(name: str, root: str | Path | None = None, split: str = "train", download: bool = True,
               md5: str | None = None) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 ("cifar10" / "cifar100") from the official python archive in `root`.

    The archive's md5 (`md5`, else the one in CIFAR_ARCHIVES) is checked before any member is read. Images come out
    as (N, 32, 32, 3) uint8: each CIFAR row is 3072 bytes, channel-planar (1024 R, then G, then B, row-major).
    """
    check_split(split)
    spec = CIFAR_ARCHIVES[name]
    md5 = md5 or spec.md5
    root = data_root(root)
    archive = root / spec.filename
    if not archive.is_file():
        if not download:
            raise DataNotFoundError(f"{name}: {archive} not found. Download {spec.url} and put it in {root} "
                                    f"(or set ${DATA_ENV}), or allow download=True.")
        fetch(spec.url, archive, md5=md5, desc=spec.filename)
    verify_file(archive, "md5", md5)

    batches = getattr(spec, split)
    wanted = {f"{spec.folder}/{m}" for m in (*batches, spec.meta)}
    members = read_tar_members(archive, wanted)

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

