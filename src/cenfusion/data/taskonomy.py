"""Taskonomy for multimodal image-to-image translation (CEN paper, Sec. 4.2): files, decoding, samples.

Layout of a data root (the released one, and what :func:`prepare_taskonomy` and
:func:`~cenfusion.data.synthetic_taskonomy.generate_taskonomy_dataset` write)::

    ROOT/rgb/point_407_view_2_domain_rgb.png
    ROOT/edge_texture/point_407_view_2_domain_edge_texture.png
    ...
    ROOT/train.txt   lines "{domain}/point_407_view_2_domain_{domain}.png"
    ROOT/val.txt     same

A split file names views, not domains: the literal ``{domain}`` is filled in per domain.
``segment_semantic`` files end in ``_domain_segmentsemantic.png`` (its folder keeps the
underscore). CEN's ``--img-types`` indices refer to :data:`DOMAINS`.

Decoding follows the released loader step by step, so a view gives the tensors the paper's
models saw. Each file is first turned into an 8-bit image (:func:`decode_domain_8bit`):

- 8-bit domains (rgb, normal, reshading, principal_curvature) as stored; one channel is
  tiled to three;
- edge_texture / edge_occlusion: 16-bit single channel, ``value * 255 / maximum`` with the
  dataset's maxima (11355 and 11584), clipped to 255 and floored by the cast to 8 bits;
- depth_zbuffer / depth_euclidean: 16-bit single channel in 1/512 m; ``log(1 + value)`` is
  computed on the 16-bit array (in float32, as numpy does), times ``255 / 11.1``, floored.
  The "no depth" value 65535 is the released code's accident kept for reproduction: ``1 +
  65535`` wraps to 0 in 16 bits, ``log(0)`` is minus infinity, and the cast to 8 bits gives
  0, the *near* end of the range. Missing depth therefore reads as "touching the camera";
- segmentation domains: region ids as given, clipped to 255.

The 8-bit image is resized with PIL's bilinear filter (training: to ``load_size``, then a
random ``size`` crop and a flip with p = 0.5, the same draw for every domain of the sample;
validation: to ``size``), and only then becomes float32 ``(3, H, W)`` in ``[-1, 1]``
(``value / 127.5 - 1``: ``ToTensor`` then ``Normalize(0.5, 0.5)``).

Samples (:class:`TaskonomyDataset`) are ``{"inputs": (M, 3, S, S), "target": (3, S, S),
"name": "point_P_view_V"}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cenfusion.data.class_names import TASKONOMY_DOMAINS
from cenfusion.data.download import download_many
from cenfusion.errors import CenError

__all__ = [
    "DEFAULT_BASE_URL",
    "DOMAINS",
    "KNOWN_DOMAINS",
    "TaskonomyDataset",
    "check_domain_modes",
    "decode_domain",
    "decode_domain_8bit",
    "domain_file",
    "load_split",
    "prepare_taskonomy",
    "read_domain",
    "read_domain_8bit",
    "read_split_file",
    "resize_8bit",
    "resolve_domain",
    "to_tensor",
    "view_name",
    "write_split_file",
]

#: CEN's ``--img-types`` table: index -> Taskonomy domain.
DOMAINS = TASKONOMY_DOMAINS
#: Domains that can be downloaded and read: the table plus semantic segmentation.
KNOWN_DOMAINS: tuple[str, ...] = (*DOMAINS, "segment_semantic")
#: Domains whose file names spell the domain differently from their folder.
FILE_DOMAIN = {"segment_semantic": "segmentsemantic"}
EDGE_MAXIMA = {"edge_texture": 11355.0, "edge_occlusion": 11584.0}
DEPTH_DOMAINS = ("depth_euclidean", "depth_zbuffer")
SEGMENT_DOMAINS = ("segment_unsup2d", "segment_unsup25d", "segment_semantic")
#: Released normaliser of ``log(1 + depth)``: about ``log(65536)``.
LOG_DEPTH_MAX = 11.1
#: Depth PNG units per metre, and the value meaning "no depth".
DEPTH_UNITS_PER_METRE = 512.0
NO_DEPTH = 65535

DEFAULT_BASE_URL = "https://github.com/alexsax/taskonomy-sample-model-1/raw/master"
SPLITS = ("train", "val")
SPLIT_TEMPLATE = "{domain}/point_%d_view_%d_domain_{domain}.png"
_SPLIT_LINE = re.compile(r"\{domain\}/point_(\d+)_view_(\d+)_domain_\{domain\}\.png")
_SPLIT_DATA = "taskonomy_split.json"

View = tuple[int, int]
"""A Taskonomy view: ``(point, view)``."""


# ----------------------------------------------------------------------------- names and splits


def resolve_domain(domain: str | int) -> str:
    """A domain name from a name or an ``--img-types`` index (``2`` or ``"2"``)."""
    text = str(domain)
    if text.isascii() and text.isdigit():
        index = int(text)
        if index >= len(DOMAINS):
            raise CenError(f"img-type {index}: expected 0..{len(DOMAINS) - 1} ({_table()})")
        return DOMAINS[index]
    if text not in KNOWN_DOMAINS:
        raise CenError(f"Taskonomy domain {text!r} is unknown, expected one of {_table()}")
    return text


def _table() -> str:
    return ", ".join(f"{i} {d}" for i, d in enumerate(DOMAINS)) + ", segment_semantic"


def domain_file(domain: str, view: View) -> str:
    """Path of ``view``'s file in ``domain``, relative to the root."""
    point, index = view
    return f"{domain}/point_{point}_view_{index}_domain_{FILE_DOMAIN.get(domain, domain)}.png"


