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

*decor*: a colour from the shared :data:`_DECOR_COLOURS` palette (jittered per instance),
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

The generator is split as scene description (:func:`sample_scene`) -> per-pixel rendering
(:func:`render`: depth, normals, labels, instances, albedo, shading, RGB, sensor depth) ->
writers (:func:`generate_segmentation_dataset`), so other domains (normals, shading, edges)
can be written from the same scenes. :func:`predictable_scene` repaints a scene for
translation, where every colour must follow from what shading and edges show. Everything is
vectorised numpy; the default set (400 + 100 images of 60x80) takes a few seconds on one
core.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import zoom

from cenfusion.data.class_names import SYNTHETIC_CLASSES
from cenfusion.data.staging import ensure_generated, staging
from cenfusion.errors import CenError

CLASS_NAMES = SYNTHETIC_CLASSES
WALL, FLOOR, CEILING, POSTER, CABINET, RUG, CRATE, BLOCK, SIGN_A, SIGN_B = range(len(CLASS_NAMES))
#: The classes only a fusion of RGB and depth features can tell apart (module docstring).
INTERACTION_CLASSES = (SIGN_A, SIGN_B)
IGNORE_INDEX = 255
#: Colours for drawing label maps, one row per class id (uint8 ``(K, 3)``).
PALETTE = np.array(
    [
        [190, 190, 160],  # wall
        [120, 80, 40],  # floor
        [225, 225, 250],  # ceiling
        [230, 25, 75],  # poster
        [60, 180, 75],  # cabinet
        [255, 225, 25],  # rug
        [0, 130, 200],  # crate
        [245, 130, 48],  # block
        [145, 30, 180],  # sign-a
        [70, 240, 240],  # sign-b
    ],
    dtype=np.uint8,
)
#: Version of the generator; bump it when the images change so caches are regenerated.
GENERATOR_VERSION = 5
#: The embedded set: training and validation images, and their size ``(H, W)``. Small images
#: that a 64x64 crop nearly covers: a CPU run sees whole scenes at every step.
DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_SIZE = 400, 100, (60, 80)
MARKER_FILE = "cenfusion-synthetic.json"

#: Saturated object colours (albedo 0..1) shared by posters, cabinets, rugs, crates, blocks.
_DECOR_COLOURS = np.array(
    [
        [0.80, 0.15, 0.15],
        [0.90, 0.50, 0.10],
        [0.90, 0.80, 0.15],
        [0.25, 0.65, 0.20],
        [0.10, 0.60, 0.60],
        [0.15, 0.35, 0.80],
        [0.15, 0.15, 0.45],
        [0.50, 0.20, 0.65],
        [0.85, 0.30, 0.60],
    ]
)
_FLOOR_COLOURS = np.array(
    [[0.55, 0.38, 0.22], [0.42, 0.28, 0.17], [0.68, 0.54, 0.38], [0.45, 0.45, 0.47]]
)
_DECOR_PATTERNS = ("plain", "checker", "dots", "frame")
#: Sign colour families (albedo 0..1): warm (red, orange, yellow, pink), cool (green, teal,
#: blue, violet). Jitter (+-0.05) never brings a colour nearer another family's.
SIGN_COLOURS = {
    "warm": np.array(
        [[0.85, 0.15, 0.12], [0.92, 0.50, 0.08], [0.90, 0.78, 0.12], [0.85, 0.25, 0.55]]
    ),
    "cool": np.array(
        [[0.20, 0.62, 0.25], [0.10, 0.58, 0.62], [0.15, 0.35, 0.85], [0.45, 0.25, 0.75]]
    ),
}
#: Sign distance bands, camera-frame z in metres: near, far.
SIGN_BANDS = {"near": (1.2, 1.7), "far": (2.3, 2.8)}
#: Probability that a sign is warm, and independently that it is near. Below 1/2, so each
#: modality's best guess for a warm (or near) sign is sign-b: late fusion never finds sign-a.
SIGN_BIT_P = 0.4
#: Signs stay above this height (the tallest floor object is 0.9 m), in metres.
_SIGN_MIN_HEIGHT = 1.0
#: The 8 corners of a box in half-extent units, ``(8, 3)``.
_CORNER_SIGNS = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
#: Per face axis of a box (x, y, z face): which local axes span the face as (u, v).
_U_AXIS = np.array([2, 0, 0])
_V_AXIS = np.array([1, 2, 1])


