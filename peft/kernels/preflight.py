"""What the fused kernel's first build needs, checked before trying: one line naming what is missing.

``torch.utils.cpp_extension.load`` needs ``ninja`` (on PATH, or the ``ninja`` Python package: ``pip install
"vit-peft[cuda]"`` / ``pip install -e ".[cuda]"``), a CUDA build of torch, ``nvcc`` from a CUDA toolkit whose
major version is torch's (``torch.version.cuda``), and a writable extensions folder (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``). Without this check a missing piece surfaces as a long compiler log or
a ``RuntimeError`` deep inside ``cpp_extension``; with it the warning says what to install.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

import torch

log = logging.getLogger(__name__)


def _ninja() -> bool:
    try:
        subprocess.run(["ninja", "--version"], capture_output=True, check=True, timeout=30)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def _cuda_home() -> str | None:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def _nvcc_release(nvcc: Path) -> str | None:
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def extensions_dir() -> Path:
    """Where torch builds and caches extensions."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path(os.path.expanduser("~")) / ".cache" / "torch_extensions"


def _writable(folder: Path) -> bool:
    probe = folder
    while not probe.exists() and probe != probe.parent:  # the first existing ancestor decides
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)


def build_problem() -> str | None:
    """Why the kernel cannot be built on this machine, with what to do about it; None if nothing is missing."""
    if torch.version.cuda is None:
        return ("this torch is a CPU build (torch.version.cuda is None): install a CUDA build of torch to use the "
                "fused kernel")
    if not _ninja():
        return ("ninja is not installed, and torch.utils.cpp_extension needs it to compile the kernel: "
                "pip install ninja (or install this project with its cuda extra: pip install -e \".[cuda]\")")
    home = _cuda_home()
    nvcc = Path(home) / "bin" / "nvcc" if home else None
    on_path = shutil.which("nvcc")
    if home is None and on_path:
        toolkit = Path(os.path.realpath(on_path)).parent.parent
        return (f"nvcc is on PATH ({on_path}) but torch found no CUDA toolkit: set CUDA_HOME (e.g. "
                f"CUDA_HOME={toolkit})")
    if nvcc is None or not nvcc.exists():
        return (f"no CUDA compiler (nvcc) found{f' under CUDA_HOME={home}' if home else ''}: install the CUDA "
                f"toolkit {torch.version.cuda.split('.')[0]}.x (torch was built with CUDA {torch.version.cuda}) "
                "and set CUDA_HOME to it")
    release = _nvcc_release(nvcc)
    if release is not None and release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (f"nvcc at {nvcc} is CUDA {release}, but torch was built with CUDA {torch.version.cuda}: the major "
                f"versions must match; install the CUDA {torch.version.cuda.split('.')[0]}.x toolkit and point "
                "CUDA_HOME at it")
    folder = extensions_dir()
    if not _writable(folder):
        return (f"the extensions folder {folder} is not writable: set TORCH_EXTENSIONS_DIR to a folder you can "
                "write")
    return None


class BuildLockTimeout(RuntimeError):
    """Another process held the kernel's build lock for longer than the timeout."""


def build_directory(name: str) -> Path:
    """torch's build folder for extension ``name`` (``<extensions dir>/py<ver>_<cu>/<name>``)."""
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(name, verbose=False))


@contextlib.contextmanager
def build_lock(name: str, timeout: float):
    """Hold this project's lock on building ``name``, waiting at most ``timeout`` seconds.

    torch's own build lock (a ``lock`` file in the build folder, ``torch/utils/file_baton.py``) is waited on
    forever and outlives a killed build, so every later run would hang. This lock is an ``flock``, which the
    operating system releases when its holder dies; holding it, any torch ``lock`` file left in the build folder
    belongs to a build that no longer runs and is removed, with one warning.
    """
    folder = build_directory(name)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder.parent / f"{name}.vit-peft.lock", "a+")
    try:
        if fcntl is not None:
            deadline, said = time.monotonic() + timeout, 0.0
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    waited = timeout - (deadline - time.monotonic())
                    if time.monotonic() > deadline:
                        raise BuildLockTimeout(
                            f"another process has been building the RLRR kernel {name} for over {timeout:.0f} s "
                            f"(lock {handle.name}); the PyTorch path is used meanwhile") from None
                    if waited - said >= 30:
                        log.info("waiting for another process to finish building the RLRR kernel (%.0f s)", waited)
                        said = waited
                    time.sleep(0.2)
        stale = folder / "lock"
        if stale.exists():
            log.warning("removing %s: a build lock left by a killed build of the RLRR kernel (no build is running)",
                        stale)
            stale.unlink(missing_ok=True)
        yield
    finally:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
