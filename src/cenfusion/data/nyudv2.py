"""NYU Depth v2 (40 classes) from its official files, written in the layout the training reads.

The layout, shared by every RGB-D segmentation set this package prepares::

    OUT/rgb/000001.png      8-bit RGB
    OUT/depth/000001.png    16-bit single channel, millimetres, 0 = missing
    OUT/masks/000001.png    8-bit single channel without palette, classes 0..K-1, 255 = ignore
    OUT/train.txt           lines "rgb/000003.png<TAB>masks/000003.png<TAB>depth/000003.png"
    OUT/val.txt             same
    OUT/classes.txt         the K class names, one a line

List files end without a final newline, like the released ones. Everything is written into a
hidden temporary folder beside ``OUT`` that is renamed to ``OUT`` only when complete, so a
failure leaves no half-written output.

Sources (each URL overridable through :class:`NyuUrls`):

- ``nyu_depth_v2_labeled.mat``: MATLAB 7.3 (HDF5). ``images`` uint8 ``(N, 3, W, H)``,
  ``depths`` float32 metres ``(N, W, H)``, ``labels`` uint16 ``(N, W, H)`` with 894 classes
  and 0 = unlabelled; MATLAB stores arrays transposed, so image ``i`` is
  ``images[i].transpose(2, 1, 0)`` of shape ``(H, W, 3)``. Real data: N = 1449, 480x640.
- ``splits.mat`` (MATLAB v5): ``trainNdxs`` (795) and ``testNdxs`` (654), 1-based.
- ``classMapping40.mat`` (MATLAB v5, Gupta et al.): ``mapClass`` (894 values 1..40) and
  ``className`` (the 40 names).

Image ``i`` (0-based) is written as ``f"{i + 1:06d}.png"``.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cenfusion.data.check import check_dataset
from cenfusion.data.class_names import NYU40_CLASSES
from cenfusion.data.download import FROM_ADVICE, download, one_line
from cenfusion.data.listfile import nyudv2_modalities, read_list_file, split_line
from cenfusion.data.staging import output_folder, staging
from cenfusion.errors import CenError

LABELED = "nyu_depth_v2_labeled.mat"
SPLITS = "splits.mat"
CLASS_MAPPING = "classMapping40.mat"
LIST_FILES = ("train.txt", "val.txt")
IGNORE = 255


_MAT_ERRORS = (
    scipy.io.matlab.MatReadError,
    ValueError,
    TypeError,
    NotImplementedError,
    IndexError,
    KeyError,
    OSError,
    EOFError,
    zlib.error,
    struct.error,
)
_LIST_FIELDS = ("rgb/", "masks/", "depth/")


@dataclass(frozen=True)
class NyuUrls:
    """Where the three NYUDv2 source files are downloaded from (override for a mirror)."""

    labeled: str = "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat"
    splits: str = "http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat"
    class_mapping: str = (
        "https://github.com/ankurhanda/nyuv2-meta-data/raw/master/classMapping40.mat"
    )


def prepare_nyudv2(
    out: Path,
    from_dir: Path | None = None,
    urls: NyuUrls = NyuUrls(),
    progress: bool = True,
) -> Path:
    """Write NYUDv2 (795 train / 654 val, 40 classes) to ``out``; return ``out``.

    Args:
        out: output folder; returned untouched when it already holds a complete data set.
        from_dir: a folder with the three source files already downloaded, or a released
            preprocessed folder (``rgb/ depth/ masks/ train.txt val.txt``), which is
            checked whole (every file, size, bit depth and label, as ``cen data check``)
            and hard-linked (copied across file systems) as it is. Without it the
            sources are downloaded into ``OUT.work`` beside ``out`` and kept there, so a
            rerun skips them.
        urls: download locations, used only without ``from_dir``.
        progress: show tqdm bars.

    Raises:
        CenError: a source is missing, truncated or not in the expected format, a download
            failed, or ``out`` exists but is not a complete data set.
    """
    out = output_folder(Path(out))
    if output_ready(out):
        return out
    if from_dir is not None:
        from_dir = Path(from_dir)
        if not from_dir.is_dir():
            raise CenError(f"--from {from_dir}: not a folder")
        if all((from_dir / name).is_file() for name in LIST_FILES):
            check_layout(from_dir)
            modalities = nyudv2_modalities()
            check_dataset(from_dir, LIST_FILES, modalities, len(NYU40_CLASSES), progress=progress)
            with staging(out) as tmp:
                _copy_layout(from_dir, tmp, progress)
            return out
        sources = {name: from_dir / name for name in (LABELED, SPLITS, CLASS_MAPPING)}
        for name, path in sources.items():
            if not path.is_file():
                raise CenError(
                    f"--from {from_dir}: {name} is missing (expected the three NYUDv2 files "
                    f"{LABELED}, {SPLITS}, {CLASS_MAPPING} or a prepared rgb/depth/masks folder "
                    "with train.txt and val.txt)"
                )
    else:
        work = out.parent / f"{out.name}.work"
        sources = {
            name: download(url, work / name, progress=progress, advice=FROM_ADVICE, check=check)
            for name, url, check in (
                (LABELED, urls.labeled, hdf5_problem),
                (SPLITS, urls.splits, mat_problem),
                (CLASS_MAPPING, urls.class_mapping, mat_problem),
            )
        }
    _convert(sources[LABELED], sources[SPLITS], sources[CLASS_MAPPING], out, progress)
    return out


def _convert(labeled: Path, splits: Path, class_mapping: Path, out: Path, progress: bool) -> None:
    """Write the layout to ``out`` from the three official files."""
    train, val = _read_splits(splits)
    lut, classes = _read_class_mapping(class_mapping)
    with open_h5(labeled) as f:
        images, depths, labels = _labeled_datasets(f, labeled)
        count = images.shape[0]
        for what, indices in (("trainNdxs", train), ("testNdxs", val)):
            if max(indices) > count:
                raise CenError(
                    f"{splits}: {what} refers to image {max(indices)} but {labeled} holds "
                    f"{count} images"
                )
        with staging(out) as tmp:
            writer = LayoutWriter(tmp)
            for i in tqdm(range(count), desc="NYUDv2", unit="img", disable=not progress):
                try:
                    rgb, depth, raw = images[i], depths[i], labels[i]
                except OSError as exc:
                    raise CenError(
                        f"{labeled}: cannot read image {i + 1}, the file is truncated or "
                        f"corrupt ({one_line(exc)})"
                    ) from None
                label = as_ints(raw, f"{labeled}: labels of image {i + 1}").T
                if label.min() < 0 or label.max() >= lut.size:
                    raise CenError(
                        f"{labeled}: image {i + 1} has labels outside 0..{lut.size - 1} "
                        f"(min {label.min()}, max {label.max()}), the range {class_mapping.name} "
                        "maps"
                    )
                writer.write(
                    f"{i + 1:06d}", rgb.transpose(2, 1, 0), metres_to_mm(depth.T), lut[label]
                )
            writer.write_lists([f"{k:06d}" for k in train], [f"{k:06d}" for k in val], classes)


class LayoutWriter:
    """Writes samples, list files and ``classes.txt`` in the layout the training reads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("rgb", "depth", "masks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def write(self, name: str, rgb: np.ndarray, depth_mm: np.ndarray, mask: np.ndarray) -> None:
        """Write one sample as ``rgb/NAME.png``, ``depth/NAME.png`` and ``masks/NAME.png``.

        ``rgb``: uint8 ``(H, W, 3)``; ``depth_mm``: uint16 ``(H, W)``; ``mask``: uint8 ``(H, W)``.
        """
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"rgb must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
        if depth_mm.dtype != np.uint16 or depth_mm.shape != rgb.shape[:2]:
            raise ValueError(
                f"depth must be uint16 {rgb.shape[:2]}, got {depth_mm.dtype} {depth_mm.shape}"
            )
        if mask.dtype != np.uint8 or mask.shape != rgb.shape[:2]:
            raise ValueError(f"mask must be uint8 {rgb.shape[:2]}, got {mask.dtype} {mask.shape}")
        Image.fromarray(np.ascontiguousarray(rgb)).save(self.root / "rgb" / f"{name}.png")
        Image.fromarray(np.ascontiguousarray(depth_mm)).save(self.root / "depth" / f"{name}.png")
        Image.fromarray(np.ascontiguousarray(mask)).save(self.root / "masks" / f"{name}.png")

    def write_lists(self, train: Sequence[str], val: Sequence[str], classes: Sequence[str]) -> None:
        """Write ``train.txt`` and ``val.txt`` for the sample names given, and ``classes.txt``."""
        for list_name, names in zip(LIST_FILES, (train, val)):
            lines = [f"rgb/{n}.png\tmasks/{n}.png\tdepth/{n}.png" for n in names]
            (self.root / list_name).write_text("\n".join(lines), encoding="utf-8")
        (self.root / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")


def output_ready(out: Path) -> bool:
    """True when ``out`` holds a complete data set, False when absent or an empty folder.

    Raises:
        CenError: ``out`` exists with other content.
    """
    if not out.exists():
        return False
    if not out.is_dir():
        raise CenError(f"{out}: exists and is not a folder; choose another output path")
    if not any(out.iterdir()):
        return False
    try:
        check_layout(out)
    except CenError as exc:
        raise CenError(
            f"{out}: exists but is not a complete prepared data set ({exc}); "
            "remove it or choose another output folder"
        ) from None
    return True


def check_layout(root: Path) -> None:
    """Check that ``root`` holds list files whose every entry exists, and sane first images.

    Raises:
        CenError: naming the list line or file at fault and what was expected.
    """
    listed: dict[str, list[tuple[str, str, str]]] = {}
    for list_name in LIST_FILES:
        list_path = root / list_name
        if not list_path.is_file():
            raise CenError(f"{list_path}: missing")
        entries = read_list(list_path)
        if not entries:
            raise CenError(f"{list_path}: no samples listed")
        for number, fields in enumerate(entries, start=1):
            for rel in fields:
                if not (root / rel).is_file():
                    raise CenError(f"{list_path}:{number}: {root / rel} does not exist")
        listed[list_name] = entries
    first = [root / rel for rel in listed[LIST_FILES[0]][0]]
    rgb, mask, depth = (_image_header(p) for p in first)
    if rgb[0] != "RGB":
        raise CenError(f"{first[0]}: expected an 8-bit RGB PNG, got mode {rgb[0]}")
    if mask[0] not in ("L", "P"):
        raise CenError(f"{first[1]}: expected an 8-bit single-channel mask, got mode {mask[0]}")
    if depth[0] not in ("I;16", "I;16B", "I", "L"):
        raise CenError(f"{first[2]}: expected a single-channel depth PNG, got mode {depth[0]}")
    if not rgb[1] == mask[1] == depth[1]:
        raise CenError(
            f"{first[0]}: RGB {rgb[1]}, mask {mask[1]} and depth {depth[1]} sizes differ"
        )


def read_list(path: Path) -> list[tuple[str, str, str]]:
    """The ``(rgb, mask, depth)`` relative paths of a list file; blank lines are skipped.

    Raises:
        CenError: a line is not ``rgb/... masks/... depth/...`` with relative paths (split
            at tabs, else at spaces, as every list file).
    """
    entries = []
    for number, line in enumerate(read_list_file(path), start=1):
        if not line.strip():
            continue
        fields = split_line(line.strip())
        if (
            len(fields) != 3
            or any(not f.startswith(p) for f, p in zip(fields, _LIST_FIELDS))
            or any(".." in Path(f).parts for f in fields)
        ):
            raise CenError(
                f"{path}:{number}: expected 'rgb/NAME.png masks/NAME.png depth/NAME.png' (tab- "
                f"or space-separated), got {line!r}"
            )
        entries.append((fields[0], fields[1], fields[2]))
    return entries


def hdf5_problem(path: Path) -> str | None:
    """What keeps ``path`` from being a MATLAB 7.3 (HDF5) file, if anything."""
    return None if h5py.is_hdf5(path) else "is not a MATLAB 7.3 (HDF5) file"


def mat_problem(path: Path) -> str | None:
    """What keeps ``path`` from being a MATLAB v5 file, if anything (its headers are read)."""
    try:
        scipy.io.whosmat(path)
    except _MAT_ERRORS:
        return "is not a MATLAB v5 file"
    return None


def open_h5(path: Path) -> h5py.File:
    """Open a MATLAB 7.3 / HDF5 file for reading.

    Raises:
        CenError: missing, truncated or not HDF5.
    """
    if not path.is_file():
        raise CenError(f"{path}: missing")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise CenError(
            f"{path}: not a readable MATLAB 7.3 (HDF5) file, possibly truncated; delete it and "
            f"fetch it again ({one_line(exc)})"
        ) from None


def load_mat(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Variables ``names`` of a MATLAB v5 file, as ``scipy.io.loadmat`` returns them.

    Raises:
        CenError: missing or unreadable file, or a variable absent.
    """
    if not path.is_file():
        raise CenError(f"{path}: missing")
    try:
        data = scipy.io.loadmat(path, variable_names=list(names))
    except _MAT_ERRORS as exc:
        raise CenError(
            f"{path}: not a readable MATLAB v5 file, possibly truncated; delete it and fetch it "
            f"again ({one_line(exc)})"
        ) from None
    for name in names:
        if name not in data:
            raise CenError(f"{path}: expected a variable {name!r}")
    return data


def mat_str(value: object, where: str) -> str:
    """The text of a MATLAB char array (or a one-element cell holding one) from ``loadmat``.

    Raises:
        CenError: ``value`` is not text; ``where`` names the file and variable in the message.
    """
    arr = np.asarray(value)
    while arr.dtype == object and arr.size == 1:
        arr = np.asarray(arr.item())
    if arr.dtype.kind != "U":
        raise CenError(f"{where}: expected text, got {arr.dtype} {arr.shape}")
    return "".join(arr.ravel(order="F").tolist())


def as_ints(value: np.ndarray, where: str) -> np.ndarray:
    """``value`` as int64 of the same shape.

    Raises:
        CenError: ``value`` holds anything but whole numbers; ``where`` names it.
    """
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf" or (
        arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr))
    ):
        raise CenError(f"{where}: expected whole numbers, got {arr.dtype}")
    return arr.astype(np.int64)


def _read_splits(path: Path) -> tuple[list[int], list[int]]:
    """The 1-based train and test image indices of ``splits.mat``."""
    data = load_mat(path, ["trainNdxs", "testNdxs"])
    train = as_ints(data["trainNdxs"], f"{path}: trainNdxs").ravel(order="F")
    test = as_ints(data["testNdxs"], f"{path}: testNdxs").ravel(order="F")
    for what, indices in (("trainNdxs", train), ("testNdxs", test)):
        if indices.size == 0 or indices.min() < 1 or len(np.unique(indices)) != indices.size:
            raise CenError(f"{path}: {what} must be distinct 1-based image indices")
    if np.intersect1d(train, test).size:
        raise CenError(f"{path}: trainNdxs and testNdxs share images")
    return train.tolist(), test.tolist()


def _read_class_mapping(path: Path) -> tuple[np.ndarray, list[str]]:
    """A lookup table raw label (0..894) -> class (0..39, 255 for 0) and the class names."""
    data = load_mat(path, ["mapClass", "className"])
    names = [
        mat_str(v, f"{path}: className")
        for v in np.asarray(data["className"], dtype=object).ravel(order="F")
    ]
    mapping = as_ints(data["mapClass"], f"{path}: mapClass").ravel(order="F")
    if not 0 < len(names) < IGNORE:
        raise CenError(f"{path}: className must hold between 1 and 254 names, got {len(names)}")
    if mapping.size == 0 or mapping.min() < 1 or mapping.max() > len(names):
        raise CenError(f"{path}: mapClass values must lie in 1..{len(names)}")
    lut = np.empty(mapping.size + 1, dtype=np.uint8)
    lut[0] = IGNORE
    lut[1:] = mapping - 1
    return lut, names


def _labeled_datasets(f: h5py.File, path: Path) -> tuple[h5py.Dataset, ...]:
    """``images``, ``depths`` and ``labels`` of an open labelled file, shapes checked."""
    try:
        images, depths, labels = f["images"], f["depths"], f["labels"]
    except KeyError:
        raise CenError(f"{path}: expected HDF5 datasets images, depths and labels") from None
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise CenError(
            f"{path}: images must be uint8 (N, 3, W, H), got {images.dtype} {images.shape}"
        )
    n, _, width, height = images.shape
    for name, ds in (("depths", depths), ("labels", labels)):
        if ds.shape != (n, width, height) or ds.dtype.kind not in "iuf":
            raise CenError(
                f"{path}: {name} must be numeric of shape {(n, width, height)} like images, "
                f"got {ds.dtype} {ds.shape}"
            )
    return images, depths, labels


def metres_to_mm(depth: np.ndarray) -> np.ndarray:
    """Depth in metres -> uint16 millimetres, rounded and clipped to 0..65535 (NaN -> 0)."""
    mm = np.rint(np.nan_to_num(depth.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0) * 1000)
    return np.clip(mm, 0, 65535).astype(np.uint16)


def _image_header(path: Path) -> tuple[str, tuple[int, int]]:
    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise CenError(f"{path}: not a readable image ({one_line(exc)})") from None


def _copy_layout(src: Path, dst: Path, progress: bool) -> None:
    """Hard-link (or copy) a checked layout's listed files and list files from ``src`` to ``dst``.

    Palette masks are rewritten as plain single-channel PNGs of their indices.
    """
    files = sorted({rel for name in LIST_FILES for entry in read_list(src / name) for rel in entry})
    for rel in tqdm(files, desc="NYUDv2 (prepared)", unit="file", disable=not progress):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.startswith("masks/") and _image_header(src / rel)[0] == "P":
            with Image.open(src / rel) as img:
                Image.fromarray(np.asarray(img, dtype=np.uint8)).save(target)
        else:
            _link_or_copy(src / rel, target)
    for name in LIST_FILES:
        shutil.copyfile(src / name, dst / name)
    if (src / "classes.txt").is_file():
        shutil.copyfile(src / "classes.txt", dst / "classes.txt")
    else:
        (dst / "classes.txt").write_text("\n".join(NYU40_CLASSES) + "\n", encoding="utf-8")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
