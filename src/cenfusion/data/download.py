"""Resumable, checksum-verified downloads with a progress bar.

A file is streamed to ``DEST.part`` next to its destination and renamed to ``DEST`` only once
it is complete (and its SHA-256 matches, when one is given, and it reads as the format it
should have, when a check is given: a mirror's error page saved under a data file's name is
removed, not kept). An interrupted transfer leaves the
``.part`` file behind, with a ``.part.source`` record of its URL and of the version the
server gave (``ETag``, ``Last-Modified``, length); the next attempt, in the same call or a
later one, asks the server for the rest with an HTTP ``Range`` request, and starts over when
the server ignores it, when the ``.part`` was begun from another URL (another mirror) or
without a record, and when the file on the server is no longer the version it began with.

Example::

    path = download("https://example.org/data.mat", Path("downloads/data.mat"))
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from cenfusion.errors import CenError

try:
    import fcntl
except ImportError:  # Windows: downloads go unlocked
    fcntl = None  # type: ignore[assignment]

_CHUNK = 1 << 20
_USER_AGENT = "cenfusion-downloader"
#: What a failed download's message advises by default; each command names its own flags.
ADVICE = "fetch the file another way, or from a mirror"
#: The advice of the commands that take downloaded files from a folder.
FROM_ADVICE = (
    "fetch it another way and pass its folder with --from DIR, or point its URL flag at a mirror"
)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
_RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


class DownloadItem(NamedTuple):
    """One file for :func:`download_many`; a plain ``(url, dest[, sha256])`` tuple also works."""

    url: str
    dest: Path
    sha256: str | None = None


#: What is wrong with a fetched file, in words that follow "the file it gave" (None: nothing).
FileCheck = Callable[[Path], str | None]


class _TransferError(Exception):
    """A network failure that a later attempt may get past."""


def one_line(reason: object) -> str:
    """``str(reason)`` (an exception or a message) with whitespace runs collapsed to one space."""
    text = " ".join(str(reason).split())
    return text or type(reason).__name__


def sha256_file(path: Path) -> str:
    """Hex SHA-256 digest of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class _Progress:
    """Byte progress that one or several concurrent transfers report into.

    Each transfer reports where its current response starts and how long the whole file is;
    the shared bar's position and total are moved by the difference to what that transfer
    reported before, so a restart or a resume keeps the bar truthful.
    """

    def __init__(self, bar: tqdm) -> None:
        self._bar = bar
        self._lock = threading.Lock()

    def adjust(self, done: int, total: int) -> None:
        """Move the bar by ``done`` bytes and its total by ``total`` bytes (either may be < 0)."""
        with self._lock:
            if total:
                self._bar.total = (self._bar.total or 0) + total
                self._bar.refresh()
            if done:
                self._bar.update(done)


def _byte_bar(desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=0, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress
    )


def download(
    url: str,
    dest: Path,
    sha256: str | None = None,
    progress: bool = True,
    *,
    retries: int = 3,
    timeout: float = 60.0,
    advice: str = ADVICE,
    check: FileCheck | None = None,
) -> Path:
    """Fetch ``url`` to ``dest`` unless it is already there; return ``dest``.

    Args:
        url: http(s) URL.
        dest: destination file; its folder is created. An existing ``dest`` is kept without
            any request when ``sha256`` is None or matches; one that does not match is moved
            aside to ``dest.name + ".bad"`` and fetched again.
        sha256: expected hex digest (any case), verified after the transfer.
        progress: show a tqdm byte bar.
        retries: further attempts after a failed one, each resuming the ``.part`` file.
        timeout: seconds without data after which an attempt fails.
        advice: how to get around a failed download, ending its message.
        check: says what is wrong with a file that is not of its format (an HTML error page
            under a data file's name); such a file, fetched or already there, is removed.

    Raises:
        CenError: the server or network failed after all attempts (naming the URL and
            ``advice``), or the checksum did not match (naming URL, expected and actual
            digests; the file is kept as ``dest.name + ".bad"``).
    """
    with _byte_bar(Path(dest).name, progress) as bar:
        return _fetch(url, Path(dest), sha256, _Progress(bar), retries, timeout, advice, check)


