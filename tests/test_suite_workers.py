"""A suite run by several workers at once: real `tools/vtab.py` processes on one folder, the tiny ViT, real files.

Each cell is run by exactly one worker and the results equal one worker's, cell for cell; a worker killed with
SIGKILL mid-cell leaves that cell to the next worker, which resumes it from its checkpoint; a job array's
environment splits the cells as --shard does; claims are exclusive among racing processes, a stale claim is taken
over by exactly one worker, and its old holder learns that it lost it. Every process has a deadline that fails
the test."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vit
from benchmark_trees import write_vtab_tree
from npz_factory import write_google_npz
from peft.cli import vtab as vtab_cli
from peft.finetune import OptionsError, load_checkpoint
from peft.finetune import claims as claims_mod
from peft.finetune.claims import Claims
from peft.finetune.suite import SuiteOptions, plan, run_suite
from peft.finetune.workers import cell_command, mine, option_flags, parse_devices, parse_shard

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 240
MODES, SWEEP = "head", ["lr=1e-3,1e-2"]  # two grid points, then the final run with the chosen one: three cells


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite-workers")
    write_vtab_tree(root / "vtab", "svhn", 10, seed=1)
    write_google_npz(root / "testing.npz", vit.get_config("testing"), seed=0)
    return root


def _options(tree, out, **kw) -> SuiteOptions:
    base = dict(data_root=str(tree / "vtab"), tasks="svhn", modes=MODES, weights=str(tree / "testing.npz"),
                output_dir=str(out), image_size=32, epochs=1, batch_size=4, device="cpu", progress=False, threads=1,
                lease=5.0, sweep=SWEEP)
    return SuiteOptions(**{**base, **kw})


def _command(o: SuiteOptions, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "vtab.py"), "--data-root", o.data_root, "--tasks", o.tasks,
            "--modes", o.modes, "--weights", o.weights, "--output-dir", o.output_dir, "--image-size",
            str(o.image_size), "--epochs", str(o.epochs), "--batch-size", str(o.batch_size), "--device", "cpu",
            "--no-progress", "--threads", "1", "--lease", str(o.lease), *[f"--sweep={s}" for s in o.sweep], *extra]


def _start(command) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def _finish(procs, deadline_s=DEADLINE_S) -> list[str]:
    """Every process's output; a process still running at the deadline fails the test (all are killed)."""
    end, outputs = time.monotonic() + deadline_s, []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, end - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a worker was still running after {deadline_s} s: {[p.args[-1] for p in procs]}")
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    return outputs


def _runs(texts) -> dict[str, list[str]]:
    """cell key -> the workers that ran it, from the workers' logs."""
    runs: dict[str, list[str]] = {}
    for text in texts:
        for key, who in re.findall(r"cell (\S+): run by worker (\S+)", text):
            runs.setdefault(key, []).append(who)
    return runs


def _per_cell(out: Path, suite) -> dict:
    """What each finished cell computed (wall times left out)."""
    table = {}
    for cell in suite.cells:
        m = json.loads((out / cell.key / "metrics.json").read_text())
        table[cell.key] = (m["test_accuracy"], m["test_loss"], m["val_accuracy"], m["trainable_parameters"],
                           m["epochs"], m["steps"])
    return table


def _table(results: dict) -> dict:
    tasks = {t: {m: {k: v for k, v in e.items() if k != "seconds"} for m, e in per.items()}
             for t, per in results["tasks"].items()}
    return {"tasks": tasks, "summary": results["summary"], "chosen": results["chosen"], "cells": results["cells"],
            "options": {k: v for k, v in results["options"].items() if k != "output_dir"}}


@pytest.fixture(scope="module")
def single(tree, tmp_path_factory):
    """The reference: one worker, in this process."""
    o = _options(tree, tmp_path_factory.mktemp("single") / "suite")
    return o, run_suite(o)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 3])
def test_workers_share_a_suite_each_cell_once_and_equal_one_worker(tree, tmp_path, single, workers):
    o = _options(tree, tmp_path / "suite")
    extra = [[]] * 2 + [["--devices", "cpu"]]  # the third worker runs each of its cells as a process of its own
    texts = _finish([_start(_command(o, *extra[i])) for i in range(workers)])
    suite = plan(o)
    runs = _runs(texts)
    assert sorted(runs) == sorted(c.key for c in suite.cells)
    assert all(len(who) == 1 for who in runs.values()), runs  # never two workers in one run folder
    ref_o, ref = single
    assert _per_cell(tmp_path / "suite", suite) == _per_cell(Path(ref_o.output_dir), plan(ref_o))
    results = json.loads((tmp_path / "suite" / "results.json").read_text())
    assert _table(results) == _table(json.loads((Path(ref_o.output_dir) / "results.json").read_text()))
    assert results["cells"] == {"total": 3, "finished": 3, "missing": []}
    assert list(results["chosen"]["svhn"]) == ["head"]
    assert not any((tmp_path / "suite" / ".claims").rglob("*.[0-9]"))  # finished cells leave no claims
    if workers == 3:  # the --devices worker's cells ran in processes given their device, logged per cell
        assert all("Traceback" not in p.read_text() for p in (tmp_path / "suite" / "logs").glob("*.log"))


