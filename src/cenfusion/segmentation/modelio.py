"""Segmentation models to and from checkpoints, released CEN files and exported ONNX ones
included."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cenfusion.engine.checkpoint import (
    load_checkpoint,
    load_weights,
    save_checkpoint,
    saved_config,
)
from cenfusion.engine.config import flag_name
from cenfusion.engine.run import RunConfig, RuntimeConfig
from cenfusion.errors import CenError, ForeignCheckpointError
from cenfusion.fusion import ExchangePointsError
from cenfusion.models.official import load_official_checkpoint
from cenfusion.models.refinenet import CENRefineNet, CENRefineNetConfig
from cenfusion.segmentation.config import modality_kinds, modality_names

if TYPE_CHECKING:
    from cenfusion.segmentation.onnx_segmenter import OnnxSegmenter

TASK = "segmentation"
#: Run-time settings that onnxruntime has no use for.
PYTORCH_ONLY = ("amp", "channels_last", "compile")


def model_record(model: CENRefineNet) -> dict:
    """What a checkpoint needs to rebuild ``model``: its config and its weights."""
    return {"task": TASK, "model_config": model.config.to_dict(), "model": model.state_dict()}


def save_segmenter(model: CENRefineNet, path: str | Path) -> None:
    """Write ``model`` as a checkpoint that :func:`load_segmenter`, ``cen seg predict``,
    ``seg eval`` and ``export onnx`` read (its config with its weights)."""
    if not isinstance(model, CENRefineNet):
        raise CenError(f"save_segmenter: expected a CENRefineNet, got {type(model).__name__}")
    save_checkpoint(path, model_record(model))


def model_from_checkpoint(path: str | Path) -> CENRefineNet:
    """Rebuild the segmentation model stored in a cenfusion checkpoint."""
    state = load_checkpoint(path, task=TASK)
    return model_from_record(state, str(path))


def model_from_record(state: dict, where: str) -> CENRefineNet:
    """The model of a checkpoint's record. A record naming exchange points its encoder
    lacks exchanged nowhere: it is rebuilt without them, the same function."""
    config = CENRefineNetConfig.from_dict(state["model_config"])
    try:
        model = CENRefineNet(config)
    except ExchangePointsError:
        model = CENRefineNet(replace(config, exchange_at=()))
    load_weights(model, state["model"], where)
    return model


def convert_official(source: str | Path, out: str | Path, threshold: float = 2e-2) -> CENRefineNet:
    """Convert a released CEN ``.pth.tar`` into a cenfusion checkpoint at ``out``, its
    exchange at ``threshold`` (the released value by default)."""
    model = load_official_checkpoint(source, threshold)
    save_checkpoint(out, {**model_record(model), "source": str(source)})
    return model


@dataclass(frozen=True)
class LoadedModel:
    """A segmenter read from a file, with what the file says of its inputs: the modality
    names it was trained on, each one's kind (how its files were decoded), the factor its
    raw depth values were multiplied by, the run's settings and its depth files' bit depths
    (each ``None`` when the file does not say, e.g. a released checkpoint)."""

    model: CENRefineNet | OnnxSegmenter
    modalities: tuple[str, ...] | None
    released: bool
    depth_scale: float | None = None
    kinds: tuple[str, ...] | None = None
    settings: dict | None = None
    depth_bits: dict[str, int] | None = None
    """Each depth modality's bit depth in the data it was trained on."""

    @property
    def heads(self) -> str:
        """``all`` (each modality's, then the ensemble), or ``ensemble`` for an ONNX file
        exported with the ensemble alone."""
        return getattr(self.model, "heads", "all")

    def trained_kinds(self) -> dict[str, str]:
        """``{name: kind}`` of the modalities the file names (empty when it names none)."""
        return dict(zip(self.modalities or (), self.kinds or ()))


def is_onnx(path: Path) -> bool:
    """Whether ``path`` names an exported ONNX file (by its suffix, in any case)."""
    return path.suffix.lower() == ".onnx"


def onnx_runtime(path: Path, cfg: RunConfig, given: Collection[str]) -> RunConfig:
    """``cfg`` to score ``path`` with: an ONNX file runs in onnxruntime, so the PyTorch-only
    run-time settings not ``given`` as flags are off (a run or a preset may have them on)."""
    if not is_onnx(path):
        return cfg
    return cfg.replace(**{n: False for n in PYTORCH_ONLY if n not in given})


def saved_settings(path: Path) -> dict | None:
    """The run settings a checkpoint or an exported ONNX file holds; ``None`` for a released
    file or an ONNX one exported without them."""
    if is_onnx(path):
        from cenfusion.segmentation.onnx_segmenter import OnnxSegmenter

        return OnnxSegmenter(path).settings
    return saved_config(path, TASK)


def check_onnx_runtime(path: Path, runtime: RuntimeConfig) -> None:
    """Refuse the PyTorch-only run-time flags for an ``.onnx`` file, which onnxruntime runs
    in the precision and layout it was exported in."""
    fast = [flag_name(n) for n in PYTORCH_ONLY if getattr(runtime, n)]
    if fast and is_onnx(path):
        raise CenError(f"{' '.join(fast)}: for PyTorch checkpoints; {path} runs in onnxruntime")


def load_segmenter(path: str | Path, official: bool | None = None) -> LoadedModel:
    """Read a cenfusion checkpoint, a released CEN ``.pth.tar`` or an exported ``.onnx``
    (run with onnxruntime).

    ``official=None`` detects the format: a file our loader rejects as foreign is read as a
    released one; ``True``/``False`` force one format.
    """
    path = Path(path)
    if is_onnx(path):
        from cenfusion.segmentation.onnx_segmenter import OnnxSegmenter

        onnx = OnnxSegmenter(path)
        return LoadedModel(
            onnx, onnx.modalities, False, onnx.depth_scale, onnx.kinds, onnx.settings
        )
    if official:
        return LoadedModel(load_official_checkpoint(path), None, True)
    try:
        state = load_checkpoint(path, task=TASK)
    except ForeignCheckpointError:
        if official is not None:
            raise
        try:
            return LoadedModel(load_official_checkpoint(path), None, True)
        except CenError as theirs:
            reason = str(theirs).removeprefix(f"{path}: ")
            raise CenError(
                f"{path}: neither a cenfusion checkpoint nor a released CEN one ({reason})"
            ) from theirs
    saved = state.get("config") or {}
    entries = saved.get("modalities")
    names = tuple(modality_names(entries)) if entries is not None else None
    kinds = tuple(modality_kinds(entries)) if entries is not None else None
    model = model_from_record(state, str(path))
    bits = (state.get("data") or {}).get("depth_bits")
    return LoadedModel(
        model, names, False, saved.get("depth_scale"), kinds, state.get("config"), bits
    )
