"""Downloads against a local HTTP server (127.0.0.1) that honours Range and can cut a transfer."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cenfusion.data.download import ADVICE, download, download_many
from cenfusion.errors import CenError


@dataclass
class FileServer:
    """What the handler serves and how it misbehaves; ``requests`` logs (path, Range header)."""

    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before a cut
    ignore_range: bool = False
    etags: bool = False  # send each file's ETag (no If-Range: a server that ignores it)
    stall_after: dict[str, int] = field(default_factory=dict)  # bytes sent before silence
    if_range: list[str | None] = field(default_factory=list)  # each request's If-Range
    modified: dict[str, str] = field(default_factory=dict)  # path -> its Last-Modified
    requests: list[tuple[str, str | None]] = field(default_factory=list)


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            """Keep the test output quiet."""

        def do_GET(self) -> None:
            state.requests.append((self.path, self.headers.get("Range")))
            state.if_range.append(self.headers.get("If-Range"))
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and not state.ignore_range:
                start = int(match[1])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            if state.etags:
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()[:16]}"')
            if self.path in state.modified:
                self.send_header("Last-Modified", state.modified[self.path])
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            stall = state.stall_after.pop(self.path, None)
            if stall is not None:
                self.wfile.write(body[start : start + stall])
                self.wfile.flush()
                time.sleep(2.0)
                return
            cut = state.cut_after.pop(self.path, None)
            if cut is None:
                self.wfile.write(body[start:])
                return
            self.wfile.write(body[start : start + cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    return Handler


@pytest.fixture()
def server() -> Iterator[FileServer]:
    state = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed * 13 + (i >> 8)) % 251 for i in range(size))


def test_download_writes_file_and_verifies_checksum(server: FileServer, tmp_path: Path) -> None:
    body = _payload(300_000)
    server.files["/a.bin"] = body
    dest = tmp_path / "sub" / "a.bin"
    got = download(
        f"{server.base}/a.bin",
        dest,
        sha256=hashlib.sha256(body).hexdigest().upper(),
        progress=False,
    )
    assert got == dest and dest.read_bytes() == body
    assert not (tmp_path / "sub" / "a.bin.part").exists()


def test_existing_file_is_skipped_without_a_request(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"already here")
    assert download(f"{server.base}/a.bin", dest, progress=False) == dest
    digest = hashlib.sha256(b"already here").hexdigest()
    assert download(f"{server.base}/a.bin", dest, sha256=digest, progress=False) == dest
    assert server.requests == []


def test_existing_file_with_wrong_checksum_is_fetched_again(
    server: FileServer, tmp_path: Path
) -> None:
    body = _payload(1000)
    server.files["/a.bin"] = body
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"stale")
    download(f"{server.base}/a.bin", dest, sha256=hashlib.sha256(body).hexdigest(), progress=False)
    assert dest.read_bytes() == body
    assert (tmp_path / "a.bin.bad").read_bytes() == b"stale"


def test_cut_connection_resumes_within_one_call(server: FileServer, tmp_path: Path) -> None:
    body = _payload(2_500_000, seed=1)
    server.files["/big.bin"] = body
    server.cut_after["/big.bin"] = 1_000_000
    dest = tmp_path / "big.bin"
    download(
        f"{server.base}/big.bin", dest, sha256=hashlib.sha256(body).hexdigest(), progress=False
    )
    assert dest.read_bytes() == body
    assert [r for _, r in server.requests] == [None, "bytes=1000000-"]


def test_cut_connection_leaves_part_that_a_later_call_resumes(
    server: FileServer, tmp_path: Path
) -> None:
    body = _payload(500_000, seed=2)
    server.files["/big.bin"] = body
    server.cut_after["/big.bin"] = 123_457
    dest = tmp_path / "big.bin"
    url = f"{server.base}/big.bin"
    with pytest.raises(CenError, match=re.escape(url)) as info:
        download(url, dest, retries=0, progress=False)
    assert str(info.value).endswith(f"; {ADVICE}") and "\n" not in str(info.value)
    part = tmp_path / "big.bin.part"
    assert part.read_bytes() == body[:123_457] and not dest.exists()
    download(url, dest, progress=False)
    assert dest.read_bytes() == body and not part.exists()
    assert server.requests[-1] == ("/big.bin", "bytes=123457-")


def _cut(server: FileServer, path: str, body: bytes, after: int, dest: Path) -> Path:
    """Leave ``dest``'s ``.part`` holding ``body[:after]``, as a transfer cut there does."""
    server.files[path] = body
    server.cut_after[path] = after
    with pytest.raises(CenError):
        download(f"{server.base}{path}", dest, retries=0, progress=False)
    part = dest.with_name(dest.name + ".part")
    assert part.read_bytes() == body[:after]
    return part


