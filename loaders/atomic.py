"""Atomic file writes: readers see the old file or the new one, never a partial one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside ``path`` for writing; on success fsync it and rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left as it was. The file gets the usual
    permissions (0666 less the umask), not the private 0600 that ``mkstemp`` gives.

        with atomic_write("model.npz") as f:
            np.savez(f, **arrays)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
