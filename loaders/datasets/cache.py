"""Decode once: image files → a :class:`~loaders.datasets.store.PixelStore` on disk, in parallel, reused.

    <cache folder>/<name>-<family>-<key>/pixels.u8     every image's uint8 (H, W, C) bytes, back to back
    <cache folder>/<name>-<family>-<key>/index.npz     offsets, shapes, a CRC32 per image, the key, the file list

* **Where**: ``$VIT_PEFT_CACHE`` if set, else ``.vit-peft-cache/`` inside the data folder; a cache folder that is
  a file or not writable (a read-only data folder) falls back to ``~/.cache/vit-peft/decoded`` with a warning.
* **Key**: every file's path (relative to the data folder), size and modification time, the store policy
  (stored resolution, resampling, EXIF, draft, alpha and 16-bit handling) and Pillow's version. A changed file
  changes the key (a new size or a new time is enough; a rewrite keeping both, e.g. within one tick of a file
  system's 1-2 s clock, is not seen); the new cache copies every unchanged image from the previous one of the
  same family (same folder, name and policy) and decodes only the changed ones.
* **Checks on opening**: every field of the index (``loaders.datasets.cache_index``: reading it raises
  ``CacheDamaged`` and nothing else), the key, the count, the offsets against the size of ``pixels.u8``. A cache
  that fails is rebuilt, with one warning naming it and the reason.
* **Checks on use**: every image's CRC32 before its pixels are first used, once per process
  (``PixelStore.image``): about one more read of its bytes (0.3 ms for a 256 × 341 photo read from the page
  cache, 2-core x86), beside 2.3 ms (500 × 375 JPEG) to 47 ms (12 MP) to decode it. An image that fails (a
  byte flipped on disk) is decoded again from its file, with one warning naming it, and written back into
  ``pixels.u8`` when its pixels match the recorded checksum (the next run finds the cache whole); if the file
  no longer decodes to an image of that shape, the run stops with an error naming it. The other images are
  served from the cache: one damaged image never costs a rebuild.
* **Atomic and shared**: built in a temporary folder and renamed into place whole, under a lock per family
  (``fcntl.flock``, released by the OS if the builder dies): concurrent runs wait for one builder and then read
  its cache; an interrupted build (``kill -9``) leaves only a temporary folder, removed by the next build, which
  starts again (reusing any earlier complete cache of the family).
* **Parallel**: ``workers`` processes decode (default: the cores this process may use), with a progress bar.
  A file that cannot be decoded (``loaders.images.ImageDecodeError``, the one error of a bad image) is recorded
  with its reason (``report.reasons``: what Pillow raised, "OSError: ...", "DecompressionBombError: ..."), never
  stops the build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from ..atomic import file_lock, fsync_dir
from ..errors import DatasetError
from ..images import ImageDecodeError, StorePolicy, decode_for_store
from .cache_index import FORMAT, CacheDamaged, Index, read_index, write_index
from .store import PixelStore

log = logging.getLogger(__name__)

CACHE_ENV = "VIT_PEFT_CACHE"
_WARN_REPAIRS = 5  # damaged images of one cache warned about one by one; after that at the 10th, 100th, ...


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def fallback_cache_root() -> Path:
    return Path.home() / ".cache" / "vit-peft" / "decoded"


def _usable(folder: Path) -> str | None:
    """None if ``folder`` can hold a cache, else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"{folder} is a file"
    except OSError as e:
        return f"{folder} cannot be created ({e.strerror or e})"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable"
    return None


_warned: set[str] = set()


def cache_folder(data_folder: Path) -> Path:
    """Where the caches of ``data_folder`` live (see the module docstring)."""
    env = os.environ.get(CACHE_ENV)
    wanted = Path(env).expanduser() if env else Path(data_folder) / ".vit-peft-cache"
    problem = _usable(wanted)
    if problem is None:
        return wanted
    fallback = fallback_cache_root()
    if str(wanted) not in _warned:
        _warned.add(str(wanted))
        log.warning("decode cache: %s; using %s instead", problem, fallback)
    return fallback


@dataclass
class CacheReport:
    """What one :func:`decode_cached` call did, per item of its file list."""

    path: Path | None  # the cache folder (None: kept in memory, nothing could be written)
    ok: np.ndarray  # (N,) bool: the item has pixels
    decoded: np.ndarray  # (N,) bool: decoded by this call (False: read from a cache)
    reasons: dict[int, str] = field(default_factory=dict)  # item -> why it could not be decoded

    def counts(self, items=None) -> dict:
        sel = np.arange(len(self.ok)) if items is None else np.asarray(items, dtype=np.int64)
        ok, dec = self.ok[sel], self.decoded[sel]
        return {"decoded": int((ok & dec).sum()), "from_cache": int((ok & ~dec).sum()), "skipped": int((~ok).sum())}


def _entries(files: list[Path], root: Path) -> list[list]:
    out = []
    for f in files:
        rel = os.path.relpath(f, root).replace(os.sep, "/")
        try:
            st = os.stat(f)
            out.append([rel, st.st_size, st.st_mtime_ns])
        except OSError as e:
            out.append([rel, -1, str(e.strerror or e)])
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "data"


