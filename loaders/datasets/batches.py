"""The project's one sharding scheme, for one process or several (DDP).

:func:`shard_bounds` gives each rank a contiguous, non-overlapping piece of an index range (sizes differ by at
most one). Training cuts every global batch that way (``loaders.datasets.stream.BatchStream``) and evaluation
shards the test set that way.
"""

from __future__ import annotations


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, non-overlapping [start, stop) of ``range(n)`` for one rank; sizes differ by at most one.

    Sharding without padding means every item is seen exactly once over all ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
