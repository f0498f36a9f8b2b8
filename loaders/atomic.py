"""Safe files for concurrent and interrupted writers: atomic writes, their leftovers, and file locks.

``atomic_write``: readers see the old file or the new one, never a partial one; the rename is made durable by an
fsync of the folder; temporary files left by an interrupted write (``kill -9``) are removed by the next write to
that folder, only ours (by name pattern) and only old ones (so a concurrent writer's file is never touched).
``file_lock``: an exclusive lock beside a file, for work several processes must not do twice (a download).
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


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str = "this file"):
    """Hold an exclusive lock on ``<path>.lock`` (waiting for another holder, with one log line)."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                log.info("waiting for another process working on %s (%s)", path, what)
                fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)
