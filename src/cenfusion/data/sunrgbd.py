"""SUN RGB-D (37 classes, 5285 train / 5050 test) from its official release.

Writes the layout described in :mod:`cenfusion.data.nyudv2` (``rgb/ depth/ masks/``,
``train.txt``, ``val.txt``, ``classes.txt``), samples named ``000001``, ``000002``, ... in the
order of ``SUNRGBDMeta``, which is also the order of the labels.

Sources, both from ``http://rgbd.cs.princeton.edu/data/``:

- ``SUNRGBD.zip``: the tree ``SUNRGBD/<sensor>/.../<scene>/`` with ``image/*.jpg``,
  ``depth/*.png`` (raw) and ``depth_bfx/*.png`` (refined, same names). Depth PNGs are 16-bit,
  0 = missing, with their bits rotated: ``mm = ((raw >> 3) | (raw << 13)) & 0xFFFF``; depth is
  clipped at 8000 mm. Image sizes vary with the sensor.
- ``SUNRGBDtoolbox.zip``: ``SUNRGBDtoolbox/Metadata/SUNRGBDMeta.mat`` (MATLAB v5 struct array
  ``SUNRGBDMeta`` with fields ``rgbpath``, ``depthname``, ...),
  ``SUNRGBDtoolbox/Metadata/SUNRGBD2Dseg.mat`` (MATLAB 7.3: ``SUNRGBD2Dseg/seglabel`` holds one
  object reference per image at ``[i][0]``, pointing at a ``(W, H)`` array of 0 = void and
  1..37 = :data:`SUN37_CLASSES`), and ``SUNRGBDtoolbox/traintestSUNRGBD/allsplit.mat``
  (MATLAB v5 cell arrays ``alltrain`` / ``alltest`` of scene folders).

Paths in the metadata and the split are server paths such as
``/n/fs/sun3d/data/SUNRGBD/kv2/kinect2data/<scene>/image/0000103.jpg``. They are resolved by
dropping every component up to and including the first one named exactly ``SUNRGBD`` and
reading the rest below the extracted ``SUNRGBD`` folder; trailing slashes are ignored. An
image's scene folder is its ``rgbpath`` without the last two components; the image goes to
``train.txt`` when that folder is listed in ``alltrain`` and to ``val.txt`` otherwise. Its
depth is ``<scene>/depth_bfx/<depthname>`` (or ``<scene>/depth/<depthname>`` for raw depth).
"""

from __future__ import annotations

import errno
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cenfusion.data.class_names import SUN37_CLASSES
from cenfusion.data.download import FROM_ADVICE, download, one_line
from cenfusion.data.nyudv2 import (
    IGNORE,
    LayoutWriter,
    as_ints,
    load_mat,
    mat_str,
    open_h5,
    output_ready,
)
from cenfusion.data.staging import output_folder, staging
from cenfusion.errors import CenError

DATA_TREE = "SUNRGBD"
TOOLBOX_TREE = "SUNRGBDtoolbox"
META = ("Metadata", "SUNRGBDMeta.mat")
SEGMENTATION = ("Metadata", "SUNRGBD2Dseg.mat")
SPLIT = ("traintestSUNRGBD", "allsplit.mat")
MAX_DEPTH_MM = 8000
_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")

# Raw label -> written class: 0 (void) -> 255, k (1..37) -> k - 1.
_LUT = np.array([IGNORE, *range(len(SUN37_CLASSES))], dtype=np.uint8)


