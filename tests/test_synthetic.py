"""Synthetic RGB-D set: rendering, layout, caching, and the class design making fusion matter."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cenfusion.data import scenes, synthetic
from cenfusion.data.listfile import ListFileDataset, nyudv2_modalities
from cenfusion.data.render import render, render_scene
from cenfusion.data.scenes import (
    BLOCK,
    CABINET,
    CLASS_NAMES,
    CRATE,
    FLOOR,
    IGNORE_INDEX,
    INTERACTION_CLASSES,
    POSTER,
    RUG,
    SIGN_A,
    SIGN_B,
    SIGN_BANDS,
    SIGN_BIT_P,
    SIGN_COLOURS,
    WALL,
    camera_rotation,
    sample_scene,
    scale_about_camera,
)
from cenfusion.data.synthetic import (
    default_data_root,
    ensure_synthetic,
    generate_segmentation_dataset,
)
from cenfusion.data.transforms import train_transform
from cenfusion.errors import CenError

SIZE = (60, 80)


def _sigma(z: np.ndarray) -> np.ndarray:
    """Sensor noise the generator documents (metres)."""
    return 0.0012 + 0.0019 * (z - 0.4) ** 2


@pytest.fixture(scope="module")
def renders() -> list[tuple[scenes.Scene, dict, np.ndarray]]:
    """(scene, rendering, depth of the empty room) for 150 scenes at 60x80."""
    out = []
    for i in range(150):
        rng = np.random.default_rng([11, i])
        scene = sample_scene(rng, aspect=SIZE[1] / SIZE[0])
        arrays = render(scene, SIZE, rng)
        empty = render(dataclasses.replace(scene, objects=()), SIZE, np.random.default_rng(0))
        out.append((scene, arrays, empty["depth"]))
    return out


def test_render_scene_arrays(renders: list) -> None:
    first = render_scene(np.random.default_rng(5), SIZE)
    again = render_scene(np.random.default_rng(5), SIZE)
    other = render_scene(np.random.default_rng(6), SIZE)
    expected = {
        "rgb": (np.uint8, (*SIZE, 3)),
        "depth": (np.float32, SIZE),
        "depth_mm": (np.uint16, SIZE),
        "label": (np.uint8, SIZE),
        "instance": (np.int32, SIZE),
        "normal": (np.float32, (*SIZE, 3)),
        "albedo": (np.float32, (*SIZE, 3)),
        "shading": (np.float32, SIZE),
    }
    for key, (dtype, shape) in expected.items():
        assert first[key].dtype == dtype and first[key].shape == shape, key
        assert np.array_equal(first[key], again[key]), key
    assert not np.array_equal(first["rgb"], other["rgb"])
    for scene, arrays, _ in renders:
        labels = set(np.unique(arrays["label"]).tolist())
        assert labels <= set(range(len(CLASS_NAMES))) | {IGNORE_INDEX}
        assert {WALL, FLOOR} <= labels
        assert arrays["depth"].min() > 0.1
        normal = arrays["normal"]
        np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1.0, atol=1e-5)
        # Normals face the camera: negative dot product with the viewing ray (OpenCV axes).
        v, u = np.mgrid[0 : SIZE[0], 0 : SIZE[1]]
        focal = scene.camera.focal * SIZE[1]
        rays = np.stack([u + 0.5 - SIZE[1] / 2, v + 0.5 - SIZE[0] / 2, np.full(u.shape, focal)], -1)
        assert ((normal * rays).sum(-1) < 0).all()
        # Floor normals point up (-y in camera coordinates).
        assert normal[arrays["label"] == FLOOR][:, 1].max() < 0
        sensor = arrays["depth_mm"].astype(np.float64) / 1000
        valid = sensor > 0
        assert 0.005 < 1 - valid.mean() < 0.3  # holes exist but do not dominate
        z = arrays["depth"][valid]
        assert (np.abs(sensor[valid] - z) < 6 * _sigma(z) + 0.001).all()


def test_every_class_appears(renders: list) -> None:
    counts = np.bincount(np.concatenate([a["label"].ravel() for _, a, _ in renders]), minlength=256)
    fractions = counts[: len(CLASS_NAMES)] / counts.sum()
    assert (fractions > 0.005).all(), dict(zip(CLASS_NAMES, fractions.round(4), strict=True))


def test_geometry_only_pair_poster_cabinet(renders: list) -> None:
    """Posters and cabinets share colours, patterns, placement and size; only depth differs."""
    drawn: dict[int, list] = {POSTER: [], CABINET: []}
    for i in range(2000):
        for box in sample_scene(np.random.default_rng([12, i])).objects:
            if box.label in drawn:
                drawn[box.label].append(box)
    posters, cabinets = drawn[POSTER], drawn[CABINET]
    assert min(len(posters), len(cabinets)) > 1000
    base = {k: np.array([b.appearance.base for b in v]) for k, v in drawn.items()}
    np.testing.assert_allclose(base[POSTER].mean(0), base[CABINET].mean(0), atol=0.05)
    np.testing.assert_allclose(base[POSTER].std(0), base[CABINET].std(0), atol=0.05)
    for pattern in ("plain", "checker", "dots", "frame"):
        share = [np.mean([b.appearance.pattern == pattern for b in v]) for v in (posters, cabinets)]
        assert abs(share[0] - share[1]) < 0.05 and share[0] > 0.15, pattern
    for axis in (0, 1):  # width and height on the wall
        sizes = [np.array([b.half[axis] for b in v]) for v in (posters, cabinets)]
        assert abs(sizes[0].mean() - sizes[1].mean()) < 0.02
    heights = [np.array([b.center[1] for b in v]) for v in (posters, cabinets)]
    assert abs(heights[0].mean() - heights[1].mean()) < 0.03

    # Rendered: similar mean colour per instance, but only cabinets stand out of the wall.
    colours: dict[int, list] = {POSTER: [], CABINET: []}
    offsets: dict[int, list] = {POSTER: [], CABINET: []}
    for scene, arrays, room_depth in renders:
        for index, box in enumerate(scene.objects, start=1):
            pixels = arrays["instance"] == index
            if box.label in colours and pixels.sum() >= 4:
                colours[box.label].append(arrays["rgb"][pixels].mean(0))
                offsets[box.label].append(room_depth[pixels] - arrays["depth"][pixels])
    mean_colour = {k: np.mean(v, axis=0) for k, v in colours.items()}
    assert np.abs(mean_colour[POSTER] - mean_colour[CABINET]).max() < 15
    poster_offset = np.concatenate(offsets[POSTER])
    cabinet_offset = np.concatenate(offsets[CABINET])
    assert abs(np.median(poster_offset) - 0.15) < 0.01 and poster_offset.max() < 0.19
    assert np.median(cabinet_offset) > 0.25
    assert np.mean(cabinet_offset > 0.1) > 0.9


def test_appearance_only_pairs(renders: list) -> None:
    """Crate/block and rug/floor: same geometry, different appearance; posters differ from
    the wall in colour (and stand 8 cm out, about one to four times the sensor noise)."""
    halves: dict[int, list] = {CRATE: [], BLOCK: []}
    for i in range(1000):
        for box in sample_scene(np.random.default_rng([13, i])).objects:
            if box.label in halves:
                halves[box.label].append(box.half)
    np.testing.assert_allclose(np.mean(halves[CRATE], 0), np.mean(halves[BLOCK], 0), atol=0.02)

    texture: dict[int, list] = {CRATE: [], BLOCK: []}
    depths: dict[int, list] = {CRATE: [], BLOCK: []}
    chroma: dict[int, list] = {WALL: [], POSTER: [], FLOOR: [], RUG: []}
    rug_ratio = []
    for scene, arrays, room_depth in renders:
        albedo = arrays["albedo"]
        for index, box in enumerate(scene.objects, start=1):
            pixels = arrays["instance"] == index
            pairs = pixels[1:] & pixels[:-1]
            if box.label in texture and pairs.sum() >= 4:
                texture[box.label].append(np.abs(np.diff(albedo, axis=0))[pairs].mean())
                depths[box.label].append(arrays["depth"][pixels].mean())
        for label, values in chroma.items():
            pixels = arrays["label"] == label
            if pixels.any():
                values.append(np.ptp(albedo[pixels], axis=1).mean())
        rug = arrays["label"] == RUG
        z = arrays["depth"][rug]
        rug_ratio.append(np.abs(room_depth[rug] - z) / _sigma(z))
    assert np.concatenate(rug_ratio).max() < 0.5  # the rug's step hides in the sensor noise
    assert abs(np.mean(depths[CRATE]) - np.mean(depths[BLOCK])) < 0.3
    assert np.mean(texture[CRATE]) > 5 * np.mean(texture[BLOCK])
    assert np.mean(chroma[POSTER]) > np.mean(chroma[WALL]) + 0.3
    assert np.mean(chroma[RUG]) > np.mean(chroma[FLOOR]) + 0.2


def _camera_z(box: scenes.Box, camera: scenes.Camera) -> float:
    """Depth of the box centre along the optical axis (what a depth sensor measures)."""
    return float((np.asarray(box.center) - camera.position) @ camera_rotation(camera)[:, 2])


def _image_box(box: scenes.Box, camera: scenes.Camera) -> np.ndarray:
    """Where the box appears, ``(u0, v0, u1, v1)`` in image widths from the image centre."""
    c, s = np.cos(box.yaw), np.sin(box.yaw)
    yaw = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    signs = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
    corners = np.asarray(box.center) + (signs * box.half) @ yaw.T
    local = (corners - camera.position) @ camera_rotation(camera)
    image = camera.focal * local[:, :2] / local[:, 2:]
    return np.concatenate([image.min(0), image.max(0)])


def _is_warm(colour: tuple[float, float, float]) -> bool:
    """Family of the palette colour nearest to ``colour`` (what RGB shows)."""
    distance = {
        family: np.linalg.norm(palette - np.asarray(colour), axis=1).min()
        for family, palette in SIGN_COLOURS.items()
    }
    return distance["warm"] < distance["cool"]


def _sign_table() -> np.ndarray:
    """One row per sign of 2000 scenes: label, warm, near, then what RGB sees (image box,
    colour, pattern) and what depth sees (z, size)."""
    rows = []
    for i in range(2000):
        scene = sample_scene(np.random.default_rng([14, i]))
        for box in scene.objects:
            if box.label not in INTERACTION_CLASSES:
                continue
            z = _camera_z(box, scene.camera)
            near = SIGN_BANDS["near"][0] <= z <= SIGN_BANDS["near"][1]
            assert near or SIGN_BANDS["far"][0] <= z <= SIGN_BANDS["far"][1]
            image = _image_box(box, scene.camera)
            rows.append(
                (
                    box.label,
                    _is_warm(box.appearance.base),
                    near,
                    *image[:2],
                    *(image[2:] - image[:2]),
                    *box.appearance.base,
                    box.appearance.pattern == "frame",
                    z,
                    box.half[0],
                    box.half[1],
                )
            )
    return np.array(rows, dtype=np.float64)


@pytest.fixture(scope="module")
def sign_table() -> np.ndarray:
    return _sign_table()


def test_interaction_classes_are_the_conjunction_of_what_each_modality_sees(
    sign_table: np.ndarray,
) -> None:
    """Each modality sees one independent bit, correlated with the class; the class is
    sign-a exactly when both bits are set, and nothing else either modality sees carries the
    other's bit."""
    assert [CLASS_NAMES[c] for c in INTERACTION_CLASSES] == ["sign-a", "sign-b"]
    label, warm, near = sign_table[:, 0], sign_table[:, 1] == 1, sign_table[:, 2] == 1
    rgb_seen, depth_seen = sign_table[:, 3:11], sign_table[:, 11:]
    assert len(label) > 4000
    for bit in (warm, near):
        assert abs(bit.mean() - SIGN_BIT_P) < 0.03
    assert abs(np.corrcoef(warm, near)[0, 1]) < 0.05
    for seen, hidden in ((rgb_seen, near), (depth_seen, warm)):
        spread = seen.std(0)
        gap = np.abs(seen[hidden].mean(0) - seen[~hidden].mean(0)) / spread
        assert (gap < 0.15).all(), gap
    # First-order signal: a cool or a far sign is never sign-a.
    a = label == SIGN_A
    assert not a[~warm].any() and not a[~near].any()
    assert np.array_equal(a, warm & near)
    assert np.array_equal(label != SIGN_A, label == SIGN_B)