def download_many(
    items: Iterable[DownloadItem | tuple[str, Path] | tuple[str, Path, str | None]],
    workers: int = 4,
    progress: bool = True,
    *,
    retries: int = 3,
    timeout: float = 60.0,
    advice: str = ADVICE,
    check: FileCheck | None = None,
) -> list[Path]:
    """Fetch several files in parallel with :func:`download`'s rules; return their paths in order.

    ``items`` are :class:`DownloadItem` or ``(url, dest[, sha256])`` tuples. One byte bar shows
    the sum of all transfers. On the first failure (in ``items`` order) the transfers not yet
    started are cancelled, the running ones finish, and that failure is raised.
    """
    if workers < 1:
        raise CenError(f"download workers: expected at least 1, got {workers}")
    jobs = [DownloadItem(*it) for it in items]
    seen: set[Path] = set()
    for job in jobs:
        key = Path(job.dest).resolve()
        if key in seen:
            raise CenError(f"{job.dest}: two downloads target the same file")
        seen.add(key)
    with _byte_bar(f"{len(jobs)} files", progress) as bar:
        shared = _Progress(bar)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [
                pool.submit(
                    _fetch, j.url, Path(j.dest), j.sha256, shared, retries, timeout, advice, check
                )
                for j in jobs
            ]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def _source_record(part: Path) -> Path:
    return part.with_name(part.name + ".source")