def prepare_sunrgbd(
    out: Path,
    from_dir: Path | None = None,
    base_url: str = "http://rgbd.cs.princeton.edu/data/",
    use_refined_depth: bool = True,
    progress: bool = True,
) -> Path:
    """Write SUN RGB-D (37 classes) to ``out``; return ``out``.

    Args:
        out: output folder; returned untouched when it already holds a complete data set.
        from_dir: a folder holding, for each of ``SUNRGBD`` and ``SUNRGBDtoolbox``, either the
            extracted folder (used in place) or its ``.zip``. Without it both zips are
            downloaded from ``base_url``. Zips are extracted into ``OUT.work`` beside ``out``;
            downloads and extracted trees are kept there so a rerun skips them.
        base_url: folder URL holding ``SUNRGBD.zip`` and ``SUNRGBDtoolbox.zip``.
        use_refined_depth: read ``depth_bfx/`` (refined) instead of ``depth/`` (raw).
        progress: show tqdm bars.

    Raises:
        CenError: a source is missing, truncated or not in the expected format, a download
            failed, or ``out`` exists but is not a complete data set.
    """
    out = output_folder(Path(out))
    if output_ready(out):
        return out
    work = out.parent / f"{out.name}.work"
    if from_dir is not None and not Path(from_dir).is_dir():
        raise CenError(f"--from {from_dir}: not a folder")
    for name in (DATA_TREE, TOOLBOX_TREE) if from_dir is not None else ():
        if not (Path(from_dir) / name).is_dir() and not (Path(from_dir) / f"{name}.zip").is_file():
            raise CenError(f"--from {from_dir}: expected a folder {name}/ or {name}.zip in it")
    data = _tree(DATA_TREE, from_dir, work, base_url, progress)
    toolbox = _tree(TOOLBOX_TREE, from_dir, work, base_url, progress)
    samples = _read_meta(toolbox.joinpath(*META))
    train_scenes = _read_train_scenes(toolbox.joinpath(*SPLIT))
    depth_folder = "depth_bfx" if use_refined_depth else "depth"
    seg_path = toolbox.joinpath(*SEGMENTATION)
    with open_h5(seg_path) as seg:
        refs = _label_refs(seg, seg_path, len(samples))
        with staging(out) as tmp:
            writer = LayoutWriter(tmp)
            train: list[str] = []
            val: list[str] = []
            for i, (rgb_rel, depth_name) in enumerate(
                tqdm(samples, desc="SUN RGB-D", unit="img", disable=not progress)
            ):
                name = f"{i + 1:06d}"
                scene = rgb_rel.parent.parent
                rgb = _read_rgb(data.joinpath(*rgb_rel.parts))
                depth = _read_depth(data.joinpath(*scene.parts, depth_folder, depth_name))
                label = _read_label(seg, refs[i], seg_path, i)
                if not rgb.shape[:2] == depth.shape == label.shape:
                    raise CenError(
                        f"{data.joinpath(*rgb_rel.parts)}: image {rgb.shape[:2]}, depth "
                        f"{depth.shape} and label {label.shape} (entry {i + 1} of {seg_path}) "
                        "sizes differ"
                    )
                writer.write(name, rgb, depth, _LUT[label])
                (train if scene in train_scenes else val).append(name)
            writer.write_lists(train, val, SUN37_CLASSES)
    return out


def release_path(server_path: str, where: str) -> PurePosixPath:
    """A server path from the release's metadata, relative to the extracted ``SUNRGBD`` folder.

    ``/n/fs/sun3d/data/SUNRGBD/kv1/NYUdata/NYU0001/`` -> ``kv1/NYUdata/NYU0001``.

    Raises:
        CenError: no component is named ``SUNRGBD``, or nothing follows it.
    """
    parts = PurePosixPath(server_path.strip().replace("\\", "/")).parts
    if DATA_TREE not in parts or parts.index(DATA_TREE) == len(parts) - 1:
        raise CenError(f"{where}: expected a path containing /{DATA_TREE}/..., got {server_path!r}")
    return PurePosixPath(*parts[parts.index(DATA_TREE) + 1 :])


def depth_from_raw(raw: np.ndarray) -> np.ndarray:
    """Undo the release's bit rotation of a 16-bit depth PNG: uint16 millimetres, <= 8000."""
    bits = raw.astype(np.uint32)
    mm = ((bits >> 3) | (bits << 13)) & 0xFFFF
    return np.minimum(mm, MAX_DEPTH_MM).astype(np.uint16)


def _tree(name: str, from_dir: Path | None, work: Path, base_url: str, progress: bool) -> Path:
    """The folder of the extracted tree ``name``, extracting or downloading its zip as needed."""
    if from_dir is not None:
        if (Path(from_dir) / name).is_dir():
            return Path(from_dir) / name
        archive = Path(from_dir) / f"{name}.zip"
    elif (work / name).is_dir():
        return work / name  # extracted from the download earlier (which may since be deleted)
    else:
        url = base_url if base_url.endswith("/") else base_url + "/"
        archive = download(
            f"{url}{name}.zip",
            work / f"{name}.zip",
            progress=progress,
            advice=FROM_ADVICE,
            check=lambda path: None if zipfile.is_zipfile(path) else "is not a zip archive",
        )
    return _extract(archive, name, work, progress)


def _extract(archive: Path, name: str, work: Path, progress: bool) -> Path:
    """Extract the members under ``name/`` of ``archive`` to ``work/name``, kept while the
    archive is the one it came from (its path, size and time, in ``work/name.source``)."""
    target, source = work / name, work / f"{name}.source"
    stat = archive.stat()
    origin = f"{archive.resolve()} {stat.st_size} {stat.st_mtime_ns}"
    if target.is_dir() and source.is_file() and source.read_text() == origin:
        return target
    shutil.rmtree(target, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.extract-", dir=work))
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if m.filename.startswith(f"{name}/")]
            if not members:
                raise CenError(f"{archive}: expected a top-level folder {name}/ in the archive")
            for member in tqdm(
                members, desc=f"extracting {archive.name}", unit="file", disable=not progress
            ):
                zf.extract(member, tmp)
        (tmp / name).rename(target)
        source.write_text(origin)
    except OSError as exc:
        read = exc.filename is not None and Path(exc.filename) == archive
        if read or exc.errno not in _WRITING_ERRORS:
            raise _corrupt(archive, exc) from None
        raise CenError(
            f"{work}: cannot extract {archive.name} there ({exc.strerror}); the archive is kept"
        ) from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _corrupt(archive, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


#: Errors of the folder extracted into, not of the archive read.
_WRITING_ERRORS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE}
)


