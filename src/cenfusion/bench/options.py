"""What ``cen bench`` times (see :mod:`cenfusion.bench.command`), as settings."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from cenfusion.engine.config import setting
from cenfusion.errors import CenError
from cenfusion.translation.config import MIN_CROP

__all__ = ["DEFAULTS", "BenchOptions"]

#: Inference size, training crop and training batch of each task (the released recipes').
DEFAULTS = {"seg": ((480, 640), (500, 500), 6), "i2i": ((256, 256), (256, 256), 1)}


@dataclass(frozen=True)
class BenchOptions:
    """What ``cen bench`` times."""

    task: str = setting("seg", "seg: CEN RefineNet; i2i: the CEN U-Net", choices=("seg", "i2i"))
    enc: int = setting(101, "seg: encoder depth", choices=(50, 101, 152))
    ngf: int = setting(64, "i2i: generator (and discriminator) width")
    num_downs: int = setting(8, "i2i: U-Net levels")
    modes: tuple[str, ...] = setting(
        ("infer",),
        "inference at --size, batch --batch; a training step at --train-size, batch "
        "--train-batch; fid (i2i): validation views at --size, the generator then the FID "
        "Inception's features of every head",
        choices=("infer", "train", "fid"),
    )
    size: tuple[int, int] | None = setting(
        None, "inference input (default: seg 480 640, i2i 256 256)", metavar=("H", "W")
    )
    batch: int = setting(1, "inference batch per modality")
    train_size: tuple[int, int] | None = setting(
        None, "training crop (default: seg 500 500, i2i 256 256)", metavar=("H", "W")
    )
    train_batch: int | None = setting(None, "training batch (default: seg 6, i2i 1)")
    precisions: tuple[str, ...] = setting(
        ("fp32",), "one cenfusion row each (fp16: CUDA only)", choices=("fp32", "bf16", "fp16")
    )
    reference: bool = setting(True, "also the per-modality reference, in fp32")
    onnx: bool = setting(False, "seg inference: also the exported model in ONNX Runtime")
    warmup: int = setting(5, "untimed steps first (compile and cuDNN settle)")
    runs: int = setting(20, "timed steps")
    json: Path | None = setting(None, "also write every number to this JSON file")
    profile: Path | None = setting(
        None,
        "profile one more step of each row (torch.profiler) and write its busiest operators "
        "to this markdown file; on CUDA the table also gives each step's device kernels and "
        "the share of its time the device was busy (the rest: waiting for the host)",
    )

    def __post_init__(self) -> None:
        for name in ("modes", "precisions"):  # a value given twice is one row
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))

    def validate(self, device: str) -> None:
        """Raise :class:`CenError` (one line) for options that cannot run, before any row
        does (a file for --json or --profile must be writable at the end)."""
        train_batch = 1 if self.train_batch is None else self.train_batch
        counts = {"runs": self.runs, "batch": self.batch, "train_batch": train_batch}
        for name, value in {**counts, "ngf": self.ngf, "num_downs": self.num_downs}.items():
            if value < 1:
                raise CenError(f"--{name.replace('_', '-')} {value}: expected >= 1")
        if self.warmup < 0:
            raise CenError(f"--warmup {self.warmup}: expected >= 0")
        for flag, size in (("--size", self.size), ("--train-size", self.train_size)):
            if size is not None and min(size) < 1:
                raise CenError(f"{flag} {size[0]} {size[1]}: expected two positive numbers H W")
        for flag, path in (("--json", self.json), ("--profile", self.profile)):
            if path is not None:
                _check_writable(flag, path)
        same = self.json and self.profile and self.json.resolve() == self.profile.resolve()
        if same:
            raise CenError(f"--json and --profile {self.json}: the same file; give two")
        if "fp16" in self.precisions and device != "cuda":
            raise CenError("--precisions fp16: CUDA only (bfloat16 is the CPU's half precision)")
        least, why = _LEAST_TRAIN_SIDE[self.task]
        if "train" in self.modes and self.train_size is not None and min(self.train_size) < least:
            raise CenError(f"--train-size: at least {least} {least} ({why})")
        for name, task in (("enc", "seg"), ("ngf", "i2i"), ("num_downs", "i2i")):
            value = getattr(self, name)
            if self.task != task and value != _DEFAULTS[name]:
                raise CenError(f"--{name.replace('_', '-')} {value}: only with --task {task}")
        if self.onnx and self.task != "seg":
            raise CenError("--onnx: segmentation only")
        if "fid" in self.modes and self.task != "i2i":
            raise CenError("--modes fid: translation only (--task i2i)")
        if self.task == "i2i":
            step = 2**self.num_downs
            for flag, size in (("--size", self.size), ("--train-size", self.train_size)):
                if size is not None and (size[0] % step or size[1] % step):
                    raise CenError(
                        f"{flag} {size[0]} {size[1]}: multiples of 2**num_downs = {step} expected"
                    )


_DEFAULTS = {f.name: f.default for f in fields(BenchOptions)}
#: The smallest training side of each task, and why.
_LEAST_TRAIN_SIDE = {
    "seg": (64, "batch statistics need more than one value per channel at the encoder's stride 32"),
    "i2i": (MIN_CROP, "the discriminator's last norm needs more than one pixel"),
}


def _check_writable(flag: str, path: Path) -> None:
    """Refuse ``path`` unless a file can be written there (tried now, not after the run)."""
    if path.is_dir():
        raise CenError(f"{flag} {path}: a folder, expected a file to write")
    if path.exists() and not path.is_file():
        raise CenError(f"{flag} {path}: not a regular file, expected a file to write")
    if not path.parent.is_dir():
        raise CenError(f"{flag} {path}: no folder {path.parent}, expected a file to write")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise CenError(f"{flag} {path}: cannot be written ({err.strerror})") from err
    if not existed:
        path.unlink()
