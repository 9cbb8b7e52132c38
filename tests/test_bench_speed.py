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


def test_cases_run_side_by_side_per_net_and_mode_or_one_at_a_time(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("seg_speed", SCRIPT)
    seg_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seg_speed)
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
