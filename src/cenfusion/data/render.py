"""Pixels of a scene of the embedded set: a vectorised ray caster (depth, normals, labels,
instances, albedo, shading, photo, sensor depth), and the repainting that makes a scene's
photo predictable from its shading and edges for translation (:func:`predictable_scene`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.ndimage import zoom

from cenfusion.data.scenes import (
    BLOCK,
    CABINET,
    CEILING,
    CRATE,
    FACE_U_AXIS,
    FACE_V_AXIS,
    FLOOR,
    IGNORE_INDEX,
    POSTER,
    RUG,
    SIGN_A,
    SIGN_B,
    WALL,
    Appearance,
    Box,
    Lighting,
    Scene,
    camera_rotation,
    rotation_y,
    sample_scene,
)

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
    rotation = rotation_y(box.yaw)
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
    u, v = local[FACE_U_AXIS[axis], columns], local[FACE_V_AXIS[axis], columns]
    hu, hv = half[FACE_U_AXIS[axis]], half[FACE_V_AXIS[axis]]
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
        box_rotation = rotation_y(box.yaw)
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
