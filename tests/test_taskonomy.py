import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cenfusion import CenError
from cenfusion.data.render import HEADLIGHT, predictable_scene, render
from cenfusion.data.scenes import BLOCK, CRATE, IGNORE_INDEX, INTERACTION_CLASSES, sample_scene
from cenfusion.data.synthetic_taskonomy import (
    SYNTHETIC_DOMAINS,
    ensure_synthetic_taskonomy,
    generate_taskonomy_dataset,
    taskonomy_domains,
)
from cenfusion.data.taskonomy import (
    DOMAINS,
    TaskonomyDataset,
    decode_domain,
    decode_domain_8bit,
    domain_file,
    load_split,
    prepare_taskonomy,
    read_domain,
    read_split_file,
    resolve_domain,
    to_tensor,
    write_split_file,
)


def test_domain_table_and_file_names() -> None:
    assert DOMAINS[:3] == ("rgb", "normal", "reshading")
    assert DOMAINS[7] == "edge_texture" and DOMAINS[9] == "segment_unsup25d"
    assert resolve_domain(2) == resolve_domain("2") == "reshading"
    assert domain_file("edge_texture", (407, 2)) == (
        "edge_texture/point_407_view_2_domain_edge_texture.png"
    )
    assert domain_file("segment_semantic", (1, 0)) == (
        "segment_semantic/point_1_view_0_domain_segmentsemantic.png"
    )
    for bad in (10, "depth", "\u00b2"):
        with pytest.raises(CenError, match="img-type 10: expected|is unknown"):
            resolve_domain(bad)


def test_released_split_is_packaged() -> None:
    train, val = load_split("train"), load_split("val")
    assert len(train) == len(set(train)) == 1000 and len(val) == len(set(val)) == 500
    assert not set(train) & set(val)
    assert train[:2] == [(407, 2), (982, 5)] and val[:2] == [(362, 10), (460, 5)]


def test_split_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    write_split_file(path, [(407, 2), (1251, 1)])
    assert path.read_text() == (
        "{domain}/point_407_view_2_domain_{domain}.png\n"
        "{domain}/point_1251_view_1_domain_{domain}.png"
    )
    assert read_split_file(path) == [(407, 2), (1251, 1)]
    path.write_text("rgb/point_1_view_2_domain_rgb.png\n")
    with pytest.raises(CenError, match=r"train.txt:1"):
        read_split_file(path)
    with pytest.raises(CenError, match="split file not found"):
        read_split_file(tmp_path / "val.txt")


def _levels(out: torch.Tensor) -> list[float]:
    """First row of channel 0 of a decoded image, back in 8-bit levels."""
    return [round(v, 4) for v in ((out[0, 0] + 1) * 127.5).tolist()]


def test_sixteen_bit_edges_scale_by_their_maxima_and_floor() -> None:
    # 5677 * 255 / 11355 = 127.49 -> 127 (floored, not rounded); above the maximum: 255.
    raw = np.array([[0, 11355, 5677, 11354, 20000]], dtype=np.uint16)
    out = decode_domain(raw, "edge_texture")
    assert out.shape == (3, 1, 5) and torch.equal(out[0], out[2])
    assert _levels(out) == [0, 255, 127, 254, 255]
    occlusion = decode_domain(np.array([[11584, 5792, 45]], dtype=np.uint16), "edge_occlusion")
    assert _levels(occlusion) == [255, 127, 0]  # 127.5 -> 127; 0.99 -> 0


def test_depth_is_log_scaled_floored_and_no_depth_reads_near_as_released() -> None:
    # log(1 + v) * 255 / 11.1: 0 -> 0; 512 -> 143.36; 2048 -> 175.17; 65534 -> 254.78;
    # 65535 wraps to log(0) = -inf in 16 bits, which the 8-bit cast makes 0.
    raw = np.array([[0, 512, 2048, 65534, 65535]], dtype=np.uint16)
    for domain in ("depth_zbuffer", "depth_euclidean"):
        assert _levels(decode_domain(raw, domain)) == [0, 143, 175, 254, 0]
    assert decode_domain_8bit(raw, "depth_zbuffer").dtype == np.uint8


