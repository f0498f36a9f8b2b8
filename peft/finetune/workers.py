"""Workers of a benchmark suite: any number of ``tools/vtab.py`` processes on one ``--output-dir`` share its cells.

A worker walks the suite's cells in order and runs each one that is not finished, whose grid is complete (a
sweep's final run), and that it can claim (``peft.finetune.claims``: an exclusive file per cell, a heartbeat, and
a takeover of a claim whose holder died). It rewrites the results files after a cell (at most once a minute, and
when it ends) and ends when every cell is finished; while the cells left are held by others it waits, so that it
can take over the cell of a worker that dies. Started N times (by hand, by ``sbatch --array``, on machines
sharing the folder), the suite is done once, cell by cell as one worker would do it.

``--shard K/N`` (or ``--shard slurm``: K and N from ``SLURM_ARRAY_TASK_ID`` / ``_MIN`` / ``_STEP`` / ``_COUNT``)
gives a fixed partition instead, without claims: the worker runs the cells i with i % N == K (a sweep's final
run waits on the disk for grid points of other shards). ``--devices cuda:0,cuda:1,...`` runs one cell per device
(or per ``--devices-per-cell`` devices, through torchrun) at once, each as a ``tools/finetune.py`` process whose
command line gives exactly the cell's options; its output goes to ``<output-dir>/logs/<cell>.log``.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..registry import get_method
from .claims import Claims, Heartbeat
from .options import FinetuneOptions, OptionsError
from .results import write_results
from .rundir import RunFolderBusy

log = logging.getLogger(__name__)

CLAIMS_DIR = ".claims"
LOGS_DIR = "logs"
RESULTS_EVERY_S = 60.0  # a worker rewrites the results files after a cell at most this often (and when it ends)


class _Results:
    """The results files, rewritten after a cell when the last rewrite is RESULTS_EVERY_S old (reading every
    finished cell of a table of a thousand cells takes about a second)."""

    def __init__(self, suite):
        self.suite, self.last = suite, -RESULTS_EVERY_S

    def cell_finished(self) -> None:
        if time.monotonic() - self.last >= RESULTS_EVERY_S:
            write_results(self.suite)
            self.last = time.monotonic()


class CellFailed(RuntimeError):
    """A cell's process ended with an error; the message names the cell and its log."""


def parse_shard(spec: str, env=os.environ) -> tuple[int, int] | None:
    """``"K/N"`` → (K, N); ``"slurm"`` → this job array task's place among the array's tasks; ``""`` → None."""
    if not spec:
        return None
    if spec == "slurm":
        try:
            task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
            first, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1))
        except (KeyError, ValueError):
            raise OptionsError("--shard slurm: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT are not set to numbers "
                               "(start it as a job array: sbatch --array=0-31 ...)") from None
        k, n = (task - first) // max(step, 1), count
    else:
        try:
            k, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise OptionsError(f"--shard {spec!r}: expected K/N (e.g. 0/4) or slurm") from None
    if not (n >= 1 and 0 <= k < n):
        raise OptionsError(f"--shard {spec!r}: shard {k} of {n} does not exist (K runs from 0 to N-1)")
    return k, n


def parse_devices(spec: str, per_cell: int) -> list[list[str]] | None:
    """``"cuda:0,cuda:1,cuda:2,cuda:3"`` with 2 per cell → [["cuda:0", "cuda:1"], ["cuda:2", "cuda:3"]]."""
    if not spec:
        return None
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if per_cell < 1 or not devices or len(devices) % per_cell:
        raise OptionsError(f"--devices {spec!r} with --devices-per-cell {per_cell}: give a multiple of "
                           f"{max(per_cell, 1)} devices")
    for d in devices:
        if not (d == "cpu" or d.startswith("cuda:") and d[5:].isdigit()):
            raise OptionsError(f"--devices: {d!r} is not cpu or cuda:N")
    return [devices[i:i + per_cell] for i in range(0, len(devices), per_cell)]


def mine(suite, shard) -> list:
    """The cells this worker may run: all of them (claims decide), or its shard's."""
    if shard is None:
        return list(suite.cells)
    k, n = shard
    return [c for i, c in enumerate(suite.cells) if i % n == k]


