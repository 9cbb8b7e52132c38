"""The modalities of a segmenter's inputs, named and typed, and ``cen seg predict``'s flags
turned into prediction inputs (gathered into samples by :mod:`cenfusion.data.own_images`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cenfusion.data.listfile import KINDS, check_modality_name
from cenfusion.data.own_images import items_from_columns
from cenfusion.errors import CenError


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
    items += items_from_columns(columns)
    if not items:
        raise CenError(
            "nothing to predict: give --rgb and --depth (files or folders), "
            "--input NAME=PATH, or a folder with rgb/ and depth/ subfolders"
        )
    return items, ([f"{n}:{k}" if k else n for n, k in kinds.items()] if kinds else None)
