"""Per-layer seeds: a layer's init must not depend on which other layers a process builds."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def seeded(seed: int | None):
    """Run the block under its own CPU RNG seed, restoring the ambient state after (None: ambient)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def layer_seeds(seed: int | None, num_layers: int) -> list[int | None]:
    """Seeds of the embedding and of each block (the same under every parallel layout)."""
    return [None if seed is None else seed + i for i in range(num_layers + 1)]
