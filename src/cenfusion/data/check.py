"""Check a list-file data root before training: every line, file, size, bit depth and label.

Training reads a sample only when it needs it, so a bad label in the validation list would
surface after a whole training epoch. :func:`check_dataset` reads every file named by the
list files once, up front, and reports every problem as one line naming the list file, the
line, the file and what was expected.

What is read: input images through their header (size and mode) plus, for PNG, PIL's
``verify`` (chunk checksums through the end of the file, which catches truncated and
corrupted files without inflating the pixels); other formats, and depth stored as colour
(valid only with three equal channels), are decoded with :func:`decode_image`. Masks are
decoded with :func:`decode_mask`, since their labels are in the pixels.

What was read is cached per file, keyed on its path, size and modification time, in a JSON
file (default ``$CEN_CACHE/data-check/``, ``$CEN_CACHE`` defaulting to ``~/.cache/cenfusion``),
so a second check of an unchanged root opens no image. The cache holds facts (size, mode,
label values), not verdicts: checking with another class count reuses it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cenfusion.data.listfile import (
    HIGH_BIT_MODES,
    IGNORE_INDEX,
    SINGLE_CHANNEL_MODES,
    ModalitySpec,
    check_data_root,
    decode_image,
    decode_mask,
    read_list_file,
    split_line,
)
from cenfusion.errors import MAX_PROBLEMS, CenError

#: Raised whenever what a file must be changes, so that older verdicts are not reused.
CACHE_VERSION = 2
MASK = "mask"


@dataclass(frozen=True)
class FileFacts:
    """What the check needs to know about one file: size, PIL mode and, for masks, the
    label values present."""

    height: int
    width: int
    mode: str
    labels: tuple[int, ...] | None = None

    @property
    def bits(self) -> int:
        return 16 if self.mode in HIGH_BIT_MODES else 8


@dataclass(frozen=True)
class CheckReport:
    """A data root that passed: ``samples`` lines over all lists, ``files`` distinct files,
    ``read`` of them opened in this run (the rest came from the cache), the bit depth of
    each depth modality, and the label values found in the masks."""

    samples: int
    files: int
    read: int
    depth_bits: dict[str, int]
    labels: tuple[int, ...]


def default_cache_dir() -> Path:
    """``$CEN_CACHE/data-check`` (``$CEN_CACHE`` defaulting to ``~/.cache/cenfusion``)."""
    base = os.environ.get("CEN_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "cenfusion") / "data-check"


def read_facts(path: Path, role: str) -> FileFacts:
    """Read ``path`` as an input of kind ``role`` or, with ``role == "mask"``, as a mask.

    Raises :class:`CenError` naming the file when it cannot be read as such.
    """
    if role == MASK:
        labels = decode_mask(path).numpy()
        with Image.open(path) as image:
            mode = image.mode
        return FileFacts(*labels.shape, mode, tuple(int(v) for v in np.unique(labels)))
    try:
        with Image.open(path) as image:
            facts = FileFacts(image.height, image.width, image.mode)
            decode = image.format != "PNG" or (
                role == "depth" and image.mode not in SINGLE_CHANNEL_MODES
            )
            if not decode:
                image.verify()
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise CenError(f"cannot read image {path}: {' '.join(str(exc).split())}") from None
    if decode:
        decode_image(path, role)
    return facts


class _FactCache:
    """Facts per ``(role, path)``, valid while the file keeps its size and mtime."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        try:
            stored = json.loads(path.read_text())
            if stored.get("version") == CACHE_VERSION:
                self.entries = stored["files"]
        except (OSError, ValueError, KeyError, AttributeError):
            self.entries = {}

    @classmethod
    def of_root(cls, root: Path, cache_dir: str | Path | None) -> _FactCache:
        """The cache of the data root ``root``, in ``cache_dir`` (default
        :func:`default_cache_dir`)."""
        key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
        return cls(Path(cache_dir or default_cache_dir()) / f"{key}.json")

    @staticmethod
    def _key(path: Path, role: str) -> str:
        return f"{role}:{path.resolve()}"

    def get(self, path: Path, role: str, stat: os.stat_result) -> FileFacts | None:
        entry = self.entries.get(self._key(path, role))
        if entry is None or entry["bytes"] != stat.st_size or entry["mtime_ns"] != stat.st_mtime_ns:
            return None
        labels = entry.get("labels")
        return FileFacts(
            entry["height"], entry["width"], entry["mode"], tuple(labels) if labels else None
        )

    def put(self, path: Path, role: str, stat: os.stat_result, facts: FileFacts) -> None:
        entry = {
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "height": facts.height,
            "width": facts.width,
            "mode": facts.mode,
        }
        if facts.labels is not None:
            entry["labels"] = list(facts.labels)
        self.entries[self._key(path, role)] = entry

    def save(self) -> None:
        """Write atomically; a cache that cannot be written only costs time next run."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        except OSError:
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "files": self.entries}, f)
            os.replace(tmp, self.path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)


class _Checker:
    """One pass over the list files, collecting problems instead of stopping at the first."""

    def __init__(
        self,
        root: Path,
        cache: _FactCache,
        modalities: Sequence[ModalitySpec],
        mask_column: int | None,
        num_classes: int | None,
    ) -> None:
        self.root = root
        self.cache = cache
        self.modalities = tuple(modalities)
        self.mask_column = mask_column
        self.num_classes = num_classes
        self.problems: list[str] = []
        self.seen: dict[tuple[Path, str], FileFacts | str] = {}
        self.read = 0
        self.depth_files: dict[str, list[tuple[int, str, str]]] = {}
        self.labels: set[int] = set()

    def check_sample(self, where: str, columns: Sequence[str]) -> None:
        """Files, sizes and labels of one list-file line (``where``: ``list:line``)."""
        sized: list[tuple[str, FileFacts]] = []
        if self.mask_column is not None:
            path = self.root / columns[self.mask_column]
            facts = self.facts(where, path, MASK)
            if facts is not None:
                sized.append((self.name(path), facts))
                self.labels.update(facts.labels or ())
                _check_labels(self.problems, where, self.name(path), facts, self.num_classes)
        for spec in self.modalities:
            path = self.root / columns[spec.column]
            facts = self.facts(where, path, spec.kind)
            if facts is None:
                continue
            sized.append((self.name(path), facts))
            if spec.kind == "depth":
                entry = (facts.bits, where, self.name(path))
                self.depth_files.setdefault(spec.name, []).append(entry)
        _check_sizes(self.problems, where, sized, self.mask_column is not None)

    def facts(self, where: str, path: Path, role: str) -> FileFacts | None:
        """Facts of ``path`` (once per run), or ``None`` after recording why not."""
        if (path, role) not in self.seen:
            self.seen[path, role] = self._lookup(path, role)
        found = self.seen[path, role]
        if isinstance(found, str):
            self.problems.append(f"{where}: {found}")
            return None
        return found

    def name(self, path: Path) -> str:
        """``path`` as written in the list file (relative to the root), to keep lines short."""
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def _lookup(self, path: Path, role: str) -> FileFacts | str:
        try:
            stat = path.stat()
        except OSError:
            return f"file {self.name(path)} does not exist"
        if not path.is_file():
            return f"{self.name(path)} is not a file"
        cached = self.cache.get(path, role, stat)
        if cached is not None:
            return cached
        self.read += 1
        try:
            facts = read_facts(path, role)
        except CenError as err:
            return str(err).replace(str(path), self.name(path))
        self.cache.put(path, role, stat, facts)
        return facts


def _list_lines(root: Path, list_files: Sequence[str | Path]) -> list[tuple[Path, list[str]]]:
    check_data_root(root)
    if not list_files:
        raise CenError(f"data root {root}: give at least one list file")
    return [(root / name, read_list_file(root / name)) for name in list_files]


def _check_modalities(
    modalities: Sequence[ModalitySpec], num_classes: int | None, mask_column: int | None
) -> None:
    names = [m.name for m in modalities]
    if not names or len(set(names)) != len(names):
        raise CenError(f"modalities {names}: expected at least one, with distinct names")
    for m in modalities:
        if m.column == mask_column:
            raise CenError(
                f"--mask-column {mask_column} is also the column of modality {m.name} "
                f"({m.name}:{m.column}:{m.kind}): the labels would be an input"
            )
    if num_classes is not None and not 1 <= num_classes <= IGNORE_INDEX:
        raise CenError(f"--num-classes {num_classes}: expected 1..{IGNORE_INDEX}")


def check_dataset(
    root: str | Path,
    list_files: Sequence[str | Path],
    modalities: Sequence[ModalitySpec],
    num_classes: int | None,
    *,
    mask_column: int | None = 1,
    allow_mixed_depth: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    max_problems: int = MAX_PROBLEMS,
    report: Callable[[str], None] | None = None,
) -> CheckReport:
    """Check every line of ``root/list_file`` for each of ``list_files``.

    Per line: the column count (at least the columns read, then as many as the list's first
    line); per file: it exists and reads as its modality's kind (or as a mask); per sample:
    every input has the mask's size (without a mask, the first input's); masks hold only
    ``0..num_classes-1`` or 255 (``num_classes=None``: not checked); each depth modality has
    one bit depth over all lists (8 or 16), unless ``allow_mixed_depth``.

    Every problem is passed to ``report`` (default: a line on stderr), up to ``max_problems``,
    then :class:`CenError` is raised with the first one and the count. The progress bar
    shows only when ``progress`` and stderr is a terminal.
    """
    root = Path(root)
    _check_modalities(modalities, num_classes, mask_column)
    lists = _list_lines(root, list_files)
    cache = _FactCache.of_root(root, cache_dir)
    checker = _Checker(root, cache, modalities, mask_column, num_classes)
    used = sorted({m.column for m in modalities} | ({mask_column} - {None}))
    samples = 0
    bar = tqdm(
        total=sum(len(lines) for _, lines in lists),
        desc="data check",
        unit="line",
        disable=not progress or not sys.stderr.isatty(),
    )
    for list_path, lines in lists:
        width: int | None = None
        listed = 0
        short: list[tuple[int, int]] = []
        spaced, first = "", len(checker.problems)
        for number, line in enumerate(lines, start=1):
            bar.update()
            if not line.strip():
                continue
            columns = split_line(line.strip())
            where = f"{list_path}:{number}"
            if width is None and len(columns) <= used[-1]:
                short.append((number, len(columns)))
            elif len(columns) != (width := width or len(columns)):
                checker.problems.append(
                    f"{where}: expected {width} tab-separated columns like the first line, "
                    f"got {len(columns)}"
                )
            else:
                listed += 1
                checker.check_sample(where, columns)
                pairs = itertools.pairwise(columns) if "\t" not in line and not spaced else ()
                if any((root / f"{a} {b}").is_file() for a, b in pairs):
                    spaced = f"{list_path}: a line without tabs is split at spaces; paths with "
                    spaced += "spaces need tab-separated columns"
        if spaced:
            checker.problems.insert(first, spaced)
        if short:
            number, got = short[0]
            rest = len(short) - 1
            more = f"; {rest} more line{'s are' if rest > 1 else ' is'} as short" if rest else ""
            checker.problems.append(
                f"{list_path}:{number}: expected at least {used[-1] + 1} tab-separated columns "
                f"(columns {used} are read), got {got}{more}"
            )
        elif not listed:
            checker.problems.append(f"list file {list_path} lists no samples")
        samples += listed
    bar.close()
    depth_bits = _check_depth_bits(checker.problems, checker.depth_files, allow_mixed_depth)
    cache.save()
    raise_problems(checker.problems, max_problems, report)
    _say_shared_samples(lists, report or _to_stderr)
    labels = tuple(sorted(checker.labels))
    return CheckReport(samples, len(checker.seen), checker.read, depth_bits, labels)


def _check_labels(
    problems: list[str], where: str, path: str, facts: FileFacts, num_classes: int | None
) -> None:
    if num_classes is None:
        return
    bad = [v for v in facts.labels or () if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        problems.append(
            f"{where}: mask {path} has label {max(bad)}, expected 0..{num_classes - 1} "
            f"or {IGNORE_INDEX} (ignore)"
        )


def _check_sizes(
    problems: list[str], where: str, sized: list[tuple[str, FileFacts]], has_mask: bool
) -> None:
    """Every file has the size of ``sized[0]`` (the mask when there is one)."""
    if not sized:
        return
    ref_path, ref = sized[0]
    like = "its mask" if has_mask else "the first input"
    for path, facts in sized[1:]:
        if (facts.height, facts.width) != (ref.height, ref.width):
            problems.append(
                f"{where}: {path} is {facts.height}x{facts.width}, expected "
                f"{ref.height}x{ref.width} like {like} {ref_path}"
            )


def _check_depth_bits(
    problems: list[str],
    depth_files: dict[str, list[tuple[int, str, str]]],
    allow_mixed: bool,
) -> dict[str, int]:
    """Bit depth of each depth modality (the majority one); the others are problems unless
    ``allow_mixed``: one ``depth_scale`` cannot fit both 8- and 16-bit encodings."""
    result: dict[str, int] = {}
    for name, entries in depth_files.items():
        counts = Counter(bits for bits, _, _ in entries)
        majority, count = counts.most_common(1)[0]
        result[name] = majority
        if allow_mixed:
            continue
        for bits, where, path in entries:
            if bits != majority:
                problems.append(
                    f"{where}: {name} {path} is {bits}-bit, expected {majority}-bit like "
                    f"{count} others (--allow-mixed-depth to accept)"
                )
    return result


def _to_stderr(line: str) -> None:
    tqdm.write(line, file=sys.stderr)


def _say_shared_samples(lists: list[tuple[Path, list[str]]], say: Callable[[str], None]) -> None:
    """Warn of a sample listed twice: in one list it counts twice (in a validation list, in
    the scores); in two, a validation list sharing samples with the training list scores
    what the network has seen."""
    samples = []
    for path, lines in lists:
        listed = Counter(tuple(split_line(x.strip())) for x in lines if x.strip())
        repeated = sorted(s for s, n in listed.items() if n > 1)
        if repeated:
            many = len(repeated) > 1
            say(f"warning: {path} lists {len(repeated)} sample{'s' * many} more than once, "
                f"e.g. the one of {repeated[0][0]}; each line counts")  # fmt: skip
        samples.append((path, set(listed)))
    for i, (first, own) in enumerate(samples):
        for later, theirs in samples[i + 1 :]:
            shared = own & theirs
            if shared and first.resolve() != later.resolve():
                many = len(shared) > 1
                say(
                    f"warning: {len(shared)} sample{'s' * many} of {later} "
                    f"{'are' if many else 'is'} also in {first.name}, e.g. the one of "
                    f"{min(shared)[0]}"
                )


def raise_problems(
    problems: list[str], max_problems: int, report: Callable[[str], None] | None
) -> None:
    """Raise the first of ``problems`` as one :class:`CenError` line, each of several said
    first (``report``, else stderr) up to ``max_problems``."""
    if not problems:
        return
    if len(problems) == 1:
        raise CenError(problems[0])
    say = report or _to_stderr
    for line in problems[:max_problems]:
        say(line)
    if len(problems) > max_problems:
        say(f"... and {len(problems) - max_problems} more problems")
    raise CenError(f"{problems[0]} (1 of {len(problems)} problems)")


def check_root_images(
    root: str | Path,
    paths: Sequence[Path],
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    max_problems: int = MAX_PROBLEMS,
    report: Callable[[str], None] | None = None,
) -> None:
    """Read every image of ``paths`` (files under the data root ``root``) as
    :func:`check_dataset` reads an input, with its cache: a data set without list-file
    columns (Taskonomy's views) is checked before training too. Every unreadable file is
    reported as there, then :class:`CenError` is raised."""
    root = Path(root)
    cache = _FactCache.of_root(root, cache_dir)
    checker = _Checker(root, cache, (), None, None)
    show = progress and sys.stderr.isatty()
    for path in tqdm(paths, desc="data check", unit="file", disable=not show):
        found = checker._lookup(path, "rgb")
        if isinstance(found, str):
            checker.problems.append(f"{root}: {found}")
    cache.save()
    raise_problems(checker.problems, max_problems, report)
