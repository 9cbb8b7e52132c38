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

from cenfusion.fusion import stack_modalities
from cenfusion.metrics.generative import fid_from_features, kid_from_features

__all__ = ["Evaluator", "keep_best_views", "save_images", "use_dropout"]

KID_SUBSETS = 50
KID_SUBSET_SIZE = 1000


def save_images(images: Tensor, folder: Path, names: Iterable[str]) -> None:
    """Write ``(B, 3, H, W)`` images in ``[-1, 1]`` as 8-bit RGB PNGs ``folder/{name}.png``."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for array, name in zip(pixels.permute(0, 2, 3, 1).cpu().numpy(), names):
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"{name}.png")


def use_dropout(generator: nn.Module, active: bool) -> None:
    """Switch the dropout of an ``eval()`` generator on (each prediction then samples the
    generator's noise, as the released code evaluates) or off."""
    for module in generator.modules():
        if isinstance(module, nn.Dropout):
            module.train(active)


def keep_best_views(run_dir: Path, num_heads: int) -> None:
    """Copy the predictions of every head (``fake*/``) to ``best/fake*/``."""
    for k in range(num_heads):
        target = run_dir / "best" / f"fake{k}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(run_dir / f"fake{k}", target)


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
        use_dropout(generator, self.dropout)
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
