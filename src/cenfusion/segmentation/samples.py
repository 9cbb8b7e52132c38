"""One's own pictures gathered into samples to predict: files or folders per modality (paired
by file stem), the modalities named and typed, and the outputs' names kept apart."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cenfusion.data.listfile import KINDS, check_modality_name
from cenfusion.errors import CenError

#: File types read from input folders.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class Modality:
    """One input of the network: its name (used in file names) and how to decode it."""

    name: str
    kind: str

    @classmethod
    def parse(cls, text: str, trained: Mapping[str, str] | None = None) -> Modality:
        """``"NAME:KIND"``, or a bare ``NAME``: of the kind it was trained as (``trained``,
        name -> kind), else of the kind it names (``rgb``, ``depth``, ``gray``)."""
        name, _, kind = text.partition(":")
        check_modality_name(name)
        kind = kind or (trained or {}).get(name) or name
        if kind not in KINDS:
            raise CenError(
                f"modality {text!r}: kind {kind!r} is unknown; name a kind as NAME:KIND "
                f"with KIND one of {', '.join(KINDS)}"
            )
        return cls(name, kind)


@dataclass(frozen=True)
class Sample:
    """One prediction to make: one file per modality; outputs are named after ``stem``."""

    stem: str
    paths: tuple[Path, ...]


def _image_files(folder: Path) -> dict[str, Path]:
    """``{stem: path}`` of the images in ``folder``; two files with one stem are an error."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            raise CenError(
                f"{folder}: two images named {path.stem} ({files[path.stem].name}, "
                f"{path.name}); keep one"
            )
        files[path.stem] = path
    return files


def pair_folders(folders: Sequence[Path], names: Sequence[str]) -> list[Sample]:
    """One sample per stem found in every folder; a stem missing from any folder is an error
    naming the file without a partner."""
    listings = [_image_files(f) for f in folders]
    stems = sorted(set().union(*listings))
    if not stems:
        raise CenError(f"{', '.join(map(str, folders))}: no images ({', '.join(IMAGE_SUFFIXES)})")
    for stem in stems:
        for folder, name, listing in zip(folders, names, listings):
            if stem not in listing:
                have = next(lst[stem] for lst in listings if stem in lst)
                raise CenError(
                    f"{have} has no {name} partner: expected {folder}/{stem}.* "
                    f"(files are paired by name across {', '.join(map(str, folders))})"
                )
    return [Sample(s, tuple(lst[s] for lst in listings)) for s in stems]


def collect_samples(
    items: Sequence[str | Path | Sequence[str | Path]], names: Sequence[str]
) -> list[Sample]:
    """Expand prediction inputs into samples, one file per modality (in ``names`` order).

    Each item is either a folder holding one subfolder per modality (``rgb/``, ``depth/``),
    or a sequence of one path per modality: all files (one sample) or all folders (paired
    by stem). Whether their outputs can all be written: :func:`check_output_names`.
    """
    samples: list[Sample] = []
    for item in items:
        if isinstance(item, (str, Path)):
            root = Path(item)
            if not root.is_dir():
                raise CenError(f"{root}: expected a folder with subfolders {', '.join(names)}")
            paths = [root / n for n in names]
        else:
            paths = [Path(p) for p in item]
            if len(paths) != len(names):
                raise CenError(
                    f"{' '.join(map(str, paths))}: expected one path per modality "
                    f"({', '.join(names)})"
                )
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise CenError(f"{missing[0]}: no such file or folder")
        if all(p.is_dir() for p in paths):
            samples += pair_folders(paths, names)
        elif all(p.is_file() for p in paths):
            samples.append(Sample(paths[0].stem, tuple(paths)))
        else:
            raise CenError(f"{', '.join(map(str, paths))}: give files or folders, not both")
    return samples


def check_output_names(samples: Sequence[Sample], heads: Sequence[str]) -> None:
    """Refuse samples whose outputs would overwrite others': two samples of one stem, and with
    ``heads`` (modality names) sample ``a``'s ``rgb`` head, which writes ``a_rgb_*.png`` as a
    sample ``a_rgb`` does."""
    owners: dict[str, str] = {}
    for sample in samples:
        if sample.stem in owners:
            raise CenError(
                f"{owners[sample.stem]} and {sample.paths[0]} are both named {sample.stem}: "
                "their outputs would overwrite each other"
            )
        owners[sample.stem] = str(sample.paths[0])
    for sample in samples:
        for head in heads:
            prefix = f"{sample.stem}_{head}"
            if prefix in owners:
                raise CenError(
                    f"{owners[prefix]} and the {head} head of {sample.paths[0]} would both "
                    f"write {prefix}_*.png: rename one, or predict without --heads"
                )
            owners[prefix] = f"the {head} head of {sample.paths[0]}"


def gather_cli_inputs(
    roots: Sequence[Path],
    rgb: Sequence[Path],
    depth: Sequence[Path],
    extra: Sequence[str],
) -> tuple[list[Path | tuple[Path, ...]], list[str] | None]:
    """Turn ``cen seg predict``'s flags into the ``inputs`` and ``modalities`` of
    :func:`~cenfusion.segmentation.predict.predict`.

    ``--rgb`` and ``--depth`` paths and ``--input NAME[:KIND]=PATH`` pairs, repeated flags
    adding samples: the i-th path of every modality forms item i. A modality without
    ``:KIND`` takes the kind the checkpoint was trained with (:meth:`Modality.parse`).
    ``roots`` are folders with one subfolder per modality, refused beside paths: those would
    name the modalities, and a root's other subfolders would go unread. Without any flag the
    modality names stay ``None`` (the checkpoint's own).
    """
    flags = [f for f, paths in (("--rgb", rgb), ("--depth", depth), ("--input", extra)) if paths]
    if roots and flags:
        raise CenError(
            f"FOLDER {roots[0]} and {'/'.join(flags)}: give folders with one subfolder per "
            "modality or each modality's paths, not both"
        )
    columns: dict[str, list[Path]] = {}
    kinds: dict[str, str] = {}
    given = [("rgb", p) for p in rgb] + [("depth", p) for p in depth]
    for text in extra:
        spec, eq, path = text.partition("=")
        if not eq or not path:
            raise CenError(f"--input {text}: expected NAME=PATH or NAME:KIND=PATH")
        given.append((spec, Path(path)))
    for spec, path in given:
        name, _, kind = spec.partition(":")
        check_modality_name(name)
        if kinds.setdefault(name, kind) != kind:
            said = f"as {kinds[name]}" if kinds[name] else "without a kind"
            raise CenError(f"--input {spec}={path}: {name} was given {said} before")
        columns.setdefault(name, []).append(Path(path))
    items: list[Path | tuple[Path, ...]] = list(roots)
    if columns:
        counts = {n: len(p) for n, p in columns.items()}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{n} {c}" for n, c in counts.items())
            raise CenError(f"each modality needs as many paths as the others, got {listed}")
        items += list(zip(*columns.values()))
    if not items:
        raise CenError(
            "nothing to predict: give --rgb and --depth (files or folders), "
            "--input NAME=PATH, or a folder with rgb/ and depth/ subfolders"
        )
    return items, ([f"{n}:{k}" if k else n for n, k in kinds.items()] if kinds else None)
