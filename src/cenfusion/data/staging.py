"""Write a data set folder atomically (build it beside its place, rename it at the end), and
generate a cached set once, recognised by the marker file holding its parameters."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cenfusion.errors import CenError


def output_folder(out: Path) -> Path:
    """``out`` as a data set folder to write: a symbolic link stands for the folder it names
    (the finished set is renamed onto that one, on its disk); the current folder is refused,
    since it would be swapped under the shell that is in it."""
    if Path(out).resolve() == Path.cwd().resolve():
        raise CenError(f"{out}: the current folder; name a folder to write (made if missing)")
    inside = next((p for p in Path(out).parents if p.exists()), None)
    if inside is not None and not inside.is_dir():
        raise CenError(f"{out}: a path inside the file {inside}, expected a folder to write")
    return Path(out).resolve() if Path(out).is_symlink() else Path(out)


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield a fresh hidden folder beside ``out``, renamed to ``out`` when the block succeeds.

    On any exception the folder is deleted, so ``out`` is either complete or absent. ``out``
    itself may exist only as an empty folder (see :func:`output_ready`). Folders of earlier
    stagings on this host whose process is gone (killed) are removed first; another host's
    (a shared disk) are left alone.
    """
    out = output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    ours = re.compile(rf"\.{re.escape(out.name)}\.tmp-(\d+)@{re.escape(host)}-[a-z0-9_]+")
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        found = ours.fullmatch(stale.name)
        if found and not _alive(found[1]):
            shutil.rmtree(stale, ignore_errors=True)
    prefix = f".{out.name}.tmp-{os.getpid()}@{host}-"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    except OSError as exc:
        raise CenError(f"{out}: cannot write in {out.parent} ({exc.strerror})") from None
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.filename is not None and not str(exc.filename).startswith(str(tmp)):
                raise  # a source file's, which names itself
            cause = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
            raise CenError(
                f"{out}: cannot write the data set ({cause}); nothing was kept"
            ) from None
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


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (a folder name's digits) still runs; unknown counts as alive."""
    if not pid.isdigit() or os.name == "nt":  # Windows' os.kill(pid, 0) would end it
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def read_marker(path: Path) -> dict | None:
    """The parameters a generated set was made with (its JSON marker), or None."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ensure_generated(
    root: Path, marker_name: str, wanted: dict, generate: Callable[[], Path], what: str
) -> Path:
    """``root`` holding a set made with ``wanted`` parameters, from ``generate`` the first time.

    A set made with other parameters is an error rather than silently reused. When several
    processes (e.g. DDP ranks) generate at once, the first rename wins and the others reuse it.
    """
    marker = root / marker_name
    found = read_marker(marker)
    if found == wanted:
        return root
    if found is not None:
        raise CenError(
            f"{what} {root} was made with {found}, expected {wanted}; "
            "delete it or choose another folder"
        )
    try:
        return generate()
    except CenError:
        if read_marker(marker) == wanted:
            return root
        raise
