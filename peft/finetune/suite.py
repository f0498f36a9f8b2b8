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

Every run is a *cell* (:class:`Cell`: a final run, or a grid point of the sweep); any number of workers (this
command started several times on one ``--output-dir``, on any machines that share it) divide the cells between
them through claims, ``--shard K/N`` divides them by a fixed rule instead, and ``--devices`` runs one cell per
device at once (``peft.finetune.workers``). The results files are built from the cells finished on disk
(``peft.finetune.results``), so ``tools/vtab.py report <output-dir>`` shows the table at any time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loaders.atomic import file_lock
from loaders.datasets import load_dataset, select_classes
from loaders.datasets.fgvc import FGVC_SETS
from loaders.datasets.vtab import REHEARSAL_TASKS, VTAB_TASKS, write_vtab_task

from ..registry import METHOD_NAMES
from . import report, workers
from . import sweep as sweeps
from .options import RECIPES, FinetuneOptions, OptionsError, check_options
from .recipes import METHOD_RECIPES, RECIPE_TABLE, apply_recipe
from .results import (PUBLISHED_FGVC, PUBLISHED_VTAB, markdown, summarise,  # noqa: F401 (the suite's API)
                      write_results)
from .trainer import run
from ..fields import option

log = logging.getLogger(__name__)

SUITES = ("vtab", "fgvc")
# Options that say how this worker takes part, not what the suite is: left out of results.json and suite.json.
WORKER_FIELDS = ("shard", "devices", "devices_per_cell", "lease", "report")


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
    shard: str = option("", "K/N: only the cells i with i % N == K, no claims; slurm: K, N from the job array (default: claims)")
    devices: str = option("", "one cell per device at once, a process each: cuda:0,cuda:1,... (default: one at a time, here)")
    devices_per_cell: int = option(1, "with --devices: each cell spans this many of them through torchrun")
    lease: float = option(300.0, "seconds a claim's heartbeat may stay silent before another worker takes the cell over")
    report: bool = option(False, "only write results.* from the cells finished so far (also: tools/vtab.py report DIR)")


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
    kw["overwrite"] = not kw["resume"]  # a folder without a checkpoint holds nothing to continue: start afresh
    for field in ("epochs", "image_size", "batch_size", "max_train_samples", "precision"):
        if getattr(o, field):
            kw[field] = getattr(o, field)
    kw = sweeps.apply_point({k: v for k, v in kw.items() if v is not None}, point or {})
    kw["explicit"] = sorted([k for k in kw if k != "method_options"] + list(kw["method_options"]))  # as the CLI
    return FinetuneOptions(**kw)


@dataclass
class Cell:
    """One run of the suite: a folder under --output-dir, run by exactly one worker."""
    key: str  # the folder under --output-dir: <task>/<mode>/seed-<s>, or <task>/<mode>/sweep/<point>/seed-<s>
    task: str
    mode: str
    seed: int
    point: dict | None = option(None, "a grid point (a tuning run); None for a final run")
    needs: tuple = option((), "keys of the grid cells a final run waits for (it runs the point chosen from them)")


@dataclass
class Suite:
    """What a suite command asks for: its options, names, grid and cells (in the order one worker runs them)."""
    o: SuiteOptions
    tasks: list
    modes: list
    seeds: list
    grid: list
    cells: list

    @property
    def out(self) -> Path:
        return Path(self.o.output_dir)

    @property
    def record(self) -> dict:
        return suite_record(self.o)

    def done(self, cell: Cell) -> bool:
        return (self.out / cell.key / "metrics.json").is_file()

    def metrics(self, cell: Cell) -> dict | None:
        path = self.out / cell.key / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def ready(self, cell: Cell) -> bool:
        return all((self.out / key / "metrics.json").is_file() for key in cell.needs)

    def grid_cells(self, task: str, mode: str) -> list[Cell]:
        return [c for c in self.cells if c.task == task and c.mode == mode and c.point is not None]

    def sweep_record(self, task: str, mode: str) -> dict | None:
        """The choice on validation from the finished grid of (task, mode); None while a grid point is missing."""
        scores = []
        for point in sweeps.grid_points(self.grid):
            ms = [self.metrics(c) for c in self.grid_cells(task, mode) if c.point == point]
            if not ms or any(m is None for m in ms):
                return None
            accs = [m["val_accuracy"] for m in ms]
            scores.append({"point": point, "val_accuracy": float(np.mean(accs)), "val_accuracies": accs})
        best = sweeps.choose(scores)
        return {"grid": [[k, v] for k, v in self.grid], "scores": scores, "chosen": best["point"],
                "chosen_val_accuracy": best["val_accuracy"], "tie_rule": sweeps.TIE_RULE,
                "tuned_on": "train800 -> val200" if self.o.suite == "vtab" else "train -> val"}

    def options(self, cell: Cell) -> FinetuneOptions:
        """The cell's run, as it is when the cell starts (resumed if its folder holds a checkpoint)."""
        folder = self.out / cell.key
        if cell.point is not None:
            return run_options(self.o, cell.task, cell.mode, cell.seed, folder, cell.point, protocol="tune")
        point = None
        if self.grid:
            record = self.sweep_record(cell.task, cell.mode)
            if record is None:
                raise RuntimeError(f"cell {cell.key} started before its grid was complete")  # the workers wait
            point = record["chosen"]
            log.info("%s / %s: chose %s (val accuracy %.4f)", cell.task, cell.mode, sweeps.point_name(point),
                     record["chosen_val_accuracy"])
        return run_options(self.o, cell.task, cell.mode, cell.seed, folder, point)

    def label(self, cell: Cell) -> str:
        name = f" / {sweeps.point_name(cell.point)}" if cell.point is not None else ""
        return f"{cell.task} / {cell.mode}{name} / seed {cell.seed}" + (" (tune)" if cell.point is not None else "")


