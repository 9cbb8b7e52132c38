"""Configuration of a segmentation run, and the two presets: the released NYUDv2 recipe and a
small fast one for the embedded synthetic data set. Every field is a command-line flag."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from cenfusion.data.class_names import SYNTHETIC_CLASSES
from cenfusion.engine.config import setting
from cenfusion.engine.run import RunConfig
from cenfusion.errors import CenError

#: The deepest encoder level has stride 32: smaller crops leave it without pixels.
MIN_CROP = 32
#: ``cenfusion.fusion.RESNET_EXCHANGE_POINTS``, spelt out: the command line starts without torch.
RESNET_POINTS = ("layer*.*.bn2",)


def modality_names(entries: Iterable[object]) -> list[str]:
    """The ``NAME`` of each ``--modalities`` entry (``NAME`` or ``NAME:COLUMN:KIND``)."""
    return [str(m).split(":")[0] for m in entries]


def modality_kinds(entries: Iterable[object]) -> list[str]:
    """The ``KIND`` of each ``--modalities`` entry: a NYUDv2 name is its own kind."""
    return [str(m).split(":")[-1] for m in entries]


@dataclass(frozen=True)
class SegmentationConfig(RunConfig):
    """Everything a segmentation run depends on. Defaults: the released NYUDv2 recipe.

    Stages: ``epochs``, ``lr_enc`` and ``lr_dec`` hold one value per stage; the optimiser
    is re-created at every stage. ``lamda`` is the released flag: as in the released loop, the
    L1 term is added once per output head, an effective weight of ``(M + 1) * lamda``.
    ``data=None`` means the embedded synthetic set, generated into the cache on first use.
    """

    batch_size: int = setting(6, "samples per step and process")
    seed: int = setting(42, "random seed", aliases=("--random-seed",))
    train_list: str = setting("train.txt", "training list file, relative to --data")
    val_list: str = setting("val.txt", "validation list file, relative to --data")
    modalities: tuple[str, ...] = setting(
        ("rgb", "depth"),
        "inputs in order: rgb depth (NYUDv2 layout) or NAME:COLUMN:KIND",
        aliases=("-i", "--input"),
    )
    mask_column: int = setting(1, "list-file column of the mask")
    depth_scale: float = setting(1 / 5000, "multiplies raw depth PNG values")
    num_classes: int = setting(40, "classes 0..K-1 (255 = ignore)")
    enc: int = setting(101, "ResNet depth of the encoder", choices=(50, 101, 152))
    backbone: str | None = setting(None, "any timm BatchNorm CNN name (overrides --enc)")
    pretrained: str | None = setting("tv_in1k", "encoder weights: timm tag, a file, or none")
    frozen_bn: bool | None = setting(None, "keep BN statistics fixed (default: when pretrained)")
    decoder_width: int = setting(256, "RefineNet width (the deepest level uses twice that)")
    drop_rate: float = setting(0.5, "dropout on the two deepest levels and the classifier")
    epochs: tuple[int, ...] = setting((100, 100, 100), "epochs per stage", aliases=("--num-epoch",))
    lr_enc: tuple[float, ...] = setting((5e-4, 2.5e-4, 1e-4), "encoder learning rate per stage")
    lr_dec: tuple[float, ...] = setting((3e-3, 1.5e-3, 7e-4), "decoder learning rate per stage")
    momentum_enc: float = setting(0.9, "SGD momentum of the encoder", aliases=("--mom-enc",))
    momentum_dec: float = setting(0.9, "SGD momentum of the decoder", aliases=("--mom-dec",))
    weight_decay_enc: float = setting(1e-5, "encoder weight decay", aliases=("--wd-enc",))
    weight_decay_dec: float = setting(1e-5, "decoder weight decay", aliases=("--wd-dec",))
    lamda: float = setting(2e-4, "L1 weight on the penalised gammas, added once per head")
    threshold: float = setting(
        2e-2, "exchange threshold on |gamma|", aliases=("-t", "--bn-threshold")
    )
    crop_size: int = setting(500, "training crop side")
    min_short_side: int = setting(350, "random scaling keeps the shorter side at least this")
    scale_range: tuple[float, ...] = setting((0.5, 2.0), "random scale range LOW HIGH")
    max_iters: int | None = setting(None, "cap iterations per epoch (smoke runs)")
    exchange: bool = setting(
        True, "channel exchange at --exchange-at (off: shared convs, private BNs, ensemble only)"
    )
    exchange_at: tuple[str, ...] = setting(
        RESNET_POINTS,
        "exchange points: patterns (fnmatch) on the encoder's BatchNorm names; ResNet: every "
        "block's bn2; e.g. EfficientNet: 'blocks.*.*.bn2'",
        metavar="PATTERN",
    )
    allow_mixed_depth: bool = setting(False, "accept 8-bit and 16-bit depth files in one data set")

    def validate(self) -> None:
        """Raise :class:`CenError` (one line naming the flag) for settings that cannot run."""
        super().validate()
        stages = len(self.epochs)
        if not (stages == len(self.lr_enc) == len(self.lr_dec)) or stages == 0:
            raise CenError(
                f"--epochs, --lr-enc and --lr-dec need one value per stage, got "
                f"{stages}, {len(self.lr_enc)} and {len(self.lr_dec)}"
            )
        said = " ".join(map(str, self.epochs))
        if any(e < 0 for e in self.epochs):
            raise CenError(f"--epochs {said}: epochs must be >= 0")
        if sum(self.epochs) == 0:
            raise CenError(f"--epochs {said}: nothing to train")
        for name in ("lr_enc", "lr_dec"):
            if any(lr <= 0 for lr in getattr(self, name)):
                raise CenError(
                    f"--{name.replace('_', '-')} {list(getattr(self, name))}: expected > 0"
                )
        for name in (
            "lamda",
            "threshold",
            "weight_decay_enc",
            "weight_decay_dec",
            "depth_scale",
        ):
            if getattr(self, name) < 0:
                raise CenError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected >= 0")
        for name in ("momentum_enc", "momentum_dec"):
            if not 0 <= getattr(self, name) < 1:
                raise CenError(
                    f"--{name.replace('_', '-')} {getattr(self, name)}: expected 0 <= m < 1"
                )
        if not 0 <= self.drop_rate < 1:
            raise CenError(f"--drop-rate {self.drop_rate}: expected 0 <= p < 1")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise CenError(f"--modalities {list(self.modalities)}: expected distinct names")
        if self.mask_column is not None and self.mask_column < 0:
            raise CenError(f"--mask-column {self.mask_column}: expected >= 0")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise CenError(
                f"--scale-range {list(self.scale_range)}: expected two numbers 0 < LOW <= HIGH"
            )
        if self.crop_size < MIN_CROP:
            raise CenError(
                f"--crop-size {self.crop_size}: expected at least {MIN_CROP} (the encoder's stride)"
            )
        for name in ("num_classes", "decoder_width", "min_short_side"):
            if getattr(self, name) < 1:
                raise CenError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected >= 1")
        if self.max_iters is not None and self.max_iters < 1:
            raise CenError(f"--max-iters {self.max_iters}: expected >= 1")
        if self.exchange and not self.exchange_at:
            raise CenError("--exchange-at: expected at least one pattern (--no-exchange: none)")

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def model_name(self) -> str:
        """The registered model variant this config trains."""
        return f"cen_refinenet_r{self.enc}" if self.backbone is None else "cen_refinenet"

    @property
    def head_names(self) -> tuple[str, ...]:
        """Names of the model's outputs: one per modality, then the ensemble."""
        return (*modality_names(self.modalities), "ensemble")

    @property
    def pretrained_weights(self) -> str | None:
        """The timm tag or file of the encoder's weights; ``none`` means random init."""
        return None if self.pretrained in (None, "", "none") else self.pretrained

    @property
    def uses_frozen_bn(self) -> bool:
        """Frozen BN statistics: by default exactly when the encoder is pretrained."""
        return self.pretrained_weights is not None if self.frozen_bn is None else self.frozen_bn