def test_eight_bit_domains_grey_tiling_and_wrong_encodings() -> None:
    rgb = np.array([[[0, 127, 255]]], dtype=np.uint8)
    torch.testing.assert_close(
        decode_domain(rgb, "rgb")[:, 0, 0], torch.tensor([-1.0, 127 / 127.5 - 1, 1.0])
    )
    grey = decode_domain(np.array([[51]], dtype=np.uint8), "reshading")
    assert grey.shape == (3, 1, 1) and torch.all(grey == 51 / 127.5 - 1)
    segments = decode_domain(np.array([[3, 300]], dtype=np.int32), "segment_unsup25d")
    assert _levels(segments) == [3, 255]
    for wrong in (
        np.zeros((2, 2), np.uint8),
        np.zeros((2, 2), bool),
        np.zeros((2, 2), np.float32),
        np.array([[0, 70000]], np.int32),
        np.zeros((2, 2, 3), np.uint16),
    ):
        with pytest.raises(CenError, match=f"16-bit single-channel PNG, got {wrong.dtype}"):
            decode_domain(wrong, "depth_zbuffer")
    as_int32 = np.array([[0, 11355]], np.int32)
    assert torch.equal(
        decode_domain(as_int32, "edge_texture"),
        decode_domain(as_int32.astype(np.uint16), "edge_texture"),
    )
    with pytest.raises(CenError, match="8-bit"):
        decode_domain(np.zeros((2, 2), np.uint16), "rgb")


def test_png_round_trip_and_unreadable_file(tmp_path: Path) -> None:
    raw = np.array([[0, 1000], [11355, 65535]], dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / "e.png")
    torch.testing.assert_close(
        read_domain(tmp_path / "e.png", "edge_texture"), decode_domain(raw, "edge_texture")
    )
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(CenError, match="cannot read image"):
        read_domain(tmp_path / "bad.png", "rgb")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_taskonomy_dataset(tmp_path_factory.mktemp("tk") / "set", 3, 2, 48, seed=3)


def test_views_are_resized_in_eight_bits_with_pils_bilinear_filter(synthetic_root: Path) -> None:
    """Validation: the 8-bit image resized by PIL (bilinear), then scaled to [-1, 1]; training
    resizes the same way to the load size before its crop."""
    domains = ["reshading", "edge_texture", "rgb"]
    val = TaskonomyDataset(synthetic_root, "val", domains[:2], domains[2], size=40)
    sample = val[0]
    images = [*sample["inputs"], sample["target"]]
    for domain, image in zip(domains, images):
        with Image.open(synthetic_root / domain_file(domain, (3, 0))) as png:
            raw = np.asarray(png)
        pil = Image.fromarray(decode_domain_8bit(raw, domain)).resize((40, 40), Image.BILINEAR)
        expected = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1) / 127.5 - 1
        assert torch.equal(image, expected.float()), domain
    train = TaskonomyDataset(synthetic_root, "train", domains[:2], domains[2], True, 48, 48)
    torch.manual_seed(0)
    flipped = train[1]["target"]
    with Image.open(synthetic_root / domain_file("rgb", (1, 0))) as png:
        rgb = to_tensor(np.asarray(png))
    assert torch.equal(flipped, rgb) or torch.equal(flipped, rgb.flip(-1))


