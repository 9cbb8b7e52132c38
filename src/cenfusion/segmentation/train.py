"""CEN segmentation training and evaluation: the released recipe on top of ``engine``.

One ``train_one_epoch`` and one ``evaluate`` serve training, ``--evaluate`` and the demo.
Stages re-create the optimiser with their own learning rates; every epoch ends with an atomic
``last.pth`` holding all that ``--resume`` needs, every validation may replace ``best.pth``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler

from cenfusion.data.listfile import (
    IGNORE_INDEX,
    ListFileDataset,
    ModalitySpec,
    nyudv2_modalities,
)
from cenfusion.data.synthetic import ensure_synthetic
from cenfusion.data.transforms import train_transform, val_transform
from cenfusion.engine.checkpoint import load_checkpoint, save_checkpoint
from cenfusion.engine.config import config_from_dict, config_to_dict, load_yaml, replace_config
from cenfusion.engine.distributed import DistInfo, init_distributed, resolve_device, unwrap
from cenfusion.engine.run import (
    append_metrics,
    capture_rng,
    log,
    restore_rng,
    seed_everything,
    start_run,
)
from cenfusion.errors import CenError
from cenfusion.fusion import exchange_stats, sparsity_penalty, stack_modalities
from cenfusion.metrics.segmentation import MultiHeadSegmentationMetric, format_scores
from cenfusion.models.refinenet import CENRefineNet, create_cen_refinenet
from cenfusion.segmentation.config import PRESETS, SegmentationConfig
from cenfusion.segmentation.modelio import TASK, model_from_record, model_record
from cenfusion.segmentation.visualize import save_prediction_panel

Scores = dict[str, dict[str, float | list[float]]]


@dataclass
class Progress:
    """Where a run stands: the next (stage, epoch) to train and the best ensemble mIoU."""

    stage: int = 0
    epoch: int = 0
    best_miou: float = -math.inf
    best_scores: Scores | None = None


def config_for(
    preset: str | None,
    yaml_path: Path | None,
    overrides: dict[str, object],
    resume: Path | None = None,
) -> SegmentationConfig:
    """The run's config: a base, then a YAML file, then flags (``None`` = not given).

    The base is the config saved in the ``resume`` checkpoint when it has one, else the
    preset (default: ``synthetic`` without ``--data``, ``nyudv2`` with it).
    """
    base: SegmentationConfig | None = None
    if resume is not None and preset is None:
        saved = load_checkpoint(resume, task=TASK).get("config")
        if saved is not None:
            base = config_from_dict(SegmentationConfig, saved, str(resume))
    if base is None:
        name = preset or ("nyudv2" if overrides.get("data") is not None else "synthetic")
        if name not in PRESETS:
            raise CenError(f"--preset {name}: expected one of {', '.join(PRESETS)}")
        base = PRESETS[name]
    if yaml_path is not None:
        base = replace_config(base, load_yaml(yaml_path), f"--config {yaml_path}")
    return replace_config(base, overrides)


def build_model(cfg: SegmentationConfig) -> CENRefineNet:
    return create_cen_refinenet(
        depth=cfg.enc,
        backbone=cfg.backbone,
        num_classes=cfg.num_classes,
        num_modalities=cfg.num_modalities,
        bn_threshold=cfg.bn_threshold,
        pretrained=cfg.pretrained_weights,
        frozen_bn=cfg.uses_frozen_bn,
        drop_rate=cfg.drop_rate,
        decoder_width=cfg.decoder_width,
    )


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
            f"{where}: model has {model.config.num_classes} classes, the data has {cfg.num_classes}"
        )


def segmentation_loss(heads: list[Tensor], target: Tensor) -> Tensor:
    """Sum over heads of the NLL of log-softmax on logits upsampled to the target size."""
    size = target.shape[-2:]
    return sum(
        F.cross_entropy(
            F.interpolate(h, size=size, mode="bilinear", align_corners=False),
            target,
            ignore_index=IGNORE_INDEX,
        )
        for h in heads
    )


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: SegmentationConfig,
    device: torch.device,
    where: str,
) -> float:
    """One pass over ``loader``; returns the mean loss. A non-finite loss stops the run."""
    model.train()
    total, count = 0.0, 0
    heads_count = cfg.num_modalities + 1
    for i, batch in enumerate(loader):
        if cfg.max_iters is not None and i >= cfg.max_iters:
            break
        inputs = stack_modalities([x.to(device, non_blocking=True) for x in batch["inputs"]])
        target = batch["mask"].to(device, non_blocking=True)
        with _autocast(device, cfg.amp):
            heads = model(inputs)
            loss = segmentation_loss(heads, target)
            loss = loss + heads_count * sparsity_penalty(unwrap(model), cfg.lamda)
        if not torch.isfinite(loss):
            raise CenError(f"{where}, iteration {i + 1}: the loss is {loss.item()}; stopping")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item()
        count += 1
    return total / max(count, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    cfg: SegmentationConfig,
    device: torch.device,
    image_dir: Path | None = None,
) -> Scores:
    """Single-scale evaluation of every head over the whole loader (one global confusion
    matrix per head, summed across processes). With ``image_dir``, writes a panel per sample."""
    model.eval()
    metric = MultiHeadSegmentationMetric(cfg.num_classes, cfg.head_names, device)
    for batch in loader:
        inputs = [x.to(device, non_blocking=True) for x in batch["inputs"]]
        target = batch["mask"].to(device, non_blocking=True)
        with _autocast(device, cfg.amp):
            heads = model(stack_modalities(inputs))
        heads = [h.float() for h in heads]
        metric.update(heads, target)
        if image_dir is not None:
            for b, name in enumerate(batch["name"]):
                save_prediction_panel(
                    image_dir / f"{name}.png",
                    [x[b] for x in batch["inputs"]],
                    [k[b] for k in batch["kinds"]],
                    batch["mask"][b],
                    [h[b] for h in heads],
                    cfg.num_classes,
                )
    return metric.compute()


def _train_loader(
    cfg: SegmentationConfig, dist_info: DistInfo, device: torch.device, generator: torch.Generator
) -> DataLoader:
    """Shuffled by ``generator`` (re-seeded every epoch), or by a DistributedSampler."""
    train_set = build_dataset(cfg, train=True)
    if len(train_set) < cfg.batch_size * dist_info.world_size:
        raise CenError(
            f"{train_set.list_path}: {len(train_set)} samples, fewer than one batch of "
            f"{cfg.batch_size} per process"
        )
    if dist_info.enabled:
        sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed, drop_last=True)
    else:
        sampler = RandomSampler(train_set, generator=generator)
    return DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        generator=generator,
    )


def _val_loader(cfg: SegmentationConfig, dist_info: DistInfo, device: torch.device) -> DataLoader:
    """Batch 1 at full size; each process takes every ``world_size``-th image, no padding."""
    val_set: Dataset = build_dataset(cfg, train=False)
    if dist_info.enabled:
        val_set = Subset(val_set, range(dist_info.rank, len(val_set), dist_info.world_size))
    return DataLoader(
        val_set, batch_size=1, num_workers=cfg.workers, pin_memory=device.type == "cuda"
    )


def _optimizer(model: CENRefineNet, cfg: SegmentationConfig, stage: int) -> torch.optim.SGD:
    groups = [
        {
            "params": [p for p in model.encoder_parameters() if p.requires_grad],
            "lr": cfg.lr_enc[stage],
        },
        {
            "params": [p for p in model.decoder_parameters() if p.requires_grad],
            "lr": cfg.lr_dec[stage],
        },
    ]
    return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _checkpoint(
    model: CENRefineNet,
    cfg: SegmentationConfig,
    progress: Progress,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> dict:
    return {
        **model_record(model),
        "config": config_to_dict(cfg),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "stage": progress.stage,
        "epoch": progress.epoch,
        "best_miou": progress.best_miou,
        "best_scores": progress.best_scores,
        "rng": capture_rng(),
    }


def _score_line(scores: Scores) -> str:
    return "  ".join(
        f"{head} {s['pixel_acc']:.2f}/{s['mean_acc']:.2f}/{s['miou']:.2f}"
        for head, s in scores.items()
    )


def train(
    cfg: SegmentationConfig,
    resume: Path | None = None,
    evaluate_only: bool = False,
    save_img: bool = False,
) -> Progress:
    """Run (or resume, or only evaluate) a segmentation experiment in ``runs/EXP``.

    Returns the final progress, whose ``best_scores`` hold the best validation (by ensemble
    mIoU) or, with ``evaluate_only``, the evaluation just made.
    """
    dist_info = init_distributed()
    device = resolve_device(cfg.device, cfg.gpu, dist_info.local_rank)
    run_dir = cfg.runs / cfg.exp
    start_run(run_dir, cfg, dist_info.is_main)
    seed_everything(cfg.seed + dist_info.rank)

    generator = torch.Generator()
    val_loader = _val_loader(cfg, dist_info, device)
    train_loader = None if evaluate_only else _train_loader(cfg, dist_info, device, generator)
    state = load_checkpoint(resume, task=TASK) if resume is not None else None
    if state is not None:
        model = model_from_record(state, str(resume))
        check_model_fits(model, cfg, str(resume))
    else:
        model = build_model(cfg)
    model.to(device)
    log(
        f"model {model.config.backbone}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
        f"parameters, {len(train_loader.dataset) if train_loader else 0} train / "
        f"{len(val_loader.dataset)} val samples, device {device}"
    )
    net: nn.Module = model
    if dist_info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    if evaluate_only:
        image_dir = run_dir / "images" if save_img else None
        scores = evaluate(net, val_loader, cfg, device, image_dir)
        if dist_info.is_main:
            log(format_scores(scores))
            append_metrics(run_dir / "metrics.jsonl", {"evaluate": str(resume), "val": scores})
        return Progress(best_scores=scores)

    progress = Progress()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    if state is not None and "stage" in state:
        progress = Progress(
            state["stage"], state["epoch"], state["best_miou"], state["best_scores"]
        )
        restore_rng(state["rng"])
    metrics_path = run_dir / "metrics.jsonl"
    for stage in range(progress.stage, len(cfg.num_epoch)):
        optimizer = _optimizer(model, cfg, stage)
        if state is not None and state.get("stage") == stage and state.get("epoch"):
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
        for epoch in range(progress.epoch if stage == progress.stage else 0, cfg.num_epoch[stage]):
            global_epoch = sum(cfg.num_epoch[:stage]) + epoch
            generator.manual_seed(cfg.seed * 1_000_003 + global_epoch)
            if isinstance(train_loader.sampler, DistributedSampler):
                train_loader.sampler.set_epoch(global_epoch)
            started = time.perf_counter()
            where = f"stage {stage + 1} epoch {epoch + 1}"
            loss = train_one_epoch(net, train_loader, optimizer, scaler, cfg, device, where)
            record = {
                "stage": stage + 1,
                "epoch": epoch + 1,
                "train_loss": loss,
                "exchange_fraction": exchange_stats(model).overall,
                "seconds": round(time.perf_counter() - started, 2),
            }
            progress.stage, progress.epoch = stage, epoch + 1
            last_of_stage = epoch + 1 == cfg.num_epoch[stage]
            if (epoch + 1) % cfg.val_every == 0 or last_of_stage:
                scores = evaluate(net, val_loader, cfg, device)
                record["val"] = scores
                miou = float(scores["ensemble"]["miou"])
                if miou > progress.best_miou or progress.best_scores is None:
                    progress.best_miou, progress.best_scores = miou, scores
                    if dist_info.is_main:
                        save_checkpoint(
                            run_dir / "best.pth",
                            _checkpoint(model, cfg, progress, optimizer, scaler),
                        )
            if last_of_stage:
                progress.stage, progress.epoch = stage + 1, 0
            if dist_info.is_main:
                save_checkpoint(
                    run_dir / "last.pth", _checkpoint(model, cfg, progress, optimizer, scaler)
                )
                append_metrics(metrics_path, record)
                val = f"  val {_score_line(record['val'])}" if "val" in record else ""
                log(
                    f"{where}: loss {loss:.4f}  exchange {record['exchange_fraction']:.3f}  "
                    f"{record['seconds']:.1f}s{val}"
                )
    if dist_info.is_main and progress.best_scores is not None:
        log(
            f"best (ensemble mIoU {progress.best_miou:.2f}):\n"
            + format_scores(progress.best_scores)
        )
    return progress