def test_the_bytes_before_a_stalled_server_went_silent_are_kept(
    server: FileServer, tmp_path: Path
) -> None:
    body = _payload(300_000, seed=10)
    server.files["/a.bin"] = body
    server.stall_after["/a.bin"] = 70_000
    dest = tmp_path / "a.bin"
    with pytest.raises(CenError, match="timed out"):
        download(f"{server.base}/a.bin", dest, retries=0, progress=False, timeout=0.5)
    assert dest.with_name("a.bin.part").read_bytes() == body[:70_000]
    download(f"{server.base}/a.bin", dest, progress=False)
    assert dest.read_bytes() == body and server.requests[-1] == ("/a.bin", "bytes=70000-")


def test_server_ignoring_range_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    body = _payload(200_000, seed=3)
    _cut(server, "/a.bin", body, 5000, tmp_path / "a.bin")
    server.ignore_range = True
    download(f"{server.base}/a.bin", tmp_path / "a.bin", progress=False)
    assert (tmp_path / "a.bin").read_bytes() == body
    assert server.requests == [("/a.bin", None), ("/a.bin", "bytes=5000-")]


def test_complete_part_file_is_finished_on_416(server: FileServer, tmp_path: Path) -> None:
    body = _payload(4000, seed=4)
    part = _cut(server, "/a.bin", body, 1000, tmp_path / "a.bin")
    with open(part, "ab") as f:
        f.write(body[1000:])  # the last bytes came, the process ended before the rename
    download(f"{server.base}/a.bin", tmp_path / "a.bin", progress=False)
    assert (tmp_path / "a.bin").read_bytes() == body
    assert server.requests[-1] == ("/a.bin", "bytes=4000-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_a_part_of_another_url_or_of_no_record_is_not_resumed(
    server: FileServer, tmp_path: Path
) -> None:
    """A user switching to a mirror that serves another version must not get a splice."""
    dest = tmp_path / "d.mat"
    _cut(server, "/old/d.mat", _payload(90_000, seed=6), 30_000, dest)
    new = server.files["/new/d.mat"] = _payload(90_000, seed=7)
    download(f"{server.base}/new/d.mat", dest, progress=False)
    assert dest.read_bytes() == new and server.requests[-1] == ("/new/d.mat", None)
    dest.unlink()
    dest.with_name("d.mat.part").write_bytes(b"bytes of unknown origin")
    assert download(f"{server.base}/new/d.mat", dest, progress=False).read_bytes() == new
    assert server.requests[-1] == ("/new/d.mat", None)


@pytest.mark.parametrize("same_length", [False, True])
def test_a_part_whose_file_changed_on_the_server_starts_over(
    server: FileServer, tmp_path: Path, same_length: bool
) -> None:
    server.etags = same_length  # another length tells without one; the same length needs it
    dest = tmp_path / "a.bin"
    first = _payload(80_000, seed=8)
    _cut(server, "/a.bin", first, 20_000, dest)
    changed = server.files["/a.bin"] = _payload(80_000 if same_length else 85_000, seed=9)
    download(f"{server.base}/a.bin", dest, progress=False)
    assert dest.read_bytes() == changed
    assert [r for _, r in server.requests[-2:]] == ["bytes=20000-", None]
    # the resume names the version it continues, for a server that honours If-Range
    assert server.if_range[-2] == (
        f'"{hashlib.sha256(first).hexdigest()[:16]}"' if same_length else None
    )


def test_checksum_mismatch_keeps_file_aside(server: FileServer, tmp_path: Path) -> None:
    body = _payload(5000, seed=5)
    server.files["/a.bin"] = body
    dest = tmp_path / "a.bin"
    url = f"{server.base}/a.bin"
    wrong = "0" * 64
    with pytest.raises(CenError) as info:
        download(url, dest, sha256=wrong, progress=False)
    message = str(info.value)
    assert url in message and wrong in message and hashlib.sha256(body).hexdigest() in message
    assert not dest.exists() and not (tmp_path / "a.bin.part").exists()
    assert (tmp_path / "a.bin.bad").read_bytes() == body


def test_http_error_names_url_and_alternatives(server: FileServer, tmp_path: Path) -> None:
    url = f"{server.base}/missing.bin"
    with pytest.raises(CenError, match=r"404 .*; --from DIR or a mirror$") as info:
        download(url, tmp_path / "m.bin", progress=False, advice="--from DIR or a mirror")
    assert url in str(info.value)
    assert len(server.requests) == 1  # a 404 is not retried


