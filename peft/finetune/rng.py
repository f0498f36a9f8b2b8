"""Every random stream that influences training, captured as tensors and plain Python values (``weights_only``-safe)
and restored on ``--resume``."""

from __future__ import annotations

import random

import numpy as np
import torch

from .checkpoint import CheckpointMismatch


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    np_state = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _to_lists(random.getstate()),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
        "generator_devices": {name: g.device.type for name, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None, reseed=None) -> list[str]:
    """Put every random stream back. A stream saved on another kind of device (a GPU run resumed on the CPU, or
    the reverse) or on more GPUs than this machine has cannot continue: with ``reseed(name) -> int`` its
    generator is re-seeded from the run's seed and step instead (reproducible from here, not bitwise the
    uninterrupted run), and the returned notes say which; without ``reseed`` that is an error naming it."""
    notes = []
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        n_saved, n_here = len(state["cuda"]), torch.cuda.device_count()
        for i, s in enumerate(state["cuda"][:n_here]):
            torch.cuda.set_rng_state(s, i)
        if n_saved != n_here:
            notes.append(f"CUDA random states of {n_saved} GPU(s) restored on {n_here}")
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    saved_devices = state.get("generator_devices", {})
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointMismatch(f"checkpoint has no state for random generator {name!r}")
        saved_on = saved_devices.get(name, g.device.type)
        try:
            if saved_on != g.device.type:
                raise RuntimeError(f"saved on {saved_on}")
            g.set_state(state["generators"][name])
        except RuntimeError as e:  # a state of another device type (its size differs): it cannot continue here
            if reseed is None:
                raise CheckpointMismatch(f"random generator {name!r} was saved on another device ({e}) and cannot "
                                         f"continue on {g.device.type}") from None
            g.manual_seed(reseed(name))
            notes.append(f"random stream {name!r} was saved on {saved_on} and is re-seeded from the run's seed "
                         f"and step on {g.device.type}")
    return notes


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
