"""Downloads shared by several processes, and what interrupted writes leave behind.

Real concurrent processes download one file from a loopback server (one transfer, all get the verified file);
a 416 is not taken as "complete" without the server's total; a server sending more than expected is cut off; a
download from a custom url= gets a sidecar checksum that later calls check; leftovers of interrupted atomic
writes are removed by the next write (only ours, only old ones); gzip inputs are bounded; "" is not a dataset.
"""

from __future__ import annotations

import gzip
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loaders import fetch_weights
from loaders.atomic import atomic_write
from loaders.datasets import DataNotFoundError, DatasetError, load_dataset, read_idx
from loaders.download import DownloadError, download_file
from loopback import PAYLOAD, SHA256
from loopback import part as _part

ROOT = Path(__file__).resolve().parents[1]


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """PAYLOAD, slowly (so that downloads overlap), counting full transfers; odd answers on request."""

    def do_GET(self):  # noqa: N802
        state = self.server.state
        state["gets"] += 1
        if state["mode"] == "416":
            self.send_response(416)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = PAYLOAD * 2 if state["mode"] == "too-long" else PAYLOAD
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(0, len(body), 30_000):
            self.wfile.write(body[i:i + 30_000])
            time.sleep(0.02)

    def log_message(self, *args):
        pass


@pytest.fixture()
def slow_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    httpd.state = {"gets": 0, "mode": "ok"}
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/file.bin", httpd.state
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_concurrent_processes_download_once_and_share_the_verified_file(slow_server, tmp_path):
    url, state = slow_server
    dest = tmp_path / "file.bin"
    # The downloader module alone (its package's __init__ would import torch: ~4 s per process on a busy machine).
    code = ("import sys, types; loaders = types.ModuleType('loaders'); loaders.__path__ = [sys.argv[3] + '/loaders']; "
            "sys.modules['loaders'] = loaders; from loaders.download import download_file; "
            "assert 'torch' not in sys.modules; print(download_file(sys.argv[1], sys.argv[2], sha256=sys.argv[4]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(dest), str(ROOT), SHA256], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert all(o[0].strip() == str(dest) for o in outs)
    assert state["gets"] == 1 and dest.read_bytes() == PAYLOAD and not _part(dest).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]  # no lock file left


def test_416_without_the_servers_total_is_not_taken_as_complete(slow_server, tmp_path):
    url, state = slow_server
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(PAYLOAD[:1000])  # a stale partial file
    state["mode"] = "416"
    with pytest.raises(DownloadError):
        download_file(url, dest)
    assert not dest.exists()  # 1,000 bytes were never renamed into place as "the file"


def test_a_server_sending_more_than_expected_is_cut_off(slow_server, tmp_path):
    url, state = slow_server
    state["mode"] = "too-long"
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match=f"announces {2 * len(PAYLOAD):,} bytes, expected {len(PAYLOAD):,}"):
        download_file(url, dest, size=len(PAYLOAD))
    assert not dest.exists()


def test_a_custom_url_download_gets_a_sidecar_checksum_that_later_calls_check(server, tmp_path):  # noqa: F811
    base, _ = server
    dest = fetch_weights("mine", cache_dir=tmp_path, url=f"{base}/file.bin")
    sidecar = dest.with_name(dest.name + ".sha256")
    assert sidecar.read_text().split() == [SHA256, str(len(PAYLOAD))]
    assert fetch_weights("mine", cache_dir=tmp_path) == dest  # complete: used without downloading
    dest.write_bytes(PAYLOAD[:-10])  # truncated later (a full disk, a killed copy)
    with pytest.raises(DownloadError, match="does not match the sha256 recorded when it was downloaded"):
        fetch_weights("mine", cache_dir=tmp_path)


def test_leftovers_of_interrupted_writes_are_removed_only_if_ours_and_old(tmp_path):
    old = tmp_path / ".model.npz.abcd1234.tmp"
    fresh = tmp_path / ".other.pt.efgh5678.tmp"
    unrelated = tmp_path / ".hidden.tmp"
    for p in (old, fresh, unrelated):
        p.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    os.utime(unrelated, (two_hours_ago, two_hours_ago))
    with atomic_write(tmp_path / "new.txt", "w") as f:
        f.write("hello")
    assert not old.exists() and fresh.exists() and unrelated.exists()
    assert (tmp_path / "new.txt").read_text() == "hello"


def test_a_gzip_bomb_and_a_truncated_stream_are_dataset_errors(tmp_path):
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        for _ in range(80):
            f.write(bytes(1 << 20))  # 80 MiB of zeros, a few KB on disk
    with pytest.raises(DatasetError, match="decompresses to more than"):
        read_idx(bomb)
    cut = tmp_path / "cut-idx1-ubyte.gz"
    cut.write_bytes(gzip.compress(bytes(range(256)) * 100)[:-20])
    with pytest.raises(DatasetError, match="corrupt gzip"):
        read_idx(cut)


def test_the_empty_name_is_not_a_dataset():
    with pytest.raises(DataNotFoundError, match="empty name"):
        load_dataset("")


def test_a_lock_file_exists_only_while_held_and_holders_never_overlap(tmp_path):
    """The holder deletes the lock file before unlocking; a process already waiting on the deleted file must not
    hold it at the same time as one that locks the new file at that path."""
    from loaders.atomic import file_lock

    target = tmp_path / "cache" / "w.npz"
    inside, overlaps, done = [], [], []

    def hold(name, seconds):
        with file_lock(target, "test"):
            overlaps.extend(inside)  # anyone inside now overlaps with this holder
            inside.append(name)
            assert (tmp_path / "cache" / "w.npz.lock").is_file()
            time.sleep(seconds)
            inside.remove(name)
        done.append(name)

    first = threading.Thread(target=hold, args=("first", 0.4))
    first.start()
    time.sleep(0.1)
    waiting = threading.Thread(target=hold, args=("waiting", 0.3))  # opens the file the first holder deletes
    waiting.start()
    first.join(timeout=30)
    late = threading.Thread(target=hold, args=("late", 0.3))  # opens whatever file is at the path now
    late.start()
    waiting.join(timeout=30)
    late.join(timeout=30)
    assert sorted(done) == ["first", "late", "waiting"] and overlaps == []
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []  # no lock file left
