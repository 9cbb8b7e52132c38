"""What a segmentation run is made of: its config (preset, YAML, flags), model and data sets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from cenfusion.data.check import check_dataset
from cenfusion.data.class_names import declared_class_names
from cenfusion.data.listfile import ListFileDataset, ModalitySpec, nyudv2_modalities
from cenfusion.data.synthetic import ensure_synthetic
from cenfusion.data.transforms import train_transform, val_transform
from cenfusion.engine.run import log
from cenfusion.engine.task import KEPT_FOR_SCORING, KEPT_FOR_TRAINING
from cenfusion.engine.trainer import Context
from cenfusion.errors import CenError
from cenfusion.fusion import ExchangePointsError, NoBatchNormError
from cenfusion.models.refinenet import CENRefineNet
from cenfusion.models.registry import create_model
from cenfusion.segmentation.config import SegmentationConfig, modality_kinds, modality_names


def build_model(cfg: SegmentationConfig) -> CENRefineNet:
    """The registered variant ``cfg.model_name`` with the run's settings."""
    extra = {} if cfg.backbone is None else {"backbone": cfg.backbone}
    try:
        return create_model(
            cfg.model_name,
            **extra,
            num_classes=cfg.num_classes,
            num_modalities=cfg.num_modalities,
            bn_threshold=cfg.threshold,
            pretrained=cfg.pretrained_weights,
            frozen_bn=cfg.uses_frozen_bn,
            drop_rate=cfg.drop_rate,
            decoder_width=cfg.decoder_width,
            exchange=cfg.exchange,
            exchange_at=cfg.exchange_at,
        )
    except NoBatchNormError as err:
        raise CenError(f"--backbone {cfg.backbone}: {err}") from None
    except ExchangePointsError as err:
        encoder = cfg.backbone or f"resnet{cfg.enc}"
        raise CenError(f"--exchange-at {' '.join(cfg.exchange_at)}: {encoder}: {err}") from None


def data_root(cfg: SegmentationConfig) -> Path:
    return cfg.data if cfg.data is not None else ensure_synthetic()


def modality_specs(cfg: SegmentationConfig) -> tuple[ModalitySpec, ...]:
    """Modalities of the list files: NYUDv2 names (``rgb``, ``depth``) or ``NAME:COLUMN:KIND``.

    ``KIND`` is ``rgb`` (8-bit colour), ``depth`` (8/16-bit, times ``depth_scale``) or ``gray``
    (8/16-bit single channel, scaled to 0..255), e.g. ``rgb:0:rgb hha:3:rgb depth:2:depth``.
    """
    if not any(":" in m for m in cfg.modalities):
        return nyudv2_modalities(cfg.modalities, cfg.depth_scale)
    specs = []
    for entry in cfg.modalities:
        parts = entry.split(":")
        if len(parts) != 3 or not parts[1].isdigit():
            raise CenError(f"--modalities {entry}: expected NAME:COLUMN:KIND, e.g. depth:2:depth")
        specs.append(ModalitySpec(parts[0], int(parts[1]), parts[2], cfg.depth_scale))
    return tuple(specs)


def check_data(cfg: SegmentationConfig, training: bool) -> dict[str, int]:
    """Check every list line, file, size, bit depth and label before anything trains;
    returns each depth modality's bit depth.

    Facts about unchanged files are cached, so a second start is instant.
    """
    lists = [cfg.train_list, cfg.val_list] if training else [cfg.val_list]
    report = check_dataset(
        data_root(cfg),
        lists,
        modality_specs(cfg),
        cfg.num_classes,
        mask_column=cfg.mask_column,
        allow_mixed_depth=cfg.allow_mixed_depth,
        progress=not cfg.quiet,
        report=log.info,
    )
    declared = declared_class_names(data_root(cfg))
    if declared is not None and len(declared) != cfg.num_classes:
        log.info(
            f"warning: {data_root(cfg)} names {len(declared)} classes, --num-classes is "
            f"{cfg.num_classes}: its names go unused (--num-classes {len(declared)} if that is "
            "the data's count)"
        )
    return report.depth_bits


def build_dataset(cfg: SegmentationConfig, train: bool) -> ListFileDataset:
    """The training split (augmented) or the validation split (full size, only normalised)."""
    if train:
        transform = train_transform(
            cfg.crop_size, cfg.min_short_side, tuple(cfg.scale_range), cfg.depth_scale
        )
    else:
        transform = val_transform()
    return ListFileDataset(
        data_root(cfg),
        cfg.train_list if train else cfg.val_list,
        modality_specs(cfg),
        cfg.mask_column,
        cfg.num_classes,
        transform,
    )


def check_model_fits(model: CENRefineNet, cfg: SegmentationConfig, where: str) -> None:
    """Refuse a checkpoint whose modality or class count differs from the data's."""
    if model.config.num_modalities != cfg.num_modalities:
        raise CenError(
            f"{where}: model has {model.config.num_modalities} modalities, "
            f"--modalities gives {cfg.num_modalities} ({', '.join(cfg.modalities)})"
        )
    if model.config.num_classes != cfg.num_classes:
        raise CenError(
            f"{where}: model has {model.config.num_classes} classes, --num-classes gives "
            f"{cfg.num_classes}"
        )


