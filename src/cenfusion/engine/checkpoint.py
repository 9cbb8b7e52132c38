"""Checkpoints: atomic writes and safe reads.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: ``{"format", "task", "model_config", "model", ...}`` plus,
for training checkpoints, whatever resume needs (optimiser, stage, epoch, best score, RNG).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cenfusion.checkpoint_format import CHECKPOINT_FORMAT, missing_checkpoint
from cenfusion.engine.files import atomic_write
from cenfusion.errors import CenError, ForeignCheckpointError, describe_load_error, shorten


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


def load_checkpoint(path: str | Path, task: str | None = None) -> dict[str, Any]:
    """Read a cenfusion checkpoint with ``weights_only=True`` on the CPU.

    Memory-mapped, so reading one twice (its config, then its weights) costs little; a file
    that is no zip archive (torch.save's format) is read plainly, so that its error says what
    it is, as every other reader of checkpoints says it.

    ``task`` (e.g. ``"segmentation"``) is checked against the checkpoint's own.
    """
    path = Path(path)
    if not path.is_file():
        raise missing_checkpoint(path)
    try:
        mmap = zipfile.is_zipfile(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise ForeignCheckpointError(
            f"{path}: not a readable checkpoint: {describe_load_error(err)}"
        ) from err
    if isinstance(state, dict) and "ensemble.alpha" in state:
        raise ForeignCheckpointError(
            f"{path}: a model's state dict, without its settings; load it into its model "
            "(load_state_dict)"
        )
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ForeignCheckpointError(
            f"{path}: not a cenfusion checkpoint (released CEN files: `cen convert-official`)"
        )
    if task is not None and state.get("task") != task:
        raise CenError(f"{path}: a {state.get('task')} checkpoint, expected {task}")
    return state


def load_weights(model: nn.Module, weights: dict, where: str) -> None:
    """Load a state dict, turning any key or shape mismatch into one clear line."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[1:2] or [str(err)]
        raise CenError(f"{where}: weights do not fit this model ({shorten(first[0])})") from err


def saved_config(path: Path | None, task: str) -> dict[str, Any] | None:
    """The settings saved in the checkpoint ``path`` of ``task``; None without a path, and
    for a released file, which saves none."""
    if path is None:
        return None
    try:
        return load_checkpoint(path, task=task).get("config")
    except ForeignCheckpointError:
        return None
