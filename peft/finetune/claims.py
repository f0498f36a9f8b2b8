"""Claims on shared work: which worker runs a cell of a suite, on a folder that several machines share (NFS).

No server and no lock daemon: a claim is a file, and the file system's exclusive create decides.

- **Claiming.** A claim on cell ``C`` is the file ``<claims>/<C>.<g>``, created with ``O_CREAT | O_EXCL``: of any
  number of workers creating it at once, exactly one succeeds (a local file system decides it; NFSv3 and v4 send
  the exclusive create to the server, which decides it). ``g`` is the claim's generation, 0 for the first.
- **Heartbeat.** The holder rewrites its claim every ``lease / 5`` seconds (a beat counter, which also moves the
  file's modification time).
- **Stale claims.** A claim is stale when (a) its holder is a process of this machine (same host name, boot id and
  process namespace) that has ended, or was released by a holder that gave its cell up, or (b) the observer has
  seen it unchanged for ``lease`` seconds of its *own* clock: no clock is compared with another machine's, so
  clock skew does not matter. Claims are read by opening the file, which makes an NFS client revalidate its cache
  (close-to-open consistency) instead of answering from cached attributes.
- **Taking over** a stale claim of generation ``g`` is the exclusive create of generation ``g + 1``: of several
  workers that judged it stale at once, one wins; nothing is renamed or deleted while the cell is unfinished, so
  no worker can mistake a fresh claim for the stale one. A holder that was only slow (a network partition longer
  than the lease) sees ``g + 1`` at its next heartbeat and gives the cell up.
- **NFS caches** can make a claim look absent for a while (cached negative lookups); that is safe, because
  every decision is an exclusive create, which the server answers: a worker that misses a claim fails to create
  it. The cost is only that a holder may learn of a takeover up to the cache's lifetime late, so leases should be
  minutes, not seconds (the default is 300 s).
- **Finished** cells are recognised by their own result file (the caller's ``done``), checked again right after
  every successful claim, so a cell finished while another worker was claiming it is never run twice; the claims
  of a finished cell are then removed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def _machine() -> str | None:
    """This machine and process namespace, or None where it cannot be told (then only leases expire claims)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _process_ended(pid: int) -> bool:
    """True when process ``pid`` of this machine no longer runs (a zombie, killed and not yet reaped, has ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


class Claim:
    """A claim this worker holds: ``beat()`` refreshes it and says whether it still holds it."""

    def __init__(self, claims: "Claims", key: str, generation: int):
        self.claims, self.key, self.generation, self.beats = claims, key, generation, 0
        self.lost = False

    @property
    def path(self) -> Path:
        return self.claims.path(self.key, self.generation)

    def beat(self) -> bool:
        """Rewrite the claim (a new beat); False, from then on, once another worker has taken the cell over."""
        if self.lost or self.claims.exists(self.key, self.generation + 1):
            self.lost = True
            return False
        self.beats += 1
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
        except FileNotFoundError:  # removed: the cell was finished by someone (only a lost claim gets here)
            self.lost = True
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.claims.record(self.beats))
        return True


class Claims:
    """Claims in one folder, for one worker. ``lease``: seconds a claim may stay unchanged before it is stale."""

    def __init__(self, folder: Path, lease: float = 300.0, worker: str | None = None):
        self.folder, self.lease = Path(folder), float(lease)
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.machine = _machine()
        self._seen: dict[Path, tuple[bytes, float]] = {}  # claim file -> (what it said, when first seen so)

    def path(self, key: str, generation: int) -> Path:
        return self.folder / f"{key}.{generation}"

    def record(self, beats: int, state: str = "running") -> str:
        return json.dumps({"worker": self.worker, "machine": self.machine, "pid": os.getpid(), "state": state,
                           "beats": beats, "time": time.time()}) + "\n"

    def exists(self, key: str, generation: int) -> bool:
        return self._read(self.path(key, generation)) is not None

    @staticmethod
    def _read(path: Path) -> tuple[bytes, os.stat_result] | None:
        """The claim's bytes and attributes, read through an open (fresh on NFS); None if it does not exist."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read(), os.fstat(f.fileno())

    def _stale(self, path: Path, data: bytes, st: os.stat_result) -> bool:
        try:
            holder = json.loads(data)
        except ValueError:  # empty or half-written: being rewritten right now, so alive
            holder = {}
        if holder.get("state") == "released":
            return True
        if holder.get("machine") is not None and holder.get("machine") == self.machine and holder.get("pid"):
            if _process_ended(int(holder["pid"])):
                return True  # our own machine: no need to wait for the lease
            # alive, or its number reused by another process: the heartbeat decides, as for other machines
        snapshot = data + f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()
        now = time.monotonic()
        seen = self._seen.get(path)
        if seen is None or seen[0] != snapshot:
            self._seen[path] = (snapshot, now)
            return False
        return now - seen[1] >= self.lease

    def try_claim(self, key: str) -> Claim | None:
        """Claim ``key`` if nobody holds it or its holder's claim is stale; None while a live worker holds it."""
        (self.folder / key).parent.mkdir(parents=True, exist_ok=True)
        generation = 0
        while True:
            current = self._read(self.path(key, generation))
            if current is None:
                break  # the first free generation: claim it (if nobody creates it first)
            if self._read(self.path(key, generation + 1)) is None:  # the newest claim: alive?
                if not self._stale(self.path(key, generation), *current):
                    return None
                log.info("claim %s (generation %d) is stale: taking the cell over", key, generation)
                generation += 1
                break
            generation += 1
        try:
            fd = os.open(self.path(key, generation), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None  # another worker won this generation
        with os.fdopen(fd, "w") as f:
            f.write(self.record(0))
        return Claim(self, key, generation)

    def release(self, claim: Claim, finished: bool) -> None:
        """Finished: remove the cell's claims (its result file now marks it). Else mark it released, so that
        another worker takes it at once."""
        if finished:
            for g in range(claim.generation + 2):
                try:
                    os.unlink(self.path(claim.key, g))
                except FileNotFoundError:
                    pass
                except OSError as e:  # pragma: no cover - a read-only or vanished share: the claims only linger
                    if e.errno not in (errno.EROFS, errno.ESTALE):
                        raise
        elif not claim.lost:
            with open(claim.path, "w") as f:
                f.write(self.record(claim.beats, state="released"))


class Heartbeat:
    """A thread that beats every held claim each ``interval`` seconds and calls ``on_lost(claim)`` for a claim
    another worker has taken over."""

    def __init__(self, interval: float, on_lost=None):
        self.interval, self.on_lost = interval, on_lost
        self.held: set[Claim] = set()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="claims-heartbeat", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def hold(self, claim: Claim) -> None:
        with self._lock:
            self.held.add(claim)

    def drop(self, claim: Claim) -> None:
        with self._lock:
            self.held.discard(claim)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                claims = list(self.held)
            for claim in claims:
                try:
                    alive = claim.beat()
                except OSError as e:  # a share that hiccups: try again next beat; the lease leaves room
                    log.warning("heartbeat of claim %s failed: %s", claim.key, e)
                    continue
                if not alive:
                    log.error("cell %s was taken over by another worker (this worker's heartbeat was late by more "
                              "than the lease): giving it up", claim.key)
                    self.drop(claim)
                    if self.on_lost is not None:
                        self.on_lost(claim)
