"""Configuration of a segmentation run, and the two presets: the released NYUDv2 recipe and a
small fast one for the embedded synthetic data set."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from cenfusion.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
from cenfusion.errors import CenError


@dataclass(frozen=True)
class SegmentationConfig:
    """Everything a segmentation run depends on. Defaults: the released NYUDv2 recipe.

    Stages: ``num_epoch``, ``lr_enc`` and ``lr_dec`` hold one value per stage; the optimiser
    is re-created at every stage. ``lamda`` is the released flag: as in the released loop, the
    L1 term is added once per output head, an effective weight of ``(M + 1) * lamda``.
    ``data=None`` means the embedded synthetic set, generated into the cache on first use.
    """

    exp: str = "cen"
    runs: Path = Path("runs")
    data: Path | None = None
    train_list: str = "train.txt"
    val_list: str = "val.txt"
    modalities: tuple[str, ...] = ("rgb", "depth")
    mask_column: int = 1
    depth_scale: float = 1 / 5000
    num_classes: int = 40
    enc: int = 101
    backbone: str | None = None
    pretrained: str | None = "tv_in1k"
    frozen_bn: bool | None = None
    decoder_width: int = 256
    drop_rate: float = 0.5
    num_epoch: tuple[int, ...] = (100, 100, 100)
    lr_enc: tuple[float, ...] = (5e-4, 2.5e-4, 1e-4)
    lr_dec: tuple[float, ...] = (3e-3, 1.5e-3, 7e-4)
    momentum: float = 0.9
    weight_decay: float = 1e-5
    lamda: float = 2e-4
    bn_threshold: float = 2e-2
    batch_size: int = 6
    crop_size: int = 500
    min_short_side: int = 350
    scale_range: tuple[float, ...] = (0.5, 2.0)
    val_every: int = 5
    workers: int = 4
    seed: int = 42
    device: str = "auto"
    gpu: int | None = None
    amp: bool = False
    max_iters: int | None = None

    def __post_init__(self) -> None:
        stages = len(self.num_epoch)
        if not (stages == len(self.lr_enc) == len(self.lr_dec)) or stages == 0:
            raise CenError(
                f"--num-epoch, --lr-enc and --lr-dec need one value per stage, got "
                f"{stages}, {len(self.lr_enc)} and {len(self.lr_dec)}"
            )
        if any(e < 0 for e in self.num_epoch):
            raise CenError(f"--num-epoch {list(self.num_epoch)}: epochs must be >= 0")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise CenError(f"--modalities {list(self.modalities)}: expected distinct names")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise CenError(f"scale_range {list(self.scale_range)}: expected 0 < low <= high")
        for name in ("batch_size", "crop_size", "val_every", "num_classes"):
            if getattr(self, name) < 1:
                raise CenError(f"--{name.replace('_', '-')} must be >= 1")
        if self.workers < 0:
            raise CenError("--workers must be >= 0")

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def head_names(self) -> tuple[str, ...]:
        """Names of the model's outputs: one per modality, then the ensemble."""
        return (*(m.split(":")[0] for m in self.modalities), "ensemble")

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
    backbone="resnet26",
    pretrained=None,
    decoder_width=64,
    drop_rate=0.1,
    num_epoch=(8, 2),
    lr_enc=(5e-3, 1e-3),
    lr_dec=(5e-3, 1e-3),
    weight_decay=1e-4,
    lamda=0.1,
    batch_size=8,
    crop_size=80,
    min_short_side=80,
    scale_range=(0.75, 1.25),
    val_every=5,
    workers=2,
    seed=0,
)
"""The embedded data on a CPU: ResNet-26 (ResNet-50 widths), decoder width 64, random init,
80x80 crops, 10 epochs. ``lamda`` is large because training is short: the penalised gammas
must reach the threshold within a few hundred steps for exchange to happen at all."""

PRESETS: dict[str, SegmentationConfig] = {"nyudv2": NYUDV2, "synthetic": SYNTHETIC}
