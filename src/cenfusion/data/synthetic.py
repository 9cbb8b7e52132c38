"""The embedded default data set: synthetic indoor RGB-D scenes where fusion matters.

Each image shows a box-shaped room seen by a tilted pinhole camera, with objects hung on the
back wall, lying on the floor, standing on it, and signs floating in the air. The classes are
designed so that neither modality alone can label every pixel, and so that two of them need
the modalities combined *inside* the network:

==  =========  =====================================  ===============================  ===========
id  class      geometry                               appearance                       needs
==  =========  =====================================  ===============================  ===========
0   wall       vertical room planes                   pale, nearly grey, plain         either
1   floor      horizontal plane, height 0             wood or grey, plain or planks    either
2   ceiling    horizontal plane, 2.5-3 m up           near white                       either
3   poster     15 cm panel on the back wall           *decor* (see below)              RGB
4   cabinet    box hung on the back wall, 30-60 cm    *decor*, same draw as poster     depth
               deep, placed and sized like posters
5   rug        1 mm panel flat on the floor           *decor*                          RGB
6   crate      box standing on the floor              palette colour, dark slats       RGB
7   block      same size and placement as crate       palette colour, plain            RGB
8   sign-a     *sign*, near (and warm)                self-lit, warm (and near)        RGB x depth
9   sign-b     *sign*, far or cool                    self-lit, same draw as sign-a    RGB x depth
255 (ignore)   small clutter boxes on the floor       any                              --
==  =========  =====================================  ===============================  ===========

*decor*: a colour from the shared ``_DECOR_COLOURS`` palette (jittered per instance),
plain or with a checker, dot or frame pattern in a second palette colour.

Pairs told apart by one modality only:

- geometry only (depth needed): poster / cabinet (same colours, patterns, placement and size;
  the cabinet protrudes from the wall).
- appearance only (RGB needed): rug / floor (flush with the floor: the 1 mm depth step is
  far below the sensor noise); crate / block (identical shape distribution, slats versus
  plain); poster / wall mostly (a poster stands 15 cm out, three to eight times the depth
  noise at the back wall, under the depth-edge rule that makes holes around cabinets).
- both: e.g. cabinet / wall, rug / poster, crate / cabinet.

A late fusion of per-modality predictions solves all of these. The *interaction* pair
:data:`INTERACTION_CLASSES` (sign-a / sign-b) it cannot solve: a sign is a thin upright panel
floating 1.2 to 2.8 m in front of the camera, facing it, and it carries two independent coin
flips, its colour family (:data:`SIGN_COLOURS`: warm or cool, seen by RGB only) and its
distance band (:data:`SIGN_BANDS`: near or far, seen by depth only), each coming up warm or
near with probability :data:`SIGN_BIT_P` (0.4). The class is their conjunction: sign-a when
warm *and* near, sign-b otherwise. Each bit is correlated with the class (a cool or a far sign
is always sign-b), so the gradient of a network that sees both has first-order signal, and
the class is a linear threshold of the two bits, one layer's work once the features meet.
Alone, neither modality can find a sign-a: given what RGB sees, a warm sign is sign-a with
probability 0.4 (the chance that it is near), never above 1/2, and the same holds for depth.
Any convex combination of the two modalities' class scores (probabilities or logits) therefore
calls every sign sign-b, the warm and near ones included: late fusion labels no sign-a pixel
(a test checks this on the generator). Two construction rules keep each bit out of the other
modality:

- RGB cannot see the distance: a sign is drawn at 1 m (image position, apparent size, yaw
  facing the camera, pattern) and then scaled about the camera centre to its distance, which
  leaves its projection unchanged; pattern and grain scale with it, and signs are self-lit
  (:attr:`Appearance.emissive`: constant radiance, no dependence on the lights' positions).
  Placements are accepted only if they fit the room at *both* ends of the distance range
  (above the floor objects, below the ceiling, inside the walls, in front of the back-wall
  objects, clear of other signs in the image), so no other object hides one band more than
  the other. Swapping a sign's band leaves the photo unchanged up to rounding.
- Depth cannot see the colour: geometry is drawn independently of the colour family.

Colours are drawn per instance from palettes shared across classes, so RGB cannot separate a
geometry pair by colour; depth cannot separate an appearance pair because their shapes come
from the same distribution. Depth carries Kinect-like noise (sigma grows with distance
squared), millimetre quantisation and holes (zeros) in blobs and along depth edges; RGB has
Lambertian shading from a directional and a point light, vignetting and sensor noise.

Names without a module here (palettes, sign constants, :class:`Appearance`,
:data:`INTERACTION_CLASSES`) are those of :mod:`cenfusion.data.scenes`. The generator is
split as scene description (:func:`cenfusion.data.scenes.sample_scene`) -> per-pixel
rendering (:func:`cenfusion.data.render.render`: depth, normals, labels, instances, albedo,
shading, RGB, sensor depth) -> writers (:func:`generate_segmentation_dataset` here), so other
domains (normals, shading, edges) can be written from the same scenes.
:func:`cenfusion.data.render.predictable_scene` repaints a scene for translation, where
every colour must follow from what shading and edges show. Everything is vectorised numpy;
the default set (400 + 100 images of 60x80) takes a few seconds on one core.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cenfusion.data.render import render_scene
from cenfusion.data.scenes import CLASS_NAMES
from cenfusion.data.staging import ensure_generated, staging
from cenfusion.errors import CenError

#: Version of the generator; bump it when the images change so caches are regenerated.
GENERATOR_VERSION = 5
#: The embedded set: training and validation images, and their size ``(H, W)``. Small images
#: that a 64x64 crop nearly covers: a CPU run sees whole scenes at every step.
DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_SIZE = 400, 100, (60, 80)
MARKER_FILE = "cenfusion-synthetic.json"


def default_data_root() -> Path:
    """Cache folder of the default set: ``$CEN_CACHE/synthetic-v1`` (``$CEN_CACHE`` defaulting
    to ``~/.cache/cenfusion``)."""
    base = os.environ.get("CEN_CACHE")
    cache = Path(base) if base else Path.home() / ".cache" / "cenfusion"
    return cache / f"synthetic-v{GENERATOR_VERSION}"


def _marker(num_train: int, num_val: int, size: tuple[int, int], seed: int) -> dict[str, object]:
    return {
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "size": list(size),
        "seed": seed,
        "classes": list(CLASS_NAMES),
    }


def _list_lines(names: list[str]) -> str:
    """List-file text in the NYUDv2 column order: rgb, mask, depth."""
    return "".join(f"rgb/{n}.png\tmasks/{n}.png\tdepth/{n}.png\n" for n in names)


def generate_segmentation_dataset(
    out: Path,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
) -> Path:
    """Write a synthetic RGB-D segmentation set in the NYUDv2 layout and return ``out``.

    Writes ``rgb/NNNNNN.png`` (8-bit RGB), ``depth/NNNNNN.png`` (16-bit, millimetres),
    ``masks/NNNNNN.png`` (8-bit L, 255 = ignore), ``train.txt`` (images 0..num_train-1),
    ``val.txt`` (the next num_val) and a marker file with the parameters. Image i is drawn
    from ``numpy.random.default_rng([seed, i])``, so the set depends only on its arguments.
    Everything is written to a hidden temporary folder next to ``out`` and renamed into place
    at the end: an interrupted run leaves no partial set at ``out``.
    """
    out = Path(out)
    if num_train < 1 or num_val < 1:
        raise CenError(
            f"synthetic set {out}: expected num_train and num_val >= 1, "
            f"got {num_train} and {num_val}"
        )
    if min(size) < 16:
        raise CenError(f"synthetic set {out}: image size {size} too small, expected >= 16x16")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CenError(f"synthetic set {out}: the folder already exists and is not empty")
    with staging(out) as tmp:
        for folder in ("rgb", "depth", "masks"):
            (tmp / folder).mkdir()
        names = [f"{i:06d}" for i in range(num_train + num_val)]
        for i, name in enumerate(names):
            arrays = render_scene(np.random.default_rng([seed, i]), size)
            Image.fromarray(arrays["rgb"]).save(tmp / "rgb" / f"{name}.png", compress_level=1)
            Image.fromarray(arrays["depth_mm"]).save(
                tmp / "depth" / f"{name}.png", compress_level=1
            )
            Image.fromarray(arrays["label"]).save(tmp / "masks" / f"{name}.png", compress_level=1)
        (tmp / "train.txt").write_text(_list_lines(names[:num_train]))
        (tmp / "val.txt").write_text(_list_lines(names[num_train:]))
        marker = _marker(num_train, num_val, tuple(size), seed)
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n")
    return out


def ensure_synthetic(
    root: str | Path | None = None,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
) -> Path:
    """Return a synthetic set at ``root`` (default :func:`default_data_root`), generating it once.

    A finished set carries a marker file with its parameters (see
    :func:`~cenfusion.data.staging.ensure_generated`).
    """
    root = Path(root) if root is not None else default_data_root()
    return ensure_generated(
        root,
        MARKER_FILE,
        _marker(num_train, num_val, tuple(size), seed),
        lambda: generate_segmentation_dataset(root, num_train, num_val, tuple(size), seed),
        "synthetic set",
    )