NYUDV2 = SegmentationConfig()

SYNTHETIC = replace(
    NYUDV2,
    num_classes=len(SYNTHETIC_CLASSES),
    backbone="resnet26_narrow",
    pretrained=None,
    decoder_width=32,
    drop_rate=0.1,
    epochs=(16, 4),
    lr_enc=(1e-2, 2e-3),
    lr_dec=(5e-3, 1e-3),
    weight_decay_enc=1e-4,
    weight_decay_dec=1e-4,
    lamda=2.5e-3,
    batch_size=8,
    crop_size=64,
    min_short_side=60,
    scale_range=(0.75, 1.25),
    val_every=8,
    workers=0,
    amp=True,
    channels_last=True,
    seed=0,
)
"""The embedded data on a CPU: the quarter-width ResNet-26 (``resnet26_narrow``), decoder width
32, random init, 64x64 crops of the 60x80 images, 16 + 4 epochs of 50 steps, bfloat16 and
channels-last (the faster steps on a CPU thread). The decoder, which has no norms, learns at
half the encoder's rate: at the encoder's, a bfloat16 run can diverge. ``lamda`` moves a penalised scale
by about 0.5 over the run, so the scales that start low (the narrow ResNet's start spread in
[0, 1)) reach the threshold unless the task holds them up: part of the channels exchange,
more as training goes on. Data loading stays in the training process: the demo trains two
runs at once on two cores, and a loading process would take a core from the other run."""

PRESETS: dict[str, SegmentationConfig] = {"nyudv2": NYUDV2, "synthetic": SYNTHETIC}
