"""Evaluation of a translation generator on the validation views, in the released layout.

One :class:`Evaluator` serves training (every ``val_every`` epochs) and ``--evaluate``. For
``M`` inputs it writes, under the run folder, one PNG per view and folder::

    input0/ .. input{M-1}/   the inputs as the network saw them
    fake0/  .. fake{M-1}/    each branch's prediction
    fake{M}/                 the alpha ensemble
    real/                    the target

and returns, per head (branches then ensemble), FID and KID (x100) against the targets with
the FID InceptionV3 (when an extractor is given) and the L1 / MSE to the target, measured
in the network's ``[-1, 1]`` range (so ``l1`` is the quantity the training loss weighs by
100; halve it for the ``[0, 1]`` pixel scale, quarter the MSE).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from cenfusion.engine.checkpoint import load_checkpoint, load_weights
from cenfusion.engine.distributed import on_main
from cenfusion.engine.run import BEST, LAST, log
from cenfusion.engine.trainer import prepare
from cenfusion.errors import CenError
from cenfusion.fusion import stack_modalities
from cenfusion.metrics.generative import fid_from_features, kid_from_features
from cenfusion.models.unet import CENUNet, CENUNetConfig
from cenfusion.translation.build import datasets, fid_extractor, format_metrics
from cenfusion.translation.config import TranslationConfig
from cenfusion.translation.modelio import TASK

__all__ = ["Evaluator", "evaluate_run", "save_images"]

KID_SUBSETS = 50
KID_SUBSET_SIZE = 1000


def save_images(images: Tensor, folder: Path, names: Iterable[str]) -> None:
    """Write ``(B, 3, H, W)`` images in ``[-1, 1]`` as 8-bit RGB PNGs ``folder/{name}.png``."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for array, name in zip(pixels.permute(0, 2, 3, 1).cpu().numpy(), names):
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"{name}.png")


class Evaluator:
    """Runs a generator over ``loader`` and measures each head against the target.

    Args:
        loader: yields ``{"inputs": (B, M, 3, H, W), "target": (B, 3, H, W), "name": [B]}``
            in a fixed order.
        device: where the generator runs.
        extractor: images ``(B, 3, H, W)`` in ``[-1, 1]`` -> features ``(B, D)``
            (:class:`~cenfusion.metrics.generative.InceptionFeatures`), or None to skip
            FID and KID.
        autocast: the mixed-precision context for the generator (``nullcontext()`` when off).
        dropout: keep the generator's dropout active while predicting, as the released code
            (and pix2pix) evaluates, so each evaluation samples the generator's noise; False
            evaluates the deterministic ``eval()`` network. Norms behave alike in both modes.

    The targets' features are computed on the first call and reused: the validation views
    do not change during a run.
    """

    def __init__(
        self,
        loader: Iterable[dict[str, Any]],
        device: torch.device,
        extractor: nn.Module | None,
        autocast: AbstractContextManager,
        dropout: bool = True,
    ) -> None:
        self.loader = loader
        self.device = device
        self.extractor = extractor
        self.autocast = autocast
        self.dropout = dropout
        self._real_features: Tensor | None = None

    @torch.no_grad()
    def __call__(self, generator: nn.Module, out_dir: Path) -> dict[str, list[float]]:
        """Predict every view, write the layout under ``out_dir``, return the metrics.

        Returns ``{"l1": [...], "mse": [...]}`` plus ``"fid"`` and ``"kid_x100"`` when an
        extractor is set; each list has ``M + 1`` entries, the branches then the ensemble.
        """
        was_training = generator.training
        generator.eval()
        if self.dropout:
            for module in generator.modules():
                if isinstance(module, nn.Dropout):
                    module.train()
        folders: list[Path] = []
        sums: dict[str, Tensor] = {}
        fake_features: list[list[Tensor]] = []
        real_features: list[Tensor] = []
        count = 0
        for batch in self.loader:
            inputs = batch["inputs"].to(self.device, non_blocking=True)
            target = batch["target"].to(self.device, non_blocking=True)
            m = inputs.shape[1]
            if not folders:
                names = [f"input{i}" for i in range(m)] + [f"fake{k}" for k in range(m + 1)]
                folders = [out_dir / name for name in (*names, "real")]
                for folder in folders:
                    shutil.rmtree(folder, ignore_errors=True)
                    folder.mkdir(parents=True)
                fake_features = [[] for _ in range(m + 1)]
            with self.autocast:
                heads = generator(stack_modalities(inputs))
            heads = heads.float().clamp(-1, 1)
            error = heads - target[None]
            batch_sums = {
                "l1": error.abs().flatten(2).mean(2).sum(1),
                "mse": error.square().flatten(2).mean(2).sum(1),
            }
            for key, value in batch_sums.items():
                sums[key] = sums.get(key, 0) + value.double().cpu()
            count += target.shape[0]
            names = list(batch["name"])
            images = [*inputs.unbind(1), *heads.unbind(0), target]
            for folder, image in zip(folders, images):
                save_images(image, folder, names)
            if self.extractor is not None:
                for k, head in enumerate(heads):
                    fake_features[k].append(self.extractor(head).double().cpu())
                if self._real_features is None:
                    real_features.append(self.extractor(target).double().cpu())
        generator.train(was_training)
        metrics = {key: (value / count).tolist() for key, value in sums.items()}
        if self.extractor is not None:
            if self._real_features is None:
                self._real_features = torch.cat(real_features)
            real = self._real_features
            fakes = [torch.cat(f) for f in fake_features]
            metrics["fid"] = [fid_from_features(f, real) for f in fakes]
            metrics["kid_x100"] = [
                100.0 * kid_from_features(f, real, KID_SUBSETS, KID_SUBSET_SIZE)[0] for f in fakes
            ]
        return metrics


