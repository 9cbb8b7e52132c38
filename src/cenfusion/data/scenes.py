"""Scene descriptions of the embedded RGB-D set: rooms, objects, signs, camera, lights.

:func:`sample_scene` draws one scene as plain data (boxes with an appearance, a camera, the
lighting); :mod:`cenfusion.data.render` turns it into pixels. What the classes are and why
they are drawn this way: :mod:`cenfusion.data.synthetic`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cenfusion.data.class_names import SYNTHETIC_CLASSES

CLASS_NAMES = SYNTHETIC_CLASSES
WALL, FLOOR, CEILING, POSTER, CABINET, RUG, CRATE, BLOCK, SIGN_A, SIGN_B = range(len(CLASS_NAMES))
#: The classes only a fusion of RGB and depth features can tell apart (module docstring of
#: :mod:`cenfusion.data.synthetic`).
INTERACTION_CLASSES = (SIGN_A, SIGN_B)
IGNORE_INDEX = 255

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
FACE_U_AXIS = np.array([2, 0, 0])
FACE_V_AXIS = np.array([1, 2, 1])


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


def rotation_y(angle: float) -> np.ndarray:
    """Rotation about the vertical axis, mapping local to world coordinates ``(3, 3)``."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def camera_rotation(camera: Camera) -> np.ndarray:
    """World-from-camera rotation ``(3, 3)``; camera axes as OpenCV: x right, y down, z forward."""
    c, s = np.cos(camera.tilt), np.sin(camera.tilt)
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return rotation_y(camera.yaw) @ tilt @ np.diag([1.0, -1.0, 1.0])


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
    return np.asarray(box.center) + (_CORNER_SIGNS * np.asarray(box.half)) @ rotation_y(box.yaw).T


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