def view_name(view: View) -> str:
    return f"point_{view[0]}_view_{view[1]}"


def load_split(split: str) -> list[View]:
    """The released split's views (``"train"``: 1000, ``"val"``: 500), in the released order."""
    if split not in SPLITS:
        raise CenError(f"Taskonomy split {split!r}: expected one of {SPLITS}")
    data = json.loads(resources.files("cenfusion.data").joinpath(_SPLIT_DATA).read_text())
    return [tuple(int(n) for n in item.split("_")) for item in data[split]]


def read_split_file(path: Path) -> list[View]:
    """Views of a split file (lines ``{domain}/point_P_view_V_domain_{domain}.png``)."""
    if not path.is_file():
        raise CenError(
            f"{path}: split file not found (prepare the data with `cen data taskonomy "
            f"{path.parent}` or `cen data synthetic-taskonomy {path.parent}`)"
        )
    views = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        match = _SPLIT_LINE.fullmatch(line.strip())
        if match is None:
            raise CenError(
                f"{path}:{number}: expected '{{domain}}/point_P_view_V_domain_{{domain}}.png', "
                f"got {line.strip()!r}"
            )
        views.append((int(match[1]), int(match[2])))
    if not views:
        raise CenError(f"{path}: split file lists no views")
    return views


def write_split_file(path: Path, views: Sequence[View]) -> None:
    """Write a split file like the released ones (no final newline)."""
    path.write_text("\n".join(SPLIT_TEMPLATE % view for view in views))


# ----------------------------------------------------------------------------- decoding


