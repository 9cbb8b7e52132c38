"""List-file datasets in the layout of the released NYUDv2 set.

A data root holds image folders and list files (``train.txt``, ``val.txt``). Each line of a
list file names one sample as tab-separated paths relative to the root, for NYUDv2::

    rgb/000003.png<TAB>masks/000003.png<TAB>depth/000003.png

A :class:`ModalitySpec` says which column holds a modality and how to decode it; any number of
modalities in any order can be read from the same line. Every input decodes to a float32
tensor ``(3, H, W)`` so one shared network can take each of them (CEN passes depth through the
same ``conv1`` as RGB); the mask decodes to int64 ``(H, W)`` with 255 = ignore.

Files are checked for existence when the dataset is built, and decoded (and checked for size
and label range) when a sample is loaded. Every problem raises :class:`CenError` with one line
naming the file or sample at fault.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cenfusion.errors import CenError

IGNORE_INDEX = 255
KINDS = ("rgb", "depth", "gray")
NYUDV2_DEPTH_SCALE = 1 / 5000

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]

HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
SINGLE_CHANNEL_MODES = ("L", *HIGH_BIT_MODES)


#: The head of the ensemble in every score table and file name: no modality may take it.
ENSEMBLE = "ensemble"


def check_modality_name(name: str) -> None:
    """Refuse a modality name that cannot name its head's files and columns: empty, with
    characters other than letters, digits, ``_``, ``-`` and ``.``, or the ensemble's."""
    if not re.fullmatch(r"[\w.-]+", name) or name in (ENSEMBLE, ".", ".."):
        raise CenError(
            f"modality name {name!r}: expected letters, digits, _, - or . (and not "
            f"{ENSEMBLE!r}), as it names the modality's head and its files"
        )


@dataclass(frozen=True)
class ModalitySpec:
    """One input modality: where it sits on a list-file line and how to decode it.

    ``kind`` selects the decoding (see :func:`decode_image`) and, downstream, the resampling
    and normalisation the transforms apply: ``"rgb"`` and ``"gray"`` are photographs (bicubic,
    normalised by mean/std), ``"depth"`` is a measurement (nearest, only scaled by
    ``depth_scale``, which multiplies the raw PNG values).
    """

    name: str
    column: int
    kind: str
    depth_scale: float = NYUDV2_DEPTH_SCALE

    def __post_init__(self) -> None:
        check_modality_name(self.name)
        if self.kind not in KINDS:
            raise CenError(
                f"modality {self.name!r}: kind {self.kind!r} is unknown, expected one of {KINDS}"
            )
        if self.column < 0:
            raise CenError(f"modality {self.name!r}: column {self.column} must be >= 0")


def nyudv2_modalities(
    names: Sequence[str] = ("rgb", "depth"), depth_scale: float = NYUDV2_DEPTH_SCALE
) -> tuple[ModalitySpec, ...]:
    """Specs for the released NYUDv2 layout (rgb column 0, mask 1, depth 2), in ``names`` order."""
    columns = {"rgb": 0, "depth": 2}
    unknown = [n for n in names if n not in columns]
    if unknown:
        raise CenError(
            f"NYUDv2 modality {unknown[0]!r} is unknown, expected names from {tuple(columns)}"
        )
    return tuple(ModalitySpec(n, columns[n], n, depth_scale) for n in names)


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode ``path`` so that truncated files fail here, with their name."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise CenError(f"cannot read image {path}: {' '.join(str(exc).split())}") from None


def _single_channel(image: Image.Image, path: Path, what: str) -> np.ndarray:
    """Raw values of a one-channel image ``(H, W)``; a colour image is accepted only if grey.

    Some tools store depth or grey images as RGB with three equal channels; those are read as
    their first channel rather than rejected, any other colour image is an error.
    """
    if image.mode in SINGLE_CHANNEL_MODES:
        return np.asarray(image)
    if image.mode == "RGB":
        values = np.asarray(image)
        if (values == values[..., :1]).all():
            return values[..., 0]
    raise CenError(f"{what} image {path} has mode {image.mode}, expected a single-channel PNG")


