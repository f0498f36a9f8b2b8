"""The downloader against a loopback HTTP server with Range support, and the weights cache on top of it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import vit
from loaders import KNOWN_WEIGHTS, CheckpointError, default_cache_dir, fetch_weights
from loaders.download import DownloadError, download_file, file_digest
from loopback import MD5, PAYLOAD, SHA256
from loopback import part as _part
from npz_factory import write_google_npz


def test_full_download_verifies_and_renames(server, tmp_path):
    base, state = server
    dest = tmp_path / "sub" / "file.bin"
    out = download_file(f"{base}/file.bin", dest, sha256=SHA256, md5=MD5, size=len(PAYLOAD))
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()
    assert state["requests"] == [("/file.bin", None)]
    # present and verified: no second request
    download_file(f"{base}/file.bin", dest, sha256=SHA256)
    assert len(state["requests"]) == 1


def test_resume_from_a_partial_file(server, tmp_path):
    base, state = server
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(PAYLOAD[:123_456])
    download_file(f"{base}/file.bin", dest, sha256=SHA256, size=len(PAYLOAD))
    assert state["requests"] == [("/file.bin", "bytes=123456-")]
    assert dest.read_bytes() == PAYLOAD and not _part(dest).exists()


def test_broken_connection_keeps_the_part_and_the_next_call_resumes(server, tmp_path):
    base, state = server
    dest = tmp_path / "file.bin"
    state["drop_after"] = 100_000
    with pytest.raises(DownloadError, match=r"partial file .*file\.bin\.part is kept") as e:
        download_file(f"{base}/file.bin", dest, sha256=SHA256)
    assert f"copy it to {dest}" in str(e.value)
    assert _part(dest).read_bytes() == PAYLOAD[:100_000] and not dest.exists()
    state["drop_after"] = 0
    download_file(f"{base}/file.bin", dest, sha256=SHA256)
    assert state["requests"][-1] == ("/file.bin", "bytes=100000-")
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_is_not_requested_again(server, tmp_path):
    base, state = server
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(PAYLOAD)
    download_file(f"{base}/file.bin", dest, sha256=SHA256, size=len(PAYLOAD))
    assert state["requests"] == [] and dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_scratch(server, tmp_path):
    base, state = server
    state["honour_range"] = False
    dest = tmp_path / "file.bin"
    _part(dest).write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    download_file(f"{base}/file.bin", dest, sha256=SHA256)
    assert state["requests"] == [("/file.bin", "bytes=1000-")]
    assert dest.read_bytes() == PAYLOAD


def test_wrong_checksum_deletes_the_part_and_creates_nothing(server, tmp_path):
    base, _ = server
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match=r"sha256 [0-9a-f]{64}, expected 0000") as e:
        download_file(f"{base}/file.bin", dest, sha256="0" * 64)
    assert f"{base}/file.bin" in str(e.value)
    assert not dest.exists() and not _part(dest).exists()
    with pytest.raises(DownloadError, match=r"md5"):
        download_file(f"{base}/file.bin", dest, md5="0" * 32)
    assert not dest.exists() and not _part(dest).exists()


def test_size_mismatch(server, tmp_path):
    base, _ = server
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match=rf"announces {len(PAYLOAD):,} bytes, expected 1,000"):  # before any byte
        download_file(f"{base}/file.bin", dest, size=1000)
    assert not dest.exists() and not _part(dest).exists()


def test_existing_file_that_does_not_verify_is_not_overwritten(server, tmp_path):
    base, state = server
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"something else")
    with pytest.raises(DownloadError, match=r"exists but does not match.*Delete it"):
        download_file(f"{base}/file.bin", dest, sha256=SHA256)
    assert dest.read_bytes() == b"something else" and state["requests"] == []
    for wrong in (PAYLOAD + b"!", PAYLOAD[:-1]):  # longer or shorter than the expected size, no checksum given
        dest.write_bytes(wrong)
        with pytest.raises(DownloadError, match=rf"size {len(wrong):,} bytes, expected {len(PAYLOAD):,}"):
            download_file(f"{base}/file.bin", dest, size=len(PAYLOAD))
    assert state["requests"] == []


def test_server_error_says_where_to_put_the_file(server, tmp_path):
    base, _ = server
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError) as e:
        download_file(f"{base}/error", dest, sha256=SHA256)
    msg = str(e.value)
    assert f"{base}/error" in msg and "500" in msg
    assert f"copy it to {dest} (sha256 {SHA256})" in msg
    assert not dest.exists()


def test_unreachable_server(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "w.npz"
    with pytest.raises(DownloadError, match=rf"could not download http://127.0.0.1:{port}/w.npz") as e:
        download_file(f"http://127.0.0.1:{port}/w.npz", dest)
    assert f"download http://127.0.0.1:{port}/w.npz on a machine with network access and copy it to {dest}" \
        in str(e.value)


def test_file_url_and_digest(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    dest = download_file(src.as_uri(), tmp_path / "out" / "copy.bin", sha256=SHA256, size=len(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert file_digest(dest, "sha256") == SHA256 and file_digest(dest, "md5") == MD5


# ── the weights cache ───────────────────────────────────────────────────────────────────────────────────

def test_known_weights_are_the_official_files():
    assert set(KNOWN_WEIGHTS) == {"ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14"}
    for name, info in KNOWN_WEIGHTS.items():
        assert info.url == f"https://storage.googleapis.com/vit_models/imagenet21k/{name}.npz"
        vit.get_config(info.config)  # a known architecture
    b16 = KNOWN_WEIGHTS["ViT-B_16"]
    assert b16.size == 412_815_506
    assert b16.sha256 == "ac7478131e1b77e5c2f0225849730bd19ee89cfffe600c2dfd2272b34a50a43d"


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VIT_PEFT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VIT_PEFT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "vit-peft"


def test_fetch_weights_local_path_and_file_url(tmp_path):
    ckpt = tmp_path / "mine.npz"
    write_google_npz(ckpt, vit.get_config("testing"))
    assert fetch_weights(str(ckpt)) == ckpt  # an existing file is used as is
    cache = tmp_path / "cache"
    got = fetch_weights("my-model", cache_dir=cache, url=ckpt.as_uri())
    assert got == cache / "my-model.npz" and got.read_bytes() == ckpt.read_bytes()
    assert fetch_weights("my-model", cache_dir=cache) == got  # cached now: no url needed


def test_fetch_weights_offline_message(tmp_path, monkeypatch):
    monkeypatch.setitem(KNOWN_WEIGHTS, "ViT-B_16", KNOWN_WEIGHTS["ViT-B_16"].__class__(
        "http://127.0.0.1:9/ViT-B_16.npz", "ViT-B/16", KNOWN_WEIGHTS["ViT-B_16"].size,
        KNOWN_WEIGHTS["ViT-B_16"].sha256))  # port 9 (discard): refused, like having no network
    with pytest.raises(DownloadError) as e:
        fetch_weights("ViT-B/16", cache_dir=tmp_path)
    assert f"copy it to {tmp_path / 'ViT-B_16.npz'}" in str(e.value)


def test_fetch_weights_mirror_of_a_known_name_keeps_its_checksum(tmp_path):
    fake = tmp_path / "not-b16.npz"
    write_google_npz(fake, vit.get_config("testing"))
    with pytest.raises(DownloadError, match="expected 412,815,506"):
        fetch_weights("ViT-B_16", cache_dir=tmp_path / "cache", url=fake.as_uri())
    assert not (tmp_path / "cache" / "ViT-B_16.npz").exists()


def test_fetch_weights_without_checksum_verifies_structure(tmp_path):
    fake = tmp_path / "small.npz"
    write_google_npz(fake, vit.get_config("testing"))
    with pytest.raises(CheckpointError, match=r"not a ViT-B/32 checkpoint: patch_size=8 \(expected 32\)"):
        fetch_weights("ViT-B_32", cache_dir=tmp_path / "cache", url=fake.as_uri())
    assert not (tmp_path / "cache" / "ViT-B_32.npz").exists()


def test_fetch_weights_unknown_name(tmp_path):
    with pytest.raises(DownloadError, match="unknown weights 'ViT-Q_99': known names are ViT-B_16"):
        fetch_weights("ViT-Q_99", cache_dir=tmp_path)
    with pytest.raises(DownloadError, match="does not exist"):
        fetch_weights(str(tmp_path / "missing.npz"))


@pytest.mark.parametrize("where", ["unreachable", "server error"])
def test_the_main_job_without_a_network_leaves_nothing(where, server, tmp_path, monkeypatch, capsys):
    """`tools/finetune.py --mode rlrr` offline, with and without --output-dir a/b/c: one line, exit 1, and no folder,
    no lock, no cache folder left (it left runs/, a/b and a 0-byte ~/.cache/vit-peft/ViT-B_16.npz.lock)."""
    import dataclasses

    from peft.cli import finetune as finetune_cli

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ViT-B_16.npz" if where == "unreachable" else f"{server[0]}/error"
    monkeypatch.setitem(KNOWN_WEIGHTS, "ViT-B_16", dataclasses.replace(KNOWN_WEIGHTS["ViT-B_16"], url=url))
    home, work = tmp_path / "home", tmp_path / "work"
    (home / ".cache").mkdir(parents=True)
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("VIT_PEFT_CACHE", raising=False)
    monkeypatch.chdir(work)
    before = sorted(tmp_path.rglob("*"))
    for extra in ([], ["--output-dir", "a/b/c"]):
        assert finetune_cli.cli(["--mode", "rlrr", *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"could not download {url}" in err, err
        assert str(home / ".cache" / "vit-peft" / "ViT-B_16.npz") in err  # where to put the file by hand
        assert sorted(tmp_path.rglob("*")) == before