def test_synthetic_set_uses_the_real_encodings(synthetic_root: Path) -> None:
    assert read_split_file(synthetic_root / "train.txt") == [(0, 0), (1, 0), (2, 0)]
    assert read_split_file(synthetic_root / "val.txt") == [(3, 0), (4, 0)]
    modes = {d: Image.open(synthetic_root / domain_file(d, (1, 0))).mode for d in SYNTHETIC_DOMAINS}
    assert modes == {
        "rgb": "RGB",
        "normal": "RGB",
        "reshading": "L",
        "depth_euclidean": "I;16",
        "depth_zbuffer": "I;16",
        "edge_occlusion": "I;16",
        "edge_texture": "I;16",
        "segment_unsup2d": "L",
    }
    rng = np.random.default_rng([3, 1])
    scene = predictable_scene(sample_scene(rng, aspect=1.0))
    arrays = render(scene, (48, 48), rng)

    def png(domain: str) -> np.ndarray:
        return np.asarray(Image.open(synthetic_root / domain_file(domain, (1, 0))))

    assert np.array_equal(png("rgb"), arrays["rgb"])
    zbuffer = png("depth_zbuffer").astype(np.float64)
    assert np.abs(zbuffer / 512 - arrays["depth"]).max() <= 1 / 1024 + 1e-6
    euclidean = png("depth_euclidean").astype(np.float64)
    assert np.all(euclidean >= zbuffer) and euclidean.max() < 65535
    edges = png("edge_occlusion")
    assert edges.max() <= 11584 and png("edge_texture").max() <= 11355
    jumps = np.abs(np.diff(arrays["depth"], axis=1)) > 0.3
    assert edges[:, 1:][jumps].min() > 0  # every big depth jump is an occlusion edge
    normal = png("normal").astype(np.float64) / 127.5 - 1
    assert np.allclose(np.linalg.norm(normal, axis=-1), 1, atol=0.02)
    for domain in SYNTHETIC_DOMAINS:
        image = read_domain(synthetic_root / domain_file(domain, (1, 0)), domain)
        assert image.shape == (3, 48, 48) and image.min() >= -1 and image.max() <= 1


def test_synthetic_photo_follows_from_shading_and_edges() -> None:
    """Translation scenes: colour is a function of what reshading and edge_texture show."""
    paint: dict[tuple, set] = {}
    for i in range(300):
        scene = predictable_scene(sample_scene(np.random.default_rng([4, i]), aspect=1.0))
        room = [(0, scene.walls), (1, scene.floor), (2, scene.ceiling)]
        surfaces = [((label, paint.pattern), paint) for label, paint in room]
        for box in scene.objects:
            if box.label in (CRATE, BLOCK, IGNORE_INDEX):  # slats or plain, tall or wide
                seen = ("tall" if box.half[1] > max(box.half[0], box.half[2]) else "wide",)
            else:  # flat pattern on a panel or box face
                seen = (box.appearance.pattern,)
            # Signs differ only by colour family and distance: neither input shows either.
            kind = "sign" if box.label in INTERACTION_CLASSES else box.label
            surfaces.append(((kind, *seen), box.appearance))
        for key, appearance in surfaces:
            assert appearance.grain == 0 and not appearance.emissive
            paint.setdefault(key, set()).add((appearance.base, appearance.second))
    assert all(len(colours) == 1 for colours in paint.values()), paint
    assert len({colours.pop() for colours in paint.values()}) >= 15
    assert len(paint) >= 20  # every class, pattern and silhouette occurs

    rng = np.random.default_rng([4, 0])
    scene = predictable_scene(sample_scene(rng, aspect=1.0))
    arrays = render(scene, (64, 64), rng)
    reshading = taskonomy_domains(arrays, scene.camera.focal * 64)["reshading"] / 255.0
    ambient, strength = HEADLIGHT
    assert np.abs(arrays["shading"] - (ambient + strength * reshading)).max() < strength / 255