@dataclass(frozen=True)
class Appearance:
    """Albedo of a surface as a function of face coordinates ``(u, v)`` in metres.

    ``pattern`` mixes ``base`` and ``second``: plain, checker / dots (cell ``period``), frame
    (a border ``period / 4`` wide), slats (dark line every ``period`` along v), planks (seam
    every ``period`` along u, each plank slightly tinted). ``grain`` scales a smooth
    surface-attached variation made of two sinusoids (``waves``: rows of (fu, fv, phase), in
    cycles per metre), so texture stays fixed to the surface when the camera moves.
    ``emissive`` surfaces are self-lit: their shading is the exposure alone, whatever the
    lights and the surface orientation.
    """

    base: tuple[float, float, float]
    second: tuple[float, float, float]
    pattern: str
    period: float
    grain: float
    waves: tuple[tuple[float, float, float], ...]
    emissive: bool = False


@dataclass(frozen=True)
class Box:
    """An oriented box in world metres (x right, y up, z forward); ``yaw`` turns it about y."""

    label: int
    center: tuple[float, float, float]
    half: tuple[float, float, float]
    yaw: float
    appearance: Appearance


@dataclass(frozen=True)
class Camera:
    """Pinhole camera at ``position``; ``tilt`` looks down, ``yaw`` turns right (radians).

    ``focal`` is in image widths, so a scene renders alike at any resolution.
    """

    position: tuple[float, float, float]
    yaw: float
    tilt: float
    focal: float


@dataclass(frozen=True)
class Lighting:
    """Ambient + directional (``direction`` points to the light) + point light with falloff."""

    ambient: float
    direction: tuple[float, float, float]
    directional: float
    lamp: tuple[float, float, float]
    lamp_strength: float
    lamp_radius: float
    exposure: float


@dataclass(frozen=True)
class Scene:
    """A room seen from inside: its walls, floor and ceiling are the faces of ``room``."""

    room: Box
    walls: Appearance
    floor: Appearance
    ceiling: Appearance
    camera: Camera
    lighting: Lighting
    objects: tuple[Box, ...]


