"""The decode cache's ``index.npz``: written by the builder, read back under one rule, checked field by field.

Reading an index can raise one exception only, :class:`CacheDamaged`, whatever is wrong with the file: missing,
empty (``EOFError`` inside numpy), not a zip or a cut one (``zipfile.BadZipFile``), a member whose bytes fail the
zip's CRC, a field missing, of another dtype or shape (a ``version`` of two elements), JSON that does not parse
or does not describe the file list. The cache (``loaders.datasets.cache``) turns it into a rebuild with one
warning. Each field, as the builder writes it (N images):

    version   integer, shape ()      FORMAT
    key       str, shape ()          sha256 hex of the file list and the store policy
    offsets   int64 (N,)             start of each image in pixels.u8 (images back to back, in order)
    shapes    int64 (N, 3)           (h, w, c) per image, c in {1, 3}; (0, 0, 0) for a file that did not decode
    ok        bool (N,)              the file decoded
    crc       int64 (N,)             zlib CRC32 of each image's bytes, 0 <= crc < 2**32
    entries   str, shape ()          JSON [[relative path, size, mtime_ns], ...]: what the key was made of
    reasons   str, shape ()          JSON {item: why it could not be decoded}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError

FORMAT = 1
_MAX_SIDE = 1 << 24  # no stored side is larger (Pillow's pixel limit is far below): keeps h*w*c inside int64


class CacheDamaged(DatasetError):
    """A decode cache on disk that cannot be trusted: its index or an image fails a check."""


@dataclass
class Index:
    key: str
    offsets: np.ndarray  # (N,) int64
    shapes: np.ndarray  # (N, 3) int64
    ok: np.ndarray  # (N,) bool
    crc: np.ndarray  # (N,) int64
    entries: list  # [relative path, size, mtime_ns] per item (size -1 and a reason for a file that was unreadable)
    reasons: dict[int, str]  # item -> why it could not be decoded

    @property
    def sizes(self) -> np.ndarray:
        return self.shapes.prod(1)


def write_index(f, ix: Index) -> None:
    np.savez(f, version=np.array(FORMAT), key=np.array(ix.key), offsets=ix.offsets, shapes=ix.shapes, ok=ix.ok,
             crc=ix.crc, entries=np.array(json.dumps(ix.entries)),
             reasons=np.array(json.dumps({str(k): v for k, v in ix.reasons.items()})))


_FIELDS = ("version", "key", "offsets", "shapes", "ok", "crc", "entries", "reasons")


def _raw(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise CacheDamaged(f"{path.name} is a single array, not an index")
            missing = [k for k in _FIELDS if k not in z.files]
            if missing:
                raise CacheDamaged(f"{path.name} has no field(s) {', '.join(missing)}")
            return {k: z[k] for k in _FIELDS}  # reading a member checks its zip CRC
    except CacheDamaged:
        raise
    except Exception as e:  # whatever a damaged file makes numpy or zipfile raise: the index is unusable
        raise CacheDamaged(f"unreadable {path.name} ({type(e).__name__}: {e})") from e


def _field(raw, name: str, kinds: str, ndim: int) -> np.ndarray:
    a = raw[name]
    if a.dtype.kind not in kinds or a.ndim != ndim:
        raise CacheDamaged(f"index field {name!r} is {a.dtype} of shape {a.shape}")
    return a


def _json(raw, name: str, kind: type):
    text = str(_field(raw, name, "U", 0))
    try:
        value = json.loads(text)
    except ValueError as e:
        raise CacheDamaged(f"index field {name!r} is not JSON ({e})") from None
    if not isinstance(value, kind):
        raise CacheDamaged(f"index field {name!r} is not a JSON {kind.__name__}")
    return value


def _entry_ok(e) -> bool:
    return (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and type(e[1]) is int
            and (type(e[2]) is int if e[1] >= 0 else isinstance(e[2], str)))


def read_index(path: Path) -> Index:
    """The index at ``path``, every field checked; :class:`CacheDamaged` (only) when anything is wrong."""
    raw = _raw(Path(path))
    version = _field(raw, "version", "iu", 0)
    if int(version) != FORMAT:
        raise CacheDamaged(f"format {int(version)}, expected {FORMAT}")
    key = str(_field(raw, "key", "U", 0))
    offsets = _field(raw, "offsets", "i", 1)
    n = len(offsets)
    shapes, ok, crc = _field(raw, "shapes", "i", 2), _field(raw, "ok", "b", 1), _field(raw, "crc", "i", 1)
    if shapes.shape != (n, 3) or ok.shape != (n,) or crc.shape != (n,):
        raise CacheDamaged(f"index fields disagree on the image count: offsets {offsets.shape}, shapes "
                           f"{shapes.shape}, ok {ok.shape}, crc {crc.shape}")
    offsets, shapes, crc = offsets.astype(np.int64), shapes.astype(np.int64), crc.astype(np.int64)
    if (crc < 0).any() or (crc >= 1 << 32).any():
        raise CacheDamaged("a checksum in the index is not a CRC32")
    if (shapes[ok, :2] < 1).any() or (shapes > _MAX_SIDE).any() or not np.isin(shapes[ok, 2], (1, 3)).all() \
            or (shapes[~ok] != 0).any() or (offsets < 0).any():
        raise CacheDamaged("bad shapes or offsets in the index")
    order = np.argsort(offsets[ok], kind="stable")  # the images, in the order they lie in pixels.u8
    start, size = offsets[ok][order], shapes[ok].prod(1)[order]
    if (start != np.cumsum(size) - size).any():
        raise CacheDamaged("the index's offsets do not lay the images back to back")
    entries = _json(raw, "entries", list)
    if len(entries) != n or not all(_entry_ok(e) for e in entries):
        raise CacheDamaged(f"index field 'entries' does not describe {n} files")
    reasons_raw = _json(raw, "reasons", dict)
    try:
        reasons = {int(k): v for k, v in reasons_raw.items()}
    except ValueError:
        raise CacheDamaged("index field 'reasons' has a key that is not an item number") from None
    if any(not (0 <= k < n) or ok[k] or not isinstance(v, str) for k, v in reasons.items()):
        raise CacheDamaged("index field 'reasons' names items that are not skipped ones")
    return Index(key, offsets, shapes, ok.astype(bool), crc, entries, reasons)
