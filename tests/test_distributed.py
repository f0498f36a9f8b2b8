"""Two CPU processes (Gloo on loopback) train exactly what one process trains with the same global batch."""

import faulthandler
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from peft.finetune import distributed as pdist
from peft.finetune import trainer as training

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_shards_cover_every_index_once_without_padding():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            bounds = [pdist.shard_bounds(n, r, world) for r in range(world)]
            covered = [i for a, b in bounds for i in range(a, b)]
            assert covered == list(range(n))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def _options(out: Path, **kw) -> training.FinetuneOptions:
    base = dict(mode="full", weights="none", model="testing", data="fashion_mnist", data_root=str(FMNIST),
                classes="0-4", max_train_samples=64, max_eval_samples=37, epochs=2, warmup_epochs=0.5,
                batch_size=16, grad_accum=2, lr=3e-3, device="cpu", output_dir=str(out), progress=False)
    base.update(kw)
    return training.FinetuneOptions(**base)


def _worker(rank: int, world: int, port: int, out: str, kw: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    Path(out).mkdir(parents=True, exist_ok=True)
    stacks = open(Path(out).parent / f"stacks-{Path(out).name}-rank{rank}.txt", "w")  # noqa: SIM115 (lives on)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)  # what a stuck worker is doing
    _ready(out, rank)
    torch.set_num_threads(1)
    training.run(_options(Path(out), **kw))


def _stuck_worker(rank: int, world: int, port: int, out: str, kw: dict) -> None:
    stacks = open(Path(out).parent / f"stacks-{Path(out).name}-rank{rank}.txt", "w")  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    _ready(out, rank)
    time.sleep(3600)  # a worker that never finishes (as one stuck in a collective would)


def _ready(out: str, rank: int) -> Path:
    """The marker a worker writes once SIGUSR1 dumps its stacks (before that, SIGUSR1 would end it silently)."""
    marker = Path(out).parent / f"stacks-{Path(out).name}-rank{rank}.ready"
    marker.touch()
    return marker


def test_a_stuck_worker_fails_the_test_with_its_stack_instead_of_hanging(tmp_path):
    start = time.monotonic()
    # A short timeout: the helper waits for a worker still starting (importing) before it asks for its stack.
    with pytest.raises(pytest.fail.Exception, match=r"(?s)still running after 3 s.*_stuck_worker"):
        _spawn_with_timeout(_stuck_worker, (2, 0, str(tmp_path / "stuck"), {}), nprocs=2, timeout=3)
    assert time.monotonic() - start < 60


def _spawn_with_timeout(fn, args, nprocs: int, timeout: float) -> None:
    """mp.spawn that cannot hang the suite: workers still alive after ``timeout`` seconds dump their Python stacks
    (SIGUSR1 → faulthandler), are killed, and the test fails with those stacks."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            alive = [(rank, p) for rank, p in enumerate(ctx.processes) if p.is_alive()]
            out = Path(args[2])
            started = time.monotonic()  # a worker still importing cannot dump its stack yet: up to 60 s more
            ready = [out.parent / f"stacks-{out.name}-rank{rank}.ready" for rank, _ in alive]
            while time.monotonic() - started < 60 and not all(m.exists() or not p.is_alive()
                                                                  for m, (_, p) in zip(ready, alive)):
                time.sleep(0.1)
            for _, p in alive:
                os.kill(p.pid, signal.SIGUSR1)
            sent = time.monotonic()  # until each stack is written (or 5 s)
            while time.monotonic() - sent < 5 and not all(
                    os.path.getsize(out.parent / f"stacks-{out.name}-rank{rank}.txt") > 0
                    if (out.parent / f"stacks-{out.name}-rank{rank}.txt").exists() else True for rank, _ in alive):
                time.sleep(0.1)
            time.sleep(0.2)  # the end of the dump
            for p in ctx.processes:
                p.kill()
            stacks = "\n".join(f"rank {rank} (pid {p.pid}):\n" + (out.parent / f"stacks-{out.name}-rank{rank}.txt")
                               .read_text()[-3000:] for rank, p in alive
                               if (out.parent / f"stacks-{out.name}-rank{rank}.txt").exists())
            pytest.fail(f"distributed workers {[p.pid for _, p in alive]} still running after {timeout:.0f} s: "
                        f"killed. Their stacks:\n{stacks}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"real Fashion-MNIST not installed at {FMNIST}")
@pytest.mark.parametrize("mode", ["full", "rlrr"])
def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch, mode):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    kw = {}
    if mode == "rlrr":  # frozen backbone + adapters: DDP must only see the trainable parameters
        import vit
        from npz_factory import write_google_npz

        write_google_npz(tmp_path / "base.npz", vit.get_config("testing"), seed=0)
        kw = dict(mode="rlrr", weights=str(tmp_path / "base.npz"), lr=1e-2)
    torch.set_num_threads(1)
    one = training.run(_options(tmp_path / "one", **kw))
    _spawn_with_timeout(_worker, (2, _free_port(), str(tmp_path / "two"), kw), nprocs=2, timeout=300)

    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 2 * 4  # 64 training images / 16 per step, 2 epochs
    for k in a["state_dict"]:
        if k.endswith(("attn.k.bias", "attn.k.f")):
            # Its exact gradient is zero (adding a constant to every key of a query shifts all its logits
            # equally, and softmax ignores that), so Adam turns rounding noise into lr-sized steps: only check
            # that neither run moved it further than Adam's step bound (about lr per step).
            bound = _options(tmp_path, **kw).lr * a["step"]
            assert a["state_dict"][k].abs().max() < bound and b["state_dict"][k].abs().max() < bound
            continue
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=1e-5, atol=1e-6, msg=k)
    for ha, hb in zip(a["history"], b["history"]):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-5)
        assert hb["val_accuracy"] == ha["val_accuracy"]
    import json

    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["num_test"] == one["num_test"] == 37  # odd size: no padded duplicates in the count
    assert two["test_accuracy"] == one["test_accuracy"]
    cm_one = (tmp_path / "one" / "test_confusion.csv").read_text()
    assert (tmp_path / "two" / "test_confusion.csv").read_text() == cm_one