@pytest.mark.slow
def test_a_worker_killed_mid_cell_leaves_it_to_the_next_which_resumes_it(tree, tmp_path, monkeypatch, caplog):
    o = _options(tree, tmp_path / "suite", modes="head", epochs=40, batch_size=1, sweep=[])
    first = tmp_path / "suite" / "svhn" / "head" / "seed-42"
    worker = _start(_command(o))
    end = time.monotonic() + DEADLINE_S
    while not (first / "checkpoint.pt").is_file():  # the first cell has finished an epoch
        assert worker.poll() is None and time.monotonic() < end, "the worker ended before its first checkpoint"
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert not (first / "metrics.json").is_file()  # killed mid-cell (40 epochs of 18 steps)
    assert list((tmp_path / "suite" / ".claims").rglob("seed-42.0"))  # its claim is left behind
    epoch = load_checkpoint(first / "checkpoint.pt")["epoch"]
    assert 1 <= epoch < 40

    from peft.finetune import trainer as training

    started, real_run = [], training.run
    monkeypatch.setattr("peft.finetune.suite.run", lambda opts: (started.append((opts.output_dir, opts.resume)),
                                                                 real_run(opts))[1])
    assert vtab_cli.main(["report", str(tmp_path / "suite")]) == 0  # the table so far: nothing finished
    assert "Partial: 0 of 1 cells finished, 1 missing" in (tmp_path / "suite" / "results.md").read_text()
    caplog.set_level(logging.INFO)
    results = run_suite(o)  # a new worker, on this machine: the dead holder's claim is stale at once
    assert re.search(rf"resumed from \S+checkpoint.pt: epoch {epoch}, ", caplog.text)
    assert started == [(str(first), True)]  # run once more, from its checkpoint
    history = (first / "history.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in history[1:]] == list(range(1, 41))  # epochs before the kill kept
    assert results["cells"] == {"total": 1, "finished": 1, "missing": []}
    assert json.loads((first / "metrics.json").read_text())["epochs"] == 40


def test_a_job_array_splits_as_shard_does(tree, tmp_path, monkeypatch):
    suite = plan(_options(tree, tmp_path / "suite", modes="head,lora,bitfit,ssf,full", seeds="1,2",
                          sweep=[]))
    shards = [mine(suite, parse_shard(f"{k}/3")) for k in range(3)]
    assert sorted(c.key for s in shards for c in s) == sorted(c.key for c in suite.cells)  # disjoint, complete
    assert [len(s) for s in shards] == [4, 3, 3]
    for k, array_id in enumerate((4, 5, 6)):  # sbatch --array=4-6: task ids from SLURM_ARRAY_TASK_MIN
        env = {"SLURM_ARRAY_TASK_ID": str(array_id), "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4"}
        assert parse_shard("slurm", env) == (k, 3)
        assert [c.key for c in mine(suite, parse_shard("slurm", env))] == [c.key for c in shards[k]]
    assert parse_shard("slurm", {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 3)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_STEP": "2"}  # --array=1-5:2
    assert parse_shard("slurm", env) == (2, 3)
    for bad, match in (("3/3", "does not exist"), ("1", "expected K/N"), ("slurm", "SLURM_ARRAY_TASK_ID")):
        with pytest.raises(OptionsError, match=match):
            parse_shard(bad, {})
    # a grid point's cells and the final run that needs them: the final waits, whichever shard it is in
    swept = plan(_options(tree, tmp_path / "swept", modes="head", sweep=["lr=1e-3,1e-2"]))
    assert [c.key for c in swept.cells] == ["svhn/head/sweep/lr=0.001/seed-42", "svhn/head/sweep/lr=0.01/seed-42",
                                            "svhn/head/seed-42"]
    assert swept.cells[-1].needs == tuple(c.key for c in swept.cells[:2]) and not swept.ready(swept.cells[-1])
    assert vtab_cli.cli(["report", str(tmp_path / "nowhere")]) == 2  # not a suite folder: one line, exit 2


@pytest.mark.slow
def test_an_array_of_two_runs_the_suite_by_shards_and_equals_one_worker(tree, tmp_path, monkeypatch, single):
    o = _options(tree, tmp_path / "suite")  # grid point 1, grid point 2, the final run: shards {0, 2} and {1}
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    partial = run_suite(SuiteOptions(**{**o.__dict__, "shard": "slurm"}))
    assert partial["cells"] == {"total": 3, "finished": 1, "missing": [c.key for c in plan(o).cells[::2]]}
    assert not list((tmp_path / "suite" / ".claims").glob("*"))  # a fixed partition takes no claims
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")  # its final run needs shard 1's grid point: finished now
    results = run_suite(SuiteOptions(**{**o.__dict__, "shard": "slurm"}))
    ref_o, ref = single
    assert _per_cell(tmp_path / "suite", plan(o)) == _per_cell(Path(ref_o.output_dir), plan(ref_o))
    assert _table(results) == _table(ref)


def test_a_cell_command_line_gives_exactly_its_options(tree, tmp_path, monkeypatch):
    from peft.cli.args import parse_options
    from peft.finetune.options import FinetuneOptions

    o = _options(tree, tmp_path / "suite", modes="lora", recipe="official", sweep=["lr=1e-3", "lora_rank=4"])
    suite = plan(o)
    for cell in suite.cells[:1]:
        opts = suite.options(cell)
        flags = option_flags(opts)
        parsed = parse_options(flags, FinetuneOptions, with_methods=True)
        assert parsed == opts and parsed.method_options == {"lora_rank": 4} and parsed.lr == 1e-3
    # a cell on two of the GPUs a scheduler made visible: torchrun, two processes, those two GPUs
    assert parse_devices("cuda:0,cuda:1,cuda:2,cuda:3", 2) == [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    command, env = cell_command(opts, ["cuda:2", "cuda:3"])
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7" and command[-2:] == ["--device", "cuda"]
    assert cell_command(opts, ["cuda:1"])[0][-2:] == ["--device", "cuda:1"]
    for bad in ("cuda:0,cuda:1,cuda:2", "gpu0,gpu1"):
        with pytest.raises(OptionsError, match="--devices"):
            parse_devices(bad, 2)


def _race(folder, keys, queue, done):
    won = []
    for key in keys:
        if Claims(folder, lease=60).try_claim(key) is not None:
            won.append(key)
    queue.put((os.getpid(), won))
    done.wait(60)  # hold the claims (a holder that has ended leaves stale claims) until every process has tried


def test_claims_are_exclusive_among_racing_processes(tmp_path):
    keys = [f"task/mode/seed-{i}" for i in range(40)]
    ctx = multiprocessing.get_context("fork")
    queue, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_race, args=(tmp_path, keys[::step], queue, done)) for step in (1, 1, -1, -1)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=60) for _ in procs]
    done.set()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    winners = [k for _, won in got for k in won]
    assert sorted(winners) == sorted(keys)  # every cell claimed, none by two processes