def _decode_one(job):
    i, path, policy = job
    try:
        return i, decode_for_store(path, policy), None
    except ImageDecodeError as e:  # the one error of a bad file (loaders.images): report it, keep going
        return i, None, e.reason


def _pool(workers: int):
    method = "fork" if sys.platform.startswith("linux") else "spawn"  # fork: no re-import of torch per worker
    return multiprocessing.get_context(method).Pool(workers)


class _Opened(NamedTuple):
    store: PixelStore
    ok: np.ndarray  # (N,) bool
    entries: list  # [relative path, size, mtime_ns] per item: what the key was made of
    reasons: dict[int, str]  # item -> why it could not be decoded


def _open(folder: Path, key: str | None = None, n: int | None = None,
          source: tuple[list[Path], StorePolicy] | None = None) -> _Opened:
    """The cache in ``folder`` if its index passes every check (its key and count too, where given); raises
    CacheDamaged, and nothing else, when it does not. Its images are checked on first use; ``source`` (the files
    and policy it was built from) lets a damaged one be decoded again, without it a damaged one raises."""
    ix = read_index(folder / "index.npz")
    if key is not None and ix.key != key:
        raise CacheDamaged("its key does not match the files")
    if n is not None and len(ix.offsets) != n:
        raise CacheDamaged(f"it holds {len(ix.offsets)} images, expected {n}")
    pixels_path = folder / "pixels.u8"
    try:
        total = pixels_path.stat().st_size if pixels_path.is_file() else -1
        if total != int(ix.sizes.sum()):
            raise CacheDamaged(f"pixels.u8 has {total} bytes, its index describes {int(ix.sizes.sum())}")
        pixels = np.memmap(pixels_path, np.uint8, "r") if total > 0 else np.zeros(0, np.uint8)
    except (OSError, ValueError) as e:
        raise CacheDamaged(f"pixels.u8 cannot be mapped ({type(e).__name__}: {e})") from e
    store = PixelStore(pixels, ix.offsets, ix.shapes, path=pixels_path, crc=ix.crc,
                       repair=_Repair(folder, ix, *source) if source is not None else None)
    return _Opened(store, ix.ok, ix.entries, ix.reasons)


class _Repair:
    """A damaged image of the cache in ``folder`` decoded again from its file, with one warning, and written back
    into pixels.u8 when its pixels match the recorded checksum (else served from memory)."""

    def __init__(self, folder: Path, ix: Index, files: list[Path], policy: StorePolicy):
        self.folder, self.ix, self.files, self.policy = folder, ix, files, policy
        self.count = 0

    def __call__(self, j: int) -> np.ndarray:
        path, folder = self.files[j], self.folder
        try:
            arr = np.ascontiguousarray(decode_for_store(path, self.policy))
        except ImageDecodeError as e:
            raise DatasetError(f"decode cache {folder}: the stored image of {path} is damaged and the file no longer "
                               f"decodes ({e.reason}); delete {folder} to rebuild it") from None
        if arr.shape != tuple(int(v) for v in self.ix.shapes[j]):
            raise DatasetError(f"decode cache {folder}: the stored image of {path} is damaged and the file now "
                               f"decodes to another shape (changed during the run?); run again")
        wrote = zlib.crc32(arr) == int(self.ix.crc[j]) and _write_back(folder / "pixels.u8", int(self.ix.offsets[j]),
                                                                         arr)
        self.count += 1
        if self.count <= _WARN_REPAIRS or str(self.count).rstrip("0") == "1":
            log.warning("decode cache %s: the stored image of %s does not match its checksum (damaged on disk); "
                        "decoded it again from the file%s%s", folder, path,
                        "" if wrote else " (the cache could not be repaired)",
                        f" [{self.count} damaged images so far]" if self.count > 1 else "")
        return arr


def _write_back(pixels_path: Path, offset: int, arr: np.ndarray) -> bool:
    """Overwrite one image's bytes in place: the same bytes every process would write, so no lock is needed."""
    try:
        with open(pixels_path, "r+b") as f:
            f.seek(offset)
            f.write(arr.tobytes())
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False


