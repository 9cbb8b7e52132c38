"""Bad input gets one line and writes nothing; a kill at any write point resumes bit-exactly.

The table runs ``cen`` (``cenfusion.cli.main``) on inputs that cannot be right and expects
exit status 2, exactly one line on stderr under 200 characters naming the flag or file,
and no file created, changed or removed under the folder it would write to.

The kill tests run a tiny training in a child process whose write points (a checkpoint's
temporary file written, a file renamed into place, a metrics line appended) are wrapped so
that the N-th one sends SIGKILL to the process, for every N of an uninterrupted run. The
run is then continued, killed once more at its own N-th write point, and continued to the
end: it must end with the weights, best weights and metrics lines of the uninterrupted run,
bit for bit, and no temporary file left.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import cenfusion.engine.run as run_module
from cenfusion.cli import main
from cenfusion.data.synthetic import generate_segmentation_dataset
from cenfusion.engine.checkpoint import load_checkpoint, save_checkpoint
from cenfusion.engine.config import config_to_dict
from cenfusion.engine.session import train
from cenfusion.errors import MAX_LINE, CenError, shorten
from cenfusion.models.official import read_official_checkpoint
from cenfusion.models.refinenet import create_cen_refinenet
from cenfusion.segmentation import train as seg_train
from cenfusion.segmentation.config import SYNTHETIC, SegmentationConfig
from cenfusion.segmentation.modelio import model_record
from cenfusion.segmentation.task import SEGMENTATION
from cenfusion.translation import train as i2i_train
from cenfusion.translation.config import TranslationConfig
from cenfusion.translation.task import TRANSLATION

#: Fields of a metrics line that measure time, not results.
TIMES = ("seconds", "data_seconds", "first_step_seconds")


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seg") / "data"
    return generate_segmentation_dataset(root, num_train=4, num_val=2, size=(40, 48), seed=3)


@pytest.fixture(scope="module")
def i2i_root(i2i_data: Path) -> Path:
    return i2i_data


def save_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints and images that cannot be used, and good ones beside them."""
    folder = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    model = create_cen_refinenet(backbone="resnet26", num_classes=5, decoder_width=16).eval()
    cfg = replace(SYNTHETIC, num_classes=5, decoder_width=16)
    paths = {
        name: folder / f"{name}.pth.tar"
        for name in ("ours", "truncated", "int_keys", "objects", "no_encoder")
    }
    save_checkpoint(paths["ours"], {**model_record(model), "config": config_to_dict(cfg)})
    whole = paths["ours"].read_bytes()
    paths["truncated"].write_bytes(whole[: len(whole) // 2])
    torch.save({"segmenter": {0: torch.ones(1), 1: torch.zeros(1)}}, paths["int_keys"])
    torch.save({"segmenter": {"alpha": torch.ones(2)}, "from": Path("/x")}, paths["objects"])
    torch.save({"segmenter": {"module.alpha": torch.ones(2)}}, paths["no_encoder"])
    images = folder / "images"
    for i in range(3):
        save_image(images / "rgb" / f"{i}.png", np.full((24, 32, 3), 60 * i, np.uint8))
        save_image(images / "depth" / f"{i}.png", np.full((24, 32), 900 * i + 500, np.uint16))
    broken = images / "depth" / "1.png"
    broken.write_bytes(broken.read_bytes()[:60])
    paths["images"] = images
    paths["text"] = folder / "text.txt"
    paths["text"].write_text("not a checkpoint\n")
    paths["yaml"] = folder / "settings.yaml"
    paths["yaml"].write_text("lamda: 0.1\n")
    paths["utf16"] = folder / "utf16.yaml"
    paths["utf16"].write_bytes(b"\xff\xfe bad\n")
    paths["octal"] = folder / "octal.yaml"
    paths["octal"].write_text("batch_size: 2\nseed: 010\n")
    paths["twice"] = folder / "twice.yaml"
    paths["twice"].write_text("batch_size: 2\nworkers: 0\nbatch_size: 3\n")
    paths["fifo"] = folder / "fifo.yaml"
    os.mkfifo(paths["fifo"])
    paths["nan"] = folder / "nan.yaml"
    paths["nan"].write_text("threshold: .nan\n")
    return paths


# Flags that ``cen`` had before the shared engine too, so that the table runs there.
def seg_args(root: Path, runs: Path, exp: str = "new") -> list[str]:
    return [
        "seg", "train", "--preset", "synthetic", "--data", str(root), "--runs", str(runs),
        "-c", exp, "--backbone", "resnet26", "--crop-size", "32", "--batch-size", "2",
        "--workers", "0", "--num-epoch", "1", "--lr-enc", "0.01", "--lr-dec", "0.01",
        "--max-iters", "1",
    ]  # fmt: skip


def i2i_args(root: Path, runs: Path, exp: str = "new") -> list[str]:
    return [
        "i2i", "train", "--data", str(root), "--runs", str(runs), "-c", exp, "--size", "32",
        "--num-downs", "5", "--ngf", "4", "--ndf", "4", "--epochs", "1", "--batch-size", "2",
        "--workers", "0", "--no-fid", "--img-types", "2", "6", "0",
    ]  # fmt: skip


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder`` with its size, modification time and bytes."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def mixed_depth_root(root: Path, out: Path) -> Path:
    """A copy of ``root`` whose first depth image is 8-bit among 16-bit ones."""
    import shutil

    shutil.copytree(root, out)
    first = min((out / "depth").glob("*.png"))
    save_image(first, np.full(np.asarray(Image.open(first)).shape[:2], 20, np.uint8))
    return out


Row = Callable[[dict[str, Path], Path, Path, Path], tuple[list[str], str]]

#: (case, argv from (files, seg data, i2i data, runs), text the line must hold)
TABLE: list[tuple[str, Row]] = [
    ("lamda", lambda f, s, i, r: ([*seg_args(s, r), "--lamda", "-1"], "--lamda")),
    ("empty run name", lambda f, s, i, r: (seg_args(s, r, exp=""), "--exp '': expected")),
    ("run name .", lambda f, s, i, r: (seg_args(s, r, exp="."), "--exp '.': expected")),
    ("run name ..", lambda f, s, i, r: (i2i_args(i, r, exp=".."), "--exp '..': expected")),
    ("run name a/b", lambda f, s, i, r: (i2i_args(i, r, exp="a/b"), "--exp 'a/b': expected")),
    ("run name ../x", lambda f, s, i, r: (seg_args(s, r, exp="../x"), "--exp '../x': expected")),
    ("empty seg schedule", lambda f, s, i, r: (
        [*seg_args(s, r), "--num-epoch", "0"], "--epochs 0: nothing to train")),
    ("empty i2i schedule", lambda f, s, i, r: (
        [*i2i_args(i, r), "--epochs", "0"], "--epochs 0: expected >= 1")),
    ("lr-enc", lambda f, s, i, r: ([*seg_args(s, r), "--lr-enc", "-0.1"], "--lr-enc")),
    ("ResNet's exchange points on EfficientNet", lambda f, s, i, r: (
        [*seg_args(s, r), "--backbone", "efficientnet_b0", "--pretrained", "none"],
        "--exchange-at layer*.*.bn2: efficientnet_b0: exchange point 'layer*.*.bn2' matches none")),
    ("empty pretrained", lambda f, s, i, r: (
        [*seg_args(s, r), "--pretrained", ""], "--pretrained '': expected a value, got an")),
    ("a million loader processes", lambda f, s, i, r: (
        [*seg_args(s, r), "--workers", "1000000"], "--workers 1000000: expected 0 to 256")),
    ("a backbone without BatchNorm", lambda f, s, i, r: (
        [*seg_args(s, r), "--backbone", "convnext_atto", "--pretrained", "none"],
        "--backbone convnext_atto: the model has no BatchNorm2d to make private")),
    ("exchange point typo", lambda f, s, i, r: (
        [*seg_args(s, r), "--exchange-at", "layer*.*.bn2", "layer*.*.bn_2"],
        "exchange point 'layer*.*.bn_2' matches none")),
    ("huge seed", lambda f, s, i, r: (
        [*seg_args(s, r), "--seed", "9" * 20], f"--seed {'9' * 20}: expected 0 to")),
    ("i2i negative seed", lambda f, s, i, r: (
        [*i2i_args(i, r), "--seed", "-1"], "--seed -1: expected 0 to")),
    ("panels without evaluate", lambda f, s, i, r: (
        [*seg_args(s, r), "--save-img"], "--save-img: only with --evaluate")),
    ("evaluate with force", lambda f, s, i, r: (
        [*i2i_args(i, r), "--evaluate", "--force"], "--force: not with --evaluate")),
    ("evaluate, no checkpoint", lambda f, s, i, r: (
        [*seg_args(s, r, "none"), "--evaluate"], "--evaluate: no checkpoint (best.pth or last.pth)")),
    ("resume alone, no run", lambda f, s, i, r: (
        [*seg_args(s, r, "fresh"), "--resume"], "nothing to resume")),
    ("i2i resume alone, no run", lambda f, s, i, r: (
        [*i2i_args(i, r, "fresh"), "--resume"], "nothing to resume")),
    ("bn-threshold", lambda f, s, i, r: ([*seg_args(s, r), "--bn-threshold", "-1"], "--threshold")),
    ("crop", lambda f, s, i, r: ([*seg_args(s, r), "--crop-size", "7"], "--crop-size")),
    ("stages", lambda f, s, i, r: ([*seg_args(s, r), "--num-epoch", "1", "1"], "--epochs")),
    ("workers", lambda f, s, i, r: ([*seg_args(s, r), "--workers", "-1"], "--workers")),
    ("threads", lambda f, s, i, r: ([*seg_args(s, r), "--threads", "0"], "--threads")),
    ("gpu", lambda f, s, i, r: ([*seg_args(s, r), "--gpu", "3"], "--gpu 3")),
    ("evaluate alone", lambda f, s, i, r: ([*seg_args(s, r), "--evaluate"], "--evaluate")),
    ("save-img alone", lambda f, s, i, r: ([*seg_args(s, r), "--save-img"], "--save-img")),
    ("save-img no evaluate", lambda f, s, i, r: (
        [*seg_args(s, r), "--save-img", "--resume", str(f["ours"])], "--save-img")),
    ("existing run", lambda f, s, i, r: (seg_args(s, r, "old"), "--resume")),
    ("existing run, bad resume", lambda f, s, i, r: (
        [*seg_args(s, r, "old"), "--resume", str(f["truncated"]), "--lamda", "5"], "truncated")),
    ("truncated resume", lambda f, s, i, r: (
        [*seg_args(s, r), "--resume", str(f["truncated"])], "truncated.pth.tar")),
    ("missing resume", lambda f, s, i, r: (
        [*seg_args(s, r), "--resume", str(r.parent / "none.pth")], "none.pth")),
    ("pickled objects resume", lambda f, s, i, r: (
        [*seg_args(s, r), "--resume", str(f["objects"])], "objects.pth.tar")),
    ("mixed depth", lambda f, s, i, r: (
        seg_args(mixed_depth_root(s, r.parent / "mixed"), r), "8-bit")),
    ("i2i lamda", lambda f, s, i, r: ([*i2i_args(i, r), "--lamda", "-1"], "--lamda")),
    ("i2i crop", lambda f, s, i, r: ([*i2i_args(i, r), "--crop-size", "7"], "--crop-size")),
    ("i2i lr", lambda f, s, i, r: ([*i2i_args(i, r), "--lr-g", "0"], "--lr-g")),
    ("i2i batch beyond the views", lambda f, s, i, r: (
        [*i2i_args(i, r), "--batch-size", "100000"], "views, fewer than one batch per process")),
    ("negative mask column", lambda f, s, i, r: (
        [*seg_args(s, r), "--mask-column", "-1"], "--mask-column -1: expected >= 0")),
    ("modality name with a slash", lambda f, s, i, r: (
        [*seg_args(s, r), "--modalities", "a/b:0:rgb", "depth:2:depth"],
        "modality name 'a/b': expected letters")),
    ("i2i one level", lambda f, s, i, r: (
        [*i2i_args(i, r), "--num-downs", "1"], "--num-downs 1: expected >= 2")),
    ("i2i img-types 99 0", lambda f, s, i, r: (
        [*i2i_args(i, r), "--img-types", "99", "0"], "--img-types: 99 is out of range")),
    ("export a text file", lambda f, s, i, r: (
        ["export", "onnx", str(f["text"]), str(r / "m.onnx")], "text.txt: neither")),
    ("export a YAML file", lambda f, s, i, r: (
        ["export", "onnx", str(f["yaml"]), str(r / "m.onnx")], "not a PyTorch file)")),
    ("i2i gpu", lambda f, s, i, r: ([*i2i_args(i, r), "--gpu", "3"], "--gpu 3")),
    ("i2i existing run", lambda f, s, i, r: (i2i_args(i, r, "old"), "--resume")),
    ("i2i truncated resume", lambda f, s, i, r: (
        [*i2i_args(i, r), "--resume", str(f["truncated"])], "truncated.pth.tar")),
    ("convert int keys", lambda f, s, i, r: (
        ["convert-official", str(f["int_keys"]), str(r / "out.pth")], "int_keys.pth.tar")),
    ("convert objects", lambda f, s, i, r: (
        ["convert-official", str(f["objects"]), str(r / "out.pth")], "objects.pth.tar")),
    ("convert truncated", lambda f, s, i, r: (
        ["convert-official", str(f["truncated"]), str(r / "out.pth")], "truncated or damaged")),
    ("convert ours", lambda f, s, i, r: (
        ["convert-official", str(f["ours"]), str(r / "out.pth")], "already a cenfusion")),
    ("convert no encoder", lambda f, s, i, r: (
        ["convert-official", str(f["no_encoder"]), str(r / "out.pth")], "no layer3")),
    ("predict corrupt image", lambda f, s, i, r: (
        ["seg", "predict", str(f["ours"]), str(f["images"]), "-o", str(r / "out"),
         "--device", "cpu"], "1.png")),
    ("i2i crop below the discriminator's", lambda f, s, i, r: (
        [*i2i_args(i, r), "--crop-size", "16", "--num-downs", "4"],
        "--crop-size 16: expected at least 24")),
    ("i2i inception not TorchScript", lambda f, s, i, r: (
        [*i2i_args(i, r), "--fid", "--inception", str(f["text"])],
        f"--inception {f['text']}: not loadable by torch.jit")),
    ("config not UTF-8", lambda f, s, i, r: (
        [*seg_args(s, r), "--config", str(f["utf16"])], "utf16.yaml: not UTF-8 text")),
    ("config integer that YAML reads as octal", lambda f, s, i, r: (
        [*seg_args(s, r), "--config", str(f["octal"])],
        "octal.yaml: line 2: '010' reads as 8 in YAML; write the decimal number")),
    ("config key given twice", lambda f, s, i, r: (
        [*seg_args(s, r), "--config", str(f["twice"])], "twice.yaml: line 3: batch_size is given")),
    ("config a pipe", lambda f, s, i, r: (
        [*i2i_args(i, r), "--config", str(f["fifo"])], "fifo.yaml: not a regular file")),
    ("config a folder", lambda f, s, i, r: (
        [*i2i_args(i, r), "--config", str(f["images"])], "images: a folder, expected a YAML")),
    ("threshold nan", lambda f, s, i, r: (
        [*seg_args(s, r), "--threshold", "nan"], "--threshold nan: expected a finite number")),
    ("i2i threshold nan", lambda f, s, i, r: (
        [*i2i_args(i, r), "-t", "nan"], "--threshold nan: expected a finite number")),
    ("lamda inf", lambda f, s, i, r: (
        [*seg_args(s, r), "--lamda", "inf"], "--lamda inf: expected a finite number")),
    ("i2i lr-g -inf", lambda f, s, i, r: (
        [*i2i_args(i, r), "--lr-g=-inf"], "--lr-g -inf: expected a finite number")),
    ("nan in YAML", lambda f, s, i, r: (
        [*seg_args(s, r), "--config", str(f["nan"])], "--threshold nan: expected a finite")),
    ("momentum 2", lambda f, s, i, r: (
        [*seg_args(s, r), "--momentum-enc", "2"], "--momentum-enc 2.0: expected 0 <= m < 1")),
    ("i2i img-types 11, every domain shown", lambda f, s, i, r: (
        [*i2i_args(i, r), "--img-types", "11", "0"],
        ("11 is out of range (0=rgb 1=normal 2=reshading 3=depth_euclidean 4=depth_zbuffer "
         "5=principal_curvature 6=edge_occlusion 7=edge_texture 8=segment_unsup2d "
         "9=segment_unsup25d)"))),
    ("predict a run folder", lambda f, s, i, r: (
        ["seg", "predict", str(r / "old"), str(f["images"]), "-o", str(r / "out")],
        "old: a folder, expected a checkpoint file (it holds last.pth)")),
    ("info a run folder", lambda f, s, i, r: (
        ["info", str(r / "old")], "old: a folder, expected a")),
    ("eval a folder", lambda f, s, i, r: (
        ["seg", "eval", "--resume", str(f["images"]), "--data", str(s)],
        "images: a folder, expected a checkpoint file")),
    ("predict depth-scale -1", lambda f, s, i, r: (
        ["seg", "predict", str(f["ours"]), str(f["images"]), "-o", str(r / "out"),
         "--depth-scale", "-1"], "--depth-scale -1.0: expected >= 0")),
    ("predict depth-scale nan", lambda f, s, i, r: (
        ["seg", "predict", str(f["ours"]), str(f["images"]), "-o", str(r / "out"),
         "--depth-scale", "nan"], "--depth-scale nan: expected a finite number")),
    ("predict into a file", lambda f, s, i, r: (
        ["seg", "predict", str(f["ours"]), str(f["images"]), "-o", str(r / "old" / "last.pth")],
        "last.pth: a file, expected a folder")),
    ("predict with --threads 0", lambda f, s, i, r: (
        ["seg", "predict", str(f["ours"]), str(f["images"]), "-o", str(r / "t"), "--threads", "0"],
        "--threads 0: expected 1 to 1024")),
    ("predict into a file's subfolder", lambda f, s, i, r: (
        ["seg", "predict", str(f["ours"]), str(f["images"]), "-o", str(f["text"] / "out")],
        "out: a path inside the file")),
    ("predict FOLDER and --rgb", lambda f, s, i, r: (
        ["seg", "predict", str(f["ours"]), str(f["images"]), "--rgb", str(f["images"] / "rgb"),
         "-o", str(r / "out")], "and --rgb: give folders with one subfolder per modality")),
]  # fmt: skip


@pytest.mark.parametrize(("case", "row"), TABLE, ids=[case for case, _ in TABLE])
def test_bad_input_gives_one_line_and_writes_nothing(
    case: str, row: Row, files, seg_root, i2i_root, tmp_path, capsys
) -> None:
    runs = tmp_path / "runs"
    old = runs / "old"
    old.mkdir(parents=True)
    (old / "config.yaml").write_text("lamda: 0.1\n")
    (old / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')
    (old / "last.pth").write_bytes(b"weights of a previous run")
    argv, needle = row(files, seg_root, i2i_root, runs)
    before = snapshot(runs)
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cen: error: ") and len(lines[0]) <= MAX_LINE, lines[0]
    assert needle in lines[0], lines[0]
    assert "(0)" not in lines[0] and "Traceback" not in err
    assert snapshot(runs) == before


def test_a_run_folder_for_a_checkpoint_names_the_file_to_give(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "t1").mkdir(parents=True)
    (tmp_path / "runs" / "t1" / "best.pth").write_bytes(b"")
    with pytest.raises(CenError) as info:
        load_checkpoint("runs/t1")
    assert str(info.value) == "runs/t1: a folder, expected a checkpoint file (it holds best.pth)"
    with pytest.raises(CenError, match=r"^runs: a folder, expected a checkpoint file$"):
        read_official_checkpoint(Path("runs"))


def test_a_long_line_loses_whole_words_from_its_middle() -> None:
    folder = "/data/" + "long-folder-name/" * 8
    line = (
        f"domain principal_curvature (img-type 5) missing on disk: no folder {folder}"
        f"principal_curvature; fetch it with `cen data taskonomy {folder} --domains "
        "principal_curvature`"
    )
    cut = shorten(line, MAX_LINE - len("cen: error: "))
    assert len(cut) <= MAX_LINE - len("cen: error: ")
    head, tail = cut.split(" ... ")
    assert line.startswith(head + " ") and line.endswith(" " + tail)
    assert head.startswith("domain principal_curvature (img-type 5) missing on disk")
    assert tail.endswith("--domains principal_curvature`")
    assert shorten("x" * 50, 20) == "x" * 8 + " ... " + "x" * 7


def test_a_long_line_first_loses_the_folders_of_its_urls() -> None:
    """The cause in a download error's middle outlives the middle of its URL."""
    url = "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat"
    short = "http://horatio.cs.nyu.edu/.../nyu_depth_v2_labeled.mat"
    line = (
        f"cannot download {url} after 4 attempts: Temporary failure in name resolution; "
        "fetch it another way and pass its folder with --from DIR, or point its URL flag at a "
        "mirror"
    )
    assert shorten(line, len(line)) == line
    assert shorten(line, len(line) - 1) == line.replace(url, short)
    cut = shorten(line, 120)
    assert cut.startswith(f"cannot download {short} after") and " ... " in cut


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                "allocate memory: you tried to allocate 10000000000000 bytes. Error code 12"
            ),
            "(DefaultCPUAllocator: can't allocate memory: you tried to allocate 1000000",
        ),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "(CUDA out"),
        (RuntimeError("Storage size calculation overflowed with sizes=[3, 10, 10]"), "(Storage"),
        (MemoryError(), "(MemoryError)"),
    ],
)
def test_a_size_the_memory_cannot_hold_is_one_line_not_a_bug_report(
    seg_root, tmp_path, monkeypatch, capsys, error, said
) -> None:
    def too_big(*args: object, **kwargs: object) -> None:
        raise error

    from cenfusion.engine import session

    monkeypatch.setattr(session, "train", too_big)
    assert main(seg_args(seg_root, tmp_path)) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"cen: error: out of memory {said}") and len(line) <= MAX_LINE
    assert line.endswith(
        "; smaller --batch-size, --crop-size, --size or --scales, or --amp, may fit"
    )


