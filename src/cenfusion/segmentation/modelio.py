"""Segmentation models to and from checkpoints, released CEN files included."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cenfusion.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from cenfusion.fusion import ExchangePointsError
from cenfusion.models.official import load_official_checkpoint
from cenfusion.models.refinenet import CENRefineNet, CENRefineNetConfig

TASK = "segmentation"


def model_record(model: CENRefineNet) -> dict:
    """What a checkpoint needs to rebuild ``model``: its config and its weights."""
    return {"task": TASK, "model_config": model.config.to_dict(), "model": model.state_dict()}


def model_from_checkpoint(path: str | Path) -> CENRefineNet:
    """Rebuild the segmentation model stored in a cenfusion checkpoint."""
    state = load_checkpoint(path, task=TASK)
    return model_from_record(state, str(path))


def model_from_record(state: dict, where: str) -> CENRefineNet:
    """The model of a checkpoint's record. One saved before exchange points were checked
    may name points its encoder lacks: it never exchanged, and is rebuilt without them."""
    config = CENRefineNetConfig.from_dict(state["model_config"])
    try:
        model = CENRefineNet(config)
    except ExchangePointsError:
        model = CENRefineNet(replace(config, exchange_at=()))
    load_weights(model, state["model"], where)
    return model


def convert_official(source: str | Path, out: str | Path) -> CENRefineNet:
    """Convert a released CEN ``.pth.tar`` into a cenfusion checkpoint at ``out``."""
    model = load_official_checkpoint(source)
    save_checkpoint(out, {**model_record(model), "source": str(source)})
    return model