def _corrupt(archive: Path, exc: BaseException) -> CenError:
    return CenError(
        f"{archive}: cannot extract, the archive is truncated or corrupt; delete it and "
        f"fetch it again ({one_line(exc)})"
    )


def _read_meta(path: Path) -> list[tuple[PurePosixPath, str]]:
    """Per image, in label order: its RGB path below ``SUNRGBD/`` and its depth file name."""
    meta = load_mat(path, ["SUNRGBDMeta"])["SUNRGBDMeta"]
    fields = meta.dtype.names or ()
    for field in ("rgbpath", "depthname"):
        if field not in fields:
            raise CenError(f"{path}: SUNRGBDMeta must be a struct array with a field {field!r}")
    samples = []
    for i, entry in enumerate(meta.ravel(order="F")):
        where = f"{path}: SUNRGBDMeta({i + 1})"
        rgb = release_path(mat_str(entry["rgbpath"], f"{where}.rgbpath"), f"{where}.rgbpath")
        if len(rgb.parts) < 3:
            raise CenError(f"{where}.rgbpath: expected <scene>/image/<name>.jpg, got {rgb}")
        depth_name = mat_str(entry["depthname"], f"{where}.depthname")
        if not depth_name or "/" in depth_name:
            raise CenError(f"{where}.depthname: expected a file name, got {depth_name!r}")
        samples.append((rgb, depth_name))
    if not samples:
        raise CenError(f"{path}: SUNRGBDMeta is empty")
    return samples


def _read_train_scenes(path: Path) -> set[PurePosixPath]:
    """The scene folders (below ``SUNRGBD/``) that ``alltrain`` lists."""
    data = load_mat(path, ["alltrain", "alltest"])
    cells = np.asarray(data["alltrain"], dtype=object).ravel(order="F")
    return {
        release_path(mat_str(c, f"{path}: alltrain({k + 1})"), f"{path}: alltrain({k + 1})")
        for k, c in enumerate(cells)
    }


def _label_refs(seg: h5py.File, path: Path, count: int) -> np.ndarray:
    """The ``count`` object references of ``SUNRGBD2Dseg/seglabel``, one per image."""
    try:
        dataset = seg["SUNRGBD2Dseg"]["seglabel"]
        refs = dataset[()]
    except (KeyError, TypeError):
        raise CenError(f"{path}: expected a dataset SUNRGBD2Dseg/seglabel") from None
    except OSError as exc:
        raise CenError(f"{path}: truncated or corrupt ({one_line(exc)})") from None
    if h5py.check_ref_dtype(dataset.dtype) is None or refs.ndim != 2 or refs.shape[1] != 1:
        raise CenError(
            f"{path}: SUNRGBD2Dseg/seglabel must be (N, 1) object references, "
            f"got {dataset.dtype} {dataset.shape}"
        )
    if refs.shape[0] != count:
        raise CenError(
            f"{path}: SUNRGBD2Dseg/seglabel holds {refs.shape[0]} labels but SUNRGBDMeta "
            f"lists {count} images"
        )
    return refs[:, 0]


def _read_label(seg: h5py.File, ref: h5py.Reference, path: Path, index: int) -> np.ndarray:
    """Label ``index`` as int64 ``(H, W)`` with values 0..37."""
    where = f"{path}: seglabel({index + 1})"
    try:
        stored = seg[ref][()]
    except (ValueError, KeyError, TypeError):
        raise CenError(f"{where}: not a valid object reference") from None
    except OSError as exc:
        raise CenError(f"{where}: truncated or corrupt ({one_line(exc)})") from None
    label = as_ints(stored, where)
    if label.ndim != 2:
        raise CenError(f"{where}: expected a 2-D (W, H) array, got shape {label.shape}")
    if label.min() < 0 or label.max() >= _LUT.size:
        raise CenError(f"{where}: labels must lie in 0..{_LUT.size - 1}, got {label.max()}")
    return label.T


def _read_rgb(path: Path) -> np.ndarray:
    """An image as uint8 ``(H, W, 3)``."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise CenError(f"{path}: missing (listed in SUNRGBDMeta)") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise CenError(f"{path}: not a readable image ({one_line(exc)})") from None


def _read_depth(path: Path) -> np.ndarray:
    """A release depth PNG as uint16 millimetres ``(H, W)``, clipped at 8000."""
    try:
        with Image.open(path) as img:
            if img.mode not in _DEPTH_MODES:
                raise CenError(f"{path}: expected a 16-bit depth PNG, got mode {img.mode}")
            raw = np.asarray(img)
    except FileNotFoundError:
        raise CenError(f"{path}: missing (depth of an image listed in SUNRGBDMeta)") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise CenError(f"{path}: not a readable image ({one_line(exc)})") from None
    if raw.min() < 0 or raw.max() > 0xFFFF:
        raise CenError(f"{path}: expected 16-bit depth values")
    return depth_from_raw(raw)
