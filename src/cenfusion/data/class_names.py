"""Class names of the segmentation data sets, for plots, reports and ``classes.txt``.

NYUDv2-40 and SUN RGB-D-37 are built in; a data root may carry its own ``classes.txt`` (one
name a line, as ``cen data`` writes it) or, for a generated synthetic set, its marker file.
:func:`resolve_class_names` picks the first that fits a run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "NYU40_CLASSES",
    "SUN37_CLASSES",
    "SYNTHETIC_CLASSES",
    "generic_class_names",
    "resolve_class_names",
]

# The 40 names as ``className`` in NYUDv2's classMapping40.mat spells them.
NYU40_CLASSES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser",
    "pillow", "mirror", "floor mat", "clothes", "ceiling", "books", "refridgerator",
    "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
    "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)  # fmt: skip

# SUN RGB-D's 37 classes in label order (label k + 1 in SUNRGBD2Dseg.mat).
SUN37_CLASSES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser",
    "pillow", "mirror", "floor_mat", "clothes", "ceiling", "books", "fridge", "tv", "paper",
    "towel", "shower_curtain", "box", "whiteboard", "person", "night_stand", "toilet", "sink",
    "lamp", "bathtub", "bag",
)  # fmt: skip

#: Classes of the embedded synthetic RGB-D set (:mod:`cenfusion.data.synthetic` draws them).
SYNTHETIC_CLASSES = (
    "wall",
    "floor",
    "ceiling",
    "poster",
    "cabinet",
    "rug",
    "crate",
    "block",
    "sign-a",
    "sign-b",
)
#: Taskonomy domains by released ``img-type`` index.
TASKONOMY_DOMAINS: tuple[str, ...] = (
    "rgb",
    "normal",
    "reshading",
    "depth_euclidean",
    "depth_zbuffer",
    "principal_curvature",
    "edge_occlusion",
    "edge_texture",
    "segment_unsup2d",
    "segment_unsup25d",
)

CLASSES_FILE = "classes.txt"
SYNTHETIC_MARKER = "cenfusion-synthetic.json"


def generic_class_names(num_classes: int) -> tuple[str, ...]:
    """``("class 0", ..., "class K-1")``: the names of last resort."""
    return tuple(f"class {i}" for i in range(num_classes))


def declared_class_names(root: Path) -> list[str] | None:
    """Names a data root declares: ``classes.txt``, else a synthetic set's marker file."""
    listed = root / CLASSES_FILE
    if listed.is_file():
        lines = listed.read_text(encoding="utf-8-sig").splitlines()
        return [line.strip() for line in lines if line.strip()]
    marker = root / SYNTHETIC_MARKER
    if marker.is_file():
        try:
            classes = json.loads(marker.read_text()).get("classes")
        except (json.JSONDecodeError, AttributeError):
            return None
        if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
            return classes
    return None


def resolve_class_names(
    num_classes: int,
    data_root: str | Path | None = None,
    names: Sequence[str] | None = None,
    synthetic: bool = False,
) -> tuple[str, ...]:
    """The ``num_classes`` names of a run's classes, from the most to the least specific source.

    Order: ``names`` when given; the data root's ``classes.txt`` or synthetic marker; the
    embedded synthetic set's names when ``synthetic`` (a run whose config has no data root);
    NYUDv2-40 for 40 classes, SUN RGB-D-37 for 37; else ``class i``. A source whose count
    differs from ``num_classes`` is skipped, except ``names``, which must fit; a data root
    that names its classes is no NYUDv2 or SUN RGB-D, whose names it then does not take.

    Raises:
        ValueError: ``names`` holds a number of names other than ``num_classes``.
    """
    if names is not None:
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names given for {num_classes} classes")
        return tuple(names)
    candidates: list[Sequence[str] | None] = []
    declared = None
    if data_root is not None and Path(data_root).is_dir():
        declared = declared_class_names(Path(data_root))
        candidates.append(declared)
    if synthetic:
        candidates.append(SYNTHETIC_CLASSES)
    if declared is None:
        candidates += [NYU40_CLASSES, SUN37_CLASSES]
    for found in candidates:
        if found is not None and len(found) == num_classes:
            return tuple(found)
    return generic_class_names(num_classes)