def _rotation_y(angle: float) -> np.ndarray:
    """Rotation about the vertical axis, mapping local to world coordinates ``(3, 3)``."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def camera_rotation(camera: Camera) -> np.ndarray:
    """World-from-camera rotation ``(3, 3)``; camera axes as OpenCV: x right, y down, z forward."""
    c, s = np.cos(camera.tilt), np.sin(camera.tilt)
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return _rotation_y(camera.yaw) @ tilt @ np.diag([1.0, -1.0, 1.0])


def _project(camera: Camera, point: tuple[float, float, float], aspect: float) -> np.ndarray:
    """Image position of ``point`` as fractions ``(u, v)`` of width and height (nan if behind)."""
    local = (np.asarray(point) - np.asarray(camera.position)) @ camera_rotation(camera)
    if local[2] <= 0.1:
        return np.array([np.nan, np.nan])
    return np.array(
        [
            0.5 + camera.focal * local[0] / local[2],
            0.5 + camera.focal * aspect * local[1] / local[2],
        ]
    )


def _in_view(camera: Camera, point: tuple[float, float, float], aspect: float) -> bool:
    uv = _project(camera, point, aspect)
    return bool(np.all((uv > 0.05) & (uv < 0.95)))


def _jitter(
    rng: np.random.Generator, colour: np.ndarray, amount: float
) -> tuple[float, float, float]:
    """``colour`` moved by up to ``amount`` per channel, kept inside 0.02..0.98."""
    return tuple(np.clip(colour + rng.uniform(-amount, amount, 3), 0.02, 0.98).tolist())


def _waves(
    rng: np.random.Generator, low: float, high: float
) -> tuple[tuple[float, float, float], ...]:
    """Two random plane waves for the surface grain, frequencies in cycles per metre."""
    angles = rng.uniform(0, np.pi, 2)
    freqs = rng.uniform(low, high, 2)
    phases = rng.uniform(0, 2 * np.pi, 2)
    return tuple(
        (float(f * np.cos(a)), float(f * np.sin(a)), float(p))
        for f, a, p in zip(freqs, angles, phases, strict=True)
    )


def _decor(rng: np.random.Generator) -> Appearance:
    """The appearance shared by posters, cabinets and rugs (one draw per instance)."""
    first, second = rng.choice(len(_DECOR_COLOURS), size=2, replace=False)
    return Appearance(
        base=_jitter(rng, _DECOR_COLOURS[first], 0.08),
        second=_jitter(rng, _DECOR_COLOURS[second], 0.08),
        pattern=str(rng.choice(_DECOR_PATTERNS)),
        period=float(rng.uniform(0.15, 0.35)),
        grain=0.05,
        waves=_waves(rng, 1.0, 4.0),
    )


def _box_paint(rng: np.random.Generator, slats: bool) -> Appearance:
    """Crate (``slats``) or block: same palette draw, differing only in the pattern."""
    base = np.asarray(_jitter(rng, _DECOR_COLOURS[rng.integers(len(_DECOR_COLOURS))], 0.08))
    return Appearance(
        base=tuple(base.tolist()),
        second=tuple((base * 0.35).tolist()),
        pattern="slats" if slats else "plain",
        period=float(rng.uniform(0.3, 0.45)),
        grain=0.05,
        waves=_waves(rng, 1.0, 4.0),
    )


def _room_paint(rng: np.random.Generator) -> tuple[Appearance, Appearance, Appearance]:
    """Walls (pale, nearly grey), floor (wood or grey, maybe planks) and ceiling (near white)."""
    tint = rng.uniform(0, 1, 3)
    wall = tuple(
        np.clip(0.82 + 0.1 * (tint - tint.mean()) + rng.uniform(-0.1, 0.08), 0, 1).tolist()
    )
    walls = Appearance(
        base=wall,
        second=wall,
        pattern="plain",
        period=1.0,
        grain=0.04,
        waves=_waves(rng, 0.2, 0.8),
    )
    floor_base = np.asarray(_jitter(rng, _FLOOR_COLOURS[rng.integers(len(_FLOOR_COLOURS))], 0.05))
    floor = Appearance(
        base=tuple(floor_base.tolist()),
        second=tuple((floor_base * 0.6).tolist()),
        pattern="planks" if rng.random() < 0.5 else "plain",
        period=float(rng.uniform(0.15, 0.3)),
        grain=0.05,
        waves=_waves(rng, 0.3, 1.5),
    )
    white = (float(rng.uniform(0.85, 0.97)),) * 3
    ceiling = Appearance(
        base=white,
        second=white,
        pattern="plain",
        period=1.0,
        grain=0.02,
        waves=_waves(rng, 0.2, 0.5),
    )
    return walls, floor, ceiling


def _place_on_floor(
    rng: np.random.Generator,
    camera: Camera,
    aspect: float,
    half: tuple[float, float, float],
    x_limit: float,
    z_range: tuple[float, float],
    taken: list[tuple[float, float, float]],
) -> tuple[float, float, float] | None:
    """A visible floor position for a box of ``half`` extents, or None.

    The box's footprint circle must stay clear of the circles in ``taken`` (x, z, radius);
    the chosen one is appended there.
    """
    radius = float(np.hypot(half[0], half[2]))
    low, high = z_range[0] + radius, z_range[1] - radius
    if low >= high or x_limit <= radius:
        return None
    for _ in range(30):
        x = float(rng.uniform(-x_limit + radius, x_limit - radius))
        z = float(rng.uniform(low, high))
        clear = all(np.hypot(x - tx, z - tz) > radius + tr + 0.05 for tx, tz, tr in taken)
        if clear and _in_view(camera, (x, half[1], z), aspect):
            taken.append((x, z, radius))
            return x, half[1], z
    return None


def scale_about_camera(box: Box, camera: Camera, factor: float) -> Box:
    """``box`` scaled by ``factor`` about the camera centre, its surface pattern with it.

    The camera sees the result exactly as it saw ``box`` (same pixels, same albedo per pixel);
    only the depth is multiplied by ``factor``.
    """
    origin = np.asarray(camera.position)
    centre = origin + factor * (np.asarray(box.center) - origin)
    paint = box.appearance
    waves = tuple((fu / factor, fv / factor, phase) for fu, fv, phase in paint.waves)
    return replace(
        box,
        center=tuple(centre.tolist()),
        half=tuple(factor * h for h in box.half),
        appearance=replace(paint, period=paint.period * factor, waves=waves),
    )


def _corners(box: Box) -> np.ndarray:
    """The 8 corners of ``box`` in world coordinates, ``(8, 3)``."""
    return np.asarray(box.center) + (_CORNER_SIGNS * np.asarray(box.half)) @ _rotation_y(box.yaw).T


def _sign_at_one_metre(
    rng: np.random.Generator, camera: Camera, aspect: float
) -> tuple[Box, np.ndarray]:
    """An unlabelled sign at camera depth 1 m facing the camera, and its image box.

    The image box is ``(u0, v0, u1, v1)`` in fractions of width and height.
    """
    u, v = rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.6)
    rotation = camera_rotation(camera)
    ray = rotation @ np.array([(u - 0.5) / camera.focal, (v - 0.5) / (camera.focal * aspect), 1.0])
    half_width = rng.uniform(0.08, 0.14) / camera.focal
    half = (half_width, half_width * rng.uniform(0.5, 1.2), 0.01)
    framed = bool(rng.random() < 0.5)
    box = Box(
        label=IGNORE_INDEX,
        center=tuple((np.asarray(camera.position) + ray).tolist()),
        half=half,
        yaw=float(np.arctan2(ray[0], ray[2])),
        appearance=Appearance(
            base=(0.5, 0.5, 0.5),
            second=(0.5, 0.5, 0.5),
            pattern="frame" if framed else "plain",
            period=float(min(half[:2]) * rng.uniform(0.25, 0.4)),
            grain=0.05,
            waves=_waves(rng, 5.0, 15.0),
            emissive=True,
        ),
    )
    local = (_corners(box) - np.asarray(camera.position)) @ rotation
    image = 0.5 + camera.focal * np.array([1.0, aspect]) * local[:, :2] / local[:, 2:]
    return box, np.concatenate([image.min(0), image.max(0)])


def _sign_fits(box: Box, camera: Camera, room: Box) -> bool:
    """Whether ``box`` (at 1 m) stays clear of the room's other objects at every sign distance.

    Checked at both ends of the distance range: the corners move linearly with the scale.
    """
    width, height, depth = 2 * room.half[0], 2 * room.half[1], room.center[2] + room.half[2]
    for distance in (SIGN_BANDS["near"][0], SIGN_BANDS["far"][1]):
        corners = _corners(scale_about_camera(box, camera, distance))
        x, y, z = corners.T
        if not (
            (y > _SIGN_MIN_HEIGHT).all()
            and (y < height - 0.1).all()
            and (np.abs(x) < width / 2 - 0.05).all()
            and (z < depth - 0.5).all()
        ):
            return False
    return True


def _signs(rng: np.random.Generator, camera: Camera, room: Box, aspect: float) -> list[Box]:
    """Two to four interaction signs (module docstring; fewer where no placement fits), not
    overlapping in the image."""
    signs: list[Box] = []
    placed: list[np.ndarray] = []
    for _ in range(int(rng.integers(2, 5))):
        for _ in range(30):
            box, image = _sign_at_one_metre(rng, camera, aspect)
            inside = bool(np.all(np.isfinite(image)) and image.min() > 0.03 and image.max() < 0.97)
            clear = all(
                image[0] > other[2] + 0.02
                or other[0] > image[2] + 0.02
                or image[1] > other[3] + 0.02
                or other[1] > image[3] + 0.02
                for other in placed
            )
            if inside and clear and _sign_fits(box, camera, room):
                break
        else:
            continue
        family = "warm" if rng.random() < SIGN_BIT_P else "cool"
        band = "near" if rng.random() < SIGN_BIT_P else "far"
        colours = SIGN_COLOURS[family]
        base = np.asarray(_jitter(rng, colours[rng.integers(len(colours))], 0.05))
        paint = replace(
            box.appearance, base=tuple(base.tolist()), second=tuple((base * 0.45).tolist())
        )
        label = SIGN_A if family == "warm" and band == "near" else SIGN_B
        distance = float(rng.uniform(*SIGN_BANDS[band]))
        signs.append(
            scale_about_camera(replace(box, label=label, appearance=paint), camera, distance)
        )
        placed.append(image)
    return signs


def sample_scene(rng: np.random.Generator, aspect: float = 4 / 3) -> Scene:
    """Draw a scene description; ``aspect`` (width / height) only serves to keep objects in view."""
    width = float(rng.uniform(3.5, 5.5))
    depth = float(rng.uniform(3.6, 5.5))
    height = float(rng.uniform(2.5, 3.0))
    camera = Camera(
        position=(float(rng.uniform(-0.25, 0.25) * width), float(rng.uniform(1.1, 1.6)), 0.0),
        yaw=float(rng.uniform(-0.3, 0.3)),
        tilt=float(rng.uniform(0.08, 0.3)),
        focal=float(rng.uniform(0.75, 0.9)),
    )
    walls, floor, ceiling = _room_paint(rng)
    # The room reaches 1 m behind the camera (z = 0) and ``depth`` in front of it.
    room = Box(
        label=WALL,
        center=(0.0, height / 2, (depth - 1.0) / 2),
        half=(width / 2, height / 2, (depth + 1.0) / 2),
        yaw=0.0,
        appearance=walls,
    )
    objects: list[Box] = []

    # Posters and cabinets: one placement and size distribution; only the protrusion differs.
    rects: list[tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(4, 8))):
        label = CABINET if rng.random() < 0.5 else POSTER
        hx, hy = float(rng.uniform(0.25, 0.7)), float(rng.uniform(0.2, 0.55))
        hz = float(rng.uniform(0.15, 0.3)) if label == CABINET else 0.075
        appearance = _decor(rng)
        for _ in range(30):
            x = float(rng.uniform(-width / 2 + hx + 0.05, width / 2 - hx - 0.05))
            y = float(rng.uniform(max(0.9, 0.45 + hy), max(0.9, min(2.0, height - 0.1 - hy))))
            free = all(
                abs(x - rx) > hx + rhx + 0.1 or abs(y - ry) > hy + rhy + 0.1
                for rx, ry, rhx, rhy in rects
            )
            if free and _in_view(camera, (x, y, depth), aspect):
                rects.append((x, y, hx, hy))
                objects.append(Box(label, (x, y, depth - hz), (hx, hy, hz), 0.0, appearance))
                break

    taken: list[tuple[float, float, float]] = []
    x_limit = width / 2 - 0.05
    if rng.random() < 0.8:
        half = (float(rng.uniform(0.6, 1.4)), 0.0005, float(rng.uniform(0.5, 1.2)))
        appearance = _decor(rng)
        spot = _place_on_floor(rng, camera, aspect, half, x_limit, (1.0, depth - 0.5), [])
        if spot is not None:
            objects.append(Box(RUG, spot, half, float(rng.uniform(-0.5, 0.5)), appearance))

    # Crates and blocks: identical shape distribution, only the paint differs. Kept 0.5 m off
    # the back wall so they never cut into a cabinet.
    for _ in range(int(rng.integers(1, 4))):
        label = CRATE if rng.random() < 0.5 else BLOCK
        half = (
            float(rng.uniform(0.15, 0.4)),
            float(rng.uniform(0.15, 0.45)),
            float(rng.uniform(0.15, 0.4)),
        )
        appearance = _box_paint(rng, slats=label == CRATE)
        spot = _place_on_floor(rng, camera, aspect, half, x_limit, (1.3, depth - 0.5), taken)
        if spot is not None:
            objects.append(
                Box(label, spot, half, float(rng.uniform(-np.pi / 4, np.pi / 4)), appearance)
            )

    for _ in range(int(rng.integers(0, 3))):
        half = tuple(float(v) for v in rng.uniform(0.05, 0.15, 3))
        appearance = _box_paint(rng, slats=bool(rng.random() < 0.5))
        spot = _place_on_floor(rng, camera, aspect, half, x_limit, (1.0, depth - 0.5), taken)
        if spot is not None:
            objects.append(Box(IGNORE_INDEX, spot, half, float(rng.uniform(0, np.pi)), appearance))
    objects += _signs(rng, camera, room, aspect)

    direction = np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.8, 1.5), rng.uniform(-1.0, -0.3)])
    lighting = Lighting(
        ambient=float(rng.uniform(0.3, 0.45)),
        direction=tuple((direction / np.linalg.norm(direction)).tolist()),
        directional=float(rng.uniform(0.35, 0.55)),
        lamp=(
            float(rng.uniform(-0.4, 0.4) * width),
            height - 0.05,
            float(rng.uniform(1.0, depth - 1.0)),
        ),
        lamp_strength=float(rng.uniform(0.3, 0.6)),
        lamp_radius=float(rng.uniform(1.5, 3.0)),
        exposure=float(rng.uniform(0.9, 1.15)),
    )
    return Scene(room, walls, floor, ceiling, camera, lighting, tuple(objects))


#: Albedo (base, second) of every surface of a :func:`predictable_scene`, by what the
#: translation inputs show: class (geometry and texture) with the pattern for flat things,
#: the silhouette ("tall" or "wide") for boxes standing on the floor.
PREDICTABLE_PAINT: dict[tuple[int, str], tuple[tuple[float, ...], tuple[float, ...]]] = {
    (WALL, "plain"): ((0.80, 0.78, 0.72), (0.80, 0.78, 0.72)),
    (FLOOR, "plain"): ((0.45, 0.45, 0.47), (0.45, 0.45, 0.47)),
    (FLOOR, "planks"): ((0.58, 0.40, 0.22), (0.35, 0.24, 0.13)),
    (CEILING, "plain"): ((0.93, 0.93, 0.93), (0.93, 0.93, 0.93)),
    (POSTER, "plain"): ((0.85, 0.20, 0.15), (0.85, 0.20, 0.15)),
    (POSTER, "checker"): ((0.95, 0.80, 0.20), (0.15, 0.35, 0.80)),
    (POSTER, "dots"): ((0.10, 0.55, 0.60), (0.95, 0.95, 0.90)),
    (POSTER, "frame"): ((0.95, 0.90, 0.80), (0.15, 0.15, 0.45)),
    (CABINET, "plain"): ((0.55, 0.35, 0.20), (0.55, 0.35, 0.20)),
    (CABINET, "checker"): ((0.30, 0.60, 0.25), (0.90, 0.85, 0.70)),
    (CABINET, "dots"): ((0.50, 0.20, 0.60), (0.90, 0.80, 0.20)),
    (CABINET, "frame"): ((0.85, 0.50, 0.10), (0.35, 0.20, 0.10)),
    (RUG, "plain"): ((0.60, 0.15, 0.20), (0.60, 0.15, 0.20)),
    (RUG, "checker"): ((0.90, 0.90, 0.85), (0.20, 0.20, 0.20)),
    (RUG, "dots"): ((0.20, 0.30, 0.60), (0.90, 0.60, 0.10)),
    (RUG, "frame"): ((0.85, 0.60, 0.60), (0.45, 0.10, 0.15)),
    (CRATE, "tall"): ((0.80, 0.62, 0.35), (0.28, 0.22, 0.12)),
    (CRATE, "wide"): ((0.55, 0.33, 0.18), (0.19, 0.12, 0.06)),
    (BLOCK, "tall"): ((0.20, 0.45, 0.80), (0.20, 0.45, 0.80)),
    (BLOCK, "wide"): ((0.90, 0.50, 0.10), (0.90, 0.50, 0.10)),
    (IGNORE_INDEX, "tall"): ((0.50, 0.50, 0.50), (0.18, 0.18, 0.18)),
    (IGNORE_INDEX, "wide"): ((0.50, 0.50, 0.50), (0.18, 0.18, 0.18)),
    (SIGN_A, "plain"): ((0.95, 0.85, 0.30), (0.95, 0.85, 0.30)),
    (SIGN_A, "frame"): ((0.30, 0.80, 0.45), (0.10, 0.30, 0.15)),
    (SIGN_B, "plain"): ((0.95, 0.85, 0.30), (0.95, 0.85, 0.30)),
    (SIGN_B, "frame"): ((0.30, 0.80, 0.45), (0.10, 0.30, 0.15)),
}
#: Photo shading of a :func:`predictable_scene`: ``ambient + strength * cos`` of the angle
#: between the normal and the ray, a light at the camera without falloff.
HEADLIGHT = (0.3, 0.7)


def _paint_key(box: Box) -> tuple[int, str]:
    if box.label in (CRATE, BLOCK, IGNORE_INDEX):
        return box.label, "tall" if box.half[1] > max(box.half[0], box.half[2]) else "wide"
    return box.label, box.appearance.pattern


def _repaint(appearance: Appearance, key: tuple[int, str]) -> Appearance:
    base, second = PREDICTABLE_PAINT[key]
    return replace(appearance, base=base, second=second, grain=0.0, emissive=False)


def predictable_scene(scene: Scene) -> Scene:
    """``scene`` repainted and relit so that its photo follows from its shading and edges.

    For image-to-image translation (shading + texture edges -> RGB) the colours must be
    learnable from the inputs: every surface takes the fixed albedo
    :data:`PREDICTABLE_PAINT` gives for its class and pattern (room, posters, cabinets, rugs,
    signs) or its silhouette (crates, blocks, clutter), without grain; signs lose their
    glow. The light is a headlight (:data:`HEADLIGHT`), so the photo's shading is an affine
    function of the Taskonomy ``reshading`` domain. Geometry is unchanged.
    """
    ambient, strength = HEADLIGHT
    lighting = Lighting(
        ambient=ambient,
        direction=(0.0, 1.0, 0.0),
        directional=0.0,
        lamp=scene.camera.position,
        lamp_strength=strength,
        lamp_radius=1e9,
        exposure=1.0,
    )
    return replace(
        scene,
        walls=_repaint(scene.walls, (WALL, scene.walls.pattern)),
        floor=_repaint(scene.floor, (FLOOR, scene.floor.pattern)),
        ceiling=_repaint(scene.ceiling, (CEILING, scene.ceiling.pattern)),
        lighting=lighting,
        objects=tuple(
            replace(b, appearance=_repaint(b.appearance, _paint_key(b))) for b in scene.objects
        ),
    )


def _slab(box: Box, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Ray/box slab test in the box frame.

    ``dirs`` is ``(3, P)`` (axis-major, so per-axis reductions are elementwise and fast);
    returns per-axis entry and exit ``t`` and the ray directions in the box frame, each
    ``(3, P)``.
    """
    rotation = _rotation_y(box.yaw)
    local_origin = rotation.T @ (origin - np.asarray(box.center))
    local_dirs = rotation.T @ dirs
    local_dirs[np.abs(local_dirs) < 1e-9] = 1e-9
    inverse = 1.0 / local_dirs
    half = np.asarray(box.half)
    t1 = (-half - local_origin)[:, None] * inverse
    t2 = (half - local_origin)[:, None] * inverse
    return np.minimum(t1, t2), np.maximum(t1, t2), local_dirs


