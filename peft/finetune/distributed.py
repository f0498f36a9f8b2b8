"""Data-parallel helpers: one process per device, started by ``torchrun`` (or run as a single process).

The design goal is that N processes compute *the same optimisation* as one process with the same global batch:

- every rank draws the same global batch (same seed, same permutation) and keeps its contiguous slice, so the
  union of the per-rank micro-batches is exactly the single-process batch;
- each rank's loss is ``sum(per-sample losses) * world_size / global_batch_size``; DDP averages gradients over
  ranks, which turns this into the mean over the global batch whatever the slice sizes are;
- evaluation shards the index range into contiguous pieces *without padding* (``loaders.datasets.shard_bounds``,
  the project's one sharding scheme) (a padded sampler would count some
  images twice) and sums correct/total counts with ``all_reduce``; predictions are gathered in rank order, which
  restores the original order.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from loaders.datasets import shard_bounds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0  # this process's index among all processes
    world_size: int = 1  # number of processes
    local_rank: int = 0  # index on this machine: picks the GPU
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process logs progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``"auto"``/None: the local rank's GPU if CUDA is available, else CPU. ``"cuda"`` gets the rank's GPU.
    The one device resolver of every tool; a device that cannot work is an OptionsError (one line, exit 2)."""
    from .options import parse_device  # here: options imports nothing of this module, but keep the import local

    device = parse_device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str | None = None) -> DistContext:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group if there is one.

    Backend: NCCL on CUDA, Gloo on CPU. Without those variables this is a plain single-process context.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
        log.info("process group: backend %s, rank %d of %d, device %s", backend, rank, world, dev)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def setup_logging(ctx: DistContext | None = None, level=logging.INFO) -> None:
    """Messages from the main process only (others log warnings and errors)."""
    main = ctx is None or ctx.is_main
    logging.basicConfig(level=level if main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device``, or None for plain fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks, in place, and return it (a no-op for one process)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_shards(local: torch.Tensor, n: int, ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's ``shard_bounds`` piece of an n-row tensor, in rank order (= original order).

    ``all_gather`` needs equal shapes, so pieces are padded to the largest and the padding is cut off again:
    every rank knows every piece's true size from ``shard_bounds``.
    """
    if not ctx.distributed:
        return local
    sizes = [b - a for a, b in (shard_bounds(n, r, ctx.world_size) for r in range(ctx.world_size))]
    padded = local.new_zeros((max(sizes),) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(pieces, sizes)])
