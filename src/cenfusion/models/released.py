"""Reading the released CEN code's files: a torch pickle read safely and refused when it is
one of ours, and a released state dict loaded into our model through a key map."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cenfusion.checkpoint_format import CHECKPOINT_FORMAT, missing_checkpoint
from cenfusion.errors import CenError, describe_load_error, shorten


def numpy_globals() -> list[Any]:
    """The numpy types a released segmentation checkpoint pickles beside its tensors (its
    best score), allowed to ``weights_only`` loading."""
    numpy_core = getattr(np, "_core", None) or np.core
    return [np.dtype, numpy_core.multiarray.scalar, type(np.dtype(np.float64))]


def read_released_file(path: Path, safe_globals: Sequence[Any] = ()) -> Any:
    """What ``torch.load`` reads from ``path`` with ``weights_only`` (and ``safe_globals``
    allowed besides tensors), refusing in one line a missing file, an unreadable one and a
    cenfusion checkpoint, which needs no conversion."""
    if not path.is_file():
        raise missing_checkpoint(path)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CenError(f"{path}: not a readable checkpoint: {describe_load_error(err)}") from err
    if isinstance(loaded, dict) and loaded.get("format") == CHECKPOINT_FORMAT:
        raise CenError(
            f"{path}: this is already a cenfusion checkpoint; use it as it is (no conversion)"
        )
    return loaded


def check_state_dict(state: dict, where: str) -> None:
    """A state dict maps parameter names (strings) to tensors; say which entry does not."""
    for key, value in state.items():
        if not isinstance(key, str):
            raise CenError(
                f"{where}: expected parameter names as keys, found {type(key).__name__} "
                f"key {shorten(repr(key), 30)}"
            )
        if not isinstance(value, Tensor):
            raise CenError(
                f"{where}: entry {shorten(key, 60)!r} holds a value of type "
                f"{type(value).__name__}, expected a tensor"
            )


def load_mapped(
    model: nn.Module,
    state: dict[str, Tensor],
    sources: dict[str, list[str]],
    what: str,
    where: str,
    unused: Collection[str] = (),
) -> None:
    """Load a released-layout ``state`` into ``model`` through ``sources`` (our key -> its
    released keys; several are the per-modality rows of one private norm, stacked). The map
    must be total both ways: every key of ours has its sources, and every released key is
    used or among ``unused`` (parts the released code owns but never applies)."""
    converted: dict[str, Tensor] = {}
    for key, names in sources.items():
        missing = [n for n in names if n not in state]
        if missing:
            raise CenError(f"{where}: lacks key {missing[0]!r} (needed for {key!r})")
        if len(names) == 1 or key.endswith("num_batches_tracked"):
            converted[key] = state[names[0]]
        else:
            converted[key] = torch.stack([state[n] for n in names])
    used = {n for names in sources.values() for n in names}
    unmatched = [k for k in state if k not in used and k not in unused]
    if unmatched:
        raise CenError(f"{where}: key {unmatched[0]!r} has no place in the {what}")
    try:
        model.load_state_dict(converted)
    except RuntimeError as err:
        detail = shorten(str(err).strip().splitlines()[-1], 100)
        raise CenError(f"{where}: shapes do not fit the {what} ({detail})") from err
