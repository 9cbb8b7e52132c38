"""NYUDv2 preparation from fabricated files in the official formats (no network)."""

from __future__ import annotations

import errno
import functools
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from cenfusion.data.nyudv2 import NyuUrls, prepare_nyudv2
from cenfusion.errors import CenError

N, H, W = 5, 12, 16
TRAIN, TEST = [1, 3, 4], [2, 5]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        """Keep the test output quiet."""


@pytest.fixture()
def serve_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder and the base URL of a local server serving it."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _fabricate(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the three source files; return the (H, W) arrays they hold."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
    depth = rng.uniform(0.5, 9.5, (N, H, W)).astype(np.float32)
    depth[0, 0, 0] = 0.0
    depth[0, 0, 1] = 70.0  # beyond 65.535 m: clipped
    depth[0, 0, 2] = 1.2345
    labels = rng.integers(0, 895, (N, H, W)).astype(np.uint16)
    labels[:, 0, 3] = 0
    labels[1, 1, :4] = [1, 894, 5, 0]
    mapping = rng.integers(1, 41, 894)
    names = [f"class{k}" for k in range(40)]
    folder.mkdir(parents=True, exist_ok=True)
    # MATLAB 7.3 stores column-major, so h5py sees every array transposed; 512-byte userblock.
    with h5py.File(folder / "nyu_depth_v2_labeled.mat", "w", userblock_size=512) as f:
        f["images"] = rgb.transpose(0, 3, 2, 1)  # (N, 3, W, H)
        f["depths"] = depth.transpose(0, 2, 1)
        f["labels"] = labels.transpose(0, 2, 1)
    scipy.io.savemat(
        folder / "splits.mat",
        {"trainNdxs": np.array(TRAIN, float)[:, None], "testNdxs": np.array(TEST, float)[:, None]},
    )
    scipy.io.savemat(
        folder / "classMapping40.mat",
        {
            "mapClass": mapping[None, :].astype(float),
            "className": np.array(names, dtype=object)[None, :],
        },
    )
    return {"rgb": rgb, "depth": depth, "labels": labels, "mapping": mapping}


def _assert_converted(out: Path, src: dict[str, np.ndarray]) -> None:
    for i in range(N):
        name = f"{i + 1:06d}.png"
        rgb = Image.open(out / "rgb" / name)
        assert rgb.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(rgb), src["rgb"][i])
        depth = Image.open(out / "depth" / name)
        assert depth.mode.startswith("I;16")
        expected_mm = np.clip(np.rint(src["depth"][i].astype(np.float64) * 1000), 0, 65535)
        np.testing.assert_array_equal(np.asarray(depth), expected_mm.astype(np.uint16))
        mask = Image.open(out / "masks" / name)
        assert mask.mode == "L" and mask.palette is None
        raw = src["labels"][i].astype(int)
        expected = np.where(raw == 0, 255, src["mapping"][np.maximum(raw, 1) - 1] - 1)
        np.testing.assert_array_equal(np.asarray(mask), expected)
    d0 = np.asarray(Image.open(out / "depth" / "000001.png"))
    assert d0[0, :3].tolist() == [0, 65535, 1235]  # float32 1.2345 is 1.23450005
    m1 = np.asarray(Image.open(out / "masks" / "000002.png"))
    mapping = src["mapping"]
    assert m1[1, :4].tolist() == [mapping[0] - 1, mapping[893] - 1, mapping[4] - 1, 255]
    assert (out / "train.txt").read_text() == "\n".join(
        f"rgb/{k:06d}.png\tmasks/{k:06d}.png\tdepth/{k:06d}.png" for k in TRAIN
    )
    assert (out / "val.txt").read_text().splitlines() == [
        f"rgb/{k:06d}.png\tmasks/{k:06d}.png\tdepth/{k:06d}.png" for k in TEST
    ]
    assert (out / "classes.txt").read_text().split("\n")[:40] == [f"class{k}" for k in range(40)]


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_converts_from_downloaded_files(tmp_path: Path) -> None:
    src = _fabricate(tmp_path / "src")
    out = tmp_path / "out" / "nyudv2"
    assert prepare_nyudv2(out, from_dir=tmp_path / "src", progress=False) == out
    _assert_converted(out, src)
    assert _leftovers(out.parent) == []