def _max3(values: np.ndarray, sign: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Largest (``sign`` 1) or smallest (``sign`` -1) of the 3 rows of ``values`` and its row."""
    a, b, c = sign * values
    best = np.maximum(a, b)
    index = np.where(b > a, 1, 0)
    index = np.where(c > best, 2, index)
    return sign * np.maximum(best, c), index


def _albedo(
    appearance: Appearance, local: np.ndarray, axis: np.ndarray, half: np.ndarray
) -> np.ndarray:
    """Albedo ``(n, 3)`` of points ``local`` ``(3, n)`` on faces ``axis`` ``(n,)`` of a box."""
    columns = np.arange(len(axis))
    u, v = local[_U_AXIS[axis], columns], local[_V_AXIS[axis], columns]
    hu, hv = half[_U_AXIS[axis]], half[_V_AXIS[axis]]
    p = appearance.period
    if appearance.pattern == "checker":
        mix = (np.floor(u / p) + np.floor(v / p)) % 2
    elif appearance.pattern == "dots":
        mix = ((np.mod(u, p) - p / 2) ** 2 + (np.mod(v, p) - p / 2) ** 2 < (0.3 * p) ** 2) * 1.0
    elif appearance.pattern == "frame":
        mix = (np.minimum(hu - np.abs(u), hv - np.abs(v)) < p / 4) * 1.0
    elif appearance.pattern == "slats":
        mix = (np.mod(v + hv, p) < 0.5 * p) * 1.0
    elif appearance.pattern == "planks":
        mix = (np.mod(u, p) < 0.04 * p) * 1.0
    else:
        mix = np.zeros_like(u)
    base, second = np.asarray(appearance.base), np.asarray(appearance.second)
    colour = base * (1 - mix[:, None]) + second * mix[:, None]
    if appearance.pattern == "planks":
        # A fixed pseudo-random tint per plank index, +-8 %.
        plank_hash = np.mod(np.sin(np.floor(u / p) * 12.9898) * 43758.5453, 1.0)
        colour *= (1 + 0.16 * (plank_hash - 0.5))[:, None]
    grain = sum(np.sin(2 * np.pi * (fu * u + fv * v) + ph) for fu, fv, ph in appearance.waves)
    return np.clip(colour * (1 + appearance.grain * grain / 2)[:, None], 0.0, 1.0)


def _sensor_depth(depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Kinect-like depth in millimetres ``(H, W)`` uint16 from true depth in metres; 0 = hole.

    Noise sigma 1.2 mm + 1.9 mm * (z - 0.4 m)^2; holes in smooth random blobs (1-5 % of the
    image) and, with probability 0.7, on pixels next to a depth jump.
    """
    height, width = depth.shape
    sigma = 0.0012 + 0.0019 * (depth - 0.4) ** 2
    noisy = depth + rng.standard_normal(depth.shape) * sigma
    coarse = rng.random((height // 8 + 2, width // 8 + 2))
    field = zoom(coarse, 8, order=1)[:height, :width]
    holes = field < np.quantile(field, rng.uniform(0.01, 0.05))
    jump = np.zeros_like(depth, dtype=bool)
    step_y = np.abs(np.diff(depth, axis=0)) > 0.08 + 0.02 * depth[1:]
    step_x = np.abs(np.diff(depth, axis=1)) > 0.08 + 0.02 * depth[:, 1:]
    jump[1:] |= step_y
    jump[:-1] |= step_y
    jump[:, 1:] |= step_x
    jump[:, :-1] |= step_x
    holes |= jump & (rng.random(depth.shape) < 0.7)
    millimetres = np.clip(np.rint(noisy * 1000.0), 1, 65535).astype(np.uint16)
    millimetres[holes] = 0
    return millimetres


def render(scene: Scene, size: tuple[int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Ray-cast ``scene`` at ``size`` = (H, W); ``rng`` draws the sensor noise only.

    Returns numpy arrays:

    - ``rgb`` uint8 ``(H, W, 3)``: albedo x shading x vignetting + noise.
    - ``depth`` float32 ``(H, W)``: true z-depth in metres (distance along the optical axis).
    - ``depth_mm`` uint16 ``(H, W)``: sensor depth, noisy, 0 in holes.
    - ``label`` uint8 ``(H, W)``: class id, 255 on clutter.
    - ``instance`` int32 ``(H, W)``: 0 for the room, i + 1 for ``scene.objects[i]``.
    - ``normal`` float32 ``(H, W, 3)``: unit surface normal in camera coordinates (x right,
      y down, z forward), facing the camera.
    - ``albedo`` float32 ``(H, W, 3)`` in 0..1, ``shading`` float32 ``(H, W)`` >= 0.
    """
    height, width = size
    camera, lighting = scene.camera, scene.lighting
    rotation = camera_rotation(camera)
    focal = camera.focal * width
    v, u = np.mgrid[0:height, 0:width].reshape(2, -1) + 0.5
    # z = 1 in camera coordinates, so the ray parameter t is the z-depth itself.
    dirs = rotation @ np.stack([(u - width / 2) / focal, (v - height / 2) / focal, np.ones_like(u)])
    origin = np.asarray(camera.position)
    pixels = np.arange(u.size)

    # The camera is inside the room: each ray leaves it through its nearest exit face.
    _, t_exit, local_dirs = _slab(scene.room, origin, dirs)
    t, axis = _max3(t_exit, sign=-1.0)
    inward = -np.sign(local_dirs[axis, pixels])
    surface = np.zeros(u.size, dtype=np.int32)
    for index, box in enumerate(scene.objects, start=1):
        t_in, t_out, box_dirs = _slab(box, origin, dirs)
        near, box_axis = _max3(t_in)
        far, _ = _max3(t_out, sign=-1.0)
        hit = np.flatnonzero((near <= far) & (near > 1e-4) & (near < t))
        t[hit] = near[hit]
        axis[hit] = box_axis[hit]
        inward[hit] = -np.sign(box_dirs[box_axis[hit], hit])
        surface[hit] = index

    points = origin[:, None] + t * dirs
    label = np.empty(u.size, dtype=np.uint8)
    normal = np.zeros((3, u.size))
    albedo = np.zeros((u.size, 3))
    emissive = np.zeros(u.size, dtype=bool)
    for index, box in enumerate((scene.room, *scene.objects)):
        sel = np.flatnonzero(surface == index)
        if not sel.size:
            continue
        box_rotation = _rotation_y(box.yaw)
        local = box_rotation.T @ (points[:, sel] - np.asarray(box.center)[:, None])
        local_normal = np.zeros((3, sel.size))
        local_normal[axis[sel], np.arange(sel.size)] = inward[sel]
        normal[:, sel] = box_rotation @ local_normal
        half = np.asarray(box.half)
        if index > 0:
            label[sel] = box.label
            albedo[sel] = _albedo(box.appearance, local, axis[sel], half)
            emissive[sel] = box.appearance.emissive
            continue
        horizontal = axis[sel] == 1
        up = local_normal[1] > 0
        for part, paint, part_label in (
            (~horizontal, scene.walls, WALL),
            (horizontal & up, scene.floor, FLOOR),
            (horizontal & ~up, scene.ceiling, CEILING),
        ):
            label[sel[part]] = part_label
            albedo[sel[part]] = _albedo(paint, local[:, part], axis[sel[part]], half)

    to_lamp = np.asarray(lighting.lamp)[:, None] - points
    distance = np.sqrt((to_lamp**2).sum(0))
    lamp = np.clip((normal * to_lamp).sum(0) / distance, 0, None)
    shading = (
        lighting.ambient
        + lighting.directional * np.clip(np.asarray(lighting.direction) @ normal, 0, None)
        + lighting.lamp_strength * lamp / (1 + (distance / lighting.lamp_radius) ** 2)
    ) * lighting.exposure
    shading[emissive] = lighting.exposure
    vignette = 1 - 0.4 * (((u - width / 2) / width) ** 2 + ((v - height / 2) / height) ** 2)
    linear = albedo * (shading * vignette)[:, None] * 255.0
    noise = rng.normal(0.0, rng.uniform(1.5, 3.5), linear.shape)
    rgb = np.clip(np.rint(linear + noise), 0, 255).astype(np.uint8)

    depth = t.reshape(height, width).astype(np.float32)
    return {
        "rgb": rgb.reshape(height, width, 3),
        "depth": depth,
        "depth_mm": _sensor_depth(depth, rng),
        "label": label.reshape(height, width),
        "instance": surface.reshape(height, width),
        "normal": (rotation.T @ normal).T.reshape(height, width, 3).astype(np.float32),
        "albedo": albedo.reshape(height, width, 3).astype(np.float32),
        "shading": shading.reshape(height, width).astype(np.float32),
    }


def render_scene(rng: np.random.Generator, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Sample a scene with ``rng`` and render it at ``size`` = (H, W) (see :func:`render`)."""
    scene = sample_scene(rng, aspect=size[1] / size[0])
    return render(scene, size, rng)


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
