"""The speed benchmark runs end to end through its case subprocesses."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "seg_speed.py"


def test_seg_speed_times_every_case_and_reports_a_failing_one_as_a_row(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    missing = tmp_path / "missing.onnx"
    cmd = [sys.executable, str(SCRIPT), "--depths", "50", "--cases", "infer"]
    cmd += ["--infer-size", "32", "32", "--check-size", "32", "32", "--warmup", "0"]
    cmd += ["--repeats", "2", "--threads", "1", "--onnx", str(missing), "--json", str(out)]
    cmd += ["--profile", str(tmp_path / "profile.txt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["reference", "cenfusion", "onnx"]
    for row in rows[:2]:
        assert len(row["times_s"]) == 2
        assert row["median_s"] > 0 and row["peak_mib"] > 0 and row["flops_per_image"] > 0
    assert rows[1]["vs_reference"] > 0
    has_onnxruntime = importlib.util.find_spec("onnxruntime") is not None
    assert (str(missing) if has_onnxruntime else "onnxruntime not installed") in rows[2]["error"]
    assert "| R50 | infer 1x32x32 | cenfusion | fp32 |" in proc.stdout
    assert "- R50 targets: inference fp32 " in proc.stdout
    sections = (tmp_path / "profile.txt").read_text().split("## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "R50 infer reference fp32",
        "R50 infer cenfusion fp32",
    ]
    assert all("aten::convolution" in s or "aten::mkldnn_convolution" in s for s in sections)


def load_seg_speed(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("seg_speed", SCRIPT)
    seg_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seg_speed)
    return seg_speed


def test_cases_run_side_by_side_per_net_and_mode_or_one_at_a_time(monkeypatch) -> None:
    seg_speed = load_seg_speed(monkeypatch)
    args = seg_speed.parse_args(["--depths", "50", "101", "--channels-last"])
    every = seg_speed.cases(args)
    side_by_side = seg_speed.case_groups(args)
    assert [c for group in side_by_side for c in group] == every
    assert [(g[0]["depth"], g[0]["mode"]) for g in side_by_side] == [
        (50, "infer"),
        (50, "train"),
        (101, "infer"),
        (101, "train"),
    ]
    assert all(
        {(c["depth"], c["mode"]) for c in g} == {(g[0]["depth"], g[0]["mode"])}
        for g in side_by_side
    )
    alone = seg_speed.case_groups(
        seg_speed.parse_args(["--depths", "50", "101", "--channels-last", "--one-at-a-time"])
    )
    assert alone == [[case] for case in every]


def test_targets_line_states_each_target_against_the_run(monkeypatch) -> None:
    seg_speed = load_seg_speed(monkeypatch)

    def row(mode, impl, variant, ratio, peak=100.0):
        return {
            "depth": 101,
            "mode": mode,
            "impl": impl,
            "variant": variant,
            "vs_reference": ratio,
            "peak_mib": peak,
        }

    rows = [
        row("infer", "reference", "fp32", 1.0),
        row("infer", "cenfusion", "fp32", 1.19),
        row("infer", "cenfusion", "bf16+channels-last", 2.4),
        row("infer", "onnx", "onnxruntime", 1.3),
        row("train", "reference", "fp32", 1.0, peak=100.0),
        row("train", "cenfusion", "fp32", 1.35, peak=99.0),
        {"depth": 101, "mode": "infer", "impl": "cenfusion", "variant": "fp16", "error": "x"},
    ]
    (line,) = seg_speed.target_lines(rows, "cpu")
    assert line == (
        "- R101 targets: training fp32 1.35x (target 1.3x: met), peak memory 99 MiB against "
        "100 (no higher); inference fp32 1.19x (target 1.2x: not met); fastest inference "
        "bf16+channels-last 2.40x (target 2.0x: met)"
    )
    (line,) = seg_speed.target_lines(
        rows[:4] + [row("train", "reference", "fp32", 1.0, 90.0), rows[5]], "cuda"
    )
    assert (
        "training fp32 1.35x (target 1.5x: not met), peak memory 99 MiB against 90 (higher)" in line
    )
    assert seg_speed.target_lines(rows[:1], "cpu") == []
