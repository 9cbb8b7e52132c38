"""Taskonomy domains of the embedded synthetic scenes, written in the real encodings.

The translation demo and the tests train on these: every domain :mod:`cenfusion.data.taskonomy`
reads (photo, normals, shading, depth, curvature, edges, segments) rendered from the scenes of
:mod:`cenfusion.data.scenes`, repainted so that the photo follows from shading and edges
(:func:`~cenfusion.data.render.predictable_scene`), in the file layout and bit depths of the
released Taskonomy sample building.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cenfusion.data.render import predictable_scene, render
from cenfusion.data.scenes import sample_scene
from cenfusion.data.staging import ensure_generated, staging
from cenfusion.data.synthetic import GENERATOR_VERSION, default_data_root
from cenfusion.data.taskonomy import (
    DEPTH_UNITS_PER_METRE,
    EDGE_MAXIMA,
    NO_DEPTH,
    domain_file,
    write_split_file,
)
from cenfusion.errors import CenError

__all__ = [
    "SYNTHETIC_DOMAINS",
    "default_synthetic_taskonomy_root",
    "ensure_synthetic_taskonomy",
    "generate_taskonomy_dataset",
    "taskonomy_domains",
]

#: Version of the Taskonomy writer below; bump it when the written images change.
WRITER_VERSION = 2
MARKER_FILE = "cenfusion-synthetic-taskonomy.json"
SYNTHETIC_DOMAINS: tuple[str, ...] = (
    "rgb",
    "normal",
    "reshading",
    "depth_euclidean",
    "depth_zbuffer",
    "edge_occlusion",
    "edge_texture",
    "segment_unsup2d",
)
_SOBEL_MAX = 4.0 * np.sqrt(2.0)


def _to_uint16(values: np.ndarray, limit: int = NO_DEPTH - 1) -> np.ndarray:
    return np.clip(np.rint(values), 0, limit).astype(np.uint16)


def _depth_jumps(depth: np.ndarray, tolerance: float = 0.03) -> np.ndarray:
    """``(H, W)`` bool: pixels beside a depth discontinuity (an occlusion boundary).

    Inverse depth is an affine function of the pixel coordinates on any plane, so its second
    difference along a row or column vanishes on planes however slanted (a floor seen at a
    grazing angle), stays small at creases (a wall meeting the floor), and is large where one
    surface hides another. A pixel is marked where that second difference exceeds
    ``tolerance`` times its own inverse depth.
    """
    inverse = 1.0 / np.maximum(depth, 1e-6)
    jump = np.zeros(depth.shape, dtype=bool)
    jump[1:-1] |= np.abs(inverse[2:] - 2 * inverse[1:-1] + inverse[:-2]) > tolerance * inverse[1:-1]
    jump[:, 1:-1] |= (
        np.abs(inverse[:, 2:] - 2 * inverse[:, 1:-1] + inverse[:, :-2])
        > tolerance * inverse[:, 1:-1]
    )
    return jump


def taskonomy_domains(arrays: dict[str, np.ndarray], focal: float) -> dict[str, np.ndarray]:
    """The Taskonomy domains of one rendered view, as the PNG arrays the real data stores.

    ``arrays`` is :func:`cenfusion.data.render.render`'s output for an ``(H, W)`` image,
    ``focal`` the camera's focal length in pixels. Each domain follows its Taskonomy
    definition, computed from the scene:

    - ``rgb``: the rendered photo, 8-bit RGB.
    - ``normal``: camera-frame unit normals (x right, y down, z forward), ``127.5 (n + 1)``.
    - ``reshading``: Lambertian shading by a point light at the camera, ``cos`` of the angle
      between the normal and the ray, 8-bit grey (it depends on geometry only, not on the
      photo's lights or albedo).
    - ``depth_zbuffer``: z-depth, ``depth_euclidean``: distance along the ray; 16-bit in
      1/512 m (the scenes are closed rooms, so 65535 "no depth" never occurs).
    - ``edge_texture``: Sobel gradient magnitude of the Gaussian-blurred (sigma 1) grey photo
      in 0..1, scaled so the largest possible magnitude is the dataset's maximum 11355.
    - ``edge_occlusion``: depth discontinuities (:func:`_depth_jumps`; creases and slanted
      planes do not count), blurred (sigma 1) to a soft line, peak 11584.
    - ``segment_unsup2d``: one id per surface region (object instance x face), 8-bit.
    """
    height, width = arrays["depth"].shape
    depth = arrays["depth"].astype(np.float64)
    v, u = np.mgrid[0:height, 0:width] + 0.5
    rays = np.stack([(u - width / 2) / focal, (v - height / 2) / focal, np.ones_like(u)], -1)
    ray_length = np.sqrt((rays**2).sum(-1))
    normal = arrays["normal"].astype(np.float64)
    reshading = np.clip(-(normal * rays).sum(-1) / ray_length, 0.0, 1.0)
    grey = arrays["rgb"].astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    grey = ndimage.gaussian_filter(grey, 1.0)
    texture = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1)) / _SOBEL_MAX
    jump = _depth_jumps(depth)
    occlusion = ndimage.gaussian_filter(jump.astype(np.float64), 1.0)
    occlusion /= max(occlusion.max(), 1e-12)
    axis = np.abs(normal).argmax(-1)
    positive = np.take_along_axis(normal, axis[..., None], -1)[..., 0] > 0
    regions = arrays["instance"].astype(np.int64) * 6 + axis * 2 + positive
    _, region_ids = np.unique(regions, return_inverse=True)
    return {
        "rgb": arrays["rgb"],
        "normal": np.clip(np.rint(127.5 * (normal + 1.0)), 0, 255).astype(np.uint8),
        "reshading": np.clip(np.rint(255.0 * reshading), 0, 255).astype(np.uint8),
        "depth_euclidean": _to_uint16(depth * ray_length * DEPTH_UNITS_PER_METRE),
        "depth_zbuffer": _to_uint16(depth * DEPTH_UNITS_PER_METRE),
        "edge_occlusion": _to_uint16(occlusion * EDGE_MAXIMA["edge_occlusion"]),
        "edge_texture": _to_uint16(texture * EDGE_MAXIMA["edge_texture"]),
        "segment_unsup2d": np.clip(region_ids.reshape(height, width), 0, 255).astype(np.uint8),
    }


def _synthetic_marker(num_train: int, num_val: int, size: int, seed: int) -> dict:
    return {
        "generator": GENERATOR_VERSION,
        "writer": WRITER_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "size": size,
        "seed": seed,
        "domains": list(SYNTHETIC_DOMAINS),
    }


def generate_taskonomy_dataset(
    out: str | Path, num_train: int = 200, num_val: int = 50, size: int = 128, seed: int = 0
) -> Path:
    """Write synthetic indoor scenes in the Taskonomy layout at ``out`` and return it.

    Scene ``i`` (rendered at ``size`` x ``size`` from ``numpy.random.default_rng([seed, i])``
    by :mod:`cenfusion.data.synthetic`, repainted and relit by
    :func:`~cenfusion.data.render.predictable_scene` so that the photo is learnable from
    the other domains: each surface's colour follows from its class and pattern or
    silhouette, its shading from ``reshading``) becomes view ``point_i_view_0`` of every
    domain in :data:`SYNTHETIC_DOMAINS` (see :func:`taskonomy_domains`); scenes
    ``0..num_train-1`` form ``train.txt``, the next ``num_val`` ``val.txt``. Written to a
    hidden folder beside ``out`` and renamed into place when complete.
    """
    out = Path(out)
    if num_train < 1 or num_val < 1:
        raise CenError(f"synthetic Taskonomy {out}: expected at least 1 train and 1 val view")
    if size < 16:
        raise CenError(f"synthetic Taskonomy {out}: size {size} too small, expected >= 16")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CenError(f"synthetic Taskonomy {out}: the folder exists and is not empty")
    with staging(out) as tmp:
        for domain in SYNTHETIC_DOMAINS:
            (tmp / domain).mkdir()
        views = [(i, 0) for i in range(num_train + num_val)]
        for i, view in enumerate(views):
            rng = np.random.default_rng([seed, i])
            scene = predictable_scene(sample_scene(rng, aspect=1.0))
            arrays = render(scene, (size, size), rng)
            encoded = taskonomy_domains(arrays, scene.camera.focal * size)
            for domain, values in encoded.items():
                Image.fromarray(values).save(tmp / domain_file(domain, view), compress_level=1)
        write_split_file(tmp / "train.txt", views[:num_train])
        write_split_file(tmp / "val.txt", views[num_train:])
        marker = _synthetic_marker(num_train, num_val, size, seed)
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n")
    return out


def default_synthetic_taskonomy_root() -> Path:
    """``$CEN_CACHE/synthetic-taskonomy-vG.W`` (default cache ``~/.cache/cenfusion``)."""
    return default_data_root().parent / f"synthetic-taskonomy-v{GENERATOR_VERSION}.{WRITER_VERSION}"


def ensure_synthetic_taskonomy(
    root: str | Path | None = None,
    *,
    num_train: int = 200,
    num_val: int = 50,
    size: int = 128,
    seed: int = 0,
) -> Path:
    """A synthetic Taskonomy set at ``root`` (default: the cache), generated on first use.

    A set made with other parameters is an error rather than silently reused; when several
    processes generate at once, the first rename wins and the others reuse it.
    """
    root = Path(root) if root is not None else default_synthetic_taskonomy_root()
    return ensure_generated(
        root,
        MARKER_FILE,
        _synthetic_marker(num_train, num_val, size, seed),
        lambda: generate_taskonomy_dataset(root, num_train, num_val, size, seed),
        "synthetic Taskonomy",
    )
