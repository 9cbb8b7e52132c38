"""The random state that makes ``--resume`` continue exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """The global random states as tensors and lists (loadable with ``weights_only``).

    Under ``torch.distributed`` this is a collective call: each process draws its own
    stream (seeded ``seed + rank``), so the state holds every rank's under ``"ranks"``.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, dict(state))
        state["ranks"] = ranks
    return state


def restore_rng(state: dict[str, Any], rank: int = 0) -> None:
    """Continue the stream ``state`` holds for process ``rank``. A process it holds none for
    (more processes than when it was captured) keeps the stream it was seeded with."""
    ranks = state.get("ranks")
    if ranks is not None:
        if rank >= len(ranks):
            return
        state = ranks[rank]
    elif rank > 0:
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
