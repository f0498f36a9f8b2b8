"""The data layer's rates and memory, measured side by side in one run (``tools/benchmark.py --data``).

Rows:

* **cold decode, per worker**: images/s of one process turning JPEG files into stored pixels
  (``decode_for_store``: reduced-size JPEG decoding, EXIF, resize to the stored shorter side), for 12-megapixel
  (4032 × 3024) and for 500 × 375 JPEGs, each interleaved image by image with a plain full-resolution
  ``Image.open(f).convert("RGB")`` of the same file, so machine load hits both alike;
* **cached delivery**: images/s from the memory-mapped cache to uint8 batches of 128 (warm page cache), with and
  without the training transform at 224 (random resized crop + flip, one thread);
* **RssAnon, 1× vs 10×**: a fresh process opens the cache of a folder and streams one epoch of batches through
  the transform; its peak anonymous memory (``RssAnon`` sampled after every batch) for the folder and for ten
  copies of it. The pixels are file-backed (page cache), so this should not grow with the folder.

The photos are written by :mod:`peft.bench.photos` into a temporary folder (or ``--data-dir``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from loaders.images import StorePolicy, decode_for_store

from .photos import write_photo_folder

log = logging.getLogger(__name__)

PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
PACKAGE = __name__.split(".")[0]


def rss_anon_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def decode_rates(files: list[Path], policy: StorePolicy, repeats: int = 2) -> dict:
    """Images/s of decode_for_store and of a plain full-resolution decode, interleaved file by file."""
    ours = plain = 0.0
    for _ in range(repeats):
        for f in files:
            t = time.perf_counter()
            decode_for_store(f, policy)
            ours += time.perf_counter() - t
            t = time.perf_counter()
            with Image.open(f) as im:
                im.convert("RGB")
            plain += time.perf_counter() - t
    n = repeats * len(files)
    return {"images": n, "stored_per_s": n / ours, "plain_full_decode_per_s": n / plain, "speedup": plain / ours}


def stream_epoch(folder: str, image_size: int, batch_size: int, transform: bool) -> dict:
    """One pass over a folder's cache in shuffled batches: images/s and peak RssAnon (MiB)."""
    from loaders.datasets import open_source
    from loaders.datasets.stream import BatchStream
    from loaders.transforms import BatchTransform

    torch.set_num_threads(1)
    src = open_source(folder, StorePolicy.for_photos(image_size), progress=False)
    ds = src.dataset
    tf = BatchTransform(image_size, train=True, crop="resized")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ds), generator=g)
    for _ in BatchStream(ds, order[: batch_size * 2].split(batch_size), "cpu"):  # warm the page cache
        pass
    for b in BatchStream(ds, order.split(batch_size), "cpu"):
        pass
    peak = rss_anon_mib() or 0.0
    start, n = time.perf_counter(), 0
    for b in BatchStream(ds, order.split(batch_size), "cpu"):
        if transform:
            tf(b.images, g, b.sizes)
        n += b.images.shape[0]
        peak = max(peak, rss_anon_mib() or 0.0)
    seconds = time.perf_counter() - start
    return {"images": n, "per_s": n / seconds, "peak_rss_anon_mib": peak, "decoded": src.counts}


def _in_fresh_process(folder: Path, image_size: int, batch_size: int, transform: bool) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {PACKAGE_PARENT!r}); "
            f"from {PACKAGE}.bench.data import stream_epoch; "
            f"print(json.dumps(stream_epoch({str(folder)!r}, {image_size}, {batch_size}, {transform})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise RuntimeError(f"data benchmark worker failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ten_copies(folder: Path, ten: Path) -> None:
    """Ten copies of a folder as hard links: other paths, so decoded and stored again, no extra disk for JPEGs."""
    for c in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for k in range(10):
            (ten / c.name / f"copy{k}").mkdir(parents=True, exist_ok=True)
            for f in c.glob("*.jpg"):
                os.link(f, ten / c.name / f"copy{k}" / f.name)


def run_data_benchmark(output_dir: str | Path, photos: int = 100, image_size: int = 224, batch_size: int = 128,
                       data_dir: str | Path | None = None) -> dict:
    """Every row above; writes data_benchmark.json and data_benchmark.md into output_dir and returns them.
    ``photos``: the 500 × 375 folder of the memory rows (1×; 10× is ten hard-linked copies)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="vit-peft-data-bench-"))
    os.environ.pop("VIT_PEFT_CACHE", None)  # caches beside the photos, removed with them
    try:
        big, small = work / "decode-12mp", work / "photos"
        if not big.is_dir():
            log.info("writing 10 photos of 12 MP and %d of 500x375 into %s", photos, work)
            write_photo_folder(big, classes=1, per_class=10, size=(4032, 3024), small=(4032, 3024), awkward=False)
            write_photo_folder(small, classes=2, per_class=photos // 2, size=(500, 375), awkward=False)
            _ten_copies(small, work / "photos10")
        policy = StorePolicy.for_photos(image_size)
        log.info("cold decode rates (one worker, interleaved with a plain full decode)")
        report = {"image_size": image_size, "batch_size": batch_size, "photos": photos,
                  "decode_12mp": decode_rates(sorted(big.rglob("*.jpg")), policy),
                  "decode_500x375": decode_rates(sorted(small.rglob("*.jpg"))[:50], policy, repeats=3)}
        log.info("RssAnon at 1x (%d photos) and 10x (%d photos), batches of 32", photos, 10 * photos)
        report["stream_1x"] = _in_fresh_process(small, image_size, 32, transform=True)
        report["stream_10x"] = _in_fresh_process(work / "photos10", image_size, 32, transform=True)
        log.info("cached delivery, batches of %d", batch_size)
        report["delivery"] = _in_fresh_process(work / "photos10", image_size, batch_size, transform=False)
        report["delivery_transform"] = _in_fresh_process(work / "photos10", image_size, batch_size, transform=True)
        report["rss_anon_growth_mib"] = (report["stream_10x"]["peak_rss_anon_mib"]
                                         - report["stream_1x"]["peak_rss_anon_mib"])
    finally:
        if data_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    (out / "data_benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "data_benchmark.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(r: dict) -> str:
    d12, d5 = r["decode_12mp"], r["decode_500x375"]
    one, ten, dl, dlt = r["stream_1x"], r["stream_10x"], r["delivery"], r["delivery_transform"]
    rows = [
        "| row | one core | beside it |",
        "|---|---:|---|",
        f"| cold decode, 12 MP JPEG → stored 256 px | {d12['stored_per_s']:.1f} img/s | plain full-size decode "
        f"{d12['plain_full_decode_per_s']:.1f} img/s: {d12['speedup']:.1f}× faster |",
        f"| cold decode, 500×375 JPEG → stored 256 px | {d5['stored_per_s']:.0f} img/s | plain full-size decode "
        f"{d5['plain_full_decode_per_s']:.0f} img/s (no resize) |",
        f"| cached delivery, uint8 batches of {r['batch_size']} | {dl['per_s']:.0f} img/s | warm page cache |",
        f"| cached delivery + random-resized-crop to {r['image_size']} | {dlt['per_s']:.0f} img/s | the device "
        "transform run on this CPU, 1 thread |",
        f"| peak RssAnon, 1× ({one['images']} photos) | {one['peak_rss_anon_mib']:.0f} MiB | streaming one epoch |",
        f"| peak RssAnon, 10× ({ten['images']} photos) | {ten['peak_rss_anon_mib']:.0f} MiB | "
        f"{r['rss_anon_growth_mib']:+.0f} MiB |",
    ]
    return "\n".join(rows) + "\n"
