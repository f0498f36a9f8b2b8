"""One run per output folder: a lock while a run uses the folder, and no silent mixing of two runs' files.

A run takes an exclusive lock on ``<output-dir>/.run.lock`` (``fcntl.flock``, released by the OS when the
process ends, even after ``kill -9``); a second run into a locked folder stops at once, saying which process
holds it. A fresh run (no ``--resume``) into a folder that holds another run's checkpoint is refused unless
``--overwrite`` is given, which removes that run's files first. ``metrics.json`` is removed at the start of every
run and written again at its end, so it always describes the run that produced it.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, one warning
    fcntl = None

from loaders.atomic import is_file_at, make_dirs, remove_created_dirs

from .options import OptionsError

LOCK_NAME = ".run.lock"
RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.json", "options.json", "history.csv", "curves.png")
REPORT_GLOBS = ("test_*", "val_*")


class RunFolderBusy(RuntimeError):
    """Another process is running in this output folder."""


class RunFolder:
    """The claimed output folder of a run; ``release()`` (or the end of the process) frees it."""

    def __init__(self, out: Path, resume: bool, overwrite: bool):
        self.out = Path(out)
        self.created = make_dirs(self.out)  # the folder and parents this run made (removed if it writes nothing)
        while True:
            self._file = open(self.out / LOCK_NAME, "a+")
            if fcntl is None:
                break
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._file.seek(0)
                holder = self._file.read().strip() or "another process"
                self._file.close()
                raise RunFolderBusy(f"{self.out} is in use by another run ({holder}); wait for it to finish or "
                                    "choose another --output-dir") from None
            if is_file_at(self._file, self.out / LOCK_NAME):
                break
            self._file.close()  # a run that ended meanwhile deleted this lock file: take the one at the path
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                         f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
        self._file.flush()
        existing = [n for n in ("checkpoint.pt", "best.pt") if (self.out / n).is_file()]
        if existing and not resume and not overwrite:
            self.release()
            raise OptionsError(f"--output-dir {self.out} already holds a run ({', '.join(existing)}): pass --resume "
                               "to continue it, --overwrite to start afresh there, or choose another folder")
        if overwrite and not resume:
            for path in [self.out / n for n in RUN_FILES] + [p for g in REPORT_GLOBS for p in self.out.glob(g)]:
                if path.is_file():
                    path.unlink()
        (self.out / "metrics.json").unlink(missing_ok=True)  # rewritten at the end of this run

    def release(self) -> None:
        """Free the folder. A run that wrote nothing there (it failed before its first file) leaves no trace: the
        lock file goes, and the folder and its parents too if this run created them (only while empty)."""
        if not self._file.closed:
            ran = self.out.is_dir() and any((self.out / n).exists() for n in RUN_FILES)
            if not ran:
                (self.out / LOCK_NAME).unlink(missing_ok=True)  # still holding the lock: nobody else is inside
            if fcntl is not None:
                fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            if not ran:
                remove_created_dirs(self.created)