def test_downloads_through_overridden_urls(serve_dir: tuple[Path, str], tmp_path: Path) -> None:
    root, base = serve_dir
    src = _fabricate(root / "mirror")
    urls = NyuUrls(
        labeled=f"{base}/mirror/nyu_depth_v2_labeled.mat",
        splits=f"{base}/mirror/splits.mat",
        class_mapping=f"{base}/mirror/classMapping40.mat",
    )
    out = tmp_path / "data" / "nyudv2"
    prepare_nyudv2(out, urls=urls, progress=False)
    _assert_converted(out, src)
    work = tmp_path / "data" / "nyudv2.work"
    assert sorted(p.name for p in work.iterdir()) == [
        "classMapping40.mat",
        "nyu_depth_v2_labeled.mat",
        "splits.mat",
    ]


def test_complete_output_is_kept_without_touching_sources(tmp_path: Path) -> None:
    _fabricate(tmp_path / "src")
    out = tmp_path / "nyudv2"
    prepare_nyudv2(out, from_dir=tmp_path / "src", progress=False)
    stamp = (out / "rgb" / "000001.png").stat().st_mtime_ns
    dead = NyuUrls(labeled="http://127.0.0.1:9/x", splits="http://127.0.0.1:9/y")
    assert prepare_nyudv2(out, urls=dead, progress=False) == out
    assert (out / "rgb" / "000001.png").stat().st_mtime_ns == stamp


def test_incomplete_existing_output_is_refused(tmp_path: Path) -> None:
    _fabricate(tmp_path / "src")
    out = tmp_path / "nyudv2"
    (out / "rgb").mkdir(parents=True)
    with pytest.raises(CenError, match="not a complete prepared data set"):
        prepare_nyudv2(out, from_dir=tmp_path / "src", progress=False)


