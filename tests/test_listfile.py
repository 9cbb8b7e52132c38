"""ListFileDataset: decoding values, any modalities, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cenfusion.data.listfile import (
    NYUDV2_DEPTH_SCALE,
    ListFileDataset,
    ModalitySpec,
    decode_image,
    decode_mask,
    nyudv2_modalities,
)
from cenfusion.errors import CenError

#: The first lines of the released NYUDv2 train list, byte for byte.
REFERENCE_LINES = [
    "rgb/000003.png\tmasks/000003.png\tdepth/000003.png",
    "rgb/000004.png\tmasks/000004.png\tdepth/000004.png",
    "rgb/000005.png\tmasks/000005.png\tdepth/000005.png",
]
H, W = 6, 8


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _make_root(root: Path, names: list[str], mask_values: np.ndarray | None = None) -> Path:
    """A NYUDv2-layout root: 8-bit rgb, 16-bit depth, L mask, train.txt listing ``names``."""
    rng = np.random.default_rng(0)
    for name in names:
        _save(root / "rgb" / f"{name}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        _save(root / "depth" / f"{name}.png", rng.integers(0, 65536, (H, W), dtype=np.uint16))
        mask = mask_values if mask_values is not None else rng.integers(0, 5, (H, W))
        _save(root / "masks" / f"{name}.png", mask.astype(np.uint8))
    lines = [f"rgb/{n}.png\tmasks/{n}.png\tdepth/{n}.png" for n in names]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def _one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_nyudv2_sample_values_and_keys(tmp_path: Path) -> None:
    root = _make_root(tmp_path, ["000003", "000004"])
    dataset = ListFileDataset(root, "train.txt", nyudv2_modalities(), num_classes=5)
    assert len(dataset) == 2
    sample = dataset[1]
    rgb_png = np.asarray(Image.open(root / "rgb" / "000004.png"))
    depth_png = np.asarray(Image.open(root / "depth" / "000004.png"))
    mask_png = np.asarray(Image.open(root / "masks" / "000004.png"))
    rgb, depth = sample["inputs"]
    assert sample["name"] == "000004"
    assert sample["kinds"] == ["rgb", "depth"]
    assert rgb.dtype == depth.dtype == torch.float32
    assert rgb.shape == depth.shape == (3, H, W)
    assert torch.equal(rgb, torch.from_numpy(rgb_png.transpose(2, 0, 1).astype(np.float32)))
    expected_depth = torch.from_numpy(depth_png.astype(np.float32) / 5000)
    for channel in depth:
        torch.testing.assert_close(channel, expected_depth)
    assert depth.max() > 255 / 5000  # 16 bits survive decoding
    assert sample["mask"].dtype == torch.int64
    assert torch.equal(sample["mask"], torch.from_numpy(mask_png.astype(np.int64)))


def test_reference_list_lines_parse(tmp_path: Path) -> None:
    lines = REFERENCE_LINES
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        rgb, mask, depth = line.split("\t")
        _save(tmp_path / rgb, np.full((H, W, 3), 7, np.uint8))
        _save(tmp_path / mask, np.full((H, W), 2, np.uint8))
        _save(tmp_path / depth, np.full((H, W), 5000, np.uint16))
    dataset = ListFileDataset(tmp_path, "train.txt", nyudv2_modalities(), num_classes=40)
    sample = dataset[0]
    assert sample["name"] == Path(lines[0].split("\t")[0]).stem
    assert torch.all(sample["inputs"][1] == 1.0)


def test_any_number_and_order_of_modalities(tmp_path: Path) -> None:
    root = _make_root(tmp_path, ["a"])
    specs = [
        ModalitySpec("depth_mm", 2, "depth", depth_scale=1 / 1000),
        ModalitySpec("rgb", 0, "rgb"),
        ModalitySpec("depth_gray", 2, "gray"),
    ]
    sample = ListFileDataset(root, "train.txt", specs, mask_column=None)[0]
    assert "mask" not in sample
    assert sample["kinds"] == ["depth", "rgb", "gray"]
    raw = np.asarray(Image.open(root / "depth" / "a.png")).astype(np.float32)
    torch.testing.assert_close(sample["inputs"][0][0], torch.from_numpy(raw / 1000))
    torch.testing.assert_close(sample["inputs"][2][2], torch.from_numpy(raw * 255 / 65535))
    assert sample["inputs"][1].shape == (3, H, W)
    only_rgb = ListFileDataset(root, "train.txt", nyudv2_modalities(["rgb"]))[0]
    assert len(only_rgb["inputs"]) == 1


def test_decode_conversions(tmp_path: Path) -> None:
    gray8 = np.arange(H * W, dtype=np.uint8).reshape(H, W) * 5
    _save(tmp_path / "g8.png", gray8)
    rgb_from_gray = decode_image(tmp_path / "g8.png", "rgb")
    assert torch.equal(rgb_from_gray, torch.from_numpy(np.stack([gray8] * 3).astype(np.float32)))
    assert torch.equal(decode_image(tmp_path / "g8.png", "gray"), rgb_from_gray)
    depth8 = decode_image(tmp_path / "g8.png", "depth", depth_scale=0.5)
    assert torch.equal(depth8, rgb_from_gray * 0.5)

    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = [10, 20, 30]
    rgba[..., 3] = 99
    _save(tmp_path / "rgba.png", rgba)
    assert decode_image(tmp_path / "rgba.png", "rgb")[:, 0, 0].tolist() == [10.0, 20.0, 30.0]

    palette = Image.new("P", (W, H), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(tmp_path / "pal.png")
    assert decode_image(tmp_path / "pal.png", "rgb")[:, 2, 3].tolist() == [200.0, 100.0, 50.0]
    assert torch.all(decode_mask(tmp_path / "pal.png") == 1)  # raw index, not colour

    full16 = np.full((H, W), 65535, np.uint16)
    _save(tmp_path / "g16.png", full16)
    assert torch.all(decode_image(tmp_path / "g16.png", "gray") == 255.0)
    depth16 = decode_image(tmp_path / "g16.png", "depth", 1 / 5000)
    torch.testing.assert_close(depth16, torch.full((3, H, W), 65535 / 5000))


def test_transform_is_applied(tmp_path: Path) -> None:
    root = _make_root(tmp_path, ["a"])
    dataset = ListFileDataset(
        root, "train.txt", nyudv2_modalities(), transform=lambda s: {**s, "name": "seen"}
    )
    assert dataset[0]["name"] == "seen"


def test_missing_root_and_list(tmp_path: Path) -> None:
    with pytest.raises(CenError) as excinfo:
        ListFileDataset(tmp_path / "nowhere", "train.txt", nyudv2_modalities())
    _one_line_error(excinfo, "nowhere")
    with pytest.raises(CenError) as excinfo:
        ListFileDataset(tmp_path, "val.txt", nyudv2_modalities())
    _one_line_error(excinfo, "val.txt")


def test_wrong_column_count_names_file_and_line(tmp_path: Path) -> None:
    root = _make_root(tmp_path, ["a", "b"])
    lines = (root / "train.txt").read_text().splitlines()
    (root / "train.txt").write_text(lines[0] + "\n" + lines[1].rsplit("\t", 1)[0] + "\n")
    with pytest.raises(CenError) as excinfo:
        ListFileDataset(root, "train.txt", nyudv2_modalities())
    _one_line_error(excinfo, "train.txt:2", "got 2")
    (root / "train.txt").write_text("rgb/a.png\n")
    with pytest.raises(CenError) as excinfo:
        ListFileDataset(root, "train.txt", nyudv2_modalities())
    _one_line_error(excinfo, "train.txt:1", "got 1")


def test_missing_file_is_named(tmp_path: Path) -> None:
    root = _make_root(tmp_path, ["a", "b"])
    (root / "depth" / "b.png").unlink()
    with pytest.raises(CenError) as excinfo:
        ListFileDataset(root, "train.txt", nyudv2_modalities())
    _one_line_error(excinfo, "train.txt:2", str(root / "depth" / "b.png"))


def test_corrupt_png_is_named(tmp_path: Path) -> None:
    root = _make_root(tmp_path, ["a"])
    path = root / "rgb" / "a.png"
    path.write_bytes(path.read_bytes()[:40])
    dataset = ListFileDataset(root, "train.txt", nyudv2_modalities())
    with pytest.raises(CenError) as excinfo:
        dataset[0]
    _one_line_error(excinfo, str(path))
    (root / "masks" / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(CenError) as excinfo:
        decode_mask(root / "masks" / "a.png")
    _one_line_error(excinfo, "a.png")


def test_size_mismatch_names_sample_and_sizes(tmp_path: Path) -> None:
    root = _make_root(tmp_path, ["a"])
    _save(root / "depth" / "a.png", np.zeros((H // 2, W // 2), np.uint16))
    dataset = ListFileDataset(root, "train.txt", nyudv2_modalities())
    with pytest.raises(CenError) as excinfo:
        dataset[0]
    _one_line_error(excinfo, "sample a", f"rgb {H}x{W}", f"depth {H // 2}x{W // 2}")


def test_label_out_of_range_names_sample_and_value(tmp_path: Path) -> None:
    mask = np.full((H, W), 255, np.uint8)
    mask[0, 0] = 3
    mask[1, 1] = 7
    root = _make_root(tmp_path, ["a"], mask_values=mask)
    assert (
        ListFileDataset(root, "train.txt", nyudv2_modalities(), num_classes=8)[0]["mask"][1, 1] == 7
    )
    dataset = ListFileDataset(root, "train.txt", nyudv2_modalities(), num_classes=5)
    with pytest.raises(CenError) as excinfo:
        dataset[0]
    _one_line_error(excinfo, "sample a", "label 7")


def test_colour_mask_and_colour_depth_are_rejected(tmp_path: Path) -> None:
    root = _make_root(tmp_path, ["a"])
    colour = np.zeros((H, W, 3), np.uint8)
    colour[..., 0] = 1
    _save(root / "masks" / "a.png", colour)
    with pytest.raises(CenError) as excinfo:
        ListFileDataset(root, "train.txt", nyudv2_modalities())[0]
    _one_line_error(excinfo, "masks/a.png", "mode RGB")
    _save(root / "depth" / "a.png", colour)
    with pytest.raises(CenError) as excinfo:
        decode_image(root / "depth" / "a.png", "depth")
    _one_line_error(excinfo, "depth/a.png", "mode RGB")


@pytest.mark.parametrize("kind", ["rgb", "gray", "depth"])
def test_32_bit_images_are_refused_16_bit_ones_read(tmp_path: Path, kind: str) -> None:
    """0..255 would clamp float or 32-bit integer values, and one depth scale cannot fit them
    beside 8- and 16-bit files; PIL reads a 16-bit PGM as mode I."""
    for name, array in (
        ("float", np.full((H, W), 1.5, np.float32)),
        ("int", np.full((H, W), 10**5, np.int32)),
    ):
        _save(tmp_path / f"{name}.tif", array)
        with pytest.raises(CenError) as excinfo:
            decode_image(tmp_path / f"{name}.tif", kind)
        _one_line_error(excinfo, f"{name}.tif", "expected 8 or 16 bits")
    _save(tmp_path / "deep.pgm", np.full((H, W), 65535, np.uint16))
    assert Image.open(tmp_path / "deep.pgm").mode == "I"
    top = 65535 * NYUDV2_DEPTH_SCALE if kind == "depth" else 255
    assert decode_image(tmp_path / "deep.pgm", kind).max() == pytest.approx(top)


def test_bad_specs() -> None:
    with pytest.raises(CenError, match="kind 'hha'"):
        ModalitySpec("x", 0, "hha")
    for name in ("", "a/b", "ensemble", ".."):
        with pytest.raises(CenError, match=f"^modality name {name!r}: expected letters"):
            ModalitySpec(name, 0, "rgb")
    with pytest.raises(CenError, match="'hha'"):
        nyudv2_modalities(["rgb", "hha"])
    specs = nyudv2_modalities(["depth", "rgb"])
    assert [(s.name, s.column, s.kind) for s in specs] == [("depth", 2, "depth"), ("rgb", 0, "rgb")]
