"""What a translation run is made of: its generator and discriminator, data and FID network."""

from __future__ import annotations

import torch

from cenfusion.data.check import check_root_images
from cenfusion.data.synthetic_taskonomy import ensure_synthetic_taskonomy
from cenfusion.data.taskonomy import (
    TaskonomyDataset,
    check_domain_modes,
    domain_file,
    view_name,
)
from cenfusion.engine.distributed import on_main
from cenfusion.engine.run import log
from cenfusion.errors import CenError
from cenfusion.metrics.generative import InceptionFeatures
from cenfusion.models.patchgan import PatchDiscriminator, create_patchgan
from cenfusion.models.registry import create_model
from cenfusion.models.unet import CENUNet
from cenfusion.translation.config import TranslationConfig


def build_models(cfg: TranslationConfig) -> tuple[CENUNet, PatchDiscriminator]:
    """The generator and the shared discriminator of ``cfg`` (fresh weights)."""
    generator = create_model(
        "cen_unet",
        num_modalities=len(cfg.inputs),
        ngf=cfg.ngf,
        num_downs=cfg.num_downs,
        threshold=cfg.threshold,
    )
    return generator, create_patchgan(ndf=cfg.ndf)


def datasets(
    cfg: TranslationConfig, training: bool = True
) -> tuple[TaskonomyDataset | None, TaskonomyDataset]:
    """Training (resized, cropped, flipped; None when not ``training``) and validation views
    of ``cfg``'s domains, each file of them read once first (cached, as segmentation's
    data check): a broken view must not surface epochs into a run."""
    root = cfg.data if cfg.data is not None else on_main(ensure_synthetic_taskonomy)
    common = {"root": root, "inputs": cfg.inputs, "target": cfg.target, "size": cfg.crop_size}
    val_set = TaskonomyDataset(split="val", train=False, **common)
    train_set = None
    if training:
        train_set = TaskonomyDataset(split="train", train=True, load_size=cfg.resize_to, **common)
    if train_set is not None and (shared := set(train_set.views) & set(val_set.views)):
        log.info(
            f"warning: {len(shared)} of the {len(val_set)} validation views are training views "
            f"too, e.g. {view_name(min(shared))}"
        )
    views = [view for part in (train_set, val_set) if part is not None for view in part.views]
    domains = [*val_set.inputs, val_set.target]
    pairs = [(val_set.root / domain_file(d, v), d) for v in dict.fromkeys(views) for d in domains]
    check_root_images(val_set.root, [f for f, _ in pairs], progress=not cfg.quiet, report=log.info)
    check_domain_modes(pairs)
    return train_set, val_set


def fid_extractor(cfg: TranslationConfig, device: torch.device) -> InceptionFeatures | None:
    """The FID network, or None (FID off, or the default file not installed: L1 decides)."""
    if not cfg.fid:
        return None
    try:
        return InceptionFeatures(cfg.inception, device=device)
    except CenError as err:
        if cfg.inception is not None:
            raise
        log.info(f"warning: {err}; FID/KID skipped, the best epoch is chosen by ensemble L1")
        return None


def format_metrics(metrics: dict[str, list[float]]) -> str:
    """One log line of per-branch validation metrics, the ensemble last."""

    def row(values: list[float], digits: int) -> str:
        *branches, ensemble = values
        return " / ".join(f"{v:.{digits}f}" for v in branches) + f" | ens {ensemble:.{digits}f}"

    return "; ".join(
        f"{key} {row(metrics[key], 2 if key in ('fid', 'kid_x100') else 4)}"
        for key in ("fid", "kid_x100", "l1", "mse")
        if key in metrics
    )
