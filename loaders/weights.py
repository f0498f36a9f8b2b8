"""The official ImageNet-21k ViT checkpoints, and a local cache to keep them in.

    path = fetch_weights("ViT-B_16")   # ~/.cache/vit-peft/ViT-B_16.npz, downloaded once and verified
    model = load_npz(path, num_classes=10)

Offline: copy the file by hand to ``<cache>/<name>.npz`` (see :func:`default_cache_dir`), pass a local
path as ``name``, or point ``url`` at a mirror (``file:///mnt/models/ViT-B_16.npz``, an example path, works).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vit import get_config

from .atomic import atomic_write
from .download import DownloadError, download_file, file_digest
from .npz import CheckpointError, infer_config, read_npz

log = logging.getLogger(__name__)

__all__ = ["WeightsInfo", "KNOWN_WEIGHTS", "default_cache_dir", "fetch_weights"]

GCS = "https://storage.googleapis.com/vit_models/imagenet21k"


@dataclass(frozen=True)
class WeightsInfo:
    url: str
    config: str  # vit.get_config name of the architecture
    size: int | None = None  # bytes, when known from a trustworthy source
    sha256: str | None = None


# Original ImageNet-21k checkpoints (with the pre_logits layer and a 21,843-way head).
# Only ViT-B_16 has a published size and sha256 (from a public Git LFS pointer to a copy of the file). For the
# others we know of no published checksum, and we do not invent one: after downloading, they are verified by
# their structure instead (every key and shape must match the named architecture), which catches truncated
# and wrong files but not a subtly altered one.
KNOWN_WEIGHTS: dict[str, WeightsInfo] = {
    "ViT-B_16": WeightsInfo(f"{GCS}/ViT-B_16.npz", "ViT-B/16", size=412_815_506,
                            sha256="ac7478131e1b77e5c2f0225849730bd19ee89cfffe600c2dfd2272b34a50a43d"),
    "ViT-B_32": WeightsInfo(f"{GCS}/ViT-B_32.npz", "ViT-B/32"),
    "ViT-L_16": WeightsInfo(f"{GCS}/ViT-L_16.npz", "ViT-L/16"),
    "ViT-L_32": WeightsInfo(f"{GCS}/ViT-L_32.npz", "ViT-L/32"),
    "ViT-H_14": WeightsInfo(f"{GCS}/ViT-H_14.npz", "ViT-H/14"),
}


def default_cache_dir() -> Path:
    """Where weights are kept: ``$VIT_PEFT_CACHE`` if set, else ``~/.cache/vit-peft``."""
    env = os.environ.get("VIT_PEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vit-peft"


def fetch_weights(name: str = "ViT-B_16", cache_dir=None, url: str | None = None) -> Path:
    """Path of a local checkpoint, downloading it into the cache first if needed.

    ``name``: an existing file (returned as is), or one of :data:`KNOWN_WEIGHTS` ("ViT-B/16" spelling also
    accepted), or any name together with ``url``. ``url`` overrides where to download from (a mirror).
    Raises :class:`loaders.download.DownloadError` (saying where to put the file by hand) or
    :class:`loaders.npz.CheckpointError` when a downloaded file has the wrong structure.
    """
    local = Path(name).expanduser()
    if local.is_file():
        return local
    key = name.replace("/", "_")
    info = KNOWN_WEIGHTS.get(key)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = cache / (key if key.endswith(".npz") else f"{key}.npz")
    sidecar = dest.with_name(dest.name + ".sha256")  # written for downloads without a published checksum
    if dest.is_file() and (info is None or info.sha256 is None):
        if sidecar.is_file():  # tell a complete file from one truncated or changed since it was downloaded
            want, _, want_size = sidecar.read_text().strip().partition(" ")
            if dest.stat().st_size != int(want_size or -1) or file_digest(dest, "sha256") != want:
                raise DownloadError(f"{dest} does not match the sha256 recorded when it was downloaded ({sidecar}): "
                                    "it is truncated or was changed; delete both to download it again")
        return dest  # verified when it was downloaded (or put there by hand)
    if info is None and url is None:
        if name.endswith(".npz") or os.sep in name:
            raise DownloadError(f"checkpoint file {local} does not exist")
        raise DownloadError(f"unknown weights {name!r}: known names are {', '.join(KNOWN_WEIGHTS)}; "
                            f"or pass a local .npz path, or a url (nothing named {dest.name} in {cache})")
    source = url or info.url
    # A mirror URL for a known name still has to produce the same bytes, so the checksum stays.
    download_file(source, dest, size=info.size if info else None, sha256=info.sha256 if info else None,
                  desc=key)
    if info is not None and info.sha256 is None:
        _verify_structure(dest, info.config, source)
    if info is None or info.sha256 is None:
        with atomic_write(sidecar, "w") as f:
            f.write(f"{file_digest(dest, 'sha256')} {dest.stat().st_size}\n")
    return dest


def _verify_structure(path: Path, config_name: str, source: str) -> None:
    """Check a downloaded file without a published checksum: it must be the named architecture."""
    want = get_config(config_name)
    try:
        got = infer_config(read_npz(path), str(path))
        fields = ("patch_size", "hidden_size", "mlp_dim", "num_heads", "num_layers")
        wrong = [f"{f}={getattr(got, f)} (expected {getattr(want, f)})" for f in fields
                 if getattr(got, f) != getattr(want, f)]
        if wrong:
            raise CheckpointError(f"{path} is not a {config_name} checkpoint: {', '.join(wrong)}")
    except CheckpointError as e:
        path.unlink()
        raise CheckpointError(f"{e}. The file downloaded from {source} was deleted.") from e
    log.info("%s: structure verified as %s (no published checksum for this file)", path, config_name)
