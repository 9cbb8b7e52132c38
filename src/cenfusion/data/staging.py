"""Write a data set folder atomically: build it beside its place, rename it at the end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cenfusion.errors import CenError


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield a fresh hidden folder beside ``out``, renamed to ``out`` when the block succeeds.

    On any exception the folder is deleted, so ``out`` is either complete or absent. ``out``
    itself may exist only as an empty folder (see :func:`output_ready`).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        try:
            if out.is_dir():
                out.rmdir()
            tmp.rename(out)
        except OSError as exc:
            raise CenError(
                f"{out}: cannot move the finished folder into place ({exc.strerror}); "
                "expected an absent or empty folder"
            ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