def test_late_fusion_of_per_modality_scores_never_finds_sign_a(sign_table: np.ndarray) -> None:
    """The best scores each modality alone can give (the class frequencies given the bit it
    sees), mixed by any convex weight, as probabilities or as logits, call every sign sign-b:
    no sign-a is found, while the joint rule labels every sign."""
    label, warm, near = sign_table[:, 0], sign_table[:, 1] == 1, sign_table[:, 2] == 1
    a = label == SIGN_A

    def posterior(bit: np.ndarray) -> np.ndarray:
        """P(sign-a | the bit this modality sees), per sign, from the data."""
        return np.where(bit, a[bit].mean(), a[~bit].mean())

    p_rgb, p_depth = posterior(warm), posterior(near)
    assert 0.3 < p_rgb.max() < 0.5 and 0.3 < p_depth.max() < 0.5

    def logit(p: np.ndarray) -> np.ndarray:
        q = np.clip(p, 1e-6, 1 - 1e-6)
        return np.log(q) - np.log1p(-q)

    for w in np.linspace(0.0, 1.0, 21):
        mixed = w * p_rgb + (1 - w) * p_depth
        assert not (mixed > 0.5).any()
        assert not (w * logit(p_rgb) + (1 - w) * logit(p_depth) > 0).any()
    joint = np.where(warm & near, SIGN_A, SIGN_B)
    assert np.array_equal(joint, label)


