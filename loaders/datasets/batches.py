"""Batches by indexing the in-memory tensors, for one process or several (DDP).

One sharding scheme for the whole project: :func:`shard_bounds` gives each rank a contiguous, non-overlapping
piece of an index range (sizes differ by at most one). Training cuts every global batch that way
(``loaders.datasets.stream.BatchStream``), evaluation shards the test set that way, and :func:`iterate_batches`
shards its (shuffled) order that way.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .base import ImageDataset


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, non-overlapping [start, stop) of ``range(n)`` for one rank; sizes differ by at most one.

    Sharding without padding means every item is seen exactly once over all ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_indices(indices: torch.Tensor, rank: int = 0, world_size: int = 1, even: bool = False) -> torch.Tensor:
    """This rank's contiguous share of ``indices`` (see :func:`shard_bounds`).

    even=False (evaluation): every index goes to exactly one rank, nothing duplicated or dropped; ranks may differ
    by one element. even=True (training): the tail is first cut to a multiple of world_size (at most
    world_size - 1 indices dropped), so every rank gets the same count and runs the same number of steps.
    """
    if even:
        indices = indices[: len(indices) - len(indices) % world_size] if world_size >= 1 else indices
    start, stop = shard_bounds(len(indices), rank, world_size)
    return indices[start:stop]


def count_batches(n: int, batch_size: int, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                  even: bool = False) -> int:
    """How many batches iterate_batches yields for n indices with these settings."""
    m = len(shard_indices(torch.empty(n), rank, world_size, even))
    return m // batch_size if drop_last else -(-m // batch_size)


def iterate_batches(ds: ImageDataset | tuple[torch.Tensor, torch.Tensor], batch_size: int, shuffle: bool = False,
                    generator: torch.Generator | None = None, drop_last: bool = False,
                    indices: torch.Tensor | Sequence[int] | None = None, rank: int = 0, world_size: int = 1,
                    even: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images uint8 (b, H, W, C), labels int64 (b,)) batches by indexing the in-memory tensors.

    Order: `indices` (default 0..N-1), permuted by torch.randperm(generator=generator) if shuffle. The generator is
    a CPU generator; call it with the same seed (e.g. seed + epoch) on every rank so all ranks see the same
    permutation. Then the rank keeps its contiguous shard_indices(order, rank, world_size, even) (see there: even=False shards
    exactly, each index on one rank once; even=True equalises counts for training) and cuts it into consecutive
    batches of batch_size, the last one smaller unless drop_last. Batches live on the device of the tensors, so a
    dataset moved to the GPU once yields GPU batches. For training with DDP use shuffle=True, even=True,
    drop_last=True (same number of steps on every rank); for evaluation use the defaults and sum counts over ranks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images, labels = (ds.images, ds.labels) if isinstance(ds, ImageDataset) else ds
    order = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices, dtype=torch.int64).cpu()
    if shuffle:
        if world_size > 1 and generator is None:
            raise ValueError("shuffle with world_size > 1 needs an explicitly seeded generator, identical on all "
                             "ranks, or the ranks' shards overlap")
        order = order[torch.randperm(len(order), generator=generator)]
    order = shard_indices(order, rank, world_size, even)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield images[idx.to(images.device)], labels[idx.to(labels.device)]
