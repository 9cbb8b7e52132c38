"""The tag every cenfusion checkpoint carries under its ``"format"`` key, and the error for a
checkpoint path that is no file.

It sits below every layer so that the models, which refuse to convert a file that is already
ours, read it without importing the engine, which writes and checks it.
"""

from __future__ import annotations

from pathlib import Path

from cenfusion.errors import CenError

CHECKPOINT_FORMAT = "cenfusion-v1"


def missing_checkpoint(path: Path) -> CenError:
    """The error for a checkpoint ``path`` that is not a file. A run's folder is an easy
    mistake, so the line names a checkpoint it holds, to give instead."""
    if not path.is_dir():
        return CenError(f"{path}: checkpoint file not found")
    found = sorted(path.glob("*.pth")) + sorted(path.glob("*.pth.tar"))
    instead = f" (it holds {found[0].name})" if found else ""
    return CenError(f"{path}: a folder, expected a checkpoint file{instead}")