def read_png(path: Path) -> np.ndarray:
    """Raw values of an image: ``(H, W)`` (any bit depth) or ``(H, W, 3)`` uint8."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("P", "RGBA", "LA", "CMYK", "YCbCr"):
                image = image.convert("RGB")
            return np.asarray(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise CenError(f"cannot read image {path}: {exc}") from None


def _sixteen_bit_values(array: np.ndarray) -> bool:
    """Whether ``array`` is one channel of 16-bit values: uint16, or the 32-bit integers that
    PIL reads some 16-bit PNGs as, within 0..65535."""
    if array.ndim != 2:
        return False
    if array.dtype == np.uint16:
        return True
    return array.dtype in (np.int32, np.int64) and (
        array.size == 0 or (array.min() >= 0 and array.max() <= np.iinfo(np.uint16).max)
    )


def decode_domain_8bit(values: np.ndarray, domain: str, where: str = "image") -> np.ndarray:
    """Raw image values of ``domain`` -> the released 8-bit image ``(H, W, 3)`` uint8 (module
    docstring). ``values``: ``(H, W)`` or ``(H, W, 3)`` as read from the PNG; ``where`` names
    the file in errors."""
    array = np.asarray(values)
    sixteen_bit = domain in EDGE_MAXIMA or domain in DEPTH_DOMAINS
    if sixteen_bit and not _sixteen_bit_values(array):
        raise CenError(
            f"{where}: {domain} must be a 16-bit single-channel PNG, got {array.dtype} "
            f"{array.shape}"
        )
    if not sixteen_bit and array.dtype != np.uint8 and domain not in SEGMENT_DOMAINS:
        raise CenError(f"{where}: {domain} must be an 8-bit PNG, got {array.dtype}")
    if domain in EDGE_MAXIMA:
        intensity = np.clip(array.astype(np.float64) * 255.0 / EDGE_MAXIMA[domain], 0, 255)
    elif domain in DEPTH_DOMAINS:
        wrapped = array.astype(np.uint16) + np.uint16(1)
        with np.errstate(divide="ignore"):
            log_depth = np.log(wrapped) * np.float32(255.0) / np.float32(LOG_DEPTH_MAX)
        intensity = np.where(np.isfinite(log_depth), log_depth, 0)
    else:
        intensity = np.clip(array, 0, 255)
    image = intensity.astype(np.uint8)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[-1] == 3:
        return image
    raise CenError(f"{where}: {domain} image of shape {array.shape} is neither grey nor RGB")


#: PIL modes of the images each kind of domain may be stored as.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
EIGHT_BIT_MODES = ("L", "RGB", "P", "RGBA", "LA", "CMYK", "YCbCr")


def check_domain_modes(files: Sequence[tuple[Path, str]]) -> None:
    """Refuse, from their headers alone, files whose storage their domain cannot be decoded
    from (:func:`decode_domain_8bit`'s rules): a wrong file must not surface at the first
    validation, epochs into a run. ``files``: ``(path, domain)`` pairs."""
    odd = []
    for path, domain in files:
        with Image.open(path) as image:
            mode = image.mode
        if domain in EDGE_MAXIMA or domain in DEPTH_DOMAINS:
            if mode not in SIXTEEN_BIT_MODES:
                odd.append(f"{path}: {domain} must be a 16-bit single-channel PNG, got {mode}")
        elif domain not in SEGMENT_DOMAINS and mode not in EIGHT_BIT_MODES:
            odd.append(f"{path}: {domain} must be an 8-bit image, got {mode}")
    if odd:
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise CenError(odd[0] + more)


def to_tensor(image: np.ndarray) -> Tensor:
    """8-bit ``(H, W, 3)`` -> float32 ``(3, H, W)`` in ``[-1, 1]``, ``value / 127.5 - 1``."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def decode_domain(values: np.ndarray, domain: str, where: str = "image") -> Tensor:
    """Raw image values of ``domain`` -> float32 ``(3, H, W)`` in ``[-1, 1]``, at the file's
    size: :func:`decode_domain_8bit` then :func:`to_tensor`."""
    return to_tensor(decode_domain_8bit(values, domain, where))


def read_domain(path: Path, domain: str) -> Tensor:
    """Read and decode one file of ``domain`` -> ``(3, H, W)`` in ``[-1, 1]``."""
    return decode_domain(read_png(path), domain, str(path))


def read_domain_8bit(path: Path, domain: str) -> np.ndarray:
    """Read one file of ``domain`` as the released 8-bit image ``(H, W, 3)``."""
    return decode_domain_8bit(read_png(path), domain, str(path))


# ----------------------------------------------------------------------------- dataset


def resize_8bit(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(size, size, 3)`` (or ``size = (h, w)`` -> ``(h, w, 3)``) with
    PIL's bilinear filter, as released."""
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


class TaskonomyDataset(Dataset):
    """Views of a Taskonomy root as ``{"inputs": (M, 3, S, S), "target": (3, S, S), "name"}``.

    Args:
        root: data root (module docstring).
        split: ``"train"`` or ``"val"`` (reads ``ROOT/{split}.txt``).
        inputs: the ``M`` input domains (names or ``--img-types`` indices), in order.
        target: the target domain.
        train: random crop and flip (else a plain resize to ``size``).
        size: output side ``S``.
        load_size: side resized to before the random crop (train only; >= ``size``).

    Raises:
        CenError: missing split file, a domain folder or file missing on disk (at
            construction), an unreadable or wrongly encoded image (when loaded).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        inputs: Sequence[str | int],
        target: str | int,
        train: bool = False,
        size: int = 256,
        load_size: int = 286,
    ) -> None:
        self.root = Path(root)
        self.inputs = [resolve_domain(d) for d in inputs]
        self.target = resolve_domain(target)
        if train and load_size < size:
            raise CenError(f"load size {load_size} is smaller than the crop size {size}")
        self.train, self.size, self.load_size = train, size, load_size
        self.views = read_split_file(self.root / f"{split}.txt")
        for domain in (*self.inputs, self.target):
            self._check_domain(domain)

    def _check_domain(self, domain: str) -> None:
        folder = self.root / domain
        hint = f"fetch it with `cen data taskonomy {self.root} --domains {domain}`"
        index = f" (img-type {DOMAINS.index(domain)})" if domain in DOMAINS else ""
        if not folder.is_dir():
            raise CenError(
                f"domain {domain}{index} missing on disk: no folder {domain}/ in the data "
                f"root; {hint}"
            )
        missing = [v for v in self.views if not (self.root / domain_file(domain, v)).is_file()]
        if missing:
            raise CenError(
                f"domain {domain}{index}: {len(missing)} of {len(self.views)} files missing, "
                f"e.g. {self.root / domain_file(domain, missing[0])}; {hint}"
            )

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> dict[str, Any]:
        view = self.views[index]
        domains = [*self.inputs, self.target]
        images = [read_domain_8bit(self.root / domain_file(d, view), d) for d in domains]
        if self.train:
            images = [resize_8bit(im, self.load_size) for im in images]
            top, left = (
                int(torch.randint(0, self.load_size - self.size + 1, ())) for _ in range(2)
            )
            images = [im[top : top + self.size, left : left + self.size] for im in images]
            if bool(torch.rand(()) < 0.5):
                images = [im[:, ::-1] for im in images]
        else:
            images = [resize_8bit(im, self.size) for im in images]
        stacked = torch.stack([to_tensor(im) for im in images])
        return {"inputs": stacked[:-1], "target": stacked[-1], "name": view_name(view)}


# ----------------------------------------------------------------------------- download


def image_problem(path: Path) -> str | None:
    """What keeps ``path`` from being an image file, if anything (its data is verified)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError):  # PIL's UnidentifiedImageError is an OSError
        return "is not an image (an error page?)"
    return None


def _refuse_other_content(out: Path, splits: dict[str, Sequence[View]]) -> None:
    """Refuse an ``out`` that holds anything but an earlier download of these splits: the
    download writes into it (a rerun resumes, more domains join), so it would mix its views
    with another set's files or write over one's own list files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CenError(f"{out}: a file, expected a folder (made if missing)")
    advice = "give an empty folder, or an earlier download's to resume it or add domains"
    for entry in sorted(out.iterdir()):
        if entry.is_dir() and entry.name in KNOWN_DOMAINS:
            continue
        split = entry.name.removesuffix(".txt")
        if entry.name.endswith(".txt") and split in splits:
            try:
                same = read_split_file(entry) == list(splits[split])
            except (CenError, OSError, UnicodeDecodeError):
                same = False
            if same:
                continue
            raise CenError(
                f"{out}: its {entry.name} is not the {split} split this download writes; {advice}"
            )
        raise CenError(f"{out}: holds {entry.name}, not of a Taskonomy download; {advice}")


def prepare_taskonomy(
    out: str | Path,
    domains: Sequence[str | int] = ("reshading", "edge_texture", "rgb"),
    base_url: str = DEFAULT_BASE_URL,
    workers: int = 4,
    progress: bool = True,
    splits: dict[str, Sequence[View]] | None = None,
) -> Path:
    """Fetch the split views of ``domains`` from the sample building into ``out``.

    Each file comes on its own from ``{base_url}/{domain}/{file}`` (the repository holds
    tens of GB across all domains; only what is asked for is fetched), ``workers`` at a time
    with :func:`~cenfusion.data.download.download_many`: files already present are skipped
    and interrupted ones resume; a file that is not an image (a mirror's error page) is
    removed. Writes ``train.txt`` and ``val.txt`` at the end. ``out`` is empty or an
    earlier download of the same splits (anything else is refused).

    ``splits`` (default: the released 1000/500 views) maps split names to views.
    """
    out = Path(out)
    names = list(dict.fromkeys(resolve_domain(d) for d in domains))
    if not names:
        raise CenError("cen data taskonomy: name at least one domain with --domains")
    chosen = {s: load_split(s) for s in SPLITS} if splits is None else dict(splits)
    _refuse_other_content(out, chosen)
    base = base_url.rstrip("/")
    items = [
        (f"{base}/{domain_file(domain, view)}", out / domain_file(domain, view))
        for domain in names
        for views in chosen.values()
        for view in views
    ]
    advice = "--base-url MIRROR for another copy (a rerun keeps the files already fetched)"
    download_many(items, workers=workers, progress=progress, advice=advice, check=image_problem)
    for split, views in chosen.items():
        write_split_file(out / f"{split}.txt", views)
    return out