@pytest.mark.parametrize("keep", [0.97, 0.5, 0.001])
def test_truncated_hdf5_gives_error_and_no_output(tmp_path: Path, keep: float) -> None:
    _fabricate(tmp_path / "src")
    mat = tmp_path / "src" / "nyu_depth_v2_labeled.mat"
    data = mat.read_bytes()
    mat.write_bytes(data[: int(len(data) * keep)])
    out = tmp_path / "nyudv2"
    with pytest.raises(CenError, match=r"nyu_depth_v2_labeled\.mat") as info:
        prepare_nyudv2(out, from_dir=tmp_path / "src", progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_corrupt_image_data_mid_file_gives_error_and_no_output(tmp_path: Path) -> None:
    src = _fabricate(tmp_path / "src")
    mat = tmp_path / "src" / "nyu_depth_v2_labeled.mat"
    with h5py.File(mat, "r+") as f:  # rewrite images compressed, one chunk per image
        del f["images"]
        f.create_dataset(
            "images", data=src["rgb"].transpose(0, 3, 2, 1), chunks=(1, 3, W, H), compression="gzip"
        )
        chunk = f["images"].id.get_chunk_info(3)
    with open(mat, "r+b") as fh:
        fh.seek(chunk.byte_offset + 2)
        fh.write(b"\xff" * 16)
    out = tmp_path / "nyudv2"
    with pytest.raises(CenError, match="cannot read image 4"):
        prepare_nyudv2(out, from_dir=tmp_path / "src", progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_truncated_split_file_gives_error(tmp_path: Path) -> None:
    _fabricate(tmp_path / "src")
    splits = tmp_path / "src" / "splits.mat"
    splits.write_bytes(splits.read_bytes()[:150])
    with pytest.raises(CenError, match=r"splits\.mat"):
        prepare_nyudv2(tmp_path / "nyudv2", from_dir=tmp_path / "src", progress=False)
    assert not (tmp_path / "nyudv2").exists()


def test_label_beyond_mapping_gives_error(tmp_path: Path) -> None:
    _fabricate(tmp_path / "src")
    with h5py.File(tmp_path / "src" / "nyu_depth_v2_labeled.mat", "r+") as f:
        f["labels"][3, 2, 1] = 900
    with pytest.raises(CenError, match=r"image 4 has labels outside 0\.\.894 \(min 0, max 900\)"):
        prepare_nyudv2(tmp_path / "nyudv2", from_dir=tmp_path / "src", progress=False)
    assert not (tmp_path / "nyudv2").exists() and _leftovers(tmp_path) == []


def test_split_index_beyond_images_gives_error(tmp_path: Path) -> None:
    _fabricate(tmp_path / "src")
    scipy.io.savemat(
        tmp_path / "src" / "splits.mat",
        {"trainNdxs": np.array([[1.0], [6.0]]), "testNdxs": np.array([[2.0]])},
    )
    with pytest.raises(CenError, match="trainNdxs refers to image 6"):
        prepare_nyudv2(tmp_path / "nyudv2", from_dir=tmp_path / "src", progress=False)


def test_missing_source_names_it(tmp_path: Path) -> None:
    _fabricate(tmp_path / "src")
    (tmp_path / "src" / "classMapping40.mat").unlink()
    with pytest.raises(CenError, match=r"classMapping40\.mat is missing"):
        prepare_nyudv2(tmp_path / "nyudv2", from_dir=tmp_path / "src", progress=False)


def _released_folder(root: Path) -> None:
    """A tiny folder in the released preprocessed layout (palette masks, no classes.txt)."""
    rng = np.random.default_rng(3)
    for sub in ("rgb", "depth", "masks"):
        (root / sub).mkdir(parents=True)
    for k in (1, 2, 3):
        name = f"{k:06d}.png"
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(root / "rgb" / name)
        depth = rng.integers(0, 5000, (6, 8)).astype(np.uint16)
        Image.fromarray(depth).save(root / "depth" / name)
        mask = Image.fromarray(rng.integers(0, 40, (6, 8), dtype=np.uint8)).convert("P")
        mask.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        mask.save(root / "masks" / name)
    line = "rgb/{0:06d}.png\tmasks/{0:06d}.png\tdepth/{0:06d}.png"
    (root / "train.txt").write_text(line.format(1) + "\n" + line.format(3) + "\n")
    (root / "val.txt").write_text(line.format(2))


def test_released_preprocessed_folder_is_taken_as_is(tmp_path: Path) -> None:
    released = tmp_path / "released"
    _released_folder(released)
    out = tmp_path / "nyudv2"
    prepare_nyudv2(out, from_dir=released, progress=False)
    assert (out / "train.txt").read_bytes() == (released / "train.txt").read_bytes()
    assert (out / "val.txt").read_bytes() == (released / "val.txt").read_bytes()
    for k in (1, 2, 3):
        name = f"{k:06d}.png"
        assert (out / "rgb" / name).read_bytes() == (released / "rgb" / name).read_bytes()
        assert (out / "depth" / name).read_bytes() == (released / "depth" / name).read_bytes()
        mask = Image.open(out / "masks" / name)
        assert mask.mode == "L"
        np.testing.assert_array_equal(
            np.asarray(mask), np.asarray(Image.open(released / "masks" / name))
        )
    assert len((out / "classes.txt").read_text().splitlines()) == 40


def test_released_folder_with_missing_file_is_refused(tmp_path: Path) -> None:
    released = tmp_path / "released"
    _released_folder(released)
    (released / "depth" / "000002.png").unlink()
    with pytest.raises(CenError, match=r"val.txt:1: .*000002.png does not exist"):
        prepare_nyudv2(tmp_path / "nyudv2", from_dir=released, progress=False)
    assert not (tmp_path / "nyudv2").exists()


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        ("masks", r"train\.txt:2: mask masks/000003\.png has label 200, expected 0\.\.39"),
        ("depth", r"depth .*8-bit"),
        ("rgb", r"val\.txt:1: rgb/000002\.png is 7x8, expected 6x8"),
    ],
)
def test_released_folder_is_checked_whole_not_by_its_first_sample(
    tmp_path: Path, spoil: str, message: str
) -> None:
    released = tmp_path / "released"
    _released_folder(released)
    if spoil == "masks":
        Image.fromarray(np.full((6, 8), 200, np.uint8)).save(released / "masks" / "000003.png")
    elif spoil == "depth":
        Image.fromarray(np.full((6, 8), 9, np.uint8)).save(released / "depth" / "000002.png")
    else:
        Image.fromarray(np.zeros((7, 8, 3), np.uint8)).save(released / "rgb" / "000002.png")
    with pytest.raises(CenError, match=message):
        prepare_nyudv2(tmp_path / "nyudv2", from_dir=released, progress=False)
    assert not (tmp_path / "nyudv2").exists()


