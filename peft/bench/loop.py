"""The training loop's own cost: step time with the loop's numbers read back every step vs every 50 steps.

``tools/benchmark.py --loop`` runs real ``tools/finetune.py`` epochs (full fine-tuning of ``--model`` from scratch
on the ``synthetic`` dataset at 32 px, batch 64) once with ``--log-every 1`` and once with ``--log-every 50``,
interleaved ``repeats`` times, and reports the median training images per second of each. On a GPU every read
(``.item()``) waits for the device, so the difference is what the loop's host synchronisation costs; on a CPU
a read costs nothing and the two should agree within noise.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def run_loop_benchmark(output_dir: str, model: str = "ViT-B/16", device: str = "auto", repeats: int = 3,
                       log_every=(1, 50), batch_size: int = 64, epochs: int = 1, threads: int | None = None) -> dict:
    from ..finetune import FinetuneOptions, run  # the engine itself: what users run

    rates: dict[int, list[float]] = {k: [] for k in log_every}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for every in log_every:  # interleaved, so drifting load hits both alike
                opts = FinetuneOptions(mode="full", weights="none", model=model, data="synthetic", image_size=32,
                                       val_fraction=0.0, max_eval_samples=64, epochs=epochs, batch_size=batch_size,
                                       device=device, progress=False, log_every=every, threads=threads,
                                       output_dir=str(Path(tmp) / f"run-{every}-{rep}"))
                rates[every].append(run(opts)["images_per_second"])
    result = {"model": model, "device": device, "batch_size": batch_size, "repeats": repeats, "threads": threads,
              "train_images_per_second": {str(k): statistics.median(v) for k, v in rates.items()},
              "all": {str(k): v for k, v in rates.items()}}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loop.json").write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result["train_images_per_second"].items():
        print(f"--log-every {k:>3}: {v:9.1f} training img/s (median of {repeats})")
    return result
