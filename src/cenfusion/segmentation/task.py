"""Segmentation as a :class:`~cenfusion.engine.task.Task`: its settings, its recipe built and
checked, and what ``cen info`` reads from its checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from cenfusion.data.class_names import resolve_class_names
from cenfusion.engine.task import ModelSummary, Task
from cenfusion.engine.trainer import Context
from cenfusion.reporting.html import write_report
from cenfusion.reporting.plots import write_plots
from cenfusion.reporting.runlog import RunKind
from cenfusion.segmentation.build import (
    build_loaders,
    build_model,
    check_data,
    check_model_fits,
    check_resumed_depth_scale,
    check_resumed_model,
    check_same_modalities,
)
from cenfusion.segmentation.config import PRESETS, SegmentationConfig, modality_names
from cenfusion.segmentation.modelio import TASK, model_from_record
from cenfusion.segmentation.train import SegmentationRecipe

#: The input size ``cen info`` counts FLOPs at: NYUDv2's images.
INFO_SIZE = (480, 640)


def build_recipe(
    cfg: SegmentationConfig,
    ctx: Context,
    state: dict[str, Any] | None,
    where: str,
    training: bool,
) -> SegmentationRecipe:
    """Data checked, loaders, and the model: the checkpoint's (checked against the
    settings) or a new one."""
    depth_bits = check_data(cfg, training=training)
    loaders = build_loaders(cfg, ctx, training=training)
    model = model_from_record(state, where) if state else build_model(cfg)
    if state is not None:
        check_model_fits(model, cfg, where)
        saved = state.get("config") or {}
        check_same_modalities(saved.get("modalities"), cfg, where, training)
        if training or saved:  # without saved settings, cfg's model ones are a preset's
            check_resumed_model(model, cfg, where, training)
        check_resumed_depth_scale(saved.get("depth_scale"), cfg, where, training)
    recipe = SegmentationRecipe(cfg, ctx, model.to(ctx.device), loaders)
    if training:
        recipe.data_facts = {"depth_bits": depth_bits}
    return recipe


def summarize(state: dict[str, Any], where: str) -> ModelSummary:
    """The checkpoint's model, its modalities and class names, and its training progress."""
    model = model_from_record(state, where)
    config = state.get("config") or {}
    classes = resolve_class_names(
        model.config.num_classes,
        config.get("data"),
        synthetic="data" in config and config["data"] is None,
    )
    progress = None
    epochs = config.get("epochs")
    if "epoch" in state and isinstance(epochs, list):
        progress = f"{int(state['epoch'])} of {sum(epochs)} epochs done"
        best = state.get("best") or {}
        if isinstance(best.get("score"), float):
            progress += f"; best ensemble mIoU {best['score']:.2f}"
    modalities = modality_names(config.get("modalities", []))
    return ModelSummary(model, modalities, classes, INFO_SIZE, progress)


def head_names(config: Mapping[str, Any], count: int) -> list[str] | None:
    """The run's modalities (``NAME`` of each ``NAME:COLUMN:KIND``), then the ensemble."""
    modalities = config.get("modalities")
    if not isinstance(modalities, list) or len(modalities) != count - 1:
        return None
    return [*modality_names(modalities), "ensemble"]


#: What a report says of a segmentation run.
RUN_KIND = RunKind("segmentation", head_names)


def default_preset(flags: Mapping[str, Any]) -> str:
    """NYUDv2's recipe for one's own data (``--data``), else the embedded synthetic set's."""
    return "nyudv2" if flags.get("data") is not None else "synthetic"


SEGMENTATION = Task(
    name=TASK,
    config=SegmentationConfig,
    presets=PRESETS,
    default_preset=default_preset,
    build_recipe=build_recipe,
    summarize=summarize,
    after_validation=partial(write_plots, kind=RUN_KIND),
    write_report=partial(write_report, kind=RUN_KIND),
    supersedes={"enc": ("backbone",)},
)
