"""SUN RGB-D preparation from a fabricated release tree in the official formats (no network)."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from cenfusion.data.sunrgbd import SUN37_CLASSES, depth_from_raw, prepare_sunrgbd
from cenfusion.errors import CenError

PREFIX = "/n/fs/sun3d/data/SUNRGBD/"


@dataclass(frozen=True)
class Scene:
    folder: str  # below SUNRGBD/
    stem: str
    size: tuple[int, int]  # (H, W)
    train: bool


SCENES = (
    Scene("kv1/NYUdata/NYU0001", "NYU0001", (9, 12), True),
    Scene("kv2/kinect2data/000002_2014-05-26_rgbf000103-resize", "0000103", (11, 7), False),
    Scene("realsense/lg/2014_10_24-resize", "0000042", (8, 10), True),
)


def _rotate_for_storage(mm: np.ndarray) -> np.ndarray:
    """The release's storage of millimetres: rotate left by 3 bits (inverse of the reader)."""
    bits = mm.astype(np.uint32)
    return (((bits << 3) | (bits >> 13)) & 0xFFFF).astype(np.uint16)


def _fabricate(root: Path) -> dict[str, list[np.ndarray]]:
    """Write ``SUNRGBD/`` and ``SUNRGBDtoolbox/`` under ``root``; return what they hold."""
    rng = np.random.default_rng(7)
    truth: dict[str, list[np.ndarray]] = {"rgb": [], "raw_mm": [], "bfx_mm": [], "label": []}
    for s in SCENES:
        h, w = s.size
        scene = root / "SUNRGBD" / s.folder
        for sub in ("image", "depth", "depth_bfx"):
            (scene / sub).mkdir(parents=True)
        (scene / "intrinsics.txt").write_text("500 0 3\n0 500 4\n0 0 1\n")
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(scene / "image" / f"{s.stem}.jpg", quality=95)
        truth["rgb"].append(np.asarray(Image.open(scene / "image" / f"{s.stem}.jpg")))
        for sub, key in (("depth", "raw_mm"), ("depth_bfx", "bfx_mm")):
            mm = rng.integers(1, 12000, (h, w)).astype(np.uint16)
            mm[0, 0] = 0
            mm[0, 1] = 65535 if sub == "depth" else 8001
            Image.fromarray(_rotate_for_storage(mm)).save(scene / sub / f"{s.stem}.png")
            truth[key].append(mm)
        label = rng.integers(0, 38, (h, w)).astype(np.uint8)
        label[0, :3] = [0, 1, 37]
        truth["label"].append(label)

    meta_dir = root / "SUNRGBDtoolbox" / "Metadata"
    meta_dir.mkdir(parents=True)
    fields = [
        ("rgbpath", object),
        ("rgbname", object),
        ("depthname", object),
        ("sensorType", object),
    ]
    meta = np.zeros((1, len(SCENES)), dtype=fields)
    for k, s in enumerate(SCENES):
        meta[0, k] = (
            f"{PREFIX}{s.folder}/image/{s.stem}.jpg",
            f"{s.stem}.jpg",
            f"{s.stem}.png",
            s.folder.split("/")[0],
        )
    scipy.io.savemat(meta_dir / "SUNRGBDMeta.mat", {"SUNRGBDMeta": meta})

    with h5py.File(meta_dir / "SUNRGBD2Dseg.mat", "w", userblock_size=512) as f:
        refs_group = f.create_group("#refs#")
        group = f.create_group("SUNRGBD2Dseg")
        seglabel = group.create_dataset("seglabel", (len(SCENES), 1), dtype=h5py.ref_dtype)
        for k, label in enumerate(truth["label"]):
            stored = refs_group.create_dataset(f"l{k}", data=label.T.astype(np.float64))
            seglabel[k, 0] = stored.ref

    split_dir = root / "SUNRGBDtoolbox" / "traintestSUNRGBD"
    split_dir.mkdir(parents=True)
    train = [f"{PREFIX}{s.folder}/" for s in SCENES if s.train]  # trailing slashes
    test = [f"{PREFIX}{s.folder}" for s in SCENES if not s.train]
    scipy.io.savemat(
        split_dir / "allsplit.mat",
        {
            "alltrain": np.array(train, dtype=object)[None, :],
            "alltest": np.array(test, dtype=object)[None, :],
        },
    )
    return truth


