"""A benchmark suite as one command: every task × method × seed, resumable, with the paper's numbers beside ours.

``run_suite(SuiteOptions(...))`` fine-tunes each (task, mode, seed) into ``<output-dir>/<task>/<mode>/seed-<s>``
through the engine of ``tools/finetune.py`` (so each run keeps its own protocol: VTAB-1k "final" trains on
train800val200 and tests once at the end; "tune" trains on train800 and selects and reports on val200; FGVC
selects on val and reports test). A run whose ``metrics.json`` exists is finished and skipped on restart; one
interrupted half-way resumes from its checkpoint. After every run the results are written again:
``results.json`` (per task and mode, and a ``summary`` per mode: ``mean_of_tasks`` over the tasks run,
``mean_of_groups`` over the Natural / Specialized / Structured means present, and the group means),
``results.csv``, ``results.md`` (the RLRR paper's published rows beside ours, each mean named) and
``results.png``.

``--recipe official`` gives each method its own official run (``peft.finetune.recipes.METHOD_RECIPES``: RLRR,
SSF, LoRA and the Adapter as NOAH ran them, FacT-TT, VPT; the other methods, and the benchmarks a recipe does not
cover, run rlrr-official's protocol at the method's own learning rate). Runs of
an official recipe also test after every epoch as the official loop does, and their results carry
``test_accuracy_official`` (the maximum over those epochs: test-selected, labelled so) beside ``test_accuracy``.
``--sweep NAME=V1,V2`` chooses hyper-parameters on validation first (``peft.finetune.sweep``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from loaders.datasets import load_dataset, select_classes
from loaders.datasets.fgvc import FGVC_SETS
from loaders.datasets.vtab import GROUPS, REHEARSAL_TASKS, VTAB_TASKS, task_info, write_vtab_task

from ..registry import METHOD_NAMES
from . import sweep as sweeps
from .options import RECIPES, FinetuneOptions, OptionsError, check_options
from .recipes import METHOD_RECIPES, RECIPE_TABLE, apply_recipe
from .trainer import run
from ..fields import option

log = logging.getLogger(__name__)

SUITES = ("vtab", "fgvc")
# The RLRR paper (Dong et al., CVPR 2024), Tables 2-3, ViT-B/16 ImageNet-21k: VTAB-1k group means, the mean of
# the 19 tasks, the mean of the three group means; FGVC mean of the five sets. None: not published there.
PUBLISHED_VTAB = {  # mode: (Natural, Specialized, Structured, mean of 19 tasks, mean of group means)
    "rlrr": (82.7, 85.8, 61.8, 74.5, 76.75), "lora": (79.5, 84.6, 59.8, 72.3, 74.6),
    "ssf": (81.6, 86.6, 59.0, 73.1, 75.7), "full": (75.9, 83.4, 47.6, 65.6, 68.96),
    "head": (68.9, 77.2, 26.9, 52.9, 57.6), "vpt": (None, None, None, 69.4, None),
}
PUBLISHED_FGVC = {"rlrr": 90.4, "ssf": 90.7, "lora": 89.5, "full": 88.5, "head": 79.3}


@dataclass
class SuiteOptions:
    data_root: str = option("", "folder with one sub-folder per VTAB-1k task, or VPT's FGVC folders")
    suite: str = option("vtab", "vtab | fgvc", choices=SUITES)
    tasks: str = option("all", "all, or comma-separated task names (vtab-1k tasks / fgvc: cub,nabirds,flowers,dogs,cars)")
    modes: str = option("rlrr", "comma-separated methods, or all")
    weights: str = option("ViT-B_16", "base weights (a .npz path or a known name)")
    output_dir: str = option("runs/vtab", "one folder per task/mode/seed, and the results files")
    protocol: str = option("final", "vtab-1k: final (train800val200 -> test once) | tune (train800 -> val200)", choices=("final", "tune"))
    recipe: str = option("rlrr-official", "official (each method's own official run) | a recipe name (all methods) | project", choices=("official",) + RECIPES)
    epochs: int = option(0, "0: the recipe's (100)")
    seeds: str = option("42", "comma-separated seeds; results are their mean")
    image_size: int = option(0, "0: the recipe's (224)")
    batch_size: int = option(0, "0: the recipe's (32)")
    max_train_samples: int = option(0, "0: every image of the training list")
    precision: str = option("", "\"\": the recipe's (official runs: fp16) | auto | bf16 | fp16 | fp32 (e.g. fp32 on a CPU)")
    rehearsal: bool = option(False, "the offline rehearsal: Fashion-MNIST cut VTAB-style into --data-root (tasks: fmnist_*)")
    device: str = option("auto", "auto | cpu | cuda")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    progress: bool = option(True, "tqdm progress bars")
    sweep: list = option(help="NAME=V1,V2,...: choose on validation, then test once (repeatable)", default_factory=list)


def task_names(o: SuiteOptions) -> list[str]:
    known = list(FGVC_SETS) if o.suite == "fgvc" else list(REHEARSAL_TASKS if o.rehearsal else VTAB_TASKS)
    names = known if o.tasks == "all" else [t.strip() for t in o.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in known and not (o.suite == "vtab" and t in REHEARSAL_TASKS)]
    if unknown or not names:
        raise OptionsError(f"--tasks: {', '.join(unknown) or 'none given'}; the {o.suite} tasks are {', '.join(known)}")
    return names


def mode_names(o: SuiteOptions) -> list[str]:
    names = list(METHOD_NAMES) if o.modes == "all" else [m.strip() for m in o.modes.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHOD_NAMES]
    if unknown or not names:
        raise OptionsError(f"--modes: {', '.join(unknown) or 'none given'} is not one of {', '.join(METHOD_NAMES)} (or all)")
    return names


def make_rehearsal(root: Path, data_root=None) -> list[str]:
    """Two VTAB-style tasks from real Fashion-MNIST (classes 0-4 and 5-9; 800/200/1000 images) under ``root``."""
    names = []
    for task, classes in (("fmnist_clothes", "0-4"), ("fmnist_shoes_bags", "5-9")):
        folder = Path(root) / task
        if not (folder / "test.txt").is_file():
            train = select_classes(load_dataset("fashion_mnist", data_root, "train"), classes)
            test = select_classes(load_dataset("fashion_mnist", data_root, "test"), classes)
            write_vtab_task(folder, train, test, seed=len(names))
        names.append(task)
    return names


def recipe_for(o: SuiteOptions, mode: str) -> str:
    """The recipe a mode runs under: ``official`` picks the method's own where it covers the benchmark, else
    rlrr-official's protocol at the method's own learning rate."""
    if o.recipe == "official":
        name = METHOD_RECIPES.get(mode)
        kind = "fgvc" if o.suite == "fgvc" else "vtab-1k"
        return name if name and kind in RECIPE_TABLE[name].benchmarks else "rlrr-official"
    return o.recipe


def run_options(o: SuiteOptions, task: str, mode: str, seed: int, out: Path, point: dict | None = None,
                protocol: str | None = None) -> FinetuneOptions:
    """One run's options. What the suite sets (seed, the sizes given, a grid point's values) is explicit: it wins
    over the recipe."""
    data = f"fgvc:{task}" if o.suite == "fgvc" else f"vtab-1k:{task}"
    kw = dict(mode=mode, weights=o.weights, data=data, data_root=o.data_root or None, protocol=protocol or o.protocol,
              recipe=recipe_for(o, mode), seed=seed, device=o.device, threads=o.threads or None, progress=o.progress,
              output_dir=str(out), resume=(out / "checkpoint.pt").is_file())
    for field in ("epochs", "image_size", "batch_size", "max_train_samples", "precision"):
        if getattr(o, field):
            kw[field] = getattr(o, field)
    kw = sweeps.apply_point(kw, point or {})
    kw["explicit"] = sorted(k for k in kw if k != "method_options")
    return FinetuneOptions(**kw)


def _finished_or_run(opts: FinetuneOptions, label: str) -> dict:
    done = Path(opts.output_dir) / "metrics.json"
    if done.is_file():
        log.info("%s: finished earlier, skipped", label)
        return json.loads(done.read_text())
    log.info("%s", label)
    return run(opts)


def sweep_task(o: SuiteOptions, task: str, mode: str, seeds: list[int], grid, out: Path) -> dict:
    """Every grid point on the tuning split, the choice by validation accuracy; returns the sweep record."""
    scores = []
    for point in sweeps.grid_points(grid):
        name = sweeps.point_name(point)
        accs = []
        for seed in seeds:
            folder = out / task / mode / "sweep" / name / f"seed-{seed}"
            m = _finished_or_run(run_options(o, task, mode, seed, folder, point, protocol="tune"),
                                 f"{task} / {mode} / {name} / seed {seed} (tune)")
            accs.append(m["val_accuracy"])
        scores.append({"point": point, "val_accuracy": float(np.mean(accs)), "val_accuracies": accs})
    best = sweeps.choose(scores)
    log.info("%s / %s: chose %s (val accuracy %.4f)", task, mode, sweeps.point_name(best["point"]),
             best["val_accuracy"])
    return {"grid": [[k, v] for k, v in grid], "scores": scores, "chosen": best["point"],
            "chosen_val_accuracy": best["val_accuracy"], "tie_rule": sweeps.TIE_RULE,
            "tuned_on": "train800 -> val200" if o.suite == "vtab" else "train -> val"}


def run_suite(o: SuiteOptions) -> dict:
    """Every requested task × mode × seed (finished ones skipped), then the results files."""
    if o.rehearsal:
        if not o.data_root:
            raise OptionsError("--rehearsal writes its Fashion-MNIST tasks into --data-root: give one")
        make_rehearsal(Path(o.data_root))
    tasks, modes = task_names(o), mode_names(o)
    try:
        seeds = [int(s) for s in o.seeds.split(",") if s.strip()]
    except ValueError:
        raise OptionsError(f"--seeds {o.seeds!r}: expected comma-separated integers") from None
    grid = sweeps.parse_grid(o.sweep)
    if grid and o.protocol != "final":
        raise OptionsError("--sweep tunes on validation and then runs the final protocol; drop --protocol tune")
    out = Path(o.output_dir)
    first = sweeps.grid_points(grid)[0] if grid else None
    for task in tasks:  # every run's options checked before the first run starts (a bad combination fails now)
        for mode in modes:
            check_options(apply_recipe(run_options(o, task, mode, seeds[0], out / task / mode, first)))
    rows, chosen = [], {}
    for task in tasks:
        for mode in modes:
            point = None
            if grid:
                record = sweep_task(o, task, mode, seeds, grid, out)
                chosen.setdefault(task, {})[mode] = record
                point = record["chosen"]
            for seed in seeds:
                folder = out / task / mode / f"seed-{seed}"
                metrics = _finished_or_run(run_options(o, task, mode, seed, folder, point),
                                           f"{task} / {mode} / seed {seed}")
                rows.append({"task": task, "mode": mode, "seed": seed, **metrics})
                write_results(o, rows, out, chosen)
    return write_results(o, rows, out, chosen)


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


def markdown(o: SuiteOptions, results: dict) -> str:
    tasks, summary = results["tasks"], results["summary"]
    names = list(tasks)
    groups = [g for g in GROUPS + ("Rehearsal", "FGVC") if any(g in s["groups"] for s in summary.values())]
    split = next(iter(next(iter(tasks.values())).values()))["split"] if tasks else "test"
    head = ["mode"] + names + [f"{g} mean" for g in groups] + ["mean of tasks", "mean of group means", "params"]
    lines = [f"test_accuracy (%): accuracy on each task's {split} split of the model the protocol chose without "
             f"looking at test ({o.protocol} protocol: the last epoch, or the best on validation), recipe {o.recipe}; "
             "'mean of tasks' averages the tasks run, 'mean of group means' averages the group means present "
             "(NOAH-style tables print the latter, the RLRR paper the former).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
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


def plot(results: dict, path: Path) -> None:
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
    ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_results(o: SuiteOptions, rows: list[dict], out: Path, chosen: dict | None = None) -> dict:
    results = {"options": dataclasses.asdict(o), **summarise(rows), "chosen": chosen or {}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "group", "mode", "accuracy", "split", "test_accuracy_official", "seeds",
                    "trainable_parameters", "epochs", "seconds"])
        for t, per in results["tasks"].items():
            group = task_info(t).group if o.suite == "vtab" else "FGVC"
            for mode, e in per.items():
                official = e.get("test_accuracy_official")
                w.writerow([t, group, mode, f"{e['accuracy']:.6f}", e["split"],
                            "" if official is None else f"{official:.6f}", len(e["accuracies"]),
                            e["trainable_parameters"], e["epochs"], f"{e['seconds']:.1f}"])
    (out / "results.md").write_text(markdown(o, results))
    plot(results, out / "results.png")
    return results
