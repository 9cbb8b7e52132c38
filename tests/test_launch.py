"""``--gpu 0 1``: one process per GPU, started by ``cen`` itself (torchrun's variables)."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from cenfusion.cli import build_parser, main
from cenfusion.data.synthetic_taskonomy import generate_taskonomy_dataset
from cenfusion.engine.checkpoint import load_checkpoint
from cenfusion.engine.launch import cen_command, launch, run_per_gpu
from cenfusion.errors import CenError

VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_launch_gives_each_process_torchruns_variables(tmp_path: Path) -> None:
    code = (
        "import json, os, pathlib; "
        f"names = {VARIABLES!r}; "
        f"pathlib.Path({str(tmp_path)!r}, os.environ['RANK'] + '.json')"
        ".write_text(json.dumps({n: os.environ[n] for n in names}))"
    )
    assert launch(python(code), 3) == 0
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(3)]
    assert [(s["RANK"], s["LOCAL_RANK"]) for s in seen] == [("0", "0"), ("1", "1"), ("2", "2")]
    assert all(s["WORLD_SIZE"] == s["LOCAL_WORLD_SIZE"] == "3" for s in seen)
    assert len({(s["MASTER_ADDR"], s["MASTER_PORT"]) for s in seen}) == 1


@pytest.mark.parametrize(
    ("failure", "expected"),
    [("sys.exit(3)", 3), ("os.kill(os.getpid(), signal.SIGKILL)", 137)],
)
def test_one_failure_stops_the_others_and_gives_the_exit_code(failure: str, expected: int) -> None:
    """Rank 0 would wait ten minutes (as at a collective); rank 1's failure ends the launch."""
    code = (
        "import os, signal, sys, time\n"
        f"if os.environ['RANK'] == '1':\n    {failure}\n"
        "time.sleep(600)"
    )
    began = time.monotonic()
    assert launch(python(code), 2) == expected
    assert time.monotonic() - began < 60


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_only_training_with_several_gpus_outside_a_launcher_is_launched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_per_gpu(parse("i2i", "train", "--gpu", "1")) is None
    assert run_per_gpu(parse("seg", "eval", "--resume", "x.pth", "--gpu", "0", "1")) is None
    assert run_per_gpu(parse("data", "synthetic", "out")) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_per_gpu(parse("seg", "train", "--gpu", "0", "1")) is None


def test_several_gpus_start_one_cen_process_each(monkeypatch: pytest.MonkeyPatch) -> None:
    from cenfusion.engine import launch as launch_module

    launched = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(launch_module, "launch", lambda *call: launched.append(call) or 5)
    argv = ["seg", "train", "--gpu", "3", "1", "--epochs", "2"]
    assert run_per_gpu(parse(*argv), argv) == 5
    assert launched == [(cen_command(argv), 2)]
    assert cen_command(argv)[1:3] == ["-m", "cenfusion.cli"]
    for gpus, message in [(["1", "1"], "each GPU once"), (["0", "4"], "only 4 CUDA device")]:
        with pytest.raises(CenError, match=message):
            run_per_gpu(parse("i2i", "train", "--gpu", *gpus))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machines without CUDA")
@pytest.mark.parametrize("task", ["seg", "i2i"])
def test_several_gpus_without_cuda_is_one_line(
    task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([task, "train", "--runs", str(tmp_path), "--gpu", "0", "1"]) == 2
    expected = "cen: error: --gpu 0 1: no CUDA device is visible (use --device cpu)\n"
    assert capsys.readouterr().err == expected
    assert main([task, "train", "--runs", str(tmp_path), "--gpu", "0", "1", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "cen: error: --gpu 0 1 with --device cpu: choose one\n"
    assert not any(tmp_path.iterdir())


def test_launch_trains_translation_in_two_gloo_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, i2i_argv
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU run: gloo, also on GPU machines
    data = generate_taskonomy_dataset(tmp_path / "data", 4, 2, 40, seed=1)
    flags = ["--epochs", "2", "--eval-every", "1", "--device", "cpu", "--quiet"]
    argv = i2i_argv(data, tmp_path, "launched", *flags)
    assert launch(cen_command(argv), 2) == 0
    run = tmp_path / "launched"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert "4 train / 2 val views, device cpu, 2 processes" in (run / "log.txt").read_text()
    assert load_checkpoint(run / "last.pth", task="translation")["epoch"] == 2
