import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cenfusion.data.class_names import (
    NYU40_CLASSES,
    SUN37_CLASSES,
    SYNTHETIC_CLASSES,
    generic_class_names,
    resolve_class_names,
)
from cenfusion.errors import CenError
from cenfusion.fusion import convert, exchange_stats, exchanging_norms
from cenfusion.info import (
    count_flops,
    format_model_info,
    info_for_encoder,
    info_from_checkpoint,
)
from cenfusion.models.unet import create_cen_unet
from cenfusion.reporting.exchange import GAMMA_EDGES, exchange_record
from cenfusion.reporting.html import write_report
from cenfusion.reporting.plots import plot_exchange_overall, write_plots
from cenfusion.reporting.runlog import load_confusion, read_run, save_confusion

CLASSES = ("wall", "floor", "ceiling", "poster", "cabinet", "cost $^$")  # "$": no mathematics
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
        assert array.std() > 5, f"{path.name} is blank"
        return image.size


def write_lines(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def shrinking_records(epochs: int) -> list[dict]:
    """Exchange records of a small converted network whose gammas are pushed towards zero."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6)
    )
    convert(net, 2, exchange_at=("1", "3"), threshold=0.02)
    records = []
    for _ in range(epochs):
        with torch.no_grad():
            for _, norm in exchanging_norms(net):
                norm.weight.mul_(torch.rand_like(norm.weight) * 0.5)
        records.append(exchange_record(net))
    return records


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A segmentation run folder written by hand: two stages of 3 epochs, a resumed epoch
    logged twice, validations at epochs 2, 3, 5, 6, an evaluation line and confusion matrices."""
    run = tmp_path_factory.mktemp("runs") / "seg"
    data = run.parent / "data"
    data.mkdir()
    (data / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    run.mkdir()
    config = {"exp": "seg", "data": str(data), "modalities": ["rgb", "depth"], "num_classes": 6}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(0)
    exchange = shrinking_records(6)
    lines = []
    for i, (stage, epoch) in enumerate([(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]):
        line = {
            "stage": stage,
            "epoch": epoch,
            "train_loss": 3.0 / (i + 1),
            "exchange": exchange[i],
            "seconds": 1.5,
        }
        if epoch != 1:
            line["val"] = {
                head: {
                    "pixel_acc": 50.0 + 5 * i + k,
                    "mean_acc": 30.0 + 4 * i,
                    "miou": 20.0 + 3 * i + k,
                    "iou": [*rng.uniform(0, 100, 5).tolist(), float("nan")],
                }
                for k, head in enumerate(("rgb", "depth", "ensemble"))
            }
        lines.append(line)
    resumed = {**lines[3], "train_loss": 99.0}
    evaluation = {
        "evaluate": "runs/seg/best.pth",
        "protocol": "multi-scale 0.5-1.5 + flip",
        "data": "data/<nyu>",
        "val": lines[-1]["val"],
    }
    write_lines(run / "metrics.jsonl", [*lines[:5], resumed, lines[5], evaluation])
    counts = rng.integers(0, 50, size=(6, 6)) + np.eye(6, dtype=np.int64) * 200
    save_confusion(run, {"rgb": torch.from_numpy(counts), "ensemble": counts})
    (run / "images").mkdir()
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (20, 60, 3), dtype=np.uint8)).save(
            run / "images" / f"{name}.png"
        )
    return run


@pytest.fixture(scope="module")
def seg_report(seg_run: Path) -> Path:
    return write_report(seg_run)


@pytest.fixture(scope="module")
def i2i_run(tmp_path_factory: pytest.TempPathFactory, i2i_data: Path) -> Path:
    """A real tiny translation run (two epochs of four 32x32 views, no FID)."""
    from cenfusion.engine.session import train
    from cenfusion.translation.config import TranslationConfig
    from cenfusion.translation.task import TRANSLATION

    root = tmp_path_factory.mktemp("i2i")
    data = i2i_data
    cfg = TranslationConfig(
        exp="i2i", runs=str(root / "runs"), data=str(data), epochs=2, val_every=1,
        batch_size=2, crop_size=32, load_size=36, num_downs=5, ngf=4, ndf=4, device="cpu",
        workers=0, fid=False,
    )  # fmt: skip
    train(TRANSLATION, cfg)
    return root / "runs" / "i2i"


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A segmentation checkpoint as training writes it, some gammas under the threshold."""
    from cenfusion.engine.checkpoint import save_checkpoint
    from cenfusion.engine.config import config_to_dict
    from cenfusion.models.refinenet import create_cen_refinenet
    from cenfusion.segmentation.config import SYNTHETIC
    from cenfusion.segmentation.modelio import model_record

    torch.manual_seed(0)
    model = create_cen_refinenet(
        backbone="resnet26", num_classes=SYNTHETIC.num_classes, decoder_width=8
    )
    with torch.no_grad():
        for _, norm in exchanging_norms(model):
            norm.weight.mul_(torch.rand_like(norm.weight) * 0.04)
    cfg = replace(SYNTHETIC, data=None, epochs=(3, 2))
    path = tmp_path_factory.mktemp("ckpt") / "last.pth"
    state = {**model_record(model), "config": config_to_dict(cfg), "stage": 1, "epoch": 4}
    save_checkpoint(path, {**state, "best": {"score": 12.5, "epoch": 3}})
    return path


def test_exchange_record_counts_each_modalitys_penalised_part() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    convert(net, 2, exchange_at=("1",), threshold=0.02)
    norm = net[1]
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.weight[0, :2] = 0.001  # 2 of modality 0's part (channels 0..3) under threshold
        norm.weight[0, 4:] = 0.0  # modality 1's part in modality 0: not penalised, not counted
        norm.weight[1, 4:] = -0.005  # all of modality 1's part (channels 4..7), by magnitude
    record = exchange_record(net)
    assert record["points"] == {"1": [0.5, 1.0]}
    assert record["overall"] == pytest.approx(6 / 8)
    assert record["overall"] == pytest.approx(exchange_stats(net).overall)
    assert record["thresholds"] == [0.02]
    edges = np.array(record["gamma_hist"]["edges"])
    counts = np.array(record["gamma_hist"]["counts"])
    assert edges.tolist() == list(GAMMA_EDGES) and counts.shape == (2, len(edges) - 1)
    assert counts.sum(1).tolist() == [4, 4]
    bin_of = lambda v: int(np.searchsorted(edges, v, side="right")) - 1
    assert counts[0, bin_of(0.001)] == 2 and counts[0, bin_of(1.0)] == 2
    assert counts[1, bin_of(0.005)] == 4
    json.dumps(record)


def test_exchange_record_puts_large_gammas_in_the_last_bin() -> None:
    net = convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), 2, exchange_at=("1",))
    with torch.no_grad():
        net[1].weight.fill_(50.0)
    counts = exchange_record(net, edges=(0.0, 0.1, 1.0))["gamma_hist"]["counts"]
    assert counts == [[0, 2], [0, 2]]
    with pytest.raises(ValueError):
        exchange_record(net, edges=(1.0, 0.5))


def test_read_run_orders_epochs_keeps_the_resumed_line_and_splits_evaluations(seg_run) -> None:
    run = read_run(seg_run)
    assert [(line["stage"], line["epoch"]) for line in run.epochs] == [
        (1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)
    ]  # fmt: skip
    assert run.xs == [1, 2, 3, 4, 5, 6]
    assert run.epochs[3]["train_loss"] == 99.0
    assert len(run.evaluations) == 1
    scores = run.score_series()
    assert set(scores) == {"pixel_acc", "mean_acc", "miou"}
    assert scores["miou"]["depth"] == ([2, 3, 5, 6], [24.0, 27.0, 33.0, 36.0])
    best_x, _ = run.best_validation()
    assert best_x == 6
    xs, overall = run.exchange_overall()
    assert xs == run.xs and overall == sorted(overall) and overall[-1] > overall[0]


def test_read_run_translation_lists_are_named_from_the_config(tmp_path) -> None:
    (tmp_path / "config.yaml").write_text("img_types: [2, 7, 0]\n")
    lines = [
        {"epoch": 1, "loss_d": 1.0, "exchange": 0.0, "l1": [0.5, 0.4, 0.3], "best": True},
        {"epoch": 2, "loss_d": 0.9, "exchange": 0.1, "l1": [0.6, 0.5, 0.45]},
    ]
    write_lines(tmp_path / "metrics.jsonl", lines)
    from cenfusion.translation.task import RUN_KIND

    assert read_run(tmp_path).score_series()["l1"]["branch 0"] == ([1, 2], [0.5, 0.6])
    run = read_run(tmp_path, RUN_KIND)
    assert run.score_series()["l1"] == {
        "reshading": ([1, 2], [0.5, 0.6]),
        "edge_texture": ([1, 2], [0.4, 0.5]),
        "ensemble": ([1, 2], [0.3, 0.45]),
    }
    assert run.best_validation()[0] == 1
    assert run.exchange_overall() == ([1, 2], [0.0, 0.1])


def test_a_run_without_exchange_points_reports_no_exchange(tmp_path) -> None:
    record = {"overall": 0.0, "thresholds": [], "points": {}}
    lines = [{"epoch": e, "loss": 1.0, "exchange": record} for e in (1, 2)]
    write_lines(tmp_path / "metrics.jsonl", lines)
    run = read_run(tmp_path)
    assert run.exchange_overall() == ([], [])
    assert plot_exchange_overall(run, tmp_path / "exchange.png") is None


def test_read_run_reports_bad_input_in_one_line(tmp_path) -> None:
    with pytest.raises(CenError, match="no metrics.jsonl"):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2,\n')
    with pytest.raises(CenError, match=r"metrics.jsonl:2: not JSON"):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("[1, 2]\n")
    with pytest.raises(CenError, match=r"metrics.jsonl:1: expected a JSON object"):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_bytes(b'{"epoch": 1}\n\x00\xff\xfe\n')
    with pytest.raises(CenError, match=r"metrics.jsonl:2: not UTF-8 text \(byte 0xff\)"):
        read_run(tmp_path)
    with pytest.raises(CenError, match=r"nowhere: no such folder, expected a run folder"):
        read_run(tmp_path / "nowhere")
    with pytest.raises(CenError, match=r"metrics.jsonl: a file, expected a run folder"):
        read_run(tmp_path / "metrics.jsonl")


def test_a_line_still_being_appended_is_left_for_later(tmp_path) -> None:
    """A running run appends its line in pieces: a last line without its newline that is
    not JSON yet is no error, while one that ends is."""
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "lo')
    assert [line["epoch"] for line in read_run(tmp_path).epochs] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}')
    assert [line["epoch"] for line in read_run(tmp_path).epochs] == [1, 2, 3]


def test_confusion_round_trip_and_bad_shape(tmp_path) -> None:
    counts = np.arange(9).reshape(3, 3)
    save_confusion(tmp_path, {"ensemble": counts})
    loaded = load_confusion(tmp_path)
    assert list(loaded) == ["ensemble"] and np.array_equal(loaded["ensemble"], counts)
    with pytest.raises(ValueError):
        save_confusion(tmp_path, {"rgb": np.zeros((2, 3))})
    assert load_confusion(tmp_path / "missing") == {}
    (tmp_path / "confusion.npz").write_bytes(b"")
    with pytest.raises(CenError, match=r"confusion.npz: not a readable .npz archive \(EOFError\)"):
        load_confusion(tmp_path)


def test_class_names_resolve_from_most_specific_source(tmp_path) -> None:
    assert resolve_class_names(3, names=["a", "b", "c"]) == ("a", "b", "c")
    with pytest.raises(ValueError):
        resolve_class_names(3, names=["a"])
    (tmp_path / "classes.txt").write_text("\ufeffx\n \ny\n", encoding="utf-8")
    assert resolve_class_names(2, tmp_path) == ("x", "y")
    # a root that names its own classes is no NYUDv2: its other counts take generic names
    assert resolve_class_names(40, tmp_path) == generic_class_names(40)
    assert resolve_class_names(40, tmp_path / "missing") == NYU40_CLASSES
    assert resolve_class_names(37) == SUN37_CLASSES
    assert resolve_class_names(5) == generic_class_names(5) == tuple(f"class {i}" for i in range(5))
    marker = tmp_path / "synth"
    marker.mkdir()
    (marker / "cenfusion-synthetic.json").write_text(json.dumps({"classes": ["p", "q", "r"]}))
    assert resolve_class_names(3, marker) == ("p", "q", "r")


def test_write_plots_draws_only_what_the_log_holds(tmp_path) -> None:
    write_lines(tmp_path / "metrics.jsonl", [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2}])
    assert write_plots(tmp_path) == [tmp_path / "plots" / "losses.png"]
    assert png_size(tmp_path / "plots" / "losses.png") == (900, 500)


def test_report_plots_segmentation(seg_run, seg_report) -> None:
    points = len(read_run(seg_run).epochs[0]["exchange"]["points"])
    expected = {
        "losses.png": (900, 500),
        "scores.png": (1200, 400),
        "exchange.png": (900, 400),
        "iou.png": (900, 120 + 30 * 6),
        "confusion_rgb.png": (300 + 16 * 6, 300 + 16 * 6),
        "confusion_ensemble.png": (300 + 16 * 6, 300 + 16 * 6),
        "exchange_map.png": (1000, 150 + 16 * points),
        "gamma_hist.png": (1000, 400),
    }
    assert {p.name: png_size(p) for p in (seg_run / "plots").iterdir()} == expected


def self_contained(page: str) -> bool:
    sources = re.findall(r'<img src="([^"]*)"', page)
    return (
        bool(sources)
        and all(s.startswith("data:image/png;base64,") for s in sources)
        and not re.search(r'(src|href)="(?!data:)', page)
        and "<script" not in page
    )


def test_report_segmentation_content(seg_report) -> None:
    page = seg_report.read_text()
    assert self_contained(page)
    assert len(re.findall("<img ", page)) == 8 + 2  # the plots and images/a.png, images/b.png
    assert "stage 2, epoch 3" in page
    heading = "Evaluation of runs/seg/best.pth (multi-scale 0.5-1.5 + flip, data/&lt;nyu&gt;)"
    assert f"<h3>{heading}</h3>" in page
    from cenfusion.reporting.html import _epoch_label

    assert _epoch_label({"stage": 2, "epoch": 20}, 20.0) == "epoch 20 (stage 2)"
    assert "Best validation, epoch 6" in page and "Last validation" not in page
    assert "<td>ensemble</td><td>77.00</td><td>50.00</td><td>37.00</td>" in page


def test_report_of_a_real_translation_run(i2i_run) -> None:
    page = write_report(i2i_run).read_text()
    assert self_contained(page) and "samples.png" in page
    views = len(list((i2i_run / "real").glob("*.png")))
    assert views == 2
    assert {p.name: png_size(p) for p in (i2i_run / "plots").iterdir()} == {
        "losses.png": (900, 500),
        "scores.png": (800, 400),  # l1 and mse (FID off)
        "exchange.png": (900, 400),
        "exchange_map.png": (1000, 150 + 16 * 3),  # encoder blocks 2..4 of 5 exchange
        "gamma_hist.png": (1000, 400),
        "samples.png": (160 * 6, 40 + 160 * views),  # 2 inputs, 2 branches, ensemble, target
    }


def test_cen_report_finds_the_task_of_a_run_folder(i2i_run, tmp_path) -> None:
    from cenfusion.cli import main
    from cenfusion.tasks import task_of_run
    from cenfusion.translation.task import TRANSLATION

    assert task_of_run(i2i_run) is TRANSLATION
    assert main(["report", str(i2i_run)]) == 0
    page = (i2i_run / "report.html").read_text()
    assert "<p>image-to-image translation, folder" in page
    assert "<td>reshading</td>" in page and "<td>edge_texture</td>" in page
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')
    for config in ("exp: x\n", "colour: red\n", ""):
        (tmp_path / "config.yaml").write_text(config)
        assert task_of_run(tmp_path) is None  # shared keys only, unknown keys, nothing
    assert main(["report", str(tmp_path)]) == 0
    assert "<p>cenfusion run, folder" in (tmp_path / "report.html").read_text()


def test_report_images_load_in_headless_chromium(seg_run, seg_report, tmp_path) -> None:
    if CHROMIUM is None:
        print("skipped: no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    probe = """<script>window.addEventListener("load", () => {
      document.body.setAttribute("data-widths",
        Array.from(document.images, i => (i.complete ? i.naturalWidth : -1)).join(","));
    });</script></body>"""
    check = tmp_path / "check.html"
    check.write_text(seg_report.read_text().replace("</body>", probe))
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
    ]  # fmt: skip
    result = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", check.as_uri()],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    found = re.search(r'data-widths="([^"]*)"', result.stdout)
    assert found, f"no result in the dumped DOM: {result.stderr[-500:]}"
    widths = [int(w) for w in found.group(1).split(",")]
    plots = sorted((seg_run / "plots").glob("*.png"))
    expected = {Image.open(p).size[0] for p in plots} | {60}
    assert len(widths) == 10 and all(w > 0 for w in widths)
    assert set(widths) == expected


def test_model_info_from_a_real_checkpoint(seg_checkpoint) -> None:
    info = info_from_checkpoint(seg_checkpoint, size=(32, 48))
    from cenfusion.segmentation.modelio import model_from_checkpoint

    model = model_from_checkpoint(seg_checkpoint).eval()
    assert info.parameters == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 3, 32, 48))
    assert info.flops == counter.get_total_flops() > 0
    assert info.modalities == ("rgb", "depth") and info.input_size == (32, 48)
    stats = exchange_stats(model)
    assert [p.name for p in info.exchange_points] == list(stats.per_point)
    for point in info.exchange_points:
        assert np.mean(point.fractions) == pytest.approx(stats.per_point[point.name])
    assert info.exchange_overall == pytest.approx(stats.overall)
    assert 0.2 < info.exchange_overall < 0.8
    assert info.progress == "4 of 5 epochs done; best ensemble mIoU 12.50"
    lines = format_model_info(info)
    assert info.target is None and not any(line.startswith("target") for line in lines)
    assert info.classes == SYNTHETIC_CLASSES
    assert f"classes ({len(SYNTHETIC_CLASSES)}): {', '.join(SYNTHETIC_CLASSES)}" in lines
    assert sum(line.strip().startswith("encoder.layer") for line in lines) == len(stats.per_point)


def test_model_info_of_a_translation_run_and_an_encoder_depth(i2i_run) -> None:
    info = info_from_checkpoint(i2i_run / "last.pth")
    assert info.task == "translation" and info.input_size == (32, 32)
    assert info.modalities == ("reshading", "edge_texture") and info.classes == ()
    assert info.target == "rgb" and "target: rgb" in format_model_info(info)
    assert [p.name for p in info.exchange_points] == ["down.1.norm", "down.2.norm", "down.3.norm"]
    unet = create_cen_unet(num_downs=5, ngf=4).train()
    assert count_flops(unet, 2, (32, 32)) == info.flops and unet.training
    fresh = info_for_encoder(50, num_classes=37, size=64)
    assert len(fresh.exchange_points) == 3 + 4 + 6 + 3 and fresh.exchange_overall == 0
    assert fresh.classes == SUN37_CLASSES and fresh.input_size == (64, 64)
    with pytest.raises(CenError, match="not a cenfusion checkpoint"):
        bad = i2i_run / "bad.pth"
        torch.save({"x": 1}, bad)
        info_from_checkpoint(bad)