def test_a_loader_workers_memory_error_is_said_and_sizes_advised_where_they_are_flags() -> None:
    from cenfusion.cli import _memory_line

    worker = RuntimeError(
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\nRuntimeError: [enforce fail at '
        "alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 80 bytes. Error code 12 (Cannot allocate memory)"
    )
    assert _memory_line(worker, "data") == (
        "out of memory (DefaultCPUAllocator: can't allocate memory: you tried to allocate 80 "
        "bytes. Error code 12 (Cannot allocate memory))"
    )
    assert _memory_line(worker, "seg").endswith("or --amp, may fit")
    assert _memory_line(worker, "bench").endswith(
        "; smaller --size, --train-size, --batch or --train-batch may fit"
    )
    assert _memory_line(worker, "demo") == _memory_line(worker, "data")


def test_internal_error_shows_a_short_traceback_and_how_to_report(
    seg_root, tmp_path, monkeypatch, capsys
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    from cenfusion.engine import session

    monkeypatch.setattr(session, "train", broken)
    status = main(seg_args(seg_root, tmp_path))
    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err and "report" in err
    assert err.count('File "') <= 4


# --- operating-system errors -------------------------------------------------------------


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("cen: error: ") and "Traceback" not in lines[0]
    return lines[0]


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(
    seg_root, tmp_path, monkeypatch, capsys
) -> None:
    """torch.save's zip writer words a full disk as a RuntimeError; the run says what it is."""
    runs = tmp_path / "runs"
    assert main(seg_args(seg_root, runs, "full")) == 0
    last = runs / "full" / "last.pth"
    before = last.read_bytes()

    def no_space(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", no_space)
    full = SimpleNamespace(total=10**9, used=10**9 - 4096, free=4096)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    capsys.readouterr()
    status = main([*seg_args(seg_root, runs, "full"), "--resume", "--num-epoch", "2"])
    line = _one_error_line(capsys)
    assert status == 2
    assert "full/" in line and ".pth: No space left on device" in line
    assert last.read_bytes() == before
    assert not [p.name for p in (runs / "full").iterdir() if p.name.startswith(".")]


def test_a_read_only_folder_is_one_line_naming_the_file(
    seg_root, tmp_path, monkeypatch, capsys
) -> None:
    def read_only(path: Path, record: dict) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(run_module, "append_metrics", read_only)
    status = main(seg_args(seg_root, tmp_path / "runs", "ro"))
    line = _one_error_line(capsys)
    assert status == 2 and line.endswith("ro/metrics.jsonl: Read-only file system")


# --- kills -------------------------------------------------------------------------------


class WritePoints:
    """Counts write points (and, with ``steps``, training steps: a kill there is one
    mid-epoch); the ``kill_at``-th one SIGKILLs this process (0: never). ``kinds`` names
    each point: ``save``, ``replace``, ``append``, ``image`` (a picture written, e.g. a
    translation prediction) or ``step``."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, kill_at: int = 0, steps: bool = False
    ) -> None:
        self.count, self.kill_at = 0, kill_at
        self.kinds: list[str] = []
        real_save, real_replace = torch.save, os.replace
        real_append = run_module.append_metrics
        for recipe in (seg_train.SegmentationRecipe, i2i_train.TranslationRecipe) if steps else ():
            real_step = recipe.train_step

            def step(recipe: object, batch: dict, real_step=real_step) -> dict:
                out = real_step(recipe, batch)
                self.point("step")
                return out

            monkeypatch.setattr(recipe, "train_step", step)

        def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
            real_save(obj, f, *args, **kwargs)
            self.point("save")

        def replace_(src: str | Path, dst: str | Path) -> None:
            real_replace(src, dst)
            self.point("replace")

        def append(path: Path, record: dict) -> None:
            real_append(path, record)
            self.point("append")

        real_image_save = Image.Image.save

        def image_save(image: Image.Image, *args: object, **kwargs: object) -> None:
            real_image_save(image, *args, **kwargs)
            self.point("image")

        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(os, "replace", replace_)
        monkeypatch.setattr(Image.Image, "save", image_save)
        for module in (run_module, seg_train, i2i_train):
            if getattr(module, "append_metrics", None) is real_append:
                monkeypatch.setattr(module, "append_metrics", append)

    def point(self, kind: str) -> None:
        self.count += 1
        self.kinds.append(kind)
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


#: Children come from a fork server, a clean process that has only imported these modules: a
#: process that has run autograd on a machine with a GPU (autograd's device threads) cannot
#: fork a child that runs autograd again, and pytest's own process has.
FORK_SERVER = multiprocessing.get_context("forkserver")
FORK_SERVER.set_forkserver_preload(
    [
        "torch",
        "pytest",
        "cenfusion.cli",
        "cenfusion.segmentation.task",
        "cenfusion.translation.task",
    ]
)


def killed_run(kill_at: int, *args: object) -> bool:
    """:func:`train_run` ``(*args)`` in a child process killed at write point ``kill_at``;
    returns whether it was killed."""
    child = FORK_SERVER.Process(target=_train_until_killed, args=(kill_at, *args))
    child.start()
    child.join()
    if child.exitcode == -signal.SIGKILL:
        return True
    assert child.exitcode == 0, f"the child failed (exit code {child.exitcode})"
    return False


def outcome(run_dir: Path) -> dict[str, object]:
    """Weights of last and best checkpoints, metrics lines without their timings, and the
    pictures the run wrote (translation predictions)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [{k: v for k, v in json.loads(line).items() if k not in TIMES} for line in lines]
    weights = {
        name: torch.load(run_dir / name, map_location="cpu", weights_only=True)["model"]
        for name in ("last.pth", "best.pth")
    }
    images = {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*.png"))}
    return {"metrics": records, "images": images, **weights}


def assert_same(got: dict[str, object], expected: dict[str, object]) -> None:
    assert got["metrics"] == expected["metrics"]
    assert got["images"] == expected["images"]
    for name in ("last.pth", "best.pth"):
        assert got[name].keys() == expected[name].keys()
        for key, value in expected[name].items():
            assert torch.equal(got[name][key], value), f"{name} {key}"


Config = SegmentationConfig | TranslationConfig


def train_run(config: Config, exp: str, resume: bool, force: bool) -> None:
    """Train run ``exp`` of ``config``, from its ``last.pth`` with ``resume``."""
    task = SEGMENTATION if isinstance(config, SegmentationConfig) else TRANSLATION
    last = Path(config.runs) / exp / "last.pth" if resume else None
    train(task, replace(config, exp=exp), last, force=force)


def _train_until_killed(kill_at: int, *args: object) -> None:
    """The child of :func:`killed_run`."""
    with pytest.MonkeyPatch.context() as patch:
        WritePoints(patch, kill_at, steps=args[0].workers > 0)
        train_run(*args)


def check_kills(config: Config, monkeypatch) -> None:
    """Train a tiny run of ``config``, then kill one at every write point; with data-loading
    workers (whose processes make each run several times slower), at one step in the middle
    of the second epoch and in the first checkpoint write instead."""
    runs = Path(config.runs)
    with monkeypatch.context() as patch:
        points = WritePoints(patch, steps=config.workers > 0)
        train_run(config, "reference", False, False)
    expected = outcome(runs / "reference")
    assert points.count >= 8
    kill_points = range(1, points.count + 1)
    if config.workers > 0:
        first_save = points.kinds.index("save")
        mid_epoch = points.kinds.index("step", first_save)
        assert points.kinds[mid_epoch + 1] == "step", "the second epoch has two steps"
        kill_points = [mid_epoch + 1, first_save + 1]
    for kill_at in kill_points:
        exp = f"kill{kill_at}"
        assert killed_run(kill_at, config, exp, False, False)
        killed, again = True, kill_at
        while killed:
            resume = (runs / exp / "last.pth").is_file()
            killed, again = killed_run(again, config, exp, resume, not resume), 0
        assert_same(outcome(runs / exp), expected)
        left = [p.name for p in (runs / exp).iterdir() if p.name.startswith(".")]
        assert not left, f"kill at write point {kill_at} left {left}"
        for folder in [runs / exp, *runs.glob(f"{exp}.old-*")]:
            shutil.rmtree(folder)  # a checked run is not needed again: the suite's disk stays small


def test_segmentation_killed_at_every_write_point_resumes_bit_exactly(
    seg_root, tmp_path, monkeypatch
) -> None:
    base = replace(
        SYNTHETIC, data=seg_root, runs=tmp_path, backbone="resnet10t", decoder_width=16,
        crop_size=32, min_short_side=32, batch_size=2, workers=0, epochs=(1, 1),
        lr_enc=(0.02, 0.01), lr_dec=(0.02, 0.01), val_every=1, device="cpu", max_iters=2,
        threads=1, quiet=True, plots=False,
    )  # fmt: skip
    check_kills(base, monkeypatch)


def test_translation_killed_at_every_write_point_resumes_bit_exactly(
    i2i_root, tmp_path, monkeypatch
) -> None:
    base = TranslationConfig(
        runs=str(tmp_path), data=str(i2i_root), epochs=2, val_every=1, batch_size=2,
        crop_size=32, load_size=36, num_downs=5, ngf=4, ndf=4, device="cpu", workers=0,
        fid=False, threads=1, quiet=True, plots=False,
    )  # fmt: skip
    check_kills(base, monkeypatch)


@pytest.mark.parametrize("task", ["segmentation", "translation"])
def test_killed_with_loader_workers_resumes_bit_exactly(
    task, seg_root, i2i_root, tmp_path, monkeypatch
) -> None:
    """The default two data-loading workers, each with its own random state: a kill in the
    middle of an epoch and one in a checkpoint write resume to the uninterrupted run."""
    common = {"batch_size": 2, "workers": 2, "device": "cpu", "threads": 1, "quiet": True}
    if task == "segmentation":
        config: Config = replace(
            SYNTHETIC, data=seg_root, runs=tmp_path, backbone="resnet10t", decoder_width=16,
            crop_size=32, min_short_side=32, epochs=(1, 1), lr_enc=(0.02, 0.01),
            lr_dec=(0.02, 0.01), val_every=1, max_iters=2, plots=False, **common,
        )  # fmt: skip
    else:
        config = TranslationConfig(
            runs=str(tmp_path), data=str(i2i_root), epochs=2, val_every=1, crop_size=32,
            load_size=36, num_downs=5, ngf=4, ndf=4, fid=False, plots=False, **common,
        )  # fmt: skip
    check_kills(config, monkeypatch)


def test_a_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path: Path) -> None:
    folder = run_module.RunFolder.open(tmp_path / "cut", resuming=False, force=False)
    for epoch in (1, 2):
        folder.append_metrics({"epoch": epoch, "loss": 1.0 / epoch})
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "lo')
    folder.truncate_metrics(2)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_every_reader_says_the_same_of_a_file_that_is_no_checkpoint(tmp_path) -> None:
    text, empty = tmp_path / "text.pth", tmp_path / "empty.pth"
    config = tmp_path / "log.pth"  # a pickle's GLOBAL opcode, then no module path
    text.write_text("not a checkpoint\n")
    empty.write_bytes(b"")
    config.write_text("Config (\n  a: 1\n)\n")
    cases = ((text, "not a PyTorch file"), (empty, "truncated or damaged"))
    for path, why in (*cases, (config, "not a PyTorch file")):
        with pytest.raises(CenError) as ours:
            load_checkpoint(path)
        with pytest.raises(CenError) as released:
            read_official_checkpoint(path)
        assert why in str(ours.value) and why in str(released.value)


def test_a_models_bare_state_dict_is_named_for_what_it_is(tmp_path) -> None:
    from cenfusion.models.unet import create_cen_unet

    path = tmp_path / "sd.pth"
    torch.save(create_cen_unet(ngf=4, num_downs=5).state_dict(), path)
    said = r"sd.pth: a model's state dict, without its settings; load it into its model \(lo"
    with pytest.raises(CenError, match=said):
        load_checkpoint(path)
