"""``check_dataset``: every line, file, size, bit depth and label of a data root, cached."""

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cenfusion.data import check
from cenfusion.data.check import check_dataset
from cenfusion.data.listfile import ModalitySpec, nyudv2_modalities
from cenfusion.data.own_images import check_images
from cenfusion.errors import CenError

HEIGHT, WIDTH = 6, 8
NUM_CLASSES = 3
TRAIN = ("t0", "t1", "t2")
VAL = ("v0", "v1")


def save_rgb(path: Path, seed: int, size: tuple[int, int] = (HEIGHT, WIDTH)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def save_depth(path: Path, seed: int, size=(HEIGHT, WIDTH), dtype=np.uint16) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(1, 250, size).astype(dtype)).save(path)


def save_mask(path: Path, seed: int, labels=(0, 1, 2, 255), size=(HEIGHT, WIDTH)) -> None:
    rng = np.random.default_rng(seed)
    values = np.array(labels, dtype=np.uint8)[rng.integers(0, len(labels), size)]
    values.flat[: len(labels)] = labels
    Image.fromarray(values, mode="L").save(path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A good root in the released NYUDv2 layout: rgb, mask, depth (16-bit) columns."""
    data = tmp_path / "data"
    for folder in ("rgb", "depth", "masks"):
        (data / folder).mkdir(parents=True)
    for seed, name in enumerate(TRAIN + VAL):
        save_rgb(data / "rgb" / f"{name}.png", seed)
        save_depth(data / "depth" / f"{name}.png", seed)
        save_mask(data / "masks" / f"{name}.png", seed)
    for list_name, names in (("train.txt", TRAIN), ("val.txt", VAL)):
        lines = [f"rgb/{n}.png\tmasks/{n}.png\tdepth/{n}.png" for n in names]
        (data / list_name).write_text("\n".join(lines) + "\n")
    return data


def run(root: Path, tmp_path: Path, **kwargs) -> tuple[check.CheckReport | None, list[str]]:
    """Check train and val; returns the report (None on failure) and the reported lines."""
    lines: list[str] = []
    arguments = {
        "num_classes": NUM_CLASSES,
        "cache_dir": tmp_path / "cache",
        "progress": False,
        "report": lines.append,
    }
    try:
        modalities = kwargs.pop("modalities", nyudv2_modalities())
        report = check_dataset(
            root, ["train.txt", "val.txt"], modalities, **{**arguments, **kwargs}
        )
    except CenError as err:
        if not lines:  # one problem: its error line alone says it
            return None, [str(err)]
        more = re.fullmatch(r"\.\.\. and (\d+) more problems", lines[-1])
        total = len(lines) - 1 + int(more[1]) if more else len(lines)
        assert total > 1 and str(err) == f"{lines[0]} (1 of {total} problems)"
        return None, lines
    assert not lines
    return report, lines


def test_good_root_passes(root: Path, tmp_path: Path) -> None:
    report, _ = run(root, tmp_path)
    assert report is not None
    assert report.samples == 5
    assert report.files == 15
    assert report.read == 15
    assert report.depth_bits == {"depth": 16}
    assert report.labels == (0, 1, 2, 255)


def test_a_mask_column_that_is_an_input_column_is_refused(root: Path, tmp_path: Path) -> None:
    depth_on_masks = [ModalitySpec("rgb", 0, "rgb"), ModalitySpec("depth", 1, "depth")]
    with pytest.raises(CenError, match=r"^--mask-column 1 is also the column of modality depth"):
        check_dataset(root, ["train.txt"], depth_on_masks, NUM_CLASSES, cache_dir=tmp_path)


def test_a_sample_in_both_lists_is_warned_of(root: Path, tmp_path: Path) -> None:
    """A validation list sharing samples with the training list scores what was trained on:
    one warning, the check passes."""
    append_line(root / "val.txt", "rgb/t1.png\tmasks/t1.png\tdepth/t1.png")
    said: list[str] = []
    arguments = {"cache_dir": tmp_path / "cache", "progress": False, "report": said.append}
    lists = ["train.txt", "val.txt"]
    report = check_dataset(root, lists, nyudv2_modalities(), NUM_CLASSES, **arguments)
    assert report.samples == 6
    assert said == [
        f"warning: 1 sample of {root / 'val.txt'} is also in train.txt, e.g. the one of rgb/t1.png"
    ]
    said.clear()
    check_dataset(root, ["val.txt", "val.txt"], nyudv2_modalities(), NUM_CLASSES, **arguments)
    assert said == []
    append_line(root / "val.txt", "rgb/t1.png\tmasks/t1.png\tdepth/t1.png")  # now twice
    check_dataset(root, ["val.txt"], nyudv2_modalities(), NUM_CLASSES, **arguments)
    once = "lists 1 sample more than once, e.g. the one of rgb/t1.png; each line counts"
    assert said == [f"warning: {root / 'val.txt'} {once}"]


def append_line(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing file": (
        lambda r: (r / "depth" / "v1.png").unlink(),
        r"val\.txt:2: file depth/v1\.png does not exist$",
    ),
    "column count": (
        lambda r: append_line(r / "train.txt", "rgb/t0.png\tmasks/t0.png"),
        r"train\.txt:4: expected 3 tab-separated columns like the first line, got 2$",
    ),
    "size mismatch": (
        lambda r: save_depth(r / "depth" / "t1.png", 1, size=(HEIGHT, WIDTH + 2)),
        r"train\.txt:2: depth/t1\.png is 6x10, expected 6x8 like its mask masks/t1\.png$",
    ),
    "label out of range": (
        lambda r: save_mask(r / "masks" / "v0.png", 3, labels=(0, 7, 255)),
        r"val\.txt:1: mask masks/v0\.png has label 7, expected 0\.\.2 or 255 \(ignore\)$",
    ),
    "8-bit depth among 16-bit": (
        lambda r: save_depth(r / "depth" / "t2.png", 2, dtype=np.uint8),
        (
            r"train\.txt:3: depth depth/t2\.png is 8-bit, expected 16-bit like 4 others "
            r"\(--allow-mixed-depth to accept\)$"
        ),
    ),
    "corrupt PNG": (
        lambda r: truncate(r / "rgb" / "v0.png"),
        r"val\.txt:1: cannot read image rgb/v0\.png: ",
    ),
    "colour mask": (
        lambda r: save_rgb(r / "masks" / "t0.png", 0),
        r"train\.txt:1: mask masks/t0\.png has mode RGB, expected an 8-bit single-channel",
    ),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_each_bad_case_is_one_line(root: Path, tmp_path: Path, case: str) -> None:
    damage, pattern = BAD_CASES[case]
    damage(root)
    report, lines = run(root, tmp_path)
    assert report is None
    assert len(lines) == 1, lines
    assert re.search(pattern, lines[0]), lines[0]
    assert "\n" not in lines[0] and len(lines[0]) < 200


def test_all_problems_are_reported_up_to_the_cap(root: Path, tmp_path: Path) -> None:
    for name in TRAIN + VAL:
        save_mask(root / "masks" / f"{name}.png", 0, labels=(0, 9))
    (root / "rgb" / "t0.png").unlink()
    report, lines = run(root, tmp_path)
    assert report is None and len(lines) == 6
    assert sum("train.txt:1: file rgb/t0.png does not exist" in line for line in lines) == 1
    _, capped = run(root, tmp_path, max_problems=2)
    assert capped[2:] == ["... and 4 more problems"]


def test_a_column_every_line_lacks_is_one_problem_per_list(root: Path, tmp_path: Path) -> None:
    rgb, depth = nyudv2_modalities()
    far = [rgb, dataclasses.replace(depth, column=9)]
    report, lines = run(root, tmp_path, modalities=far)
    assert report is None and len(lines) == 2
    assert lines[0].startswith(f"{root / 'train.txt'}:1: expected at least 10 tab-separated")
    assert lines[0].endswith("got 3; 2 more lines are as short")
    assert lines[1].endswith("val.txt:1: expected at least 10 tab-separated columns "
                             "(columns [0, 1, 9] are read), got 3; 1 more line is as short")  # fmt: skip


def test_mixed_depth_accepted_when_allowed(root: Path, tmp_path: Path) -> None:
    save_depth(root / "depth" / "t2.png", 2, dtype=np.uint8)
    report, _ = run(root, tmp_path, allow_mixed_depth=True)
    assert report is not None and report.depth_bits == {"depth": 16}


def test_second_run_reads_nothing_until_a_file_changes(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[Path] = []
    real = check.read_facts

    def counting(path: Path, role: str) -> check.FileFacts:
        reads.append(path)
        return real(path, role)

    monkeypatch.setattr(check, "read_facts", counting)
    assert run(root, tmp_path)[0] is not None and len(reads) == 15
    reads.clear()
    report, _ = run(root, tmp_path)
    assert reads == [] and report is not None and report.read == 0
    assert report.labels == (0, 1, 2, 255)
    # The cache holds facts, not verdicts: a smaller class count is checked without reading.
    report, lines = run(root, tmp_path, num_classes=2)
    assert reads == [] and report is None and "has label 2, expected 0..1" in lines[0]

    mask = root / "masks" / "t1.png"
    stat = mask.stat()
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert run(root, tmp_path)[0] is not None and reads == [mask]
    reads.clear()
    save_mask(mask, 1, labels=(0, 7, 255))  # another size and another label
    report, lines = run(root, tmp_path)
    assert reads == [mask] and report is None and "has label 7" in lines[0]


def test_cache_lives_in_the_given_folder(root: Path, tmp_path: Path) -> None:
    run(root, tmp_path)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert not list(root.rglob("*.json"))


def test_bad_arguments_are_one_line(root: Path, tmp_path: Path) -> None:
    with pytest.raises(CenError, match="list file .*test.txt does not exist"):
        check_dataset(root, ["test.txt"], nyudv2_modalities(), 3, cache_dir=tmp_path)
    with pytest.raises(CenError, match="data root .* is not a folder$"):
        check_dataset(root / "nope", ["train.txt"], nyudv2_modalities(), 3, cache_dir=tmp_path)
    where = re.escape(f"data root nope is not a folder (looked for from {Path.cwd()}; --data")
    with pytest.raises(CenError, match=f"^{where}"):
        check_dataset(Path("nope"), ["train.txt"], nyudv2_modalities(), 3, cache_dir=tmp_path)
    with pytest.raises(CenError, match="--num-classes 0: expected 1..255"):
        check_dataset(root, ["train.txt"], nyudv2_modalities(), 0, cache_dir=tmp_path)
    with pytest.raises(CenError, match="^list file .*rgb is a folder, expected a text file"):
        check_dataset(root, ["rgb"], nyudv2_modalities(), 3, cache_dir=tmp_path)


def test_list_files_are_utf8_with_or_without_a_byte_order_mark(root: Path, tmp_path: Path) -> None:
    """Windows editors write a byte-order mark first; a Latin-1 name is one line naming it."""
    text = (root / "train.txt").read_text()
    (root / "train.txt").write_text(text, encoding="utf-8-sig")
    report, _ = run(root, tmp_path)
    assert report is not None and report.samples == 5
    (root / "train.txt").write_bytes(text.encode() + "rgb/\xe9.png\n".encode("latin-1"))
    with pytest.raises(CenError, match=r"train.txt:4: not UTF-8 text \(byte 0xe9\); save it as"):
        check_dataset(root, ["train.txt"], nyudv2_modalities(), 3, cache_dir=tmp_path)


def test_check_images_finds_every_unreadable_input(root: Path) -> None:
    good = [root / "rgb" / f"{n}.png" for n in TRAIN]
    check_images(good + [root / "depth" / "t0.png"], ["rgb"] * 3 + ["depth"])
    truncate(good[1])
    lines: list[str] = []
    with pytest.raises(CenError, match=r"cannot read image .*t1\.png.*\(1 of 2 problems\)"):
        check_images([*good, root / "rgb" / "gone.png"], report=lines.append)
    assert "t1.png" in lines[0] and lines[1].endswith("gone.png does not exist")


def test_paths_with_spaces_in_a_list_without_tabs_get_a_hint(root: Path, tmp_path: Path) -> None:
    for folder in ("rgb", "masks", "depth"):
        (root / folder / "t0.png").rename(root / folder / "t 0.png")
    lines = (root / "train.txt").read_text().replace("t0", "t 0").replace("\t", " ")
    (root / "train.txt").write_text(lines)
    report, said = run(root, tmp_path)
    assert report is None
    hint = "train.txt: a line without tabs is split at spaces; paths with spaces need tab-separ"
    assert hint in said[0] and sum(hint in line for line in said) == 1, "first, not cut off"
    (root / "train.txt").write_text(lines.replace(" ", "\t").replace("t\t0", "t 0"))
    assert run(root, tmp_path)[0] is not None
    (root / "val.txt").write_text((root / "val.txt").read_text().replace("\t", " "))
    (root / "masks" / "v0.png").unlink()  # missing, its name without a space: no hint
    report, said = run(root, tmp_path)
    assert report is None and not any("without tabs" in line for line in said)


def test_comment_lines_are_read_as_blank_ones(root: Path, tmp_path: Path) -> None:
    """``#`` lines are comments: no sample and no column template, and the other lines keep
    their numbers in what is said of them."""
    lines = (root / "train.txt").read_text().splitlines()
    commented = ["# rgb, mask, depth", lines[0], "  # a note", *lines[1:]]
    (root / "train.txt").write_text("\n".join(commented) + "\n")
    report, _ = run(root, tmp_path)
    assert report is not None and report.samples == 5
    commented[3] = commented[3].replace(".png", ".jpg", 1)
    (root / "train.txt").write_text("\n".join(commented) + "\n")
    with pytest.raises(CenError, match=r"train.txt:4: file .*\.jpg does not exist"):
        check_dataset(root, ["train.txt"], nyudv2_modalities(), 3, cache_dir=tmp_path)
