"""Every seed and RNG state of a run: per-layer init seeds, the dropout stream, saved RNG states.

A layer's init must not depend on which other layers a process builds (pipeline stages build a
few), so each layer has its own seed. Dropout acts on activations replicated over the tensor
group: the same stream on its ranks, a different one per data-parallel rank.
"""
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


def seed_dropout(seed: int, dp_rank: int, step: int = 0) -> None:
    """Start this rank's dropout stream: at step 0 for a fresh run, or at `step` for a run resumed
    at another layout (whose saved streams cannot match; this one is still deterministic)."""
    torch.manual_seed(seed + 1 + dp_rank + 1000003 * step)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's CPU (and current GPU) RNG state, as tensors a checkpoint can store."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
