"""The results files of a suite, built from the cells finished on disk: ``results.json`` / ``.csv`` / ``.md`` /
``.png`` (see ``peft.finetune.suite``).

Every worker rewrites them after each cell it finishes, and ``tools/vtab.py report DIR`` at any time; they are
read from the run folders in the suite's own order, so they are the same whichever worker ran which cell, and a
partial table says how many cells are missing. Writers do not lock: each file is replaced atomically, and a
writer that finds more cells finished after its write than before it writes again, so the last write of a
complete suite is complete.
"""

from __future__ import annotations

import csv
import io
import logging

import numpy as np
from matplotlib.figure import Figure

from loaders.atomic import atomic_write
from loaders.datasets.vtab import GROUPS, REHEARSAL_TASKS, VTAB_TASKS, task_info

from . import report
from . import sweep as sweeps

log = logging.getLogger(__name__)

# The RLRR paper (Dong et al., CVPR 2024), Tables 2-3, ViT-B/16 ImageNet-21k: VTAB-1k group means, the mean of
# the 19 tasks, the mean of the three group means; FGVC mean of the five sets. None: not published there.
PUBLISHED_VTAB = {  # mode: (Natural, Specialized, Structured, mean of 19 tasks, mean of group means)
    "rlrr": (82.7, 85.8, 61.8, 74.5, 76.75), "lora": (79.5, 84.6, 59.8, 72.3, 74.6),
    "ssf": (81.6, 86.6, 59.0, 73.1, 75.7), "full": (75.9, 83.4, 47.6, 65.6, 68.96),
    "head": (68.9, 77.2, 26.9, 52.9, 57.6), "vpt": (None, None, None, 69.4, None),
}
PUBLISHED_FGVC = {"rlrr": 90.4, "ssf": 90.7, "lora": 89.5, "full": 88.5, "head": 79.3}



def _accuracy(m: dict) -> tuple[float, str]:
    if m.get("test_accuracy") is not None:
        return m["test_accuracy"], m["splits"]["test"]
    return m["val_accuracy"], m["splits"]["val"]


def summarise(rows: list[dict]) -> dict:
    """Per task and mode (mean over seeds), and per mode the means named as the field names them."""
    tasks: dict = {}
    for r in rows:
        acc, split = _accuracy(r)
        entry = tasks.setdefault(r["task"], {}).setdefault(r["mode"], {
            "accuracies": [], "split": split, "trainable_parameters": r["trainable_parameters"],
            "epochs": r["epochs"], "seconds": 0.0, "selected_on": r.get("selected_on"), "splits": r.get("splits")})
        entry["accuracies"].append(acc)
        entry.setdefault("official_accuracies", []).append(r.get("test_accuracy_official"))
        entry["seconds"] += r["time_seconds"]
        entry["recipe"] = r.get("recipe")
    for per_mode in tasks.values():
        for e in per_mode.values():
            e["accuracy"] = float(np.mean(e["accuracies"]))
            e["test_accuracy"] = e["accuracy"] if e["split"] in ("test",) else None
            official = e.pop("official_accuracies")
            # the official loops' number (max over per-epoch tests: test-selected), where every seed has one
            e["test_accuracy_official"] = float(np.mean(official)) if all(a is not None for a in official) else None
    summary = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        accs = {t: per[mode]["accuracy"] for t, per in tasks.items() if mode in per}
        groups: dict = {}
        for t, a in accs.items():
            groups.setdefault(task_info(t).group if t in VTAB_TASKS or t in REHEARSAL_TASKS else "FGVC", []).append(a)
        group_means = {g: float(np.mean(v)) for g, v in groups.items()}
        # Counts vary per task (the head's classes; FacT's per-task rank): each task's, and their mean (what the
        # tables print as a method's parameter count).
        counts = {t: per[mode]["trainable_parameters"] for t, per in tasks.items() if mode in per}
        summary[mode] = {"mean_of_tasks": float(np.mean(list(accs.values()))),
                         "mean_of_groups": float(np.mean(list(group_means.values()))),
                         "groups": group_means, "tasks_run": len(accs),
                         "trainable_parameters_per_task": counts,
                         "trainable_parameters_mean": float(np.mean(list(counts.values())))}
    return {"tasks": tasks, "summary": summary}


def _official_table(tasks: dict, names: list) -> list[str]:
    modes = list(dict.fromkeys(m for per in tasks.values() for m, e in per.items()
                               if e.get("test_accuracy_official") is not None))
    if not modes:
        return []
    lines = ["", "test_accuracy_official (%): the maximum test accuracy over the per-epoch evaluations, computed as "
             "the official code computes and reports it. The test set selects the epoch here, so this is not a "
             "held-out estimate; it is for comparison with the published tables only.", "",
             "| mode | " + " | ".join(names) + " | mean of tasks |", "|" + "---|" * (len(names) + 2)]
    for mode in modes:
        vals = [tasks[t][mode].get("test_accuracy_official") if mode in tasks[t] else None for t in names]
        cells = [f"{100 * v:.1f}" if v is not None else "–" for v in vals]
        got = [v for v in vals if v is not None]
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {100 * float(np.mean(got)):.1f} |")
    return lines


def _chosen_table(chosen: dict) -> list[str]:
    if not chosen:
        return []
    lines = ["", f"Hyper-parameters chosen on validation ({sweeps.TIE_RULE}), then tested once:", "",
             "| task | mode | chosen | val accuracy | grid scores (val) |", "|---|---|---|---|---|"]
    for task, per in chosen.items():
        for mode, rec in per.items():
            scores = "; ".join(f"{sweeps.point_name(s['point'])}: {100 * s['val_accuracy']:.1f}" for s in rec["scores"])
            lines.append(f"| {task} | {mode} | {sweeps.point_name(rec['chosen'])} | "
                         f"{100 * rec['chosen_val_accuracy']:.1f} | {scores} |")
    return lines


