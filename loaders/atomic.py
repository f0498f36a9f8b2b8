"""Safe files for concurrent and interrupted writers: atomic writes, their leftovers, and file locks.

``atomic_write``: readers see the old file or the new one, never a partial one; the rename is made durable by an
fsync of the folder; temporary files left by an interrupted write (``kill -9``) are removed by the next write to
that folder, only ours (by name pattern) and only old ones (so a concurrent writer's file is never touched).
``file_lock``: an exclusive lock beside a file, for work several processes must not do twice (a download); its lock
file exists only while held. ``make_dirs`` / ``remove_created_dirs``: folders a failed attempt created go again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks
    fcntl = None

log = logging.getLogger(__name__)

TEMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_write's mkstemp names look like
STALE_AFTER_S = 3600.0  # a temporary file this old belongs to no write in progress


def remove_stale_temps(folder: Path, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete our leftover temporary files (name pattern, age) in ``folder``; returns what was removed."""
    removed, now = [], time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if entry.is_file(follow_symlinks=False) and TEMP_PATTERN.match(entry.name):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:  # removed meanwhile by another writer
                pass
    if removed:
        log.info("removed %d leftover temporary file(s) of interrupted writes in %s", len(removed), folder)
    return removed


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside ``path`` for writing; on success fsync it and rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left as it was. The file gets the usual
    permissions (0666 less the umask), not the private 0600 that ``mkstemp`` gives.

        with atomic_write("model.npz") as f:
            np.savez(f, **arrays)
    """
    path = Path(path)
    remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # text: UTF-8, and a name that is not valid UTF-8 (read as surrogate escapes) written back as its bytes
        text = {} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape"}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:  # name the file being written, not the temporary one (disk full, read-only, ...)
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_dirs(folder: str | os.PathLike) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders this call created, outermost first, for
    :func:`remove_created_dirs`. A folder another process creates meanwhile is not counted as ours; a parent another
    process removes meanwhile is created again."""
    folder = Path(folder)
    for _ in range(10):
        missing, p = [], folder
        while not p.is_dir() and p != p.parent:
            missing.append(p)
            p = p.parent
        created = []
        try:
            for d in reversed(missing):
                try:
                    d.mkdir()
                    created.append(d)
                except FileExistsError:
                    if not d.is_dir():
                        raise
            return created
        except FileNotFoundError:  # a parent went away between the two steps: once more
            remove_created_dirs(created)
    folder.mkdir(parents=True, exist_ok=True)  # still racing: the plain call raises the real error
    return []


def remove_created_dirs(created: list[Path]) -> None:
    """Remove folders that :func:`make_dirs` created, innermost first, each only while it is empty: a file anyone
    put there (another process's too) keeps it and every folder above it."""
    for d in reversed(created):
        try:
            d.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty
            return


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str = "this file"):
    """Hold an exclusive lock on ``<path>.lock`` (waiting for another holder, with one log line).

    The lock file exists only while it is held: the holder deletes it before unlocking. A process that was waiting
    on the deleted file finds that it is no longer the file at that path and locks the one that is (creating it),
    so two holders never overlap. A holder killed with ``kill -9`` leaves an empty lock file; the next holder takes
    it over and deletes it. The lock's folder is created if missing (and again if another process removes it).
    """
    lock_path = Path(str(path) + ".lock")
    waited = False
    while True:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = open(lock_path, "a+")
        except FileNotFoundError:  # the folder was removed between the two calls
            continue
        if fcntl is None:
            break
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not waited:
                log.info("waiting for another process working on %s (%s)", path, what)
                waited = True
            fcntl.flock(f, fcntl.LOCK_EX)
        if is_file_at(f, lock_path):
            break
        f.close()  # its holder deleted it while this process waited: lock the one at the path now
    try:
        yield
    finally:
        if fcntl is not None:
            lock_path.unlink(missing_ok=True)  # still held: whoever opened it before now retries on a new file
            fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def is_file_at(f, path: Path) -> bool:
    """Is the open file ``f`` the file now at ``path`` (not one deleted or replaced since it was opened)?"""
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except FileNotFoundError:
        return False
