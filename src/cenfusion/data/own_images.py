"""One's own pictures gathered into samples to predict: files or folders per input (paired by
file stem), and the outputs' names kept apart. Both tasks' ``predict`` commands read them so."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cenfusion.errors import MAX_PROBLEMS, CenError

#: File types read from input folders.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class Sample:
    """One prediction to make: one file per input; outputs are named after ``stem``.
    ``paired``: its files were found in folders given as inputs (paired by stem)."""

    stem: str
    paths: tuple[Path, ...]
    paired: bool = False


def _stem(path: Path, ending: str) -> str:
    """``path``'s stem without ``ending`` (kept whole where nothing else would be left)."""
    return path.stem.removesuffix(ending) or path.stem


def _image_files(folder: Path, ending: str) -> dict[str, Path]:
    """``{stem: path}`` of the images in ``folder`` (hidden files left out), ``ending`` cut
    from the stems that end with it; two files with one stem are an error."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        hidden = path.name.startswith(".")
        if hidden or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = _stem(path, ending)
        if stem in files:
            raise CenError(
                f"{folder}: two images named {stem} ({files[stem].name}, {path.name}); keep one"
            )
        files[stem] = path
    return files


def pair_folders(
    folders: Sequence[Path], names: Sequence[str], endings: Sequence[str] | None = None
) -> list[Sample]:
    """One sample per stem found in every folder; a stem missing from any folder is an error
    naming the file without a partner. ``endings``: per folder, a stem ending that does not
    count in the pairing (a Taskonomy file's ``_domain_rgb``)."""
    listings = [_image_files(f, e) for f, e in zip(folders, endings or [""] * len(folders))]
    stems = sorted(set().union(*listings))
    if not stems:
        raise CenError(f"{', '.join(map(str, folders))}: no images ({', '.join(IMAGE_SUFFIXES)})")
    for stem in stems:
        for folder, name, listing in zip(folders, names, listings):
            if stem not in listing:
                have = next(lst[stem] for lst in listings if stem in lst)
                raise CenError(
                    f"{have} has no {name} partner {folder}/{stem}.* (files pair by name)"
                )
    return [Sample(s, tuple(lst[s] for lst in listings), paired=True) for s in stems]


def collect_samples(
    items: Sequence[str | Path | Sequence[str | Path]],
    names: Sequence[str],
    endings: Sequence[str] | None = None,
) -> list[Sample]:
    """Expand prediction inputs into samples, one file per input (in ``names`` order).

    Each item is either a folder holding one subfolder per input (``rgb/``, ``depth/``), or
    a sequence of one path per input: all files (one sample, named after the first file
    without its ending) or all folders (paired by stem). ``endings``: see
    :func:`pair_folders`. Whether their outputs can all be written: :func:`check_output_names`.
    """
    samples: list[Sample] = []
    for item in items:
        if isinstance(item, (str, Path)):
            root = Path(item)
            paths = [root / n for n in names]
            missing = next((p for p in paths if not p.is_dir()), None)
            if missing is not None:
                raise CenError(
                    f"{root}: no subfolder {missing.name}/ (expected one subfolder per input: "
                    f"{', '.join(names)})"
                )
        else:
            paths = [Path(p) for p in item]
            if len(paths) != len(names):
                raise CenError(
                    f"{' '.join(map(str, paths))}: expected one path per input ({', '.join(names)})"
                )
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise CenError(f"{missing[0]}: no such file or folder")
        if all(p.is_dir() for p in paths):
            samples += pair_folders(paths, names, endings)
        elif all(p.is_file() for p in paths):
            samples.append(Sample(_stem(paths[0], endings[0] if endings else ""), tuple(paths)))
        else:
            raise CenError(f"{', '.join(map(str, paths))}: give files or folders, not both")
    return samples


def check_output_folder(out: Path) -> None:
    """Refuse an output folder ``--out`` that is a file or lies inside one, before any work."""
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "a file" if existing == out else f"a path inside the file {existing}"
        raise CenError(f"--out {out}: {what}, expected a folder (made if missing)")


def check_outputs_spare_inputs(samples: Sequence[Sample], outputs: Iterable[Path]) -> None:
    """Refuse outputs that are some sample's input file (``--out`` the input folder, with
    a name the outputs take): writing them would destroy the pictures still to be read; and
    outputs into a folder given as inputs, where a later run on that folder would read them
    as inputs."""
    inputs = {path.resolve() for sample in samples for path in sample.paths}
    folders = {path.parent.resolve() for s in samples if s.paired for path in s.paths}
    outputs = list(outputs)
    for output in outputs:
        if output.resolve() in inputs:
            raise CenError(
                f"--out {output.parent}: {output.name} there is an input, which the outputs "
                "would write over; write them elsewhere"
            )
    for output in outputs:
        if output.parent.resolve() in folders:
            raise CenError(
                f"--out {output.parent}: a folder of the inputs, where the outputs would be "
                "read as inputs by a later run on it; write them elsewhere"
            )


def check_output_names(
    samples: Sequence[Sample],
    heads: Sequence[str],
    prefix: str = "{stem}_{head}",
    files: str = "{}_*.png",
) -> None:
    """Refuse samples whose outputs would overwrite others': two samples of one stem, and with
    ``heads`` (their names) sample ``a``'s ``rgb`` head, whose files begin with ``prefix``
    (``a_rgb``) as a sample ``a_rgb``'s do. ``files``: the files of one stem or head prefix,
    in error lines."""
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
            start = prefix.format(stem=sample.stem, head=head)
            if start in owners:
                raise CenError(
                    f"{files.format(start)}: written by {owners[start]} and by the {head} "
                    f"head of sample {sample.stem}; rename one, or predict without --heads"
                )
            owners[start] = f"the {head} head of sample {sample.stem}"


def items_from_columns(columns: Mapping[str, Sequence[Path]]) -> list[tuple[Path, ...]]:
    """Prediction items from each input's paths (``{name: paths}``, from repeated flags): the
    i-th path of every input forms item i."""
    counts = {n: len(p) for n, p in columns.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{n} {c}" for n, c in counts.items())
        raise CenError(f"each input needs as many paths as the others, got {listed}")
    return list(zip(*columns.values()))


def check_images(
    paths: Iterable[str | Path],
    kinds: Iterable[str] | None = None,
    *,
    max_problems: int = MAX_PROBLEMS,
    report: Callable[[str], None] | None = None,
) -> None:
    """Decode every image of ``paths`` (as ``kinds``, one per path; default ``rgb``) before
    any output is written, reporting every unreadable one as for :func:`check_dataset`."""
    from cenfusion.data.check import raise_problems  # numpy and torch: not at the CLI's start
    from cenfusion.data.listfile import decode_image

    paths = [Path(p) for p in paths]
    kinds = list(kinds) if kinds is not None else ["rgb"] * len(paths)
    if len(kinds) != len(paths):
        raise ValueError(f"{len(paths)} paths but {len(kinds)} kinds")
    problems = []
    for path, kind in zip(paths, kinds):
        if not path.is_file():
            problems.append(f"file {path} does not exist")
            continue
        try:
            decode_image(path, kind)
        except CenError as err:
            problems.append(str(err))
    raise_problems(problems, max_problems, report)