def test_swapping_one_bit_of_a_sign_changes_its_class_and_one_modality_only() -> None:
    """Moving a sign to the other distance band leaves the photo unchanged; giving it a colour
    of the other family leaves the depth unchanged; either takes the class the conjunction
    of the new bits gives."""
    checked = 0
    for i in range(40):
        rng = np.random.default_rng([15, i])
        scene = sample_scene(rng, aspect=SIZE[1] / SIZE[0])
        signs = [k for k, box in enumerate(scene.objects) if box.label in INTERACTION_CLASSES]
        if not signs:
            continue
        k = signs[0]
        sign = scene.objects[k]
        z = _camera_z(sign, scene.camera)
        warm, near = _is_warm(sign.appearance.base), z < SIGN_BANDS["far"][0]
        assert sign.label == (SIGN_A if warm and near else SIGN_B)
        other_z = float(np.mean(SIGN_BANDS["far" if near else "near"]))
        moved = dataclasses.replace(
            scale_about_camera(sign, scene.camera, other_z / z),
            label=SIGN_A if warm and not near else SIGN_B,
        )
        colour = SIGN_COLOURS["cool" if warm else "warm"][i % 4]
        paint = dataclasses.replace(
            sign.appearance, base=tuple(colour), second=tuple(colour * 0.45)
        )
        recoloured = dataclasses.replace(
            sign, label=SIGN_A if near and not warm else SIGN_B, appearance=paint
        )
        views = {}
        for name, box in (("original", sign), ("moved", moved), ("recoloured", recoloured)):
            objects = scene.objects[:k] + (box,) + scene.objects[k + 1 :]
            views[name] = render(
                dataclasses.replace(scene, objects=objects), SIZE, np.random.default_rng(i)
            )
        original, moved_view, recoloured_view = (
            views["original"],
            views["moved"],
            views["recoloured"],
        )
        pixels = original["instance"] == k + 1
        assert pixels.sum() > 20
        for view, box in ((moved_view, moved), (recoloured_view, recoloured)):
            assert np.array_equal(view["instance"], original["instance"])
            assert (view["label"][pixels] == box.label).all()
            assert np.array_equal(view["label"][~pixels], original["label"][~pixels])
        rgb_change = np.abs(moved_view["rgb"].astype(int) - original["rgb"]).max(-1)
        assert (rgb_change > 1).mean() < 0.002
        ratio = moved_view["depth"][pixels] / original["depth"][pixels]
        assert np.abs(np.log(ratio) - np.log(other_z / z)).max() < 0.05
        assert np.array_equal(recoloured_view["depth_mm"], original["depth_mm"])
        colour_change = np.abs(recoloured_view["rgb"].astype(int) - original["rgb"]).max(-1)
        assert colour_change[pixels].mean() > 30
        checked += 1
    assert checked > 25


