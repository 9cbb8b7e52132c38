"""Writing a run's files so that a kill at any instant leaves the old file or the new one."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write`` so that a kill at any instant leaves either the old
    file or the new one: a temporary ``.NAME.*`` beside it, then renamed over it.

    A kill can leave the temporary behind; :meth:`RunFolder.open` removes those of a run.
    Any other failure removes it and leaves the old file; a write that failed for lack of
    space is raised as the ``OSError`` (ENOSPC) it is, naming ``path``, even when the writer
    (``torch.save``'s zip writer) words it as a ``RuntimeError``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except RuntimeError as err:
        full = _disk_full(path.parent)  # before the temporary's space is given back
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_file_mode() -> int:
    """The mode ``open`` gives a new file (0o666 less the umask; mkstemp's is 0o600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _disk_full(folder: Path) -> bool:
    """Whether the file system of ``folder`` has (next to) no space left."""
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False
