"""Training and evaluation of CEN image-to-image translation (CEN paper, Sec. 4.2; pix2pix losses).

Per batch, with ``M`` input modalities stacked along the batch, generator heads
``G = (M + 1, B, 3, H, W)`` (branches, then the ensemble) and target ``y``:

- discriminator: ``sum_m 0.5 * [BCE(D(x_m, y), 1) + BCE(D(x_m, G_m), 0)]``;
- generator: ``sum_m BCE(D(x_m, G_m), 1) + 100 * sum_{k <= M} L1(G_k, y)
  + lamda * sum |gamma|`` over the disjoint penalised parts of the exchanging norms.

The ensemble head gets the L1 term too; its inputs are detached, so it trains only alpha.
One Adam per network (lr 2e-4, betas (0.5, 0.999)); D is updated first, then G against the
updated D, as in pix2pix.

The run folder ``runs/EXP`` holds ``config.yaml``, ``log.txt`` (the run log),
``metrics.jsonl`` (one JSON object per epoch), ``last.pth`` and ``best.pth`` and the
:mod:`~cenfusion.translation.evaluate` layout, plus ``best/fake*/`` copies of the best
epoch's predictions. The best epoch has the lowest ensemble FID, or the lowest ensemble L1
when FID is off or its network is not installed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cenfusion.data.taskonomy import DOMAINS, TaskonomyDataset, ensure_synthetic_taskonomy
from cenfusion.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from cenfusion.engine.distributed import resolve_device
from cenfusion.engine.run import append_metrics, capture_rng, restore_rng
from cenfusion.errors import CenError
from cenfusion.fusion import exchange_stats, sparsity_penalty
from cenfusion.metrics.generative import InceptionFeatures
from cenfusion.models.patchgan import PatchDiscriminator, create_patchgan
from cenfusion.models.unet import CENUNet, CENUNetConfig, create_cen_unet
from cenfusion.translation.config import TranslationConfig
from cenfusion.translation.evaluate import Evaluator, stack_batch

__all__ = ["build_models", "evaluate_run", "log", "run_log", "train", "train_one_epoch"]

TASK = "translation"
LAST, BEST = "last.pth", "best.pth"
METRICS = "metrics.jsonl"

log = logging.getLogger("cenfusion.translation")


@contextmanager
def run_log(run_dir: Path | None) -> Iterator[None]:
    """Send :data:`log` to stdout and, given a run folder, ``run_dir/log.txt`` (appended).

    The one output channel of the task: library code logs, it never prints.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()


# ----------------------------------------------------------------------------- setup


def _resolve_data(cfg: TranslationConfig) -> TranslationConfig:
    """``cfg`` with ``data`` set: the given root, or the synthetic set (made on first use)."""
    if cfg.data is not None:
        return cfg
    return cfg.replace(data=str(ensure_synthetic_taskonomy()))


def _datasets(cfg: TranslationConfig) -> tuple[TaskonomyDataset, TaskonomyDataset]:
    common = {"root": cfg.data, "inputs": cfg.inputs, "target": cfg.target, "size": cfg.size}
    train_set = TaskonomyDataset(split="train", train=True, load_size=cfg.load_size, **common)
    val_set = TaskonomyDataset(split="val", train=False, **common)
    return train_set, val_set


def _loader(
    dataset: TaskonomyDataset, cfg: TranslationConfig, train: bool, pin: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train,
        num_workers=cfg.workers,
        pin_memory=pin,
    )


def build_models(cfg: TranslationConfig) -> tuple[CENUNet, PatchDiscriminator]:
    """The generator and the shared discriminator of ``cfg`` (fresh weights)."""
    generator = create_cen_unet(
        num_modalities=len(cfg.inputs),
        ngf=cfg.ngf,
        num_downs=cfg.num_downs,
        threshold=cfg.threshold,
    )
    return generator, create_patchgan(ndf=cfg.ndf)


def _autocast(cfg: TranslationConfig, device: torch.device) -> AbstractContextManager:
    """bfloat16 autocast when ``cfg.amp`` (no gradient scaler needed), else a no-op."""
    if not cfg.amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _extractor(cfg: TranslationConfig, device: torch.device) -> InceptionFeatures | None:
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


# ----------------------------------------------------------------------------- losses


def _branch_bce(logits: Tensor, real: bool, num_branches: int) -> Tensor:
    """Sum over branches of each branch's mean BCE; ``logits`` ``(M*B, 1, h, w)``, stacked."""
    logits = logits.float()
    target = torch.full_like(logits, 1.0 if real else 0.0)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return loss.view(num_branches, -1).mean(1).sum()