def test_dataset_samples_and_shared_augmentation(tmp_path: Path) -> None:
    picture = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
    for domain in ("rgb", "normal", "reshading"):
        (tmp_path / domain).mkdir()
        for view in [(1, 0), (2, 3)]:
            image = np.repeat(picture[..., None], 3, -1) if domain != "reshading" else picture
            Image.fromarray(image).save(tmp_path / domain_file(domain, view))
    write_split_file(tmp_path / "train.txt", [(1, 0), (2, 3)])
    write_split_file(tmp_path / "val.txt", [(2, 3)])
    train = TaskonomyDataset(tmp_path, "train", [2, 1], 0, train=True, size=16, load_size=24)
    torch.manual_seed(0)
    crops = set()
    for _ in range(8):
        sample = train[1]
        assert sample["inputs"].shape == (2, 3, 16, 16) and sample["name"] == "point_2_view_3"
        assert torch.equal(sample["inputs"][0], sample["target"])
        assert torch.equal(sample["inputs"][1], sample["target"])
        crops.add(sample["target"].sum().item())
    assert len(crops) > 1  # the crop / flip draw changes between calls
    val = TaskonomyDataset(tmp_path, "val", ["reshading", "normal"], "rgb", size=20)
    sample = val[0]
    assert sample["inputs"].shape == (2, 3, 20, 20) and sample["target"].shape == (3, 20, 20)
    again = val[0]
    assert torch.equal(sample["target"], again["target"])


def test_dataset_errors_are_one_line(synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(CenError) as missing:
        TaskonomyDataset(synthetic_root, "train", [5, 2], 0)
    assert str(missing.value) == (
        "domain principal_curvature (img-type 5) missing on disk: no folder principal_curvature/ "
        f"in the data root; fetch it with `cen data taskonomy {synthetic_root} --domains "
        "principal_curvature`"
    )
    with pytest.raises(CenError, match="split file not found"):
        TaskonomyDataset(tmp_path, "train", [2, 7], 0)
    (tmp_path / "rgb").mkdir()
    (tmp_path / "reshading").mkdir()
    write_split_file(tmp_path / "val.txt", [(1, 0)])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / domain_file("reshading", (1, 0)))
    with pytest.raises(CenError, match="1 of 1 files missing") as info:
        TaskonomyDataset(tmp_path, "val", [2, 2], 0)
    assert "\n" not in str(info.value)
    (tmp_path / domain_file("rgb", (1, 0))).write_bytes(b"\x89PNG broken")
    dataset = TaskonomyDataset(tmp_path, "val", [2, 2], 0, size=8)
    with pytest.raises(CenError, match="cannot read image"):
        dataset[0]


def test_ensure_synthetic_caches_and_refuses_other_parameters(tmp_path: Path) -> None:
    root = ensure_synthetic_taskonomy(tmp_path / "cache", num_train=1, num_val=1, size=16)
    stamp = (root / "rgb" / "point_0_view_0_domain_rgb.png").stat().st_mtime_ns
    assert ensure_synthetic_taskonomy(root, num_train=1, num_val=1, size=16) == root
    assert (root / "rgb" / "point_0_view_0_domain_rgb.png").stat().st_mtime_ns == stamp
    with pytest.raises(CenError, match="was made with"):
        ensure_synthetic_taskonomy(root, num_train=2, num_val=1, size=16)