def check_same_modalities(
    trained: Sequence[str] | None, cfg: SegmentationConfig, where: str, training: bool
) -> None:
    """Refuse inputs in another order than the checkpoint's modalities: each modality has
    its own norms and head, so a swap would feed one modality through the other's. Each keeps
    its kind (how its files are decoded), and a resumed training its names; scoring with
    other names only warns (a name is a label of the user's data). ``trained``: the
    checkpoint's ``--modalities`` (``NAME[:COLUMN]:KIND`` or NYUDv2 names; None: not
    recorded)."""
    if trained is None:
        return
    theirs, ours = modality_names(trained), modality_names(cfg.modalities)
    if theirs == ours:
        kinds = zip(ours, modality_kinds(trained), modality_kinds(cfg.modalities))
        for name, was, now in kinds:
            if was != now:
                raise CenError(
                    f"--modalities {' '.join(cfg.modalities)}: the model of {where} was "
                    f"trained on {name} as {was}, not {now}"
                )
        return
    said = (
        f"--modalities {' '.join(cfg.modalities)}: the model of {where} was trained on "
        f"{', '.join(theirs)}"
    )
    if sorted(theirs) == sorted(ours) or training:
        raise CenError(
            f"{said}, in this order; each modality has its own norms and head: give the "
            "same modalities in the same order"
        )
    log.warning(f"warning: {said}; scoring {', '.join(ours)} in their place, in order")


def check_resumed_depth_scale(
    trained: float | None, cfg: SegmentationConfig, where: str, training: bool = True
) -> None:
    """Refuse another ``--depth-scale`` on resume: the network learnt its depth at the
    checkpoint's scale (``trained``; None: not recorded). Scoring other data may change it:
    a warning says so."""
    depth = "depth" in modality_kinds(cfg.modalities)
    if depth and trained is not None and trained != cfg.depth_scale:
        said = (
            f"--depth-scale {cfg.depth_scale:g}: the model of {where} was trained with {trained:g}"
        )
        if training:
            raise CenError(f"{said}; a resumed run keeps its inputs' encoding")
        log.warning(f"warning: {said}")


def check_resumed_model(
    model: CENRefineNet, cfg: SegmentationConfig, where: str, training: bool = True
) -> None:
    """Refuse settings that describe another model than the checkpoint's: a resumed run
    keeps its model and an evaluation scores it, so a flag that contradicts it (encoder,
    width, dropout, threshold, exchange) would otherwise be ignored while the printed config
    shows it."""
    c = model.config
    exchange_points = "exchange points" if c.exchange_at else "no exchange points"
    exchanges = cfg.exchange and c.num_modalities > 1  # one modality has none to exchange
    if cfg.backbone is not None:
        encoder = ("--backbone", cfg.backbone, cfg.backbone == c.backbone, c.backbone)
    else:
        encoder = ("--enc", cfg.enc, f"resnet{cfg.enc}" == c.backbone, c.backbone)
    for flag, value, same, theirs in (
        encoder,
        (
            "--decoder-width",
            cfg.decoder_width,
            cfg.decoder_width == c.decoder_width,
            c.decoder_width,
        ),
        ("--drop-rate", cfg.drop_rate, cfg.drop_rate == c.drop_rate, c.drop_rate),
        ("--threshold", cfg.threshold, cfg.threshold == c.bn_threshold, c.bn_threshold),
        ("--exchange", cfg.exchange, exchanges == bool(c.exchange_at), exchange_points),
        (
            "--exchange-at",
            " ".join(cfg.exchange_at),
            not (exchanges and c.exchange_at) or tuple(cfg.exchange_at) == c.exchange_at,
            f"exchange points {' '.join(c.exchange_at)}",
        ),
    ):
        if not same:
            kept = KEPT_FOR_TRAINING if training else KEPT_FOR_SCORING
            raise CenError(f"{flag} {value}: the model of {where} has {theirs}; {kept}")


def build_loaders(
    cfg: SegmentationConfig, ctx: Context, training: bool
) -> tuple[DataLoader | None, DataLoader]:
    """Training loader (None when only evaluating) and validation loader."""
    return (_train_loader(cfg, ctx) if training else None), _val_loader(cfg, ctx)


def _train_loader(cfg: SegmentationConfig, ctx: Context) -> DataLoader:
    """Every process takes whole batches; a set smaller than one batch per process is refused."""
    train_set = build_dataset(cfg, train=True)
    if len(train_set) < cfg.batch_size * ctx.dist.world_size:
        raise CenError(
            f"{train_set.list_path}: {len(train_set)} samples, fewer than one batch of "
            f"{cfg.batch_size} per process"
        )
    return ctx.train_loader(train_set, cfg, drop_last=True)


def _val_loader(cfg: SegmentationConfig, ctx: Context) -> DataLoader:
    """Batch 1 at full size; each process takes every ``world_size``-th image, no padding."""
    val_set = build_dataset(cfg, train=False)
    rank, world = ctx.dist.rank, ctx.dist.world_size
    subset = Subset(val_set, range(rank, len(val_set), world)) if ctx.dist.enabled else val_set
    return ctx.loader(subset, cfg, batch_size=1)