def train_one_epoch(
    generator: CENUNet,
    discriminator: PatchDiscriminator,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    loader: DataLoader,
    cfg: TranslationConfig,
    device: torch.device,
    autocast: AbstractContextManager,
    epoch: int,
) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch means of the loss terms."""
    generator.train()
    discriminator.train()
    m = generator.num_modalities
    totals: dict[str, float] = {}
    steps = 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not sys.stderr.isatty())
    for batch in bar:
        x = stack_batch(batch["inputs"].to(device, non_blocking=True))  # (M*B, 3, H, W)
        y = batch["target"].to(device, non_blocking=True)  # (B, 3, H, W)
        y_branches = y.repeat(m, 1, 1, 1)  # (M*B, 3, H, W): the target beside every branch
        with autocast:
            heads = generator(x)  # (M+1, B, 3, H, W)
        fakes = heads[:m].reshape(x.shape)

        discriminator.requires_grad_(True)
        with autocast:
            real_logits = discriminator(torch.cat([x, y_branches], 1))
            fake_logits = discriminator(torch.cat([x, fakes.detach()], 1))
        loss_d = 0.5 * (_branch_bce(real_logits, True, m) + _branch_bce(fake_logits, False, m))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        discriminator.requires_grad_(False)
        with autocast:
            fooled = discriminator(torch.cat([x, fakes], 1))
        loss_gan = _branch_bce(fooled, True, m)
        loss_l1 = (heads.float() - y[None]).abs().flatten(2).mean(2).mean(1).sum()
        penalty = sparsity_penalty(generator, cfg.lamda)
        loss_g = loss_gan + cfg.l1_weight * loss_l1 + penalty
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        terms = {"loss_d": loss_d, "loss_gan": loss_gan, "loss_l1": loss_l1, "penalty": penalty}
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach())
        steps += 1
    discriminator.requires_grad_(True)
    return {key: value / max(steps, 1) for key, value in totals.items()}


# ----------------------------------------------------------------------------- run state


def _record(
    cfg: TranslationConfig,
    generator: CENUNet,
    discriminator: PatchDiscriminator,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    epoch: int,
    best: dict[str, Any],
) -> dict[str, Any]:
    """Everything a checkpoint holds: models' configs and weights, optimisers, progress, RNG."""
    return {
        "task": TASK,
        "model_config": generator.config.to_dict(),
        "model": generator.state_dict(),
        "discriminator_config": discriminator.config.to_dict(),
        "discriminator": discriminator.state_dict(),
        "run_config": cfg.to_dict(),
        "optimizer_g": opt_g.state_dict(),
        "optimizer_d": opt_d.state_dict(),
        "epoch": epoch,
        "best": best,
        "rng": capture_rng(),
    }


def _truncate_metrics(run_dir: Path, epoch: int) -> None:
    """Drop metric lines of epochs after ``epoch`` (written after the last checkpoint)."""
    path = run_dir / METRICS
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epoch]
    path.write_text("".join(line + "\n" for line in kept))


def _format(metrics: dict[str, list[float]]) -> str:
    def row(values: list[float], digits: int) -> str:
        *branches, ensemble = values
        return " / ".join(f"{v:.{digits}f}" for v in branches) + f" | ens {ensemble:.{digits}f}"

    parts = [
        f"{key} {row(metrics[key], 2 if key in ('fid', 'kid_x100') else 4)}"
        for key in ("fid", "kid_x100", "l1", "mse")
        if key in metrics
    ]
    return "; ".join(parts)


def _criterion(extractor: nn.Module | None) -> str:
    return "fid" if extractor is not None else "l1"


def _update_best(run_dir: Path, num_heads: int) -> None:
    """Replace ``best/fake*`` by the predictions just written."""
    best_dir = run_dir / "best"
    for k in range(num_heads):
        target = best_dir / f"fake{k}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(run_dir / f"fake{k}", target)


# ----------------------------------------------------------------------------- entry points


