"""Checkpoints and downloads: Google's ViT ``.npz`` files ⇄ :class:`vit.VisionTransformer`.

``loaders.npz`` holds the key table and the converters, ``loaders.download`` a small resumable downloader,
``loaders.weights`` the official checkpoint names and the local cache. Datasets live in ``loaders.datasets``
and ``loaders.transforms`` (imported by name, not re-exported here).
"""

from .npz import CheckpointError, infer_config, load_npz, read_npz, save_npz
from .weights import KNOWN_WEIGHTS, default_cache_dir, fetch_weights

__all__ = ["CheckpointError", "infer_config", "load_npz", "read_npz", "save_npz", "KNOWN_WEIGHTS",
           "default_cache_dir", "fetch_weights"]