class _Recorder(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A local copy of the sample building for a few views and domains."""
    served = tmp_path / "served"
    for domain in ("rgb", "reshading", "normal"):
        (served / domain).mkdir(parents=True)
        for point in range(1, 6):
            value = np.full((4, 4), point, np.uint8)
            Image.fromarray(value).save(served / domain_file(domain, (point, 0)))
    requests: list[str] = []
    handler = functools.partial(
        type("Handler", (_Recorder,), {"requests": requests}), directory=str(served)
    )
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", served, requests
    httpd.shutdown()
    httpd.server_close()


def test_prepare_fetches_only_requested_domains_and_split_views(
    server: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    url, served, requests = server
    out = tmp_path / "out"
    present = out / domain_file("rgb", (2, 0))
    present.parent.mkdir(parents=True)
    present.write_bytes((served / domain_file("rgb", (2, 0))).read_bytes())
    splits = {"train": [(1, 0), (2, 0)], "val": [(4, 0)]}
    prepare_taskonomy(out, ["rgb", 2], base_url=url, workers=2, progress=False, splits=splits)
    assert sorted(requests) == sorted(
        f"/{domain_file(d, v)}"
        for d in ("rgb", "reshading")
        for v in [(1, 0), (4, 0), (2, 0)]
        if (d, v) != ("rgb", (2, 0))
    )
    assert not (out / "normal").exists()
    for domain in ("rgb", "reshading"):
        for view in [(1, 0), (2, 0), (4, 0)]:
            path = domain_file(domain, view)
            assert (out / path).read_bytes() == (served / path).read_bytes()
    assert read_split_file(out / "train.txt") == [(1, 0), (2, 0)]
    assert read_split_file(out / "val.txt") == [(4, 0)]
    requests.clear()
    prepare_taskonomy(out, ["rgb"], base_url=url, workers=2, progress=False, splits=splits)
    assert requests == []  # everything present: nothing fetched again
    dataset = TaskonomyDataset(out, "val", ["reshading", "reshading"], "rgb", size=4)
    assert float(dataset[0]["target"][0, 0, 0]) == pytest.approx(4 / 127.5 - 1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"train.txt": "rgb/mine.png\tlabels/mine.png"}, "its train.txt is not the train split"),
        ({"val.txt": domain_file("rgb", (5, 0)).replace("rgb", "{domain}")}, "val.txt is not"),
        ({"cenfusion-synthetic-taskonomy.json": "{}"}, "holds cenfusion-synthetic-taskonomy"),
        ({"notes/a.txt": "x"}, "holds notes, not of a Taskonomy download; give an empty"),
    ],
)
def test_prepare_refuses_a_folder_of_other_content(
    server: tuple[str, Path, list[str]], tmp_path: Path, content: dict[str, str], message: str
) -> None:
    """The download writes into its folder: another set's files would mix with its views,
    and one's own list files would be written over."""
    url, _, requests = server
    out = tmp_path / "out"
    for name, text in content.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = {p: p.read_text() for p in out.rglob("*") if p.is_file()}
    splits = {"train": [(1, 0)], "val": [(4, 0)]}
    with pytest.raises(CenError, match=message):
        prepare_taskonomy(out, ["rgb"], base_url=url, workers=1, progress=False, splits=splits)
    assert requests == [] and {p: p.read_text() for p in out.rglob("*") if p.is_file()} == before


def test_prepare_reports_missing_remote_file(
    server: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    url, _, _ = server
    with pytest.raises(CenError, match="HTTP 404") as info:
        prepare_taskonomy(
            tmp_path / "o",
            ["rgb"],
            base_url=url,
            workers=1,
            progress=False,
            splits={"train": [(9, 9)], "val": [(1, 0)]},
        )
    assert "\n" not in str(info.value)
    assert str(info.value).endswith(
        "; --base-url MIRROR for another copy (a rerun keeps the files already fetched)"
    )


def test_prepare_removes_what_is_not_an_image(
    server: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    url, served, _ = server
    (served / domain_file("rgb", (1, 0))).write_text("<html>quota exceeded</html>")
    splits = {"train": [(1, 0)], "val": [(4, 0)]}
    with pytest.raises(
        CenError, match=r"point_1_view_0_domain_rgb\.png: the file it gave is not an"
    ):
        prepare_taskonomy(
            tmp_path / "o", ["rgb"], base_url=url, workers=1, progress=False, splits=splits
        )
    assert not (tmp_path / "o" / domain_file("rgb", (1, 0))).exists()


def test_marker_lists_written_domains(synthetic_root: Path) -> None:
    marker = json.loads((synthetic_root / "cenfusion-synthetic-taskonomy.json").read_text())
    assert marker["domains"] == list(SYNTHETIC_DOMAINS)
    assert all((synthetic_root / d).is_dir() for d in SYNTHETIC_DOMAINS)