def decode_cached(files: list[Path], root: Path, name: str, policy: StorePolicy, workers: int | None = None,
                  progress: bool = True, folder: Path | None = None) -> tuple[PixelStore, CacheReport]:
    """Pixels of ``files`` (all inside ``root``) as a :class:`PixelStore` in the order given, decoding only
    what no valid cache holds. Items that cannot be decoded have a 0 × 0 image and a reason in the report."""
    root = Path(root)
    folder = Path(folder) if folder is not None else cache_folder(root)
    entries = _entries(files, root)
    settings = policy.settings()
    key = hashlib.sha256(json.dumps([FORMAT, settings, entries]).encode()).hexdigest()
    family = hashlib.sha256(json.dumps([FORMAT, settings, str(root.resolve()), name]).encode()).hexdigest()[:12]
    stem = f"{_safe(name)}-{family}"
    final = folder / f"{stem}-{key[:16]}"
    n = len(files)
    try:
        with file_lock(folder / stem, f"decode cache {name}"):
            if final.exists():
                try:
                    opened = _open(final, key, n, (files, policy))
                    return opened.store, CacheReport(final, opened.ok, np.zeros(n, bool), opened.reasons)
                except CacheDamaged as e:
                    log.warning("decode cache %s fails its checks (%s); rebuilding it", final, e)
                    if final.is_dir():
                        shutil.rmtree(final, ignore_errors=True)
                    else:
                        final.unlink()
            return _build(files, entries, key, stem, final, policy, workers, progress, name)
    except OSError as e:  # nothing can be written there: decode into memory
        log.warning("could not write the decode cache in %s (%s); decoding into memory, nothing is kept", folder, e)
        return _build(files, entries, key, stem, None, policy, workers, progress, name)


def _previous(stem: str, folder: Path | None) -> dict[tuple, tuple[PixelStore, int]]:
    """Images of earlier complete caches of the same family, by (path, size, mtime)."""
    found = {}
    if folder is None:
        return found
    for old in sorted(folder.parent.glob(f"{stem}-*")):
        if old == folder or not old.is_dir():
            continue
        try:
            opened = _open(old)  # no repair: a damaged image there is simply decoded again
        except CacheDamaged:
            continue
        found.update({tuple(e): (opened.store, j) for j, e in enumerate(opened.entries) if opened.ok[j]})
    return found


def _build(files, entries, key, stem, final: Path | None, policy, workers, progress, name):
    tmp = None if final is None else final.parent / f".tmp-{final.name}-{os.getpid()}"
    if final is not None:
        for stale in final.parent.glob(f".tmp-{stem}-*"):  # we hold the family's lock: nobody else is building
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    try:
        with open(tmp / "pixels.u8", "wb") if tmp is not None else contextlib.nullcontext() as out:
            return _write(files, entries, key, stem, final, tmp, out, policy, workers, progress, name)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(files, entries, key, stem, final, tmp, out, policy, workers, progress, name):
    n = len(files)
    offsets, shapes = np.zeros(n, np.int64), np.zeros((n, 3), np.int64)
    ok, decoded, crc = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, np.int64)
    reasons: dict[int, str] = {}
    previous = _previous(stem, final)
    chunks: list[np.ndarray] = []  # in-memory fallback only (out is None)
    written = 0

    def put(i, arr):
        nonlocal written
        arr = np.ascontiguousarray(arr)
        offsets[i], shapes[i], ok[i], crc[i] = written, arr.shape, True, zlib.crc32(arr)
        out.write(arr.tobytes()) if out is not None else chunks.append(arr.reshape(-1))
        written += arr.size

    todo = []
    for i, e in enumerate(entries):
        if e[1] < 0:
            reasons[i] = f"cannot read the file ({e[2]})"
            continue
        hit = previous.get(tuple(e))
        try:
            if hit is not None:
                put(i, np.array(hit[0].image(hit[1])))
                continue
        except CacheDamaged:  # that image fails its checksum in the earlier cache
            pass
        todo.append(i)
    workers = max(1, min(workers or default_workers(), len(todo)))
    jobs = [(i, files[i], policy) for i in todo]
    bar = tqdm(total=len(todo), desc=f"decoding {name}", unit="img", disable=not progress or not todo,
               dynamic_ncols=True)
    pool = _pool(workers) if workers > 1 and len(todo) >= 2 * workers else None
    try:
        results = pool.imap(_decode_one, jobs, chunksize=4) if pool else map(_decode_one, jobs)
        for i, arr, reason in results:
            if arr is None:
                reasons[i] = reason
            else:
                put(i, arr)
                decoded[i] = True
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if reasons:
        for i, why in sorted(reasons.items())[:5]:
            log.warning("skipped %s: %s", files[i], why)
        if len(reasons) > 5:
            log.warning("... and %d more undecodable file(s)", len(reasons) - 5)
    if out is None:
        pixels = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
        store = PixelStore(pixels, offsets, shapes)
        return store, CacheReport(None, ok, decoded, reasons)
    out.flush()
    os.fsync(out.fileno())
    out.close()
    with open(tmp / "index.npz", "wb") as f:
        write_index(f, Index(key, offsets, shapes, ok, crc, entries, reasons))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)
    fsync_dir(final.parent)
    for old in final.parent.glob(f"{stem}-*"):  # older versions of this family: replaced by this one
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    try:
        opened = _open(final, key, len(files), (files, policy))
    except CacheDamaged as e:  # pragma: no cover - we just wrote it
        raise OSError(f"the decode cache just written to {final} fails its checks: {e}") from None
    log.info("decode cache %s: %d images (%.1f MiB), %d decoded, %d skipped", final, int(ok.sum()),
             written / 2**20, int(decoded.sum()), len(reasons))
    return opened.store, CacheReport(final, ok, decoded, reasons)