def _pick(suite, cells, claims, busy) -> tuple | None:
    """The first cell this worker can run now, claimed: (cell, claim or None); None if there is none now."""
    for cell in cells:
        if cell.key in busy or suite.done(cell) or not suite.ready(cell):
            continue
        if claims is None:
            return cell, None
        claim = claims.try_claim(cell.key)
        if claim is None:
            continue
        if suite.done(cell):  # finished while we were claiming it: never run twice
            claims.release(claim, finished=True)
            continue
        return cell, claim
    return None


def check(o) -> tuple:
    """This worker's options: (shard or None, device slots or None); a bad one is an OptionsError."""
    if o.lease <= 0:
        raise OptionsError(f"--lease {o.lease}: give a positive number of seconds")
    return parse_shard(o.shard), parse_devices(o.devices, o.devices_per_cell)


def work(suite, run_cell) -> None:
    """Run this worker's share of ``suite``: ``run_cell(suite, cell)`` in this process, or ``--devices`` processes."""
    o = suite.o
    shard, slots = check(o)
    cells = mine(suite, shard)
    claims = None if shard is not None else Claims(suite.out / CLAIMS_DIR, o.lease)
    who = claims.worker if claims else f"shard {shard[0]}/{shard[1]}"
    log.info("worker %s: %d of %d cells %s", who, len(cells), len(suite.cells),
             "to share by claims" if claims else "in this shard")
    if slots is None:
        _work_here(suite, cells, claims, run_cell, who)
    else:
        _work_on_devices(suite, cells, claims, slots, who)


def _poll(o) -> float:
    """Seconds between looks at the suite while every cell left is someone else's (a worker that finishes a grid's
    last point runs the final run itself at once; this only delays taking over a dead worker's cell)."""
    return min(o.lease / 10, 15.0)


def _waiting(suite, cells, since: float) -> float:
    """Log (once a minute) what the worker waits for; returns when it last logged."""
    if time.monotonic() - since < 60:
        return since
    left = [c for c in cells if not suite.done(c)]
    log.info("waiting: %d cell(s) left, held by other workers or waiting for their grid (%s%s)", len(left),
             ", ".join(c.key for c in left[:3]), ", ..." if len(left) > 3 else "")
    return time.monotonic()


def _work_here(suite, cells, claims, run_cell, who: str) -> None:
    current, lock = [None], threading.Lock()

    def on_lost(claim):  # another worker took this cell over: stop running it (the main thread gets the signal)
        with lock:
            if current[0] is claim:
                _thread.interrupt_main()

    logged, results = 0.0, _Results(suite)
    with Heartbeat(suite.o.lease / 5, on_lost) as heartbeat:
        while True:
            picked = _pick(suite, cells, claims, ())
            if picked is None:
                if all(suite.done(c) for c in cells):
                    return
                logged = _waiting(suite, cells, logged)
                time.sleep(_poll(suite.o))
                continue
            cell, claim = picked
            if claim is not None:
                heartbeat.hold(claim)
            with lock:
                current[0] = claim
            log.info("cell %s: run by worker %s", cell.key, who)
            try:
                run_cell(suite, cell)
            except KeyboardInterrupt:
                if claim is None or not claim.lost:
                    raise
                continue  # the cell is the other worker's now
            except RunFolderBusy as e:
                if claim is None:
                    raise
                log.warning("%s; leaving the cell for now", e)
                time.sleep(_poll(suite.o))
                continue
            finally:
                with lock:
                    current[0] = None
                if claim is not None:
                    heartbeat.drop(claim)
                    claims.release(claim, finished=suite.done(cell))
            results.cell_finished()


# ── one process per cell (--devices) ─────────────────────────────────────────────────────────────────────────


def option_flags(opts: FinetuneOptions) -> list[str]:
    """The ``tools/finetune.py`` flags that give ``opts``: every explicit field, then the method's options."""
    flags = []
    for name in opts.explicit:
        if name in opts.method_options:
            continue
        value = getattr(opts, name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, repr(value) if isinstance(value, float) else str(value)]
    options = get_method(opts.mode).options
    for key, value in opts.method_options.items():
        flags += [options[key].flag, repr(value) if isinstance(value, float) else str(value)]
    return flags