def _is_32_bit(image: Image.Image) -> bool:
    """Float or 32-bit integer values (e.g. a TIFF), which 0..255 would clamp; PIL reads 16-bit
    PGM files (and, in older versions, PNG files) as mode ``I`` too, so those pass."""
    return image.mode == "F" or image.mode == "I" and image.format not in ("PNG", "PPM")


def decode_image(path: Path, kind: str, depth_scale: float = NYUDV2_DEPTH_SCALE) -> torch.Tensor:
    """Decode one input image to float32 ``(3, H, W)``.

    - ``rgb``: 8-bit colour in 0..255 (grey, palette and RGBA images are converted to RGB;
      16-bit grey is scaled to 0..255 as for ``gray``).
    - ``depth``: raw values of an 8- or 16-bit single-channel PNG times ``depth_scale``
      (NYUDv2: 1/5000), tiled to 3 channels; 0 stays 0 (a hole).
    - ``gray``: 8-bit as is, 16-bit scaled by 255/65535 into 0..255, tiled to 3 channels
      (a colour image is converted to its luma first).

    32-bit (float or integer) images are refused: 0..255 cannot hold them, and one depth
    scale cannot fit them beside 8- and 16-bit files.
    """
    image = _open_image(path)
    if _is_32_bit(image):
        raise CenError(
            f"{kind} image {path} has 32-bit values (mode {image.mode}), expected 8 or 16 bits"
        )
    if kind == "rgb" and image.mode not in HIGH_BIT_MODES:
        array = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    else:
        if kind == "gray" and image.mode not in SINGLE_CHANNEL_MODES:
            image = image.convert("L")
        values = _single_channel(image, path, kind).astype(np.float32)
        if kind == "depth":
            values *= np.float32(depth_scale)
        elif image.mode in HIGH_BIT_MODES:
            values *= np.float32(255 / 65535)
        array = np.broadcast_to(values, (3, *values.shape))
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def decode_mask(path: Path) -> torch.Tensor:
    """Decode a label PNG to int64 ``(H, W)``; mode L or P are read as raw class indices."""
    image = _open_image(path)
    if image.mode not in ("L", "P"):
        raise CenError(f"mask {path} has mode {image.mode}, expected an 8-bit single-channel PNG")
    return torch.from_numpy(np.asarray(image).astype(np.int64))


def check_data_root(root: Path) -> None:
    """Refuse a data root that is no folder; a relative one is named with the folder it was
    looked for from (a run's saved ``--data`` is relative to where it started)."""
    if not root.is_dir():
        seen = "" if root.is_absolute() else f" (looked for from {Path.cwd()}; --data names it)"
        raise CenError(f"data root {root} is not a folder{seen}")


def read_list_file(path: Path) -> list[str]:
    """The lines of the list file ``path``: UTF-8, with or without the byte-order mark some
    editors write first; a comment line (``#`` first) reads as a blank one, which keeps the
    others' numbers. Raises :class:`CenError` naming the file (and the line of a byte that is
    not UTF-8)."""
    if path.is_dir():
        raise CenError(f"list file {path} is a folder, expected a text file of samples")
    if not path.is_file():
        raise CenError(f"list file {path} does not exist")
    lines = read_utf8(path, "list file ").splitlines()
    return ["" if line.lstrip().startswith("#") else line for line in lines]