def train(cfg: TranslationConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or, with ``resume``, continue ``runs/EXP/last.pth``) up to ``cfg.epochs``.

    Returns ``{"epoch", "best": {"criterion", "score", "epoch"}, "metrics"}`` where
    ``metrics`` are the last evaluation's (see :class:`Evaluator`).

    Raises:
        CenError: bad settings, missing data, or a run folder that already holds a run
            when ``resume`` is off.
    """
    cfg.validate()
    run_dir = cfg.run_dir
    if not resume and (run_dir / LAST).exists():
        raise CenError(
            f"{run_dir} already holds a run ({LAST}); pass --resume to continue it or "
            "choose another -c EXP"
        )
    if resume and not (run_dir / LAST).is_file():
        raise CenError(f"--resume: no checkpoint {run_dir / LAST} to continue")
    with run_log(run_dir):
        cfg = _resolve_data(cfg)
        train_set, val_set = _datasets(cfg)
        log.info(
            f"cen i2i train: {' + '.join(DOMAINS[t] for t in cfg.inputs)} -> "
            f"{DOMAINS[cfg.target]}; {len(train_set)} train / {len(val_set)} val views"
        )
        log.info("config:\n" + cfg.to_yaml().rstrip())
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

        device = resolve_device(cfg.device, cfg.gpu)
        torch.manual_seed(cfg.seed)
        generator, discriminator = build_models(cfg)
        generator.to(device)
        discriminator.to(device)
        opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=cfg.betas)
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=cfg.betas)
        autocast = _autocast(cfg, device)
        extractor = _extractor(cfg, device)
        criterion = _criterion(extractor)
        best: dict[str, Any] = {"criterion": criterion, "score": math.inf, "epoch": 0}
        start = 0
        if resume:
            state = load_checkpoint(run_dir / LAST, task=TASK)
            where = str(run_dir / LAST)
            load_weights(generator, state["model"], where)
            load_weights(discriminator, state["discriminator"], where)
            opt_g.load_state_dict(state["optimizer_g"])
            opt_d.load_state_dict(state["optimizer_d"])
            start = int(state["epoch"])
            if state["best"]["criterion"] == criterion:
                best = dict(state["best"])
            else:
                log.info(
                    f"best epoch was chosen by {state['best']['criterion']}, now by "
                    f"{criterion}: best tracking restarts"
                )
            restore_rng(state["rng"])
            _truncate_metrics(run_dir, start)
            log.info(f"resumed {where} after epoch {start}")

        pin = device.type == "cuda"
        train_loader = _loader(train_set, cfg, train=True, pin=pin)
        evaluator = Evaluator(
            _loader(val_set, cfg, train=False, pin=pin),
            device,
            extractor,
            autocast,
            dropout=cfg.eval_dropout,
        )
        metrics: dict[str, list[float]] = {}
        for epoch in range(start + 1, cfg.epochs + 1):
            began = time.perf_counter()
            losses = train_one_epoch(
                generator, discriminator, opt_g, opt_d, train_loader, cfg, device, autocast, epoch
            )
            record: dict[str, Any] = {
                "epoch": epoch,
                **losses,
                "exchange": exchange_stats(generator).overall,
                "seconds": time.perf_counter() - began,
            }
            log.info(
                f"epoch {epoch}/{cfg.epochs}: loss D {losses['loss_d']:.4f}, "
                f"GAN {losses['loss_gan']:.4f}, L1 {losses['loss_l1']:.4f}, penalty "
                f"{losses['penalty']:.4f}; exchanging {record['exchange']:.1%} of "
                f"penalised gammas; {record['seconds']:.1f} s"
            )
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                metrics = evaluator(generator, run_dir)
                score = metrics[criterion][-1]
                improved = score < best["score"]
                if improved:
                    best = {"criterion": criterion, "score": score, "epoch": epoch}
                    _update_best(run_dir, generator.num_modalities + 1)
                record.update(metrics, best=improved)
                log.info(
                    f"epoch {epoch} val: {_format(metrics)}"
                    + (f"; best {criterion}" if improved else "")
                )
            append_metrics(run_dir / METRICS, record)
            state = _record(cfg, generator, discriminator, opt_g, opt_d, epoch, best)
            if record.get("best"):
                save_checkpoint(run_dir / BEST, state)
            save_checkpoint(run_dir / LAST, state)
        log.info(f"done: best {best['criterion']} {best['score']:.4f} at epoch {best['epoch']}")
        return {"epoch": cfg.epochs, "best": best, "metrics": metrics}


def evaluate_run(cfg: TranslationConfig) -> dict[str, Any]:
    """Evaluate ``runs/EXP/best.pth`` (else ``last.pth``) on the validation views.

    Writes the prediction layout into the run folder (``best/`` is left alone), appends
    an ``{"evaluate": true, ...}`` line to the metrics log and returns
    ``{"checkpoint", "epoch", "metrics"}``.
    """
    cfg.validate()
    run_dir = cfg.run_dir
    path = next((run_dir / n for n in (BEST, LAST) if (run_dir / n).is_file()), None)
    if path is None:
        raise CenError(f"--evaluate: no checkpoint ({BEST} or {LAST}) in {run_dir}")
    with run_log(run_dir):
        cfg = _resolve_data(cfg)
        state = load_checkpoint(path, task=TASK)
        generator = CENUNet(CENUNetConfig.from_dict(state["model_config"]))
        load_weights(generator, state["model"], str(path))
        if generator.num_modalities != len(cfg.inputs):
            raise CenError(
                f"{path}: a model for {generator.num_modalities} inputs, but --img-types "
                f"names {len(cfg.inputs)}"
            )
        _, val_set = _datasets(cfg)
        device = resolve_device(cfg.device, cfg.gpu)
        generator.to(device)
        extractor = _extractor(cfg, device)
        evaluator = Evaluator(
            _loader(val_set, cfg, train=False, pin=device.type == "cuda"),
            device,
            extractor,
            _autocast(cfg, device),
            dropout=cfg.eval_dropout,
        )
        metrics = evaluator(generator, run_dir)
        epoch = int(state["epoch"])
        log.info(f"evaluate {path} (epoch {epoch}) on {len(val_set)} views: {_format(metrics)}")
        append_metrics(
            run_dir / METRICS,
            {"evaluate": True, "checkpoint": path.name, "epoch": epoch, **metrics},
        )
        return {"checkpoint": str(path), "epoch": epoch, "metrics": metrics}