def markdown(o, results: dict) -> str:
    tasks, summary = results["tasks"], results["summary"]
    names = list(tasks)
    groups = [g for g in GROUPS + ("Rehearsal", "FGVC") if any(g in s["groups"] for s in summary.values())]
    split = next(iter(next(iter(tasks.values())).values()))["split"] if tasks else "test"
    head = ["mode"] + names + [f"{g} mean" for g in groups] + ["mean of tasks", "mean of group means", "params"]
    lines = [f"test_accuracy (%): accuracy on each task's {split} split of the model the protocol chose without "
             f"looking at test ({o.protocol} protocol: the last epoch, or the best on validation), recipe {o.recipe}; "
             "'mean of tasks' averages the tasks run, 'mean of group means' averages the group means present "
             "(NOAH-style tables print the latter, the RLRR paper the former).", ""]
    cells = results.get("cells")
    if cells and cells["missing"]:
        lines += [f"Partial: {cells['finished']} of {cells['total']} cells finished, {len(cells['missing'])} missing "
                  "(means are over the cells finished so far).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, s in summary.items():
        cells = [f"{100 * tasks[t][mode]['accuracy']:.1f}" if mode in tasks[t] else "–" for t in names]
        cells += [f"{100 * s['groups'][g]:.1f}" if g in s["groups"] else "–" for g in groups]
        counts = s["trainable_parameters_per_task"]
        params = f"{next(iter(counts.values())):,}" if len(set(counts.values())) == 1 else \
            f"{s['trainable_parameters_mean']:,.0f} (mean; per task: {', '.join(f'{n:,}' for n in counts.values())})"
        lines.append("| " + " | ".join([mode] + cells + [f"{100 * s['mean_of_tasks']:.1f}",
                                                        f"{100 * s['mean_of_groups']:.1f}", params]) + " |")
    if o.suite == "vtab" and not o.rehearsal:
        lines += ["", "Published (RLRR paper, Table 2; ViT-B/16 ImageNet-21k, all 19 tasks):", "",
                  "| mode | Natural | Specialized | Structured | mean of 19 tasks | mean of group means |",
                  "|---|---|---|---|---|---|"]
        for mode, row in PUBLISHED_VTAB.items():
            lines.append(f"| {mode} (paper) | " + " | ".join("–" if v is None else f"{v}" for v in row) + " |")
    lines += _official_table(tasks, names) + _chosen_table(results.get("chosen", {}))
    if o.suite == "fgvc":
        lines += ["", "Published FGVC mean of the five sets (RLRR paper, Table 3): " +
                  ", ".join(f"{m} {v}" for m, v in PUBLISHED_FGVC.items())]
    return "\n".join(lines) + "\n"


def plot(results: dict, path) -> None:
    tasks, summary = results["tasks"], results["summary"]
    modes, names = list(summary), list(tasks)
    fig = Figure(figsize=(max(6.0, 1.5 + 0.25 * len(names) * max(1, len(modes))), 4.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(modes))
    values = [100 * e["accuracy"] for per in tasks.values() for e in per.values()]
    for j, mode in enumerate(modes):
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [100 * tasks[t][mode]["accuracy"] if mode in tasks[t] else 0 for t in names], width, label=mode)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(max(0.0, min(values, default=0) - 10), min(100.0, max(values, default=100) + 3))
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    if modes:
        ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")


def collect(suite) -> dict:
    """The results of the finished cells of ``suite`` (a ``peft.finetune.suite.Suite``), in the suite's order."""
    rows, chosen, missing = [], {}, [c.key for c in suite.cells if not suite.done(c)]
    for cell in suite.cells:
        if cell.point is None:
            metrics = suite.metrics(cell)
            if metrics is not None:
                rows.append({"task": cell.task, "mode": cell.mode, "seed": cell.seed, **metrics})
    if suite.grid:
        for task in suite.tasks:
            for mode in suite.modes:
                record = suite.sweep_record(task, mode)
                if record is not None:
                    chosen.setdefault(task, {})[mode] = record
    cells = {"total": len(suite.cells), "finished": len(suite.cells) - len(missing), "missing": missing}
    return {"options": suite.record, **summarise(rows), "chosen": chosen, "cells": cells}


def write_results(suite) -> dict:
    """Write results.json / .csv / .md / .png from the cells finished now; again while more finish meanwhile."""
    while True:
        results = collect(suite)
        write_files(suite.o, results, suite.out)
        if sum(suite.done(c) for c in suite.cells) == results["cells"]["finished"]:
            return results


def write_files(o, results: dict, out) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, out / "results.json")
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["task", "group", "mode", "accuracy", "split", "test_accuracy_official", "seeds",
                "trainable_parameters", "epochs", "seconds"])
    for t, per in results["tasks"].items():
        group = task_info(t).group if o.suite == "vtab" else "FGVC"
        for mode, e in per.items():
            official = e.get("test_accuracy_official")
            w.writerow([t, group, mode, f"{e['accuracy']:.6f}", e["split"],
                        "" if official is None else f"{official:.6f}", len(e["accuracies"]),
                        e["trainable_parameters"], e["epochs"], f"{e['seconds']:.1f}"])
    report.write_text(text.getvalue(), out / "results.csv")
    report.write_text(markdown(o, results), out / "results.md")
    with atomic_write(out / "results.png") as f:
        plot(results, f)