def test_generated_layout_loads_and_is_deterministic(tmp_path: Path) -> None:
    out = generate_segmentation_dataset(tmp_path / "set", num_train=4, num_val=2, size=(48, 64))
    assert sorted(p.name for p in out.iterdir()) == [
        "cenfusion-synthetic.json",
        "depth",
        "masks",
        "rgb",
        "train.txt",
        "val.txt",
    ]
    train = (out / "train.txt").read_text().splitlines()
    val = (out / "val.txt").read_text().splitlines()
    assert train[0] == "rgb/000000.png\tmasks/000000.png\tdepth/000000.png"
    assert len(train) == 4 and val[-1].startswith("rgb/000005.png\t")
    with (
        Image.open(out / "rgb" / "000003.png") as rgb,
        Image.open(out / "depth" / "000003.png") as depth,
        Image.open(out / "masks" / "000003.png") as mask,
    ):
        assert (rgb.mode, depth.mode, mask.mode) == ("RGB", "I;16", "L")
        assert rgb.size == depth.size == mask.size == (64, 48)
        assert np.asarray(depth).max() > 1000  # millimetres, not 8-bit

    dataset = ListFileDataset(
        out,
        "train.txt",
        nyudv2_modalities(),
        num_classes=len(CLASS_NAMES),
        transform=train_transform(crop_size=40, min_short_side=30),
    )
    torch.manual_seed(0)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert [x.shape for x in batch["inputs"]] == [(2, 3, 40, 40)] * 2
    assert batch["mask"].shape == (2, 40, 40)

    again = generate_segmentation_dataset(tmp_path / "again", num_train=4, num_val=2, size=(48, 64))
    other = generate_segmentation_dataset(tmp_path / "other", 4, 2, size=(48, 64), seed=1)
    for folder in ("rgb", "depth", "masks"):
        for name in ("000000.png", "000005.png"):
            assert (out / folder / name).read_bytes() == (again / folder / name).read_bytes()
    assert (out / "rgb" / "000000.png").read_bytes() != (other / "rgb" / "000000.png").read_bytes()


