"""Reading ``.npz`` checkpoints defensively: headers before data, bounded sizes, one array at a time, no pickle.

:class:`NpzArchive` opens the zip, names what a file that is not an ``.npz`` looks like (empty, text, HTML, a Git
LFS pointer, a torch.save file, a single ``.npy``), reads each member's ``.npy`` header (key, shape, dtype)
without decompressing its data, refuses a declared size that the member's compressed size cannot hold, and
decompresses an array only when asked, straight into a new array. With an ``opt/target/`` prefix only the
members under it are considered. Every failure is a :class:`loaders.errors.CheckpointError` naming the file and
the key.
"""

from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import CheckpointError

log = logging.getLogger(__name__)

TARGET_PREFIX = "opt/target/"  # Flax optimizer exports keep the parameters under this path
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand data by more than ~1032x: a larger claim is a crafted file


def _some(keys: list[str], limit: int = 20) -> str:
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class ArrayInfo(NamedTuple):
    """What a member's .npy header declares, read before any data is decompressed."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


# ── reading files ────────────────────────────────────────────────────────────────────────────────────────

def _describe_non_npz(path: Path, head: bytes) -> str | None:
    """What a file that is not an .npz archive looks like, from its first bytes (None: it is a zip)."""
    if not head:
        return "it is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        return None
    if head.startswith(b"\x93NUMPY"):
        return "it is a single .npy array, not an .npz archive of named arrays"
    if head[:1] == b"\x80":
        return ("it is a Python pickle (perhaps a legacy torch.save file); pickles are never loaded here, "
                "use torch.load(..., weights_only=True) for PyTorch files")
    text = head.decode("utf-8", errors="replace")
    if text.startswith("version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights: run `git lfs pull` or download the real file"
    if text.lstrip().lower().startswith(("<!doctype html", "<html", "<?xml")):
        return "it is an HTML/XML page (an error page saved by a failed download?)"
    if all(ch.isprintable() or ch in "\r\n\t" for ch in text[:64]):
        return f"it is a text file starting with {text[:40]!r}"
    return f"its first bytes {head[:8]!r} are not a zip archive (.npz files start with b'PK')"



class NpzArchive:
    """An open ``.npz`` file: member headers up front, arrays decompressed one at a time on request.

    ``keys`` / ``info(key)`` come from the headers only. With an ``opt/target/`` prefix, only the members under
    it are considered (keys without the prefix); the optimizer state beside them is never decompressed.
    """

    def __init__(self, path):
        self.path = Path(path)
        path = self.path
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if path.is_dir():
            raise CheckpointError(f"checkpoint {path} is a directory, expected an .npz file")
        with open(path, "rb") as f:
            head = f.read(64)
        problem = _describe_non_npz(path, head)
        if problem:
            raise CheckpointError(f"{path} is not an .npz checkpoint: {problem}")
        try:
            self.zip = zipfile.ZipFile(path)
            members = self.zip.infolist()
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise self._corrupt(e) from e
        names = [m.filename for m in members]
        if any(n.endswith("data.pkl") for n in names):
            self.close()
            raise CheckpointError(f"{path} is not an .npz checkpoint: it is a PyTorch torch.save file (a zip holding "
                                  "data.pkl); load it with torch.load(..., weights_only=True)")
        not_arrays = [n for n in names if not n.endswith(".npy")]
        if not_arrays:
            self.close()
            raise CheckpointError(f"{path} is a zip archive but not an .npz: members {_some(not_arrays, 5)} "
                                  "are not .npy arrays")
        by_key = {m.filename[:-4]: m for m in members}
        if any(k.startswith(TARGET_PREFIX) for k in by_key):
            others = [k for k in by_key if not k.startswith(TARGET_PREFIX)]
            if others:
                log.info("%s: using the arrays under %r, skipping %d others (optimizer state), e.g. %s", path,
                         TARGET_PREFIX, len(others), others[0])
            by_key = {k[len(TARGET_PREFIX):]: m for k, m in by_key.items() if k.startswith(TARGET_PREFIX)}
        if not by_key:
            self.close()
            raise CheckpointError(f"{path} is an .npz archive with no arrays in it")
        self.members = by_key
        self._infos = {}

    def _corrupt(self, e: BaseException) -> CheckpointError:
        size = self.path.stat().st_size
        return CheckpointError(f"{self.path} ({size:,} bytes) looks like a truncated or corrupt .npz/zip file "
                               f"({type(e).__name__}: {e}); download it again")

    @property
    def keys(self) -> list[str]:
        return list(self.members)

    def _header(self, f, key: str) -> tuple[ArrayInfo, bool]:
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f".npy format version {version} (1.0 and 2.0 are read)")
            shape, fortran, dtype = read[version](f, max_header_size=10_000)
        except Exception as e:  # a malformed header (ValueError, SyntaxError, ...): never a bare exception
            raise CheckpointError(f"{self.path}: array {key!r} has an unreadable .npy header "
                                  f"({type(e).__name__}: {str(e)[:120]})") from e
        if dtype.hasobject:
            raise CheckpointError(f"{self.path}: array {key!r} cannot be read without pickle (dtype {dtype}; "
                                  "refused)")
        if dtype.kind not in "fiub" or dtype.itemsize > 8:  # what torch holds: floats, ints, bools up to 64 bits
            raise CheckpointError(f"{self.path}: array {key!r} has dtype {dtype.name} ({dtype.str}), which a model "
                                  "parameter cannot hold; re-save it as float32")
        if any((not isinstance(d, int)) or d < 0 for d in shape):
            raise CheckpointError(f"{self.path}: array {key!r} declares an invalid shape {shape}")
        return ArrayInfo(tuple(shape), dtype), fortran

    def info(self, key: str) -> ArrayInfo:
        """Shape and dtype of ``key`` from its header (a few hundred bytes decompressed)."""
        if key not in self._infos:
            member = self.members[key]
            try:
                with self.zip.open(member) as f:
                    info, _ = self._header(f, key)
            except CheckpointError:
                raise
            except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
                raise self._corrupt(e) from e
            nbytes = math.prod(info.shape) * info.dtype.itemsize
            if nbytes > MAX_DEFLATE_RATIO * member.compress_size + (1 << 16):
                raise CheckpointError(
                    f"{self.path}: array {key!r} declares {nbytes:,} bytes {info.shape} but its member holds "
                    f"{member.compress_size:,} compressed bytes: a truncated or crafted file")
            self._infos[key] = info
        return self._infos[key]

    def read(self, key: str) -> np.ndarray:
        """Decompress one array (its declared size was checked against its compressed size by :meth:`info`)."""
        info = self.info(key)
        try:
            with self.zip.open(self.members[key]) as f:
                _, fortran = self._header(f, key)
                array = np.empty(info.shape[::-1] if fortran else info.shape, dtype=info.dtype)
                view = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
                got = 0
                while got < len(view):  # straight into the array: no second copy of the data
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:  # CRC errors too
            raise CheckpointError(f"{self.path}: array {key!r} is corrupt ({type(e).__name__}: {e}); "
                                  "download the file again") from e
        if got != len(view):
            raise CheckpointError(f"{self.path}: array {key!r} is truncated ({got:,} of {len(view):,} bytes)")
        if not array.dtype.isnative:  # big-endian writers exist: the same numbers in this machine's byte order
            array = array.astype(array.dtype.newbyteorder("="))
        return array.T if fortran else array

    def close(self) -> None:
        if getattr(self, "zip", None) is not None:
            self.zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ArrayDict:
    """The :class:`NpzArchive` interface over arrays already in memory (``params_to_model`` on a dict)."""

    def __init__(self, params: dict[str, np.ndarray]):
        if any(k.startswith(TARGET_PREFIX) for k in params):
            params = {k[len(TARGET_PREFIX):]: v for k, v in params.items() if k.startswith(TARGET_PREFIX)}
        self.params = params

    @property
    def keys(self) -> list[str]:
        return list(self.params)

    def info(self, key: str) -> ArrayInfo:
        a = np.asarray(self.params[key])
        return ArrayInfo(tuple(a.shape), a.dtype)

    def read(self, key: str) -> np.ndarray:
        return np.asarray(self.params[key])


def read_npz(path) -> dict[str, np.ndarray]:
    """All model arrays of a Google-style ``.npz`` file, keys without an ``opt/target/`` prefix.

    Never unpickles anything. Anything that is not a readable .npz (a missing, empty, truncated or text file,
    a torch.save ``.pt``) raises :class:`CheckpointError` saying which file and what it looks like.
    """
    with NpzArchive(path) as archive:
        return {key: archive.read(key).copy() for key in archive.keys}
