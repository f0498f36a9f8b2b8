"""Test-only generators of small trees in exactly the layouts people have on disk for VTAB-1k and FGVC.

VTAB-1k (the extracted release shared by NOAH / SSF / RLRR): ``<root>/<task>/`` with image files and the lists
``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt`` of ``relative/path label`` lines (the sizes
here are tiny: the code reads sizes from the lists, never from the names). FGVC (VPT's layout): ``<root>/<folder>/``
with ``train.json``, ``val.json``, ``test.json`` mapping image paths to the datasets' own class ids, images under
``images/`` for CUB and NABirds and directly in the folder for the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _image(path: Path, rng, size=(20, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def write_vtab_tree(root, task: str, num_classes: int, sizes=(12, 6, 10), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = Path(root) / task
    lines = {}
    for split, n in zip(("train800", "val200", "test"), sizes):
        rows = []
        for i in range(n):
            name = f"images/{split}/{i:04d}.jpg" if i % 2 else f"images/{split}/{i:04d}.png"
            _image(folder / name, rng)
            rows.append(f"{name} {int(rng.integers(num_classes)) if i >= num_classes else i % num_classes}")
        lines[split] = rows
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return folder


def write_fgvc_tree(root, folder_name: str, class_ids, images_dir: str = "", per_split=(2, 1, 1), seed: int = 0):
    rng = np.random.default_rng(seed)
    folder = Path(root) / folder_name
    base = folder / images_dir if images_dir else folder
    for split, n in zip(("train", "val", "test"), per_split):
        mapping = {}
        for c in class_ids:
            for k in range(n):
                name = f"{c:03d}.class/{split}_{k}.jpg"
                _image(base / name, rng, size=(12, 12))
                mapping[name] = int(c)
        (folder / f"{split}.json").write_text(json.dumps(mapping))
    return folder
