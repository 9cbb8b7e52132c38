"""What every training run shares: its folder, its printed and saved config, its metrics log
and the random state that makes ``--resume`` continue exactly."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cenfusion.engine.config import dump_yaml


def start_run(run_dir: Path, config: Any, is_main: bool = True) -> None:
    """Create ``run_dir``, print the full resolved config and save it as ``config.yaml``."""
    if not is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    text = dump_yaml(config)
    log(
        f"config ({type(config).__name__}):\n"
        + "".join(f"  {line}\n" for line in text.splitlines())
    )
    (run_dir / "config.yaml").write_text(text)


def log(message: str) -> None:
    """One line (or block) of the run log, on standard output."""
    print(message, file=sys.stdout, flush=True)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to a metrics log."""
    with path.open("a") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """The global random states as tensors and lists (loadable with ``weights_only``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
