"""CEN image-to-image translation (CEN paper, Sec. 4.2) as an engine recipe: one Adam per
network; D is updated first, then G against the updated D, as in pix2pix, with the losses of
:mod:`~cenfusion.translation.losses`.

Besides the engine's files, the run folder holds the :mod:`~cenfusion.translation.evaluate`
layout and ``best/fake*/`` copies of the best epoch's predictions. The best epoch has the
lowest ensemble FID, or the lowest ensemble L1 when FID is off or its network is missing.

Under torchrun (or ``--gpu 0 1``) the generator and the discriminator are each wrapped in DDP
and every process trains on its share of the views (a DistributedSampler). Validation runs on
rank 0 alone, over all views, while the others wait for its metrics: FID needs every feature in
one place and the views are written to one folder, so the scores equal a one-process
evaluation of the same weights.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from cenfusion.data.taskonomy import DOMAINS
from cenfusion.engine.checkpoint import load_weights
from cenfusion.engine.distributed import on_main
from cenfusion.engine.run import log
from cenfusion.engine.trainer import BestScore, Context, Recipe
from cenfusion.fusion import sparsity_penalty, stack_modalities
from cenfusion.models.patchgan import PatchDiscriminator, PatchGANConfig
from cenfusion.reporting.exchange import exchange_record
from cenfusion.translation.build import (
    build_models,
    fid_extractor,
    format_metrics,
)
from cenfusion.translation.config import TranslationConfig
from cenfusion.translation.evaluate import Evaluator, keep_best_views
from cenfusion.translation.losses import pix2pix_step
from cenfusion.translation.modelio import TASK

__all__ = ["TranslationRecipe"]


class TranslationRecipe(Recipe):
    task = TASK
    higher_is_better = False

    def __init__(
        self, cfg: TranslationConfig, ctx: Context, loaders: tuple[DataLoader | None, DataLoader]
    ) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.train_loader, self.val_loader = loaders
        # Weights from the seed alone (drawn on the CPU); the run's own streams, per rank for
        # dropout, CUDA's included, go on after.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(cfg.seed)
            generator, discriminator = build_models(cfg)
        self.generator = generator.to(ctx.device)
        self.g_net = ctx.prepare(self.generator, training=True)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g, betas=betas)
        self._use_discriminator(discriminator)
        self.evaluator: Evaluator | None = None
        self.criterion = on_main(self._set_up_validation)

    def _use_discriminator(self, discriminator: PatchDiscriminator) -> None:
        """Train ``discriminator`` (on the run's device, with its own optimiser)."""
        self.discriminator = discriminator.to(self.ctx.device)
        self.d_net = self.ctx.prepare(self.discriminator, training=True)
        betas = (self.cfg.beta1, self.cfg.beta2)
        self.opt_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=self.cfg.lr_d, betas=betas
        )

    def start_line(self) -> str:
        cfg, ctx = self.cfg, self.ctx
        inputs = " + ".join(DOMAINS[t] for t in cfg.inputs)
        processes = f", {ctx.dist.world_size} processes" if ctx.dist.enabled else ""
        train = len(self.train_loader.dataset) if self.train_loader else 0
        return (
            f"cen i2i: {inputs} -> {DOMAINS[cfg.target]}; {train} train / "
            f"{len(self.val_loader.dataset)} val views, device {ctx.device}{processes}"
        )

    def best_line(self, best: BestScore) -> str | None:
        if best.score is None:
            return None
        return f"done: best {self.criterion} {best.score:.4f} at epoch {best.epoch}"

    def keeps_best(self, state: dict[str, Any]) -> bool:
        if state.get("criterion") == self.criterion:
            return True
        log.info(
            f"the best epoch was chosen by {state.get('criterion')}, now by "
            f"{self.criterion}: best tracking restarts"
        )
        return False

    def _set_up_validation(self) -> str:
        """Set ``self.evaluator`` (called on rank 0 only); returns the criterion of the best
        epoch."""
        ctx, extractor = self.ctx, fid_extractor(self.cfg, self.ctx.device)
        autocast, dropout = ctx.precision.autocast(), self.cfg.eval_dropout
        self.evaluator = Evaluator(self.val_loader, ctx.device, extractor, autocast, dropout)
        return "fid" if extractor is not None else "l1"

    def num_epochs(self) -> int:
        return self.cfg.epochs

    def begin_epoch(self, epoch: int) -> DataLoader:
        self.generator.train()
        self.discriminator.train()
        return self.train_loader

    def train_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        x = stack_modalities(batch["inputs"].to(self.ctx.device, non_blocking=True))
        y = batch["target"].to(self.ctx.device, non_blocking=True)
        return pix2pix_step(
            (self.g_net, self.d_net),
            self.discriminator,
            (self.opt_g, self.opt_d),
            x,
            y,
            self.cfg.l1_weight,
            partial(sparsity_penalty, self.generator, self.cfg.lamda),
            self.ctx.precision,
        )

    def epoch_record(self) -> dict[str, Any]:
        return {"exchange": exchange_record(self.generator)}

    def wants_validation(self, epoch: int) -> bool:
        return epoch % self.cfg.val_every == 0 or epoch == self.cfg.epochs

    def validate(self, epoch: int) -> tuple[dict[str, Any], float]:
        metrics = on_main(lambda: self.evaluator(self.generator, self.cfg.run_dir))
        return metrics, metrics[self.criterion][-1]

    def evaluate(self, run_dir: Path, **options: Any) -> dict[str, Any]:
        """The validation, its views written to the run folder as every validation's are."""
        metrics, _ = self.validate(0)
        log.info(f"evaluated on {len(self.val_loader.dataset)} views: {format_metrics(metrics)}")
        return metrics

    def on_best(self, epoch: int) -> None:
        if self.ctx.dist.is_main:
            keep_best_views(self.cfg.run_dir, self.generator.num_modalities + 1)

    def describe(self, record: dict[str, Any]) -> str:
        line = (
            f"epoch {record['epoch']}/{self.cfg.epochs}: loss D {record['loss_d']:.4f}, GAN "
            f"{record['loss_gan']:.4f}, L1 {record['loss_l1']:.4f}, penalty "
            f"{record['penalty']:.4f}; exchanging {record['exchange']['overall']:.1%}; "
            f"{record['seconds']:.1f} s (data {record['data_seconds']:.1f} s)"
        )
        if "val" in record:
            line += f"\nepoch {record['epoch']} val: {format_metrics(record['val'])}"
            line += f"; best {self.criterion}" if record["best"] else ""
        return line

    def state_dict(self) -> dict[str, Any]:
        return {
            "model_config": self.generator.config.to_dict(),
            "model": self.generator.state_dict(),
            "discriminator_config": self.discriminator.config.to_dict(),
            "discriminator": self.discriminator.state_dict(),
            "optimizer_g": self.opt_g.state_dict(),
            "optimizer_d": self.opt_d.state_dict(),
            "criterion": self.criterion,
        }

    def load_state_dict(self, state: dict[str, Any], where: str) -> None:
        """Continue from ``state``; a converted released checkpoint holds no optimiser state
        (and maybe no discriminator): those start afresh, and the log says so."""
        load_weights(self.generator, state["model"], where)
        if "discriminator" in state:
            saved = PatchGANConfig.from_dict(state["discriminator_config"])
            if saved != self.discriminator.config:
                log.info(f"{where}: its discriminator keeps the {saved.norm!r} norms it has")
                self._use_discriminator(PatchDiscriminator(saved))
            load_weights(self.discriminator, state["discriminator"], where)
        else:
            log.info(f"{where}: no discriminator; a new one starts")
        if "optimizer_g" not in state:
            log.info(f"{where}: no optimiser state; Adam starts afresh")
            return
        self.opt_g.load_state_dict(state["optimizer_g"])
        self.opt_d.load_state_dict(state["optimizer_d"])