def test_crash_leaves_no_partial_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(rng: np.random.Generator, size: tuple[int, int]) -> dict:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return render_scene(rng, size)

    monkeypatch.setattr(synthetic, "render_scene", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_segmentation_dataset(tmp_path / "set", num_train=4, num_val=2, size=(32, 32))
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_folder_and_bad_counts(tmp_path: Path) -> None:
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "keep.txt").write_text("mine")
    with pytest.raises(CenError) as excinfo:
        generate_segmentation_dataset(tmp_path / "set", 2, 1, size=(32, 32))
    assert "\n" not in str(excinfo.value) and str(tmp_path / "set") in str(excinfo.value)
    with pytest.raises(CenError, match="num_val"):
        generate_segmentation_dataset(tmp_path / "new", 2, 0)


def test_ensure_synthetic_generates_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEN_CACHE", str(tmp_path / "cache"))
    assert default_data_root() == tmp_path / "cache" / f"synthetic-v{synthetic.GENERATOR_VERSION}"
    root = ensure_synthetic(num_train=2, num_val=1, size=(32, 32))
    assert root == default_data_root() and (root / "train.txt").is_file()

    def must_not_run(*args: object, **kwargs: object) -> Path:
        raise AssertionError("regenerated an existing set")

    monkeypatch.setattr(synthetic, "generate_segmentation_dataset", must_not_run)
    assert ensure_synthetic(num_train=2, num_val=1, size=(32, 32)) == root
    with pytest.raises(CenError) as excinfo:
        ensure_synthetic(num_train=3, num_val=1, size=(32, 32))
    assert "\n" not in str(excinfo.value) and str(root) in str(excinfo.value)
    monkeypatch.delenv("CEN_CACHE")
    assert (
        default_data_root()
        == Path.home() / ".cache" / "cenfusion" / f"synthetic-v{synthetic.GENERATOR_VERSION}"
    )
