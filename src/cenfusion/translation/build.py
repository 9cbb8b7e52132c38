"""What a translation run is made of: its generator and discriminator, data and FID network."""

from __future__ import annotations

import torch

from cenfusion.data.synthetic_taskonomy import ensure_synthetic_taskonomy
from cenfusion.data.taskonomy import TaskonomyDataset
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


def datasets(cfg: TranslationConfig) -> tuple[TaskonomyDataset, TaskonomyDataset]:
    """Training (resized, cropped, flipped) and validation views of ``cfg``'s domains."""
    root = cfg.data if cfg.data is not None else on_main(ensure_synthetic_taskonomy)
    common = {"root": root, "inputs": cfg.inputs, "target": cfg.target, "size": cfg.crop_size}
    train_set = TaskonomyDataset(split="train", train=True, load_size=cfg.resize_to, **common)
    return train_set, TaskonomyDataset(split="val", train=False, **common)


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