def plan(o: SuiteOptions) -> Suite:
    """The suite's cells, checked: per task and mode its grid points (the first --sweep varying slowest, then the
    seeds), then its final runs; every run's options are checked before the first run starts."""
    tasks, modes = task_names(o), mode_names(o)
    try:
        seeds = [int(s) for s in o.seeds.split(",") if s.strip()]
    except ValueError:
        raise OptionsError(f"--seeds {o.seeds!r}: expected comma-separated integers") from None
    if not seeds:
        raise OptionsError("--seeds: none given")
    grid = sweeps.parse_grid(o.sweep)
    if grid and o.protocol != "final":
        raise OptionsError("--sweep tunes on validation and then runs the final protocol; drop --protocol tune")
    out = Path(o.output_dir)
    first = sweeps.grid_points(grid)[0] if grid else None
    for task in tasks:  # every run's options checked before the first run starts (a bad combination fails now)
        for mode in modes:
            check_options(apply_recipe(run_options(o, task, mode, seeds[0], out / task / mode, first)))
    cells = []
    for task in tasks:
        for mode in modes:
            grid_keys = []
            for point in sweeps.grid_points(grid) if grid else []:
                for seed in seeds:
                    key = f"{task}/{mode}/sweep/{sweeps.point_name(point)}/seed-{seed}"
                    cells.append(Cell(key, task, mode, seed, point))
                    grid_keys.append(key)
            cells += [Cell(f"{task}/{mode}/seed-{seed}", task, mode, seed, needs=tuple(grid_keys)) for seed in seeds]
    return Suite(o, tasks, modes, seeds, grid, cells)


def prepare(o: SuiteOptions) -> Suite:
    """The rehearsal's data (once), the plan, and ``suite.json`` (what ``tools/vtab.py report DIR`` reads)."""
    workers.check(o)
    if o.rehearsal:
        if not o.data_root:
            raise OptionsError("--rehearsal writes its Fashion-MNIST tasks into --data-root: give one")
        if not o.report:
            with file_lock(Path(o.data_root) / "rehearsal", "the rehearsal's tasks"):  # several workers at once
                make_rehearsal(Path(o.data_root))
    suite = plan(o)
    if not o.report:
        suite.out.mkdir(parents=True, exist_ok=True)
        report.write_json(suite_record(o), suite.out / "suite.json")
    return suite


def suite_record(o: SuiteOptions) -> dict:
    """The options that define the suite's cells and results (not how one worker takes part)."""
    return {k: v for k, v in dataclasses.asdict(o).items() if k not in WORKER_FIELDS}


def run_cell(suite: Suite, cell: Cell) -> dict:
    """Run one cell in this process (a cell finished meanwhile is not run again)."""
    if suite.done(cell):
        log.info("%s: finished earlier, skipped", suite.label(cell))
        return suite.metrics(cell)
    opts = suite.options(cell)
    log.info("%s", suite.label(cell))
    return run(opts)


def run_suite(o: SuiteOptions) -> dict:
    """Every requested task × mode × seed this worker gets (finished ones skipped), then the results files."""
    suite = prepare(o)
    if not o.report:
        workers.work(suite, run_cell)
    return write_results(suite)