def test_a_stale_claim_is_taken_over_once_and_its_holder_learns_it(tmp_path, monkeypatch):
    holder = Claims(tmp_path, lease=0.3, worker="far-away")
    monkeypatch.setattr(holder, "machine", "another-machine")  # its pid cannot be checked from here
    claim = holder.try_claim("cell")
    a, b = Claims(tmp_path, lease=0.3), Claims(tmp_path, lease=0.3)
    assert a.try_claim("cell") is None and b.try_claim("cell") is None  # first seen now: alive
    time.sleep(0.15)
    assert claim.beat()  # a heartbeat: the observers' clocks start again
    assert a.try_claim("cell") is None and b.try_claim("cell") is None
    time.sleep(0.4)  # silent for longer than the lease, as seen by each observer's own clock
    taken = [a.try_claim("cell"), b.try_claim("cell")]
    assert sum(t is not None for t in taken) == 1 and next(t for t in taken if t).generation == 1
    assert not claim.beat() and claim.lost  # the old holder gives the cell up
    winner = next(t for t in taken if t)
    (a if taken[0] else b).release(winner, finished=False)  # stopped (SIGTERM, an error): free at once, no lease
    assert Claims(tmp_path, lease=3600).try_claim("cell").generation == 2
    # on this machine, a holder whose process has ended is stale at once, without waiting for the lease
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60).stdout.strip()
    mine_ = Claims(tmp_path, lease=3600)
    (tmp_path / "other.0").write_text(json.dumps({"machine": mine_.machine, "pid": int(dead), "state": "running"}))
    assert mine_.machine is None or mine_.try_claim("other").generation == 1
    assert claims_mod._process_ended(int(dead)) and not claims_mod._process_ended(os.getpid())
    # a live process of this machine (or one that got a dead holder's number): its heartbeat decides
    (tmp_path / "reused.0").write_text(json.dumps({"machine": mine_.machine, "pid": os.getpid(), "state": "running"}))
    observer = Claims(tmp_path, lease=0.2)
    assert observer.try_claim("reused") is None
    time.sleep(0.3)
    assert observer.try_claim("reused").generation == 1


