"""A small resumable downloader on the standard library: ``.part`` file + HTTP Range, verify, atomic rename.

    download_file(url, dest, sha256=...)  # → dest, only ever complete and verified

The bytes arrive in ``<dest>.part``. An interrupted download resumes from where the ``.part`` ends (a server
that ignores the Range header makes it start over). Size and checksum are checked before ``.part`` is renamed
to ``dest``, so ``dest`` never holds a partial or corrupt file; a ``.part`` that fails the check is deleted.
Without network the error says which URL to fetch by hand and where to put the file.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import file_lock, fsync_dir, make_dirs, remove_created_dirs

log = logging.getLogger(__name__)

__all__ = ["DownloadError", "download_file", "file_digest"]

CHUNK = 1 << 20
TIMEOUT_S = 60


class DownloadError(RuntimeError):
    """A download that failed or did not verify; the message names the URL and where to put the file."""


def file_digest(path, algo: str = "sha256") -> str:
    """Hex digest of a file (``algo``: any hashlib name such as "sha256" or "md5"), read in 1 MiB chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _problems(path: Path, size, sha256, md5) -> list[str]:
    """What is wrong with a file against the expected size/checksums (empty list: it is right)."""
    got = path.stat().st_size
    if size is not None and got != size:
        return [f"size {got:,} bytes, expected {size:,}"]
    problems = []
    for algo, want in (("sha256", sha256), ("md5", md5)):
        if want is not None:
            digest = file_digest(path, algo)
            if digest.lower() != want.lower():
                problems.append(f"{algo} {digest}, expected {want}")
    return problems


def _by_hand(url: str, dest: Path, sha256, md5) -> str:
    check = f" (sha256 {sha256})" if sha256 else f" (md5 {md5})" if md5 else ""
    return (f"To install it by hand, download {url} on a machine with network access and copy it to "
            f"{dest}{check}; it is then used without downloading.")


def download_file(url: str, dest, *, sha256: str | None = None, md5: str | None = None,
                  size: int | None = None, desc: str | None = None) -> Path:
    """Download ``url`` to ``dest`` (resuming a ``dest.part``), verify size/checksums, rename atomically.

    A ``dest`` that already exists and verifies is returned without any network access. ``file://`` URLs
    work too (useful for a mirror on a shared disk). Several processes downloading one ``dest`` at once (torchrun
    ranks, parallel jobs) coordinate through ``<dest>.lock`` (there only while held): one downloads, the others wait
    and reuse the verified file. A failed download leaves no lock and no folder it created (only a resumable
    ``.part``, if bytes arrived). Raises :class:`DownloadError`.
    """
    dest = Path(dest)
    if not dest.exists():
        created = make_dirs(dest.parent)
        try:
            with file_lock(dest, f"downloading {url}"):
                if not dest.exists():  # nobody finished it while this process waited
                    _download_locked(url, dest, sha256, md5, size, desc)
                    return dest
        except BaseException:  # a failed first download leaves no empty cache folder (a kept .part keeps it)
            remove_created_dirs(created)
            raise
    problems = _problems(dest, size, sha256, md5)
    if not problems:
        log.debug("%s already present and verified", dest)
        return dest
    raise DownloadError(f"{dest} exists but does not match: {'; '.join(problems)}. Delete it to download "
                        f"it again from {url}.")


def _download_locked(url: str, dest: Path, sha256, md5, size, desc) -> None:
    part = dest.with_name(dest.name + ".part")

    try:
        total = _fetch_into(url, part, size, desc or dest.name)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        plain_url_error = isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError)
        reason = e.reason if plain_url_error else f"{type(e).__name__}: {e}"
        kept = f" The partial file {part} is kept and resumed next time." if part.exists() else ""
        raise DownloadError(f"could not download {url}: {reason}.{kept} {_by_hand(url, dest, sha256, md5)}") from e

    problems = _problems(part, size if size is not None else total, sha256, md5)
    if problems:
        part.unlink()
        raise DownloadError(f"the file downloaded from {url} is corrupt ({'; '.join(problems)}); the partial "
                            f"file was deleted, try again. {_by_hand(url, dest, sha256, md5)}")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    log.info("downloaded %s to %s", url, dest)


def _total_from(content_range: str | None) -> int | None:
    """The total size in a ``Content-Range: bytes a-b/total`` (or ``bytes */total``) header, if it gives one."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    return None


def _fetch_into(url: str, part: Path, size: int | None, desc: str, _retry: bool = True) -> int | None:
    """Append the missing bytes of ``url`` to ``part``; start over if the server ignores Range.

    Returns the total size the server announced (None if it announced none). A resumed ``.part`` must match
    that total (and ``size`` when known); a 416 answer is taken as "already complete" only when the server's
    total equals the ``.part``'s size; a transfer stops as soon as it would exceed the expected size.
    """
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # longer than the whole file: it cannot be a prefix of it
        part.unlink()
        have = 0
    if size is not None and have == size:
        return size
    request = urllib.request.Request(url, headers={"User-Agent": "vit-peft-downloader"})
    if have and not url.startswith("file:"):
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: complete only if the server says the total is `have`
            total = _total_from(e.headers.get("Content-Range")) if e.headers else None
            if total == have and size in (None, have):
                return total
            log.info("%s: the server refused the range of %s (%s bytes) without confirming its size; starting "
                     "over", url, part, f"{have:,}")
            part.unlink()
            if _retry:
                return _fetch_into(url, part, size, desc, _retry=False)
        raise
    with response:
        status = getattr(response, "status", None)
        resumed = have and status == 206
        content_range = response.headers.get("Content-Range")
        if resumed and not (content_range or "").startswith(f"bytes {have}-"):
            raise ValueError(f"asked for bytes {have}- but the server sent {content_range!r}; delete {part} "
                             "to start over")
        if have and not resumed:
            log.info("%s: the server ignored the Range request (status %s); starting over", url, status)
            have = 0
        length = response.headers.get("Content-Length")
        total = _total_from(content_range) if resumed else (int(length) if length and length.isdigit() else None)
        if total is not None and size is not None and total != size:
            raise ValueError(f"the server announces {total:,} bytes, expected {size:,}")
        expected = size if size is not None else total
        with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=expected, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=None) as bar:
            received = 0
            while chunk := response.read(CHUNK):
                if expected is not None and have + received + len(chunk) > expected:
                    raise ValueError(f"the server sent more than the expected {expected:,} bytes")
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    if length and length.isdigit() and received < int(length):  # urllib returns b"" when the link drops
        raise OSError(f"the connection closed after {received:,} of {int(length):,} bytes")
    return total