def read_utf8(path: Path, what: str = "") -> str:
    """``path``'s UTF-8 text (a byte-order mark dropped); a byte that is not UTF-8 is one
    :class:`CenError` line naming ``what`` (e.g. ``"list file "``), the file and its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CenError(
            f"{what}{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save it as UTF-8"
        ) from None


def split_line(line: str) -> list[str]:
    """Columns of one list-file line: tab-separated (whitespace accepted when there is no tab)."""
    return line.split("\t") if "\t" in line else line.split()


class ListFileDataset(Dataset):
    """Samples listed in ``root/list_file``, one modality per column.

    ``__getitem__`` returns, after ``transform``::

        {"inputs": float32 (M, 3, H, W), the modalities stacked in ``modalities`` order,
         "kinds":  [modality kind per input, e.g. "rgb", "depth"],
         "mask":   int64 (H, W), 255 = ignore   (absent when ``mask_column`` is None),
         "name":   stem of the first column's file}

    ``kinds`` travels with the sample because the transforms resample and normalise each input
    according to what it is. ``num_classes``, when given, makes every mask value other than 255
    be checked to lie below it.
    """

    def __init__(
        self,
        root: str | Path,
        list_file: str | Path,
        modalities: Sequence[ModalitySpec],
        mask_column: int | None = 1,
        num_classes: int | None = None,
        transform: Transform | None = None,
    ) -> None:
        self.root = Path(root)
        self.list_path = self.root / list_file
        self.modalities = tuple(modalities)
        self.mask_column = mask_column
        self.num_classes = num_classes
        self.transform = transform
        self._check_arguments()
        self.samples = self._read_list()

    def _check_arguments(self) -> None:
        if not self.modalities:
            raise CenError(f"dataset {self.list_path}: at least one modality is needed")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise CenError(f"dataset {self.list_path}: modality names {names} must be unique")
        if self.num_classes is not None and self.num_classes < 1:
            raise CenError(f"dataset {self.list_path}: num_classes {self.num_classes} must be >= 1")
        check_data_root(self.root)

    def _read_list(self) -> list[tuple[Path, ...]]:
        """Parse the list file: every line has the same number of columns, every file exists."""
        used = [m.column for m in self.modalities]
        if self.mask_column is not None:
            used.append(self.mask_column)
        needed = max(used) + 1
        samples: list[tuple[Path, ...]] = []
        width: int | None = None
        lines = read_list_file(self.list_path)
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            columns = split_line(line.strip())
            where = f"{self.list_path}:{number}"
            if width is None and len(columns) < needed:
                raise CenError(
                    f"{where}: expected at least {needed} tab-separated columns "
                    f"(columns {sorted(set(used))} are read), got {len(columns)}"
                )
            width = width or len(columns)
            if len(columns) != width:
                raise CenError(
                    f"{where}: expected {width} tab-separated columns like the first line, "
                    f"got {len(columns)}"
                )
            paths = tuple(self.root / c for c in columns)
            for column in sorted(set(used)):
                if not paths[column].is_file():
                    raise CenError(f"{where}: file {paths[column]} does not exist")
            samples.append(paths)
        if not samples:
            raise CenError(f"list file {self.list_path} lists no samples")
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        paths = self.samples[index]
        name = paths[0].stem
        inputs = [decode_image(paths[m.column], m.kind, m.depth_scale) for m in self.modalities]
        sample: Sample = {
            "inputs": inputs,
            "kinds": [m.kind for m in self.modalities],
            "name": name,
        }
        sizes = {m.name: tuple(x.shape[-2:]) for m, x in zip(self.modalities, inputs, strict=True)}
        if self.mask_column is not None:
            mask = decode_mask(paths[self.mask_column])
            sizes["mask"] = tuple(mask.shape)
            self._check_labels(mask, name, paths[self.mask_column])
            sample["mask"] = mask
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{k} {h}x{w}" for k, (h, w) in sizes.items())
            raise CenError(f"sample {name} ({self.list_path}): sizes differ: {listed}")
        if self.transform is not None:
            sample = self.transform(sample)
        return {**sample, "inputs": torch.stack(sample["inputs"])}

    def _check_labels(self, mask: torch.Tensor, name: str, path: Path) -> None:
        if self.num_classes is None:
            return
        bad = mask[(mask >= self.num_classes) & (mask != IGNORE_INDEX)]
        if bad.numel():
            raise CenError(
                f"sample {name} ({path}): label {int(bad.max())} is out of range, expected "
                f"0..{self.num_classes - 1} or {IGNORE_INDEX} (ignore)"
            )
