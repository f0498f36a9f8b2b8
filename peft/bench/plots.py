"""The benchmark chart: grouped bars of inference and training images/s and training peak memory per row."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def plot(results: list[dict], path: Path, title: str) -> None:
    """Grouped bars: inference img/s, training img/s and training peak memory per mode, one colour per batch."""
    ok = [r for r in results if "skipped" not in r and "error" not in r]
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    batches = sorted({r["batch_size"] for r in ok})
    panels = [("infer_img_s", "inference images/s"), ("train_img_s", "training images/s"),
              ("train_peak_mib", "training peak memory (MiB)")]
    fig = Figure(figsize=(min(24, 6 + 1.2 * len(modes)), 4.5))
    axes = fig.subplots(1, 3)
    width = 0.8 / max(1, len(batches))
    for ax, (key, label) in zip(axes, panels):
        for j, b in enumerate(batches):
            vals = [next((r.get(key) or 0 for r in ok if r["mode"] == m and r["batch_size"] == b), 0) for m in modes]
            xs = [i + (j - (len(batches) - 1) / 2) * width for i in range(len(modes))]
            ax.bar(xs, vals, width, label=f"batch {b}")
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(modes, rotation=45, ha="right")
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    if ok:
        axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