def _read_source(part: Path) -> dict[str, object]:
    """What ``part`` was begun from (empty when it has no readable record)."""
    try:
        record = json.loads(_source_record(part).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return record if isinstance(record, dict) else {}


def _drop_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    record = _source_record(part)
    if record.is_dir() and not record.is_symlink():
        shutil.rmtree(record)
    record.unlink(missing_ok=True)


@contextlib.contextmanager
def _fetching_alone(dest: Path) -> Iterator[None]:
    """Hold ``dest``'s download lock (``DEST.part.lock``, removed after): a second process
    fetching the same file appended to the first one's ``.part``. Where the system has no
    ``flock`` (Windows) nothing is locked."""
    if fcntl is None:
        yield
        return
    lock = dest.with_name(dest.name + ".part.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(lock).st_ino != os.fstat(fd).st_ino:  # its holder removed it meanwhile
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise CenError(
            f"{dest}: another process is downloading it now; let it finish, or stop it"
        ) from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _fetch(
    url: str,
    dest: Path,
    sha256: str | None,
    bar: _Progress,
    retries: int,
    timeout: float,
    advice: str,
    check: FileCheck | None,
) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _fetching_alone(dest):
        expected = sha256.strip().lower() if sha256 else None
        bad = dest.with_name(dest.name + ".bad")
        if dest.is_file():
            if expected is not None and sha256_file(dest) != expected:
                os.replace(dest, bad)
            elif check is not None and check(dest) is not None:
                dest.unlink()
            else:
                return dest
        part = dest.with_name(dest.name + ".part")
        if part.exists() and _read_source(part).get("url") != url:
            _drop_part(part)  # begun from another mirror: its bytes may be of another file
        attempt = 0
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                _transfer(url, part, bar, timeout)
                break
            except CenError as exc:
                raise CenError(f"{exc}; {advice}") from None
            except _TransferError as exc:
                attempt += 1
                if attempt > retries:
                    tries = f" after {attempt} attempts" if attempt > 1 else ""
                    raise CenError(f"cannot download {url}{tries}: {exc}; {advice}") from None
                made_progress = part.exists() and part.stat().st_size > before
                if not made_progress:
                    time.sleep(min(attempt, 5))
        if expected is not None:
            actual = sha256_file(part)
            if actual != expected:
                os.replace(part, bad)
                _drop_part(part)
                raise CenError(
                    f"checksum mismatch for {url}: expected sha256 {expected}, got {actual}; "
                    f"the file was kept as {bad}"
                )
        problem = check(part) if check is not None else None
        if problem is not None:
            _drop_part(part)
            raise CenError(
                f"{url}: the file it gave {problem}; removed, so a rerun fetches it again; {advice}"
            )
        os.replace(part, dest)
        _drop_part(part)
        return dest


def _open(
    url: str, offset: int, timeout: float, version: str | None = None
) -> http.client.HTTPResponse | None:
    """Open ``url`` from byte ``offset``; None when the server says the part is already whole.
    ``version``: the part's ``ETag`` or ``Last-Modified``, so that a server that knows the
    file changed sends it whole (``If-Range``)."""
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if version:
            headers["If-Range"] = version
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            whole = _UNSATISFIED_RANGE.fullmatch(exc.headers.get("Content-Range", "").strip())
            exc.close()
            if whole and int(whole[1]) == offset:
                return None
            return _open(url, 0, timeout)
        exc.close()
        reason = f"HTTP {exc.code} {exc.reason}"
        if exc.code in _RETRYABLE_HTTP:
            raise _TransferError(reason) from None
        raise CenError(f"cannot download {url}: {reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, OSError) and reason.strerror:
            reason = reason.strerror
        raise _TransferError(one_line(reason)) from None


def _transfer(url: str, part: Path, bar: _Progress, timeout: float) -> None:
    """One attempt: append the rest of ``url`` to ``part`` (or rewrite it when not resumable)."""
    offset = part.stat().st_size if part.exists() else 0
    began = _read_source(part) if offset else {}
    response = _open(url, offset, timeout, _version(began))
    if response is None:
        if began.get("length") not in (None, offset):  # whole, but of another length
            _drop_part(part)
            return _transfer(url, part, bar, timeout)
        bar.adjust(offset, offset)
        return
    with response:
        start, total = 0, None
        length = response.headers.get("Content-Length")
        if offset and response.status == 206:
            span = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if span is None or int(span[1]) != offset:
                _drop_part(part)
                raise _TransferError(
                    f"server answered a resume from byte {offset} with an unexpected range; "
                    "starting over"
                )
            start = offset
            total = int(span[3]) if span[3] != "*" else None
            if _changed(began, total, response.headers):
                response.close()
                _drop_part(part)
                return _transfer(url, part, bar, timeout)
        if total is None and length is not None and length.isdigit():
            total = start + int(length)
        if not start:
            record = {
                "url": url,
                "etag": response.headers.get("ETag"),
                "last_modified": response.headers.get("Last-Modified"),
                "length": total,
            }
            _source_record(part).write_text(json.dumps(record), encoding="utf-8")
        reported_total = total or 0
        bar.adjust(start, reported_total)
        received = start
        try:
            with open(part, "ab" if start else "wb") as f:
                while chunk := _read(response):
                    f.write(chunk)
                    received += len(chunk)
                    bar.adjust(len(chunk), 0)
            if total is not None and received != total:
                raise _TransferError(f"connection closed after {received} of {total} bytes")
        except BaseException:
            bar.adjust(-received, -reported_total)
            raise
        if total is None:
            bar.adjust(0, received)


def _version(began: dict[str, object]) -> str | None:
    """The part's ``If-Range`` validator: a strong ETag, else its Last-Modified date."""
    etag, modified = began.get("etag"), began.get("last_modified")
    if isinstance(etag, str) and not etag.startswith("W/"):
        return etag
    return modified if isinstance(modified, str) else None


def _changed(began: dict[str, object], total: int | None, headers: Any) -> bool:
    """Whether the server's file is no longer the one the part was begun from: another
    length, ETag or Last-Modified date (a server that ignores If-Range still says them)."""
    length = began.get("length")
    if length is not None and total is not None and length != total:
        return True
    for key, header in (("etag", "ETag"), ("last_modified", "Last-Modified")):
        now = headers.get(header)
        if began.get(key) and now is not None and now != began[key]:
            return True
    return False


def _read(response: http.client.HTTPResponse) -> bytes:
    """The next block of ``response``, as much as has come (a stalled server's last bytes are
    kept for the resume); b"" at its end (or where the server cut it short)."""
    try:
        return response.read1(_CHUNK)
    except (http.client.HTTPException, OSError) as exc:
        raise _TransferError(f"connection lost ({one_line(exc)})") from None