def evaluate_run(cfg: TranslationConfig, checkpoint: Path | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (default ``runs/EXP/best.pth``, else ``last.pth``).

    Writes the prediction layout into the run folder (``best/`` is left alone), appends an
    ``{"evaluate": ...}`` line to the metrics log; returns ``{"checkpoint", "epoch", "metrics"}``.
    Under torchrun rank 0 evaluates alone and every process returns its result.
    """
    run_dir = cfg.run_dir
    path = checkpoint or next((run_dir / n for n in (BEST, LAST) if (run_dir / n).is_file()), None)
    if path is None:
        raise CenError(f"--evaluate: no checkpoint ({BEST} or {LAST}) in {run_dir}")
    with prepare(cfg) as ctx:
        state = load_checkpoint(path, task=TASK)
        generator = CENUNet(CENUNetConfig.from_dict(state["model_config"]))
        load_weights(generator, state["model"], str(path))
        if generator.num_modalities != len(cfg.inputs):
            raise CenError(
                f"{path}: a model for {generator.num_modalities} inputs, but "
                f"--img-types names {len(cfg.inputs)}"
            )
        _, val_set = datasets(cfg)
        epoch = int(state["epoch"])
        folder = ctx.open_folder(cfg, resuming=True, force=False)

        def evaluate() -> dict[str, Any]:
            evaluator = Evaluator(
                ctx.loader(val_set, cfg),
                ctx.device,
                fid_extractor(cfg, ctx.device),
                ctx.precision.autocast(),
                cfg.eval_dropout,
            )
            metrics = evaluator(generator.to(ctx.device), run_dir)
            log.info(
                f"evaluate {path} (epoch {epoch}) on {len(val_set)} views: "
                f"{format_metrics(metrics)}"
            )
            folder.append_metrics(
                {"evaluate": True, "checkpoint": path.name, "epoch": epoch, "val": metrics}
            )
            return {"checkpoint": str(path), "epoch": epoch, "metrics": metrics}

        return on_main(evaluate)