def test_unreachable_server_names_url(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.bin"
    with pytest.raises(CenError, match=re.escape(url) + f".*; {ADVICE}$"):
        download(url, tmp_path / "x.bin", retries=0, progress=False, timeout=5)
    assert not os.listdir(tmp_path)


def test_a_part_of_a_file_changed_on_a_server_that_says_only_its_date_starts_over(
    server: FileServer, tmp_path: Path
) -> None:
    dest = tmp_path / "a.bin"
    server.modified["/a.bin"] = "Mon, 07 Dec 2026 10:00:00 GMT"
    _cut(server, "/a.bin", _payload(60_000, seed=11), 15_000, dest)
    changed = server.files["/a.bin"] = _payload(60_000, seed=12)
    server.modified["/a.bin"] = "Tue, 08 Dec 2026 10:00:00 GMT"
    assert download(f"{server.base}/a.bin", dest, progress=False).read_bytes() == changed
    assert server.if_range[-2] == "Mon, 07 Dec 2026 10:00:00 GMT"


def test_a_whole_part_of_another_length_is_not_taken_for_the_file(
    server: FileServer, tmp_path: Path
) -> None:
    """The server's file shrank to the part's length: its 416 says "whole", the record's
    length says otherwise."""
    dest = tmp_path / "a.bin"
    _cut(server, "/a.bin", _payload(90_000, seed=13), 30_000, dest)
    shrunk = server.files["/a.bin"] = _payload(30_000, seed=14)
    assert download(f"{server.base}/a.bin", dest, progress=False).read_bytes() == shrunk


def test_one_process_at_a_time_downloads_a_file_and_a_bad_record_starts_over(
    server: FileServer, tmp_path: Path
) -> None:
    import fcntl

    body = server.files["/a.bin"] = _payload(20_000, seed=15)
    dest = tmp_path / "a.bin"
    lock = tmp_path / "a.bin.part.lock"
    with open(lock, "w") as held:  # another process's download, under way
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CenError, match="a.bin: another process is downloading it now"):
            download(f"{server.base}/a.bin", dest, progress=False)
    lock.unlink()
    (tmp_path / "a.bin.part").write_bytes(body[:5000])
    (tmp_path / "a.bin.part.source").write_text("[" * 100_000)  # json recurses past its limit
    assert download(f"{server.base}/a.bin", dest, progress=False).read_bytes() == body
    (tmp_path / "b.bin.part").write_bytes(b"x")
    (tmp_path / "b.bin.part.source").mkdir()
    server.files["/b.bin"] = body
    assert download(f"{server.base}/b.bin", tmp_path / "b.bin", progress=False).read_bytes() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def test_download_many_in_parallel(server: FileServer, tmp_path: Path) -> None:
    bodies = {f"/f{k}.bin": _payload(50_000 + k, seed=k) for k in range(5)}
    server.files.update(bodies)
    server.cut_after["/f2.bin"] = 7000
    items = [
        (f"{server.base}{p}", tmp_path / p[1:], hashlib.sha256(b).hexdigest())
        for p, b in bodies.items()
    ]
    paths = download_many(items, workers=3, progress=False)
    assert paths == [tmp_path / p[1:] for p in bodies]
    assert all((tmp_path / p[1:]).read_bytes() == b for p, b in bodies.items())


def test_download_many_rejects_duplicate_targets(tmp_path: Path) -> None:
    items = [("http://127.0.0.1:9/a", tmp_path / "a"), ("http://127.0.0.1:9/b", tmp_path / "a")]
    with pytest.raises(CenError, match="same file"):
        download_many(items, progress=False)


def test_download_many_raises_first_failure(server: FileServer, tmp_path: Path) -> None:
    server.files["/ok.bin"] = b"fine"
    items = [
        (f"{server.base}/ok.bin", tmp_path / "ok.bin"),
        (f"{server.base}/nope.bin", tmp_path / "nope.bin"),
    ]
    with pytest.raises(CenError, match=r"nope\.bin"):
        download_many(items, workers=2, progress=False)


def test_a_file_failing_its_check_is_removed_fetched_or_found(
    server: FileServer, tmp_path: Path
) -> None:
    """A mirror's error page under a data file's name is not kept, so a rerun fetches again."""
    server.files["/d.mat"] = b"<html>moved</html>"
    dest = tmp_path / "d.mat"

    def check(path: Path) -> str | None:
        return "is not a MATLAB file" if path.read_bytes().startswith(b"<html>") else None

    url = f"{server.base}/d.mat"
    with pytest.raises(CenError, match=r"d\.mat: the file it gave is not a MATLAB file; removed"):
        download(url, dest, progress=False, check=check)
    assert not dest.exists() and not (tmp_path / "d.mat.part").exists()
    dest.write_bytes(b"<html>kept by an older version</html>")
    server.files["/d.mat"] = good = _payload(1000)
    assert download(url, dest, progress=False, check=check).read_bytes() == good
    server.requests.clear()
    assert download(url, dest, progress=False, check=check).read_bytes() == good
    assert server.requests == [], "a file that passes its check is not fetched again"
