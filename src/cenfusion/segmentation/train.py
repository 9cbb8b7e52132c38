"""CEN segmentation: the released recipe as an engine :class:`~cenfusion.engine.trainer.Recipe`.

Stages re-create the SGD optimiser with their own learning rates (encoder and decoder groups);
the loss is the cross-entropy of every head plus the L1 sparsity term once per head;
validation every ``val_every`` epochs of a stage and at its end keeps the best ensemble mIoU.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from cenfusion.data.listfile import IGNORE_INDEX
from cenfusion.engine.checkpoint import load_checkpoint, load_weights
from cenfusion.engine.run import log
from cenfusion.engine.trainer import BestScore, Context, Recipe, fit, prepare
from cenfusion.errors import CenError
from cenfusion.fusion import sparsity_penalty, stack_modalities
from cenfusion.metrics.segmentation import format_scores
from cenfusion.models.refinenet import CENRefineNet
from cenfusion.reporting.exchange import exchange_record
from cenfusion.reporting.plots import write_plots
from cenfusion.reporting.runlog import save_confusion
from cenfusion.segmentation.build import (
    build_loaders,
    build_model,
    check_data,
    check_model_fits,
    check_resumed_model,
)
from cenfusion.segmentation.config import SegmentationConfig
from cenfusion.segmentation.evaluate import Scores, evaluate, score_loader
from cenfusion.segmentation.modelio import TASK, model_from_record, model_record


def segmentation_loss(heads: Tensor, target: Tensor) -> Tensor:
    """Sum over heads of the cross-entropy of logits upsampled to the target size.

    ``heads`` ``(H, B, K, h, w)``, ``target`` ``(B, Ht, Wt)``. Every head sees the same
    labelled pixels, so the sum of per-head means is ``H`` times the mean over all heads.
    """
    logits = F.interpolate(
        heads.flatten(0, 1), size=target.shape[-2:], mode="bilinear", align_corners=False
    )
    targets = target.repeat(heads.shape[0], 1, 1)
    return heads.shape[0] * F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)


class SegmentationRecipe(Recipe):
    task = TASK

    def __init__(
        self,
        cfg: SegmentationConfig,
        ctx: Context,
        model: CENRefineNet,
        loaders: tuple[DataLoader | None, DataLoader, torch.Generator],
    ) -> None:
        self.cfg, self.ctx, self.model = cfg, ctx, model
        self.net = ctx.parallel(model)
        self.train_loader, self.val_loader, self.generator = loaders
        self.stage = 0
        self.optimizer = self._optimizer(0)

    def _optimizer(self, stage: int) -> torch.optim.SGD:
        cfg, model = self.cfg, self.model
        groups = [
            (model.encoder_parameters(), cfg.lr_enc, cfg.momentum_enc, cfg.weight_decay_enc),
            (model.decoder_parameters(), cfg.lr_dec, cfg.momentum_dec, cfg.weight_decay_dec),
        ]
        return torch.optim.SGD(
            [
                {
                    "params": [p for p in params if p.requires_grad],
                    "lr": lr[stage],
                    "momentum": momentum,
                    "weight_decay": decay,
                }
                for params, lr, momentum, decay in groups
            ]
        )

    def _position(self, epoch: int) -> tuple[int, int]:
        """(stage, epoch within the stage, 1-based) of global epoch ``epoch``."""
        for stage, count in enumerate(self.cfg.epochs):
            if epoch <= count:
                return stage, epoch
            epoch -= count
        raise ValueError(epoch)

    def num_epochs(self) -> int:
        return sum(self.cfg.epochs)

    def begin_epoch(self, epoch: int) -> Iterable[dict[str, Any]]:
        stage, _ = self._position(epoch)
        if stage != self.stage:
            self.stage, self.optimizer = stage, self._optimizer(stage)
        self.generator.manual_seed(self.cfg.seed * 1_000_003 + epoch - 1)
        if isinstance(self.train_loader.sampler, DistributedSampler):
            self.train_loader.sampler.set_epoch(epoch - 1)
        self.net.train()
        return islice(self.train_loader, self.cfg.max_iters)

    def train_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        inputs = stack_modalities(batch["inputs"].to(self.ctx.device, non_blocking=True))
        target = batch["mask"].to(self.ctx.device, non_blocking=True)
        with self.ctx.precision.autocast():
            heads = self.net(inputs)
            loss = segmentation_loss(heads.float(), target)
            loss = loss + heads.shape[0] * sparsity_penalty(self.model, self.cfg.lamda)
        self.ctx.precision.backward_step(loss, self.optimizer)
        self.ctx.precision.update()
        return {"loss": loss.detach()}

    def epoch_record(self) -> dict[str, Any]:
        return {"stage": self.stage + 1, "exchange": exchange_record(self.model)}

    def wants_validation(self, epoch: int) -> bool:
        stage, within = self._position(epoch)
        return within % self.cfg.val_every == 0 or within == self.cfg.epochs[stage]

    def validate(self, epoch: int) -> tuple[Scores, float]:
        metric = score_loader(
            self.net, self.val_loader, self.cfg, self.ctx.device, self.ctx.precision
        )
        if self.ctx.dist.is_main:
            save_confusion(self.cfg.run_dir, {h: m.confmat for h, m in metric.metrics.items()})
        scores = metric.compute()
        return scores, float(scores["ensemble"]["miou"])

    def describe(self, record: dict[str, Any]) -> str:
        line = (
            f"epoch {record['epoch']}/{self.num_epochs()} (stage {record['stage']}): loss "
            f"{record['loss']:.4f}  exchange {record['exchange']['overall']:.3f}  {record['seconds']:.1f}s "
            f"(data {record['data_seconds']:.1f}s)"
        )
        if "val" in record:
            line += "  val " + "  ".join(
                f"{h} {s['pixel_acc']:.2f}/{s['mean_acc']:.2f}/{s['miou']:.2f}"
                for h, s in record["val"].items()
            )
        return line

    def state_dict(self) -> dict[str, Any]:
        return {
            **model_record(self.model),
            "stage": self.stage,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.ctx.precision.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        load_weights(self.model, state["model"], where)
        self.stage = int(state["stage"])
        self.optimizer = self._optimizer(self.stage)
        self.optimizer.load_state_dict(state["optimizer"])
        self.ctx.precision.scaler.load_state_dict(state["scaler"])


def train(
    cfg: SegmentationConfig,
    resume: Path | None = None,
    evaluate_only: bool = False,
    save_img: bool = False,
    force: bool = False,
) -> BestScore:
    """Run, resume (``resume``: a checkpoint) or only evaluate a segmentation experiment.

    Returns the best validation (by ensemble mIoU) or, with ``evaluate_only``, the evaluation.
    Settings, data and checkpoint are all checked before the run folder is touched.
    """
    if evaluate_only and resume is None:
        raise CenError("--evaluate: needs --resume CHECKPOINT (the weights to evaluate)")
    if save_img and not evaluate_only:
        raise CenError("--save-img: only with --evaluate (validation panels of a checkpoint)")
    with prepare(cfg) as ctx:
        check_data(cfg, training=not evaluate_only)
        loaders = build_loaders(cfg, ctx, training=not evaluate_only)
        state = load_checkpoint(resume, task=TASK) if resume is not None else None
        model = model_from_record(state, str(resume)) if state else build_model(cfg)
        if state is not None:
            check_model_fits(model, cfg, str(resume))
            if not evaluate_only:
                check_resumed_model(model, cfg, str(resume))
        recipe = SegmentationRecipe(cfg, ctx, model.to(ctx.device), loaders)
        resuming = state is not None and "optimizer" in state
        folder = ctx.open_folder(cfg, resuming=resuming or evaluate_only, force=force)
        train_count = len(recipe.train_loader.dataset) if recipe.train_loader else 0
        log.info(
            f"model {model.config.backbone}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}"
            f" M parameters, {train_count} train / {len(recipe.val_loader.dataset)} val samples,"
            f" device {ctx.device}"
        )
        if evaluate_only:
            image_dir = folder.path / "images" if save_img else None
            scores = evaluate(
                recipe.net, recipe.val_loader, cfg, ctx.device, ctx.precision, image_dir
            )
            log.info(format_scores(scores))
            folder.append_metrics({"evaluate": str(resume), "val": scores})
            return BestScore(True, float(scores["ensemble"]["miou"]), 0, scores)
        best = fit(
            recipe,
            cfg,
            folder,
            True,
            state if resuming else None,
            str(resume),
            write_plots if cfg.plots else None,
        )
        if best.metrics is not None:
            log.info(
                f"best (ensemble mIoU {best.score:.2f}, epoch {best.epoch}):\n"
                + format_scores(best.metrics)
            )
        return best