def cell_command(opts: FinetuneOptions, devices: list[str]) -> tuple[list[str], dict]:
    """The command (and environment) that runs ``opts`` on ``devices``: ``tools/finetune.py``, under torchrun
    when the cell spans several devices."""
    package = __name__.split(".")[0]  # peft in a checkout, vit_peft when installed
    root = Path(__file__).resolve().parents[2]
    script = root / "tools" / "finetune.py"
    target = [str(script)] if package == "peft" and script.is_file() else ["-m", f"{package}.cli.finetune"]
    env = dict(os.environ)
    flags = option_flags(opts)
    if "--device" in flags:
        i = flags.index("--device")
        del flags[i:i + 2]
    if len(devices) == 1:
        return [sys.executable, *target, *flags, "--device", devices[0]], env
    if devices[0].startswith("cuda"):  # each torchrun process takes GPU LOCAL_RANK of the ones made visible
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = visible.split(",") if visible else None
        env["CUDA_VISIBLE_DEVICES"] = ",".join(names[int(d[5:])] if names else d[5:] for d in devices)
    device = "cuda" if devices[0].startswith("cuda") else "cpu"
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(devices)}",
            *target, *flags, "--device", device], env


def _work_on_devices(suite, cells, claims, slots, who: str) -> None:
    free, running, lost, stopping, failed = list(slots), {}, set(), set(), []
    logs = suite.out / LOGS_DIR
    logged, results, next_look = 0.0, _Results(suite), 0.0
    with Heartbeat(suite.o.lease / 5, on_lost=lambda claim: lost.add(claim.key)) as heartbeat:
        try:
            while True:
                for key, (proc, cell, claim, devices, log_file) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        if key in lost and key not in stopping:
                            proc.send_signal(signal.SIGTERM)  # taken over: its checkpoint stays for the new holder
                            stopping.add(key)
                        continue
                    del running[key]
                    log_file.close()
                    free.append(devices)
                    next_look = 0.0  # a slot is free: look for the next cell now
                    if claim is not None:
                        heartbeat.drop(claim)
                        claims.release(claim, finished=suite.done(cell))
                    if code != 0 and key not in lost:
                        failed.append(f"{suite.label(cell)} failed (exit {code}); see {log_file.name}")
                        log.error("%s", failed[-1])
                    elif code == 0:
                        log.info("%s: finished on %s", suite.label(cell), ",".join(devices))
                        results.cell_finished()
                while free and not failed and time.monotonic() >= next_look:
                    picked = _pick(suite, cells, claims, running)
                    if picked is None:  # the cells left are others' (or wait for a grid): look again later
                        next_look = time.monotonic() + _poll(suite.o)
                        break
                    cell, claim = picked
                    devices = free.pop(0)
                    command, env = cell_command(suite.options(cell), devices)
                    path = logs / (cell.key.replace("/", "__") + ".log")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    log_file = open(path, "a")
                    log_file.write(f"$ {' '.join(command)}\n")
                    log_file.flush()
                    proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
                    if claim is not None:
                        heartbeat.hold(claim)
                    running[cell.key] = (proc, cell, claim, devices, log_file)
                    log.info("cell %s: run by worker %s on %s (pid %d, log %s)", cell.key, who, ",".join(devices),
                             proc.pid, path)
                if not running:
                    if failed:
                        raise CellFailed("; ".join(failed))
                    if all(suite.done(c) for c in cells):
                        return
                    logged = _waiting(suite, cells, logged)
                time.sleep(0.2 if running else max(0.2, next_look - time.monotonic()))
        finally:  # interrupted (Ctrl-C) or failed: stop the cells' processes; their checkpoints stay
            for proc, cell, claim, _, log_file in running.values():
                proc.terminate()
                proc.wait()
                log_file.close()
                if claim is not None:
                    claims.release(claim, finished=suite.done(cell))
