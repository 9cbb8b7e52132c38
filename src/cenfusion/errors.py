"""The one exception type for bad user input, and short words for what a library said.

Raised with a single line naming the file, flag or sample at fault and what was expected;
the CLI prints it without a traceback and exits with status 2. Operating-system errors (a
full disk, a read-only folder, too many open files) are the user's to fix too: the CLI
prints them as one line with :func:`describe_os_error`.
"""

from __future__ import annotations

import pickle
import re

#: The longest line an error may print (longer ones lose words from the middle).
MAX_LINE = 299
#: Problems listed before a check gives up listing (it still counts them all).
MAX_PROBLEMS = 50
#: A URL with folders between its host and its last part.
_URL = re.compile(r"^([a-z][a-z0-9+.-]*://[^/\s]+)/[^\s]*(/[^/\s]+/?)$")


class CenError(Exception):
    """Bad input or configuration, explained in one line."""


class ForeignCheckpointError(CenError):
    """A readable file that is not a cenfusion checkpoint (e.g. a released CEN ``.pth.tar``)."""


def shorten(text: str, limit: int = 80) -> str:
    """``text`` on one line (whitespace collapsed), at most ``limit`` characters: a longer
    one first loses the middle folders of its URLs (``http://host/.../file.mat``: the host
    and the file still say which), then whole words from its middle, since its start names
    the culprit and its end often the file or command to use, kept whole up to half the
    room; a word longer than its room is cut."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    flat = " ".join(_URL.sub(r"\1/...\2", word) for word in flat.split(" "))
    if len(flat) <= limit:
        return flat
    mark = " ... "
    room = limit - len(mark)
    last_word = len(flat) - flat.rfind(" ") - 1
    tail_room = max(room // 3, min(last_word, room // 2))
    head = flat[: room - tail_room + 1]
    head = head.rsplit(" ", 1)[0] if " " in head[1:] else head[:-1]
    tail = flat[len(flat) - (room - len(head)) - 1 :]
    tail = tail.split(" ", 1)[1] if " " in tail[:-1] else tail[1:]
    return head + mark + tail


def describe_load_error(err: BaseException) -> str:
    """Why ``torch.load`` refused a file, in a few words (torch's own text runs to many lines).

    Recognised: a cut-off or damaged file, and a pickle holding Python objects other than
    tensors (which ``weights_only`` loading refuses for safety); anything else is torch's
    first line, shortened.
    """
    text = str(err)
    unsupported = re.search(r"Unsupported global: GLOBAL (\w+(?:\.\w+)+)", text)
    if unsupported:
        return f"holds Python objects other than tensors ({unsupported.group(1)}), not loaded"
    if "Unsupported global" in text:  # no module path: text read as a pickle's opcodes
        return "not a PyTorch file"
    damaged = ("central directory", "PytorchStreamReader", "Ran out of input", "truncated")
    if isinstance(err, EOFError) or any(word in text for word in damaged):
        return "truncated or damaged (the file ends before its data does)"
    if "mmap can only be used" in text:
        return "not in the zip format of torch.save"
    if isinstance(err, (KeyError, IndexError, UnicodeDecodeError, pickle.UnpicklingError)):
        return "not a PyTorch file"
    if re.search(r"Unsupported operand|invalid load key|could not find MARK", text):
        return "not a PyTorch file"
    first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
    return shorten(first, 80)


def describe_os_error(err: OSError) -> str:
    """``PATH: cause`` for an operating-system error (the cause as the system words it)."""
    cause = err.strerror or shorten(str(err), 80) or type(err).__name__
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(map(str, paths))}: {cause}" if paths else cause