def test_a_worker_whose_cell_was_taken_over_stops_running_it(tree, tmp_path):
    from peft.finetune import workers
    from peft.finetune.suite import prepare

    suite = prepare(_options(tree, tmp_path / "suite", modes="head", sweep=[], lease=0.5))
    seen = []

    def cell_taken_over(suite, cell):  # a cell that another worker takes over while it runs (a long pause here)
        other = Claims(suite.out / workers.CLAIMS_DIR, lease=60)
        os.close(os.open(other.path(cell.key, 1), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        end = time.monotonic() + 30
        try:
            while time.monotonic() < end:
                time.sleep(0.01)
        except KeyboardInterrupt:  # the heartbeat found generation 1: this worker gives the cell up
            seen.append(cell.key)
            (suite.out / cell.key).mkdir(parents=True)
            (suite.out / cell.key / "metrics.json").write_text("{}")  # ... and the other worker finishes it
            raise
        pytest.fail("the worker kept running a cell another worker had taken over")

    workers.work(suite, cell_taken_over)  # returns: the cell is finished (by the other worker)
    assert seen == ["svhn/head/seed-42"]


def test_a_sweep_chooses_by_the_mean_over_seeds(tree, tmp_path):
    """sweep_record: each grid point scores the mean of its seeds' validation accuracies (not the best seed); the
    choice waits until every grid cell has its metrics."""
    o = _options(tree, tmp_path / "s", modes="lora", seeds="1,2", sweep=["lr=1e-3,3e-3"])
    suite = plan(o)
    accs = {(1e-3, 1): 0.9, (1e-3, 2): 0.1, (3e-3, 1): 0.6, (3e-3, 2): 0.6}  # means 0.5 and 0.6; best seeds 0.9, 0.6
    grid = suite.grid_cells("svhn", "lora")
    assert len(grid) == 4
    for i, cell in enumerate(grid):
        assert suite.sweep_record("svhn", "lora") is None  # a grid point still missing
        folder = tmp_path / "s" / cell.key
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"val_accuracy": accs[(cell.point["lr"], cell.seed)]}))
    record = suite.sweep_record("svhn", "lora")
    assert [s["val_accuracy"] for s in record["scores"]] == [pytest.approx(0.5), pytest.approx(0.6)]
    assert record["chosen"] == {"lr": 3e-3} and record["chosen_val_accuracy"] == pytest.approx(0.6)


def test_official_recipes_where_they_cover_the_benchmark_and_cells_start_fresh_or_resume(tmp_path):
    """--recipe official: a method's own recipe where it covers the suite's benchmark (lora-noah: VTAB-1k only), else
    rlrr-official's protocol; a cell folder without checkpoint.pt starts afresh (overwrite), one with it resumes."""
    from peft.finetune.suite import recipe_for, run_options

    vtab, fgvc = (SuiteOptions(recipe="official", suite=s) for s in ("vtab", "fgvc"))
    assert [recipe_for(vtab, m) for m in ("lora", "ssf", "head")] == ["lora-noah", "ssf-official", "rlrr-official"]
    assert [recipe_for(fgvc, m) for m in ("lora", "ssf", "vpt")] == ["rlrr-official", "ssf-official", "vpt-official"]
    assert recipe_for(SuiteOptions(recipe="project", suite="fgvc"), "lora") == "project"
    folder = tmp_path / "cell"
    fresh = run_options(vtab, "svhn", "lora", 1, folder)
    assert (fresh.resume, fresh.overwrite) == (False, True)
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"")
    again = run_options(vtab, "svhn", "lora", 1, folder)
    assert (again.resume, again.overwrite) == (True, False)


def test_a_finished_cell_leaves_no_claim_even_if_it_was_taken_over_meanwhile(tmp_path, monkeypatch):
    """release(finished=True) removes the cell's claims up to the generation after the releaser's own: a holder that
    finished while another worker took the cell over (a slow heartbeat) leaves no claim file behind."""
    holder = Claims(tmp_path, lease=0.1, worker="slow")
    monkeypatch.setattr(holder, "machine", "another-machine")
    claim = holder.try_claim("cell")
    other = Claims(tmp_path, lease=0.1)
    assert other.try_claim("cell") is None  # first seen now
    time.sleep(0.25)
    taken = other.try_claim("cell")
    assert taken is not None and taken.generation == 1
    holder.release(claim, finished=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
