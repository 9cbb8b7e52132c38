"""Writing a run's files so that a kill at any instant leaves the old file or the new one, and
one process at a time writing a run's folder."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from cenfusion.errors import CenError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write`` so that a kill at any instant leaves either the old
    file or the new one: a temporary ``.NAME.*`` beside it, then renamed over it.

    A kill can leave the temporary behind; :meth:`RunFolder.open` removes those of a run.
    Any other failure removes it and leaves the old file; a write that failed for lack of
    space is raised as the ``OSError`` (ENOSPC) it is, naming ``path``, even when the writer
    (``torch.save``'s zip writer) words it as a ``RuntimeError``.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file"
        raise CenError(f"{path}: {what}, expected a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err
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


def _in_use(folder: Path, owner: str) -> CenError:
    return CenError(
        f"{folder} is in use by another cen process (pid {owner or 'unknown'}): wait for it "
        "to end, or choose another -c EXP"
    )


def refuse_overwriting(out: Path, flag: str, sources: Sequence[Path | None]) -> None:
    """Refuse an output ``out`` (given as ``flag``) that is one of the files a command reads:
    writing it would destroy them."""
    for source in sources:
        if source is not None and out.exists() and source.exists() and out.samefile(source):
            raise CenError(f"{flag} {out}: an input of this command; write another file")


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


def lock_file(folder: Path) -> Path:
    """The file the lock of run folder ``folder`` is taken on: ``.NAME.lock`` beside it."""
    return folder.parent / f".{folder.name}.lock"


class FolderLock:
    """An exclusive lock on a run folder, held by this process until :meth:`release`: two
    processes writing one run would overwrite each other's checkpoints and metrics. It is
    taken on a hidden file beside the folder (``.NAME.lock``), which stays put when
    ``--force`` moves the folder aside. The lock goes with the process (a kill frees it).
    Where the system has no ``flock`` (Windows) nothing is locked."""

    def __init__(self, folder: Path) -> None:
        if folder.parent.exists() and not folder.parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder.parent))
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.path = lock_file(folder)
        self._fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _new_file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise _in_use(folder, owner) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @staticmethod
    def refuse_if_held(folder: Path) -> None:
        """Refuse ``folder`` when another process holds its lock, taking none (a shared
        probe: probes of several processes at once do not stand in each other's way; the
        lock this process holds passes)."""
        path = lock_file(folder)
        if fcntl is None or not path.is_file():
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip()
            if owner != str(os.getpid()):  # this process's own lock is no other's
                raise _in_use(folder, owner) from None
        finally:
            os.close(fd)

    def release(self) -> None:
        """Give the lock up (closing its file); a second call does nothing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