def test_released_folder_with_bad_line_is_refused(tmp_path: Path) -> None:
    released = tmp_path / "released"
    _released_folder(released)
    (released / "val.txt").write_text("depth/000002.png\tmasks/000002.png\trgb/000002.png")
    with pytest.raises(CenError, match=r"val.txt:1: expected"):
        prepare_nyudv2(tmp_path / "nyudv2", from_dir=released, progress=False)


def test_released_folder_lists_split_as_every_list_file_and_not_empty(tmp_path: Path) -> None:
    released = tmp_path / "released"
    _released_folder(released)
    (released / "val.txt").write_text("rgb/000002.png masks/000002.png depth/000002.png\n")
    prepare_nyudv2(tmp_path / "spaces", from_dir=released, progress=False)
    (released / "val.txt").write_text("\n")
    with pytest.raises(CenError, match=r"val\.txt: no samples listed"):
        prepare_nyudv2(tmp_path / "empty", from_dir=released, progress=False)


def test_a_file_that_is_no_matlab_file_is_one_line(tmp_path: Path) -> None:
    _fabricate(tmp_path / "src")
    (tmp_path / "src" / "splits.mat").write_text("<html><body>Moved</body></html>")
    with pytest.raises(CenError, match=r"splits\.mat: not a readable MATLAB v5 file"):
        prepare_nyudv2(tmp_path / "out", from_dir=tmp_path / "src", progress=False)


def test_an_output_link_is_written_through_and_the_current_folder_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _fabricate(tmp_path / "src")
    (tmp_path / "disk" / "nyu").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "disk" / "nyu")
    prepare_nyudv2(tmp_path / "link", from_dir=tmp_path / "src", progress=False)
    _assert_converted(tmp_path / "disk" / "nyu", src)
    assert (tmp_path / "link").is_symlink()
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(CenError, match=r"^\.: the current folder; name a folder to write"):
        prepare_nyudv2(Path("."), from_dir=tmp_path / "src", progress=False)


def test_a_folder_that_cannot_be_written_is_named_not_its_hidden_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fabricate(tmp_path / "src")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CenError, match=r"afile/nyu: a path inside the file .*afile, expected a"):
        prepare_nyudv2(tmp_path / "afile" / "nyu", from_dir=tmp_path / "src", progress=False)
    save = Image.Image.save

    def full(self, fp, *args, **kwargs):
        if "masks" in str(fp):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write() says it
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(CenError) as info:
        prepare_nyudv2(tmp_path / "nyu", from_dir=tmp_path / "src", progress=False)
    assert str(info.value) == (
        f"{tmp_path / 'nyu'}: cannot write the data set (No space left on device); nothing was kept"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "src"]

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / ".nyu.tmp-1"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(CenError, match=rf"nyu: cannot write in {tmp_path} \(Read-only file"):
        prepare_nyudv2(tmp_path / "nyu", from_dir=tmp_path / "src", progress=False)


def test_a_killed_conversions_folder_is_removed_by_the_next(tmp_path: Path) -> None:
    _fabricate(tmp_path / "src")
    dead = tmp_path / f".nyu.tmp-999999999@{socket.gethostname()}-abc"  # no such process
    live = tmp_path / f".nyu.tmp-{os.getpid()}@{socket.gethostname()}-abc"
    elsewhere = tmp_path / ".nyu.tmp-999999999@another-host-abc"  # a shared disk's
    for folder in (dead, live, elsewhere):
        folder.mkdir()
    prepare_nyudv2(tmp_path / "nyu", from_dir=tmp_path / "src", progress=False)
    assert not dead.exists() and live.exists() and elsewhere.exists()


def test_the_command_says_when_it_kept_a_prepared_set(tmp_path: Path, capsys) -> None:
    from cenfusion.cli import main

    _fabricate(tmp_path / "src")
    argv = ["data", "nyudv2", str(tmp_path / "nyu"), "--from", str(tmp_path / "src")]
    assert main(argv) == 0 and capsys.readouterr().out.strip() == f"wrote {tmp_path / 'nyu'}"
    assert main(argv) == 0
    assert "already holds a prepared data set: kept as it is" in capsys.readouterr().out