def _zip_trees(root: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("SUNRGBD", "SUNRGBDtoolbox"):
        with zipfile.ZipFile(dest / f"{name}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted((root / name).rglob("*")):
                zf.write(path, path.relative_to(root).as_posix())


def _assert_converted(out: Path, truth: dict[str, list[np.ndarray]], refined: bool) -> None:
    key = "bfx_mm" if refined else "raw_mm"
    for k, s in enumerate(SCENES):
        name = f"{k + 1:06d}.png"
        rgb = Image.open(out / "rgb" / name)
        assert rgb.mode == "RGB" and rgb.size == (s.size[1], s.size[0])
        np.testing.assert_array_equal(np.asarray(rgb), truth["rgb"][k])
        depth = np.asarray(Image.open(out / "depth" / name))
        np.testing.assert_array_equal(depth, np.minimum(truth[key][k], 8000))
        assert depth[0, 0] == 0 and depth[0, 1] == 8000
        mask = Image.open(out / "masks" / name)
        assert mask.mode == "L" and mask.palette is None
        label = truth["label"][k].astype(int)
        np.testing.assert_array_equal(np.asarray(mask), np.where(label == 0, 255, label - 1))
        assert np.asarray(mask)[0, :3].tolist() == [255, 0, 36]

    def line(k: int) -> str:
        return f"rgb/{k:06d}.png\tmasks/{k:06d}.png\tdepth/{k:06d}.png"

    assert (out / "train.txt").read_text() == f"{line(1)}\n{line(3)}"
    assert (out / "val.txt").read_text() == line(2)
    assert (out / "classes.txt").read_text().splitlines() == list(SUN37_CLASSES)


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_depth_bit_rotation() -> None:
    mm = np.array([0, 1, 1234, 7999, 8000, 8191, 40000], dtype=np.uint16)
    expected = [0, 1, 1234, 7999, 8000, 8000, 8000]
    assert depth_from_raw(_rotate_for_storage(mm)).tolist() == expected
    assert depth_from_raw(np.array([8], dtype=np.uint16)).tolist() == [1]


def test_converts_extracted_trees(tmp_path: Path) -> None:
    truth = _fabricate(tmp_path / "release")
    out = tmp_path / "out" / "sunrgbd"
    assert prepare_sunrgbd(out, from_dir=tmp_path / "release", progress=False) == out
    _assert_converted(out, truth, refined=True)
    assert _leftovers(out.parent) == [] and not (out.parent / "sunrgbd.work").exists()


def test_raw_depth_on_request(tmp_path: Path) -> None:
    truth = _fabricate(tmp_path / "release")
    out = tmp_path / "sunrgbd"
    prepare_sunrgbd(out, from_dir=tmp_path / "release", use_refined_depth=False, progress=False)
    _assert_converted(out, truth, refined=False)


def test_converts_from_zips(tmp_path: Path) -> None:
    truth = _fabricate(tmp_path / "release")
    _zip_trees(tmp_path / "release", tmp_path / "zips")
    out = tmp_path / "sunrgbd"
    prepare_sunrgbd(out, from_dir=tmp_path / "zips", progress=False)
    _assert_converted(out, truth, refined=True)
    work = tmp_path / "sunrgbd.work"
    assert sorted(p.name for p in work.iterdir()) == [
        "SUNRGBD",
        "SUNRGBD.source",
        "SUNRGBDtoolbox",
        "SUNRGBDtoolbox.source",
    ]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        """Keep the test output quiet."""


@pytest.fixture()
def zip_server(tmp_path: Path) -> Iterator[tuple[dict[str, list[np.ndarray]], str]]:
    """The fabricated release zipped and served locally; yields its truth and base URL."""
    truth = _fabricate(tmp_path / "release")
    _zip_trees(tmp_path / "release", tmp_path / "served" / "data")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "served"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield truth, f"http://127.0.0.1:{httpd.server_address[1]}/data"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_downloads_and_extracts(
    zip_server: tuple[dict[str, list[np.ndarray]], str], tmp_path: Path
) -> None:
    truth, base_url = zip_server
    out = tmp_path / "out" / "sunrgbd"
    prepare_sunrgbd(out, base_url=base_url, progress=False)
    _assert_converted(out, truth, refined=True)
    work = tmp_path / "out" / "sunrgbd.work"
    assert sorted(p.name for p in work.iterdir()) == [
        "SUNRGBD",
        "SUNRGBD.source",
        "SUNRGBD.zip",
        "SUNRGBDtoolbox",
        "SUNRGBDtoolbox.source",
        "SUNRGBDtoolbox.zip",
    ]


def test_truncated_label_file_gives_error_and_no_output(tmp_path: Path) -> None:
    _fabricate(tmp_path / "release")
    seg = tmp_path / "release" / "SUNRGBDtoolbox" / "Metadata" / "SUNRGBD2Dseg.mat"
    seg.write_bytes(seg.read_bytes()[:3000])
    out = tmp_path / "sunrgbd"
    with pytest.raises(CenError, match=r"SUNRGBD2Dseg\.mat"):
        prepare_sunrgbd(out, from_dir=tmp_path / "release", progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_truncated_zip_gives_error_and_no_output(tmp_path: Path) -> None:
    _fabricate(tmp_path / "release")
    _zip_trees(tmp_path / "release", tmp_path / "zips")
    archive = tmp_path / "zips" / "SUNRGBD.zip"
    archive.write_bytes(archive.read_bytes()[:-200])
    out = tmp_path / "sunrgbd"
    with pytest.raises(CenError, match=r"SUNRGBD\.zip.*truncated or corrupt"):
        prepare_sunrgbd(out, from_dir=tmp_path / "zips", progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []
    assert not (tmp_path / "sunrgbd.work" / "SUNRGBD").exists()
    assert _leftovers(tmp_path / "sunrgbd.work") == []


def test_a_full_disk_while_extracting_blames_the_folder_not_the_archive(
    tmp_path: Path, monkeypatch
) -> None:
    _fabricate(tmp_path / "release")
    _zip_trees(tmp_path / "release", tmp_path / "zips")

    def full(self, member, path=None, pwd=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(zipfile.ZipFile, "extract", full)
    work = tmp_path / "sunrgbd.work"
    with pytest.raises(CenError) as info:
        prepare_sunrgbd(tmp_path / "sunrgbd", from_dir=tmp_path / "zips", progress=False)
    assert str(info.value) == (
        f"{work}: cannot extract SUNRGBD.zip there (No space left on device); the archive is kept"
    )
    assert _leftovers(work) == []


def test_missing_image_gives_error_and_no_output(tmp_path: Path) -> None:
    _fabricate(tmp_path / "release")
    gone = tmp_path / "release" / "SUNRGBD" / SCENES[2].folder / "depth_bfx" / "0000042.png"
    gone.unlink()
    out = tmp_path / "sunrgbd"
    with pytest.raises(CenError, match=r"0000042.png: missing"):
        prepare_sunrgbd(out, from_dir=tmp_path / "release", progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_label_out_of_range_gives_error(tmp_path: Path) -> None:
    _fabricate(tmp_path / "release")
    seg = tmp_path / "release" / "SUNRGBDtoolbox" / "Metadata" / "SUNRGBD2Dseg.mat"
    with h5py.File(seg, "r+") as f:
        f["#refs#"]["l1"][0, 0] = 38
    with pytest.raises(CenError, match=r"seglabel\(2\): labels must lie in 0..37, got 38"):
        prepare_sunrgbd(tmp_path / "sunrgbd", from_dir=tmp_path / "release", progress=False)


def test_label_size_mismatch_gives_error(tmp_path: Path) -> None:
    _fabricate(tmp_path / "release")
    seg = tmp_path / "release" / "SUNRGBDtoolbox" / "Metadata" / "SUNRGBD2Dseg.mat"
    with h5py.File(seg, "r+") as f:
        stored = f["#refs#"].create_dataset("wrong", data=np.zeros((5, 5)))
        f["SUNRGBD2Dseg"]["seglabel"][0, 0] = stored.ref
    with pytest.raises(CenError, match="sizes differ"):
        prepare_sunrgbd(tmp_path / "sunrgbd", from_dir=tmp_path / "release", progress=False)


def test_meta_path_without_release_root_gives_error(tmp_path: Path) -> None:
    _fabricate(tmp_path / "release")
    meta_path = tmp_path / "release" / "SUNRGBDtoolbox" / "Metadata" / "SUNRGBDMeta.mat"
    meta = scipy.io.loadmat(meta_path)["SUNRGBDMeta"]
    meta[0, 1]["rgbpath"] = np.array(["/somewhere/else/image/x.jpg"])
    scipy.io.savemat(meta_path, {"SUNRGBDMeta": meta})
    with pytest.raises(CenError, match=r"SUNRGBDMeta\(2\).rgbpath: expected a path containing"):
        prepare_sunrgbd(tmp_path / "sunrgbd", from_dir=tmp_path / "release", progress=False)


def test_from_dir_without_release_names_what_is_expected(tmp_path: Path) -> None:
    _fabricate(tmp_path / "release")
    shutil.rmtree(tmp_path / "release" / "SUNRGBDtoolbox")
    with pytest.raises(CenError, match=r"expected a folder SUNRGBDtoolbox/ or SUNRGBDtoolbox.zip"):
        prepare_sunrgbd(tmp_path / "sunrgbd", from_dir=tmp_path / "release", progress=False)


def test_a_changed_zip_is_extracted_again(tmp_path: Path) -> None:
    _fabricate(tmp_path / "release")
    _zip_trees(tmp_path / "release", tmp_path / "zips")
    prepare_sunrgbd(tmp_path / "a", from_dir=tmp_path / "zips", progress=False)
    image = next((tmp_path / "release" / "SUNRGBD").rglob("*.jpg"))
    Image.new("RGB", Image.open(image).size).save(image)  # black
    for archive in (tmp_path / "zips").iterdir():
        archive.unlink()
    _zip_trees(tmp_path / "release", tmp_path / "zips")  # the same path, another archive
    (tmp_path / "a.work").rename(tmp_path / "b.work")  # the first run's extraction, kept
    prepare_sunrgbd(tmp_path / "b", from_dir=tmp_path / "zips", progress=False)
    rgbs = [np.asarray(Image.open(p)).max() for p in sorted((tmp_path / "b" / "rgb").iterdir())]
    assert 0 in rgbs, "the new archive's black image, not the old extraction's"


def test_a_missing_toolbox_is_refused_before_any_extraction(tmp_path: Path) -> None:
    _fabricate(tmp_path / "release")
    _zip_trees(tmp_path / "release", tmp_path / "zips")
    (tmp_path / "zips" / "SUNRGBDtoolbox.zip").unlink()
    with pytest.raises(CenError, match="expected a folder SUNRGBDtoolbox/ or SUNRGBDtoolbox.zip"):
        prepare_sunrgbd(tmp_path / "s", from_dir=tmp_path / "zips", progress=False)
    assert not (tmp_path / "s.work").exists()
