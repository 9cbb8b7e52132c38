from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cenfusion.data.synthetic import generate_segmentation_dataset
from cenfusion.data.synthetic_taskonomy import generate_taskonomy_dataset


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The tests' tiny convolutions run fastest on one thread, above all on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kept_memory_calls(monkeypatch: pytest.MonkeyPatch):
    """``record(module)`` makes ``module``'s ``kept_cpu_memory`` note each call's
    ``(enabled, device_type)`` in the list it returns (the context itself still runs)."""

    def record(module) -> list[tuple[bool, str]]:
        calls: list[tuple[bool, str]] = []
        real = module.kept_cpu_memory

        def recording(enabled: bool = True, device_type: str = "cpu"):
            calls.append((enabled, device_type))
            return real(enabled, device_type)

        monkeypatch.setattr(module, "kept_cpu_memory", recording)
        return calls

    return record


@pytest.fixture(scope="session")
def seg_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic RGB-D set: 6 train / 3 val images of 40x48 (read-only for tests)."""
    root = tmp_path_factory.mktemp("seg") / "data"
    return generate_segmentation_dataset(root, num_train=6, num_val=3, size=(40, 48), seed=3)


@pytest.fixture(scope="session")
def i2i_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic Taskonomy set: 4 train / 2 val views of 40x40 (read-only for tests)."""
    return generate_taskonomy_dataset(tmp_path_factory.mktemp("i2i") / "data", 4, 2, 40, seed=1)


def tiny_i2i_argv(data: Path, runs: Path, exp: str, *extra: str) -> list[str]:
    """``cen i2i train`` of a tiny U-Net on ``data`` into ``runs/exp`` (no FID, no workers, no
    plots), followed by ``extra`` flags (a later flag wins)."""
    return [
        "i2i", "train", "--data", str(data), "--runs", str(runs), "-c", exp, "--size", "32",
        "--num-downs", "5", "--ngf", "4", "--ndf", "4", "--workers", "0", "--no-fid", "--no-plots",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def i2i_argv():
    """:func:`tiny_i2i_argv`, for tests to call."""
    return tiny_i2i_argv
