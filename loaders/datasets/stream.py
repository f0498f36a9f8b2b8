"""Batches delivered to the device ahead of use, with memory bounded by a few batches.

:class:`BatchStream` walks a list of index batches over an :class:`~loaders.datasets.base.ImageDataset`. For a
disk-backed store a background thread assembles the next batches (``PixelStore.gather``: memory-mapped reads into
one canvas, pinned when the device is a GPU) and starts their copy to the device on a side CUDA stream while the
model works on the current one; at most ``depth`` batches wait, so a run's memory does not depend on the
dataset's size. An in-memory dataset (a tensor, already on the device for small sets) is simply indexed.

With data parallelism every rank passes the same global batches and its ``rank``/``world_size``: it reads only
its own contiguous slice of each (``shard_bounds``), and gets ``rows`` = (start, stop, n) so the augmentation can
draw the randomness of the whole global batch and keep its slice (one process's result, bit for bit).
"""

from __future__ import annotations

import ctypes
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .base import ImageDataset
from .batches import shard_bounds
from .store import PixelStore


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (b, H, W, C) on the device: the canvas
    sizes: torch.Tensor | None  # (b, 2) int64 true (h, w) per image, None when every image fills the canvas
    labels: torch.Tensor  # int64 (b,) on the device
    rows: tuple[int, int, int]  # (start, stop, n): this rank's rows of a global batch of n


_DONE = object()
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
_malloc_fixed = False


def fix_malloc_threshold(nbytes: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``nbytes`` or more with its own mmap, returned to the system when
    freed. By default glibc raises that threshold after each large free (up to 32 MiB), after which batch-sized
    buffers come from the heap and fragment it: a run's RssAnon then creeps up with the number of batches (so
    with the dataset's size) although nothing is kept. Once per process; False where glibc is absent."""
    global _malloc_fixed
    if _malloc_fixed:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        _malloc_fixed = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        _malloc_fixed = False
    return _malloc_fixed


class BatchStream:
    """Iterate :class:`Batch` es of ``ds`` for the index tensors ``batches``, prefetching ``depth`` ahead."""

    def __init__(self, ds: ImageDataset, batches: Sequence[torch.Tensor], device: torch.device | str,
                 rank: int = 0, world_size: int = 1, depth: int = 2):
        self.ds, self.batches, self.device = ds, [b for b in batches if len(b)], torch.device(device)
        self.rank, self.world_size, self.depth = rank, world_size, max(1, depth)
        if ds.on_disk:
            fix_malloc_threshold()

    def __len__(self) -> int:
        return len(self.batches)

    def _piece(self, idx: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        start, stop = shard_bounds(len(idx), self.rank, self.world_size)
        return idx[start:stop], (start, stop, len(idx))

    def _read(self, idx: torch.Tensor):
        """Host side of one batch: (canvas, sizes, labels, rows), pinned for a GPU."""
        mine, rows = self._piece(idx.cpu())
        store: PixelStore = self.ds.images
        out = None
        if self.device.type == "cuda":
            out = torch.empty(store.batch_shape(mine.numpy()), dtype=torch.uint8, pin_memory=True)
        canvas, sizes = store.gather(mine.numpy(), out=out)
        return canvas, sizes, self.ds.labels.cpu()[mine], rows

    def __iter__(self) -> Iterator[Batch]:
        if not self.ds.on_disk:
            for idx in self.batches:
                mine, rows = self._piece(idx.cpu())
                images = self.ds.images[mine.to(self.ds.images.device)].to(self.device, non_blocking=True)
                yield Batch(images, None, self.ds.labels[mine.to(self.ds.labels.device)].to(self.device), rows)
            return
        yield from self._prefetched()

    def _prefetched(self) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def produce():
            try:
                for idx in self.batches:
                    canvas, sizes, labels, rows = self._read(idx)
                    if side is not None:  # copy on a side stream; the consumer waits for its event
                        with torch.cuda.stream(side):
                            item = [t.to(self.device, non_blocking=True) if t is not None else None
                                    for t in (canvas, sizes, labels)]
                            event = torch.cuda.Event()
                            event.record(side)
                    else:
                        item, event = [canvas, sizes, labels], None
                    while not stop.is_set():
                        try:
                            q.put((item, rows, event), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(_DONE)
            except BaseException as e:  # handed to the consumer, raised there
                q.put(e)

        thread = threading.Thread(target=produce, name="vit-peft-batches", daemon=True)
        thread.start()
        try:
            while True:
                got = q.get()
                if got is _DONE:
                    return
                if isinstance(got, BaseException):
                    raise got
                (images, sizes, labels), rows, event = got
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in (images, sizes, labels):
                        if t is not None:
                            t.record_stream(current)  # the allocator keeps it until the compute stream is done
                yield Batch(images, sizes, labels, rows)
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
