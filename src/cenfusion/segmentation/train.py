"""CEN segmentation: the released recipe as an engine :class:`~cenfusion.engine.trainer.Recipe`.

Stages re-create the SGD optimiser with their own learning rates (encoder and decoder groups);
the loss is the cross-entropy of every head plus the L1 sparsity term once per head;
validation every ``val_every`` epochs of a stage and at its end keeps the best ensemble mIoU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from cenfusion.data.listfile import IGNORE_INDEX
from cenfusion.engine.checkpoint import load_weights
from cenfusion.engine.run import log
from cenfusion.engine.runtime import Precision
from cenfusion.engine.trainer import BestScore, Context, Recipe
from cenfusion.fusion import sparsity_penalty, stack_modalities
from cenfusion.metrics.segmentation import format_scores, scores_from_confusion
from cenfusion.models.refinenet import CENRefineNet
from cenfusion.reporting.exchange import exchange_record
from cenfusion.reporting.runlog import save_confusion
from cenfusion.segmentation.config import SegmentationConfig
from cenfusion.segmentation.evaluate import Scores, score_loader
from cenfusion.segmentation.evaluate import evaluate as evaluate_model
from cenfusion.segmentation.modelio import TASK, model_record


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


def segmentation_step(
    net: Callable[[Any], Tensor],
    penalty: Callable[[], Tensor],
    inputs: Any,
    target: Tensor,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
) -> Tensor:
    """One step of the released loss: the cross-entropy of every head of ``net(inputs)``
    plus the sparsity term ``penalty()`` once per head; returns the detached loss."""
    with precision.autocast():
        heads = net(inputs)
        loss = segmentation_loss(heads.float(), target) + heads.shape[0] * penalty()
    precision.backward_step(loss, optimizer)
    precision.update()
    return loss.detach()


class SegmentationRecipe(Recipe):
    task = TASK

    def __init__(
        self,
        cfg: SegmentationConfig,
        ctx: Context,
        model: CENRefineNet,
        loaders: tuple[DataLoader | None, DataLoader],
    ) -> None:
        self.cfg, self.ctx, self.model = cfg, ctx, model
        self.net = ctx.prepare(model, training=True)
        self.train_loader, self.val_loader = loaders
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
        self.net.train()
        return islice(self.train_loader, self.cfg.max_iters)

    def train_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        inputs = stack_modalities(batch["inputs"].to(self.ctx.device, non_blocking=True))
        target = batch["mask"].to(self.ctx.device, non_blocking=True)
        penalty = partial(sparsity_penalty, self.model, self.cfg.lamda)
        loss = segmentation_step(
            self.net, penalty, inputs, target, self.optimizer, self.ctx.precision
        )
        return {"loss": loss}

    def epoch_record(self) -> dict[str, Any]:
        return {"stage": self.stage + 1, "exchange": exchange_record(self.model)}

    def wants_validation(self, epoch: int) -> bool:
        stage, within = self._position(epoch)
        return within % self.cfg.val_every == 0 or within == self.cfg.epochs[stage]

    def validate(self, epoch: int) -> tuple[Scores, float]:
        cfg, ctx = self.cfg, self.ctx
        metric = score_loader(self.net, self.val_loader, cfg, ctx.device, ctx.precision)
        matrices = metric.summed_confmats()
        if ctx.dist.is_main:
            save_confusion(cfg.run_dir, matrices)
        scores = {head: scores_from_confusion(matrix) for head, matrix in matrices.items()}
        return scores, float(scores["ensemble"]["miou"])

    def describe(self, record: dict[str, Any]) -> str:
        line = (
            f"epoch {record['epoch']}/{self.num_epochs()} (stage {record['stage']}): loss "
            f"{record['loss']:.4f}  exchange {record['exchange']['overall']:.3f}  "
            f"{record['seconds']:.1f}s (data {record['data_seconds']:.1f}s)"
        )
        if "val" in record:
            line += "  val (acc/mAcc/mIoU) " + "  ".join(
                f"{h} {s['pixel_acc']:.2f}/{s['mean_acc']:.2f}/{s['miou']:.2f}"
                for h, s in record["val"].items()
            )
        return line

    def start_line(self) -> str:
        train = len(self.train_loader.dataset) if self.train_loader else 0
        val_set = self.val_loader.dataset
        val = len(val_set.dataset if isinstance(val_set, Subset) else val_set)
        millions = sum(p.numel() for p in self.model.parameters()) / 1e6
        dist = self.ctx.dist
        processes = f", {dist.world_size} processes" if dist.enabled else ""
        return (
            f"model {self.model.config.backbone}: {millions:.1f} M parameters, {train} train / "
            f"{val} val samples, device {self.ctx.device}{processes}"
        )

    def best_line(self, best: BestScore) -> str | None:
        if best.metrics is None:
            return None
        head = f"best (ensemble mIoU {best.score:.2f}, epoch {best.epoch}):\n"
        return head + format_scores(best.metrics)

    def state_dict(self) -> dict[str, Any]:
        return {
            **model_record(self.model),
            "stage": self.stage,
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        """Continue from ``state``; a converted released model holds no training state."""
        load_weights(self.model, state["model"], where)
        self.stage = int(state.get("stage", 0))
        self.optimizer = self._optimizer(self.stage)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])

    def evaluate(self, run_dir: Path, save_img: bool = False) -> Scores:
        """``save_img``: also write each validation image's panel to ``run_dir/images``."""
        image_dir = run_dir / "images" if save_img else None
        ctx = self.ctx
        scores = evaluate_model(
            self.net, self.val_loader, self.cfg, ctx.device, ctx.precision, image_dir
        )
        log.info(format_scores(scores))
        return scores
