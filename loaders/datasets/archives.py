"""What every downloaded archive goes through: checksums, the resumable downloader, and member-name checks.

Nothing is ever extracted to disk: members are read straight from the tar/zip stream, and an archive holding a
member that *would* escape its folder (absolute path, "..", drive letter) or a link/device is refused whole.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path, PurePosixPath

from .. import download
from .base import DataNotFoundError, DatasetError


def verify_file(path: Path, algo: str, expected: str | None) -> None:
    """Raise DatasetError unless the file's ``algo`` digest is ``expected`` (None: nothing to check)."""
    if expected is None:
        return
    actual = download.file_digest(path, algo)
    if actual != expected.lower():
        raise DatasetError(f"{path}: {algo} is {actual}, expected {expected}. The file is corrupt or incomplete; "
                           f"delete it and download it again.")


def fetch(url: str, dest: Path, *, md5: str | None = None, desc: str | None = None) -> Path:
    """Download through loaders.download (resumable, verified); any failure says where to put the file by hand."""
    hint = f"Download {url} yourself and put it at {dest}, or pass download=False once it is there."
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(download.download_file(url, dest, md5=md5, desc=desc or dest.name))
    except download.DownloadError as e:
        raise DataNotFoundError(f"could not download {url}: {e}\n{hint}") from e


def check_member_name(name: str, archive: Path) -> PurePosixPath:
    """Reject archive members that would land outside the target folder if extracted."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")) or name == "":
        raise DatasetError(f"{archive}: refusing member {name!r}: its path escapes the archive's folder")
    return path



def read_tar_members(archive: Path, wanted: set[str]) -> dict[str, bytes]:
    """Read the `wanted` member files from a tar archive in one pass, checking every member on the way.

    Nothing is extracted to disk; still, an archive holding any member that would be unsafe to extract (absolute
    path, "..", symlink, hard link, device) is rejected as a whole.
    """
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                path = check_member_name(member.name, archive)
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

