"""Key map between the released CEN segmentation checkpoints and :class:`CENRefineNet`.

The released ``.pth.tar`` holds ``{"segmenter": state_dict, ...}`` saved under
``nn.DataParallel`` (keys start with ``module.``). Shared modules are stored as
``<path>.module.<param>``; private BatchNorms as ``<path>.bn_<m>.<param>`` with one entry
per modality, where we keep one ``(M, C)`` tensor. The encoder paths equal ours under
``encoder.``; the decoder paths are listed in :func:`_decoder_path`. The map is total in
both directions: loading fails on the first key it cannot place or cannot find.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from cenfusion.errors import CenError
from cenfusion.fusion import ModalityBatchNorm2d
from cenfusion.models.refinenet import (
    RESNET_DEPTHS,
    CENRefineNet,
    CENRefineNetConfig,
    create_cen_refinenet,
)
from cenfusion.models.released import (
    check_state_dict,
    load_mapped,
    numpy_globals,
    read_released_file,
)

_LAYER3_BLOCKS_TO_DEPTH = {6: 50, 23: 101, 36: 152}


def _decoder_path(path: str) -> str:
    """Our decoder module path (without ``decoder.``) -> the released module path."""
    if path == "classifier":
        return "clf_conv"
    match = re.fullmatch(
        r"stages\.(\d)\.(reduce|fuse|project|crp\.convs|rcu_in|rcu_out)(?:\.(\d+))?(?:\.(conv[12]))?",
        path,
    )
    if match is None:
        raise KeyError(path)
    stage, part, index, conv = match.groups()
    g = int(stage) + 1
    if part == "reduce":
        return f"p_ims1d2_outl{g}_dimred"
    if part == "fuse":
        return f"adapt_stage{g}_b2_joint_varout_dimred"
    if part == "project":
        return f"mflow_conv_g{g}_b3_joint_varout_dimred"
    unit = int(index) + 1
    if part == "crp.convs":
        return f"mflow_conv_g{g}_pool.0.{unit}_outvar_dimred"
    suffix = "_conv" if conv == "conv1" else "_conv_relu_varout_dimred"
    block = f"adapt_stage{g}_b" if part == "rcu_in" else f"mflow_conv_g{g}_b"
    return f"{block}.0.{unit}{suffix}"


def _official_path(path: str) -> str:
    if path.startswith("encoder."):
        return path[len("encoder.") :]
    if path.startswith("decoder."):
        return _decoder_path(path[len("decoder.") :])
    raise KeyError(path)


def official_key_map(model: CENRefineNet) -> dict[str, list[str]]:
    """Our state-dict key -> the released keys it is made of (``M`` for private BN entries)."""
    mapping: dict[str, list[str]] = {"ensemble.alpha": ["alpha"]}
    for path, module in model.named_modules():
        local = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        persistent = [n for n, _ in local if n not in module._non_persistent_buffers_set]
        if not persistent or path == "ensemble":
            continue
        official = _official_path(path)
        for name in persistent:
            if isinstance(module, ModalityBatchNorm2d):
                mapping[f"{path}.{name}"] = [
                    f"{official}.bn_{m}.{name}" for m in range(module.num_modalities)
                ]
            else:
                mapping[f"{path}.{name}"] = [f"{official}.module.{name}"]
    return mapping


def to_official_state_dict(model: CENRefineNet) -> dict[str, Tensor]:
    """Our weights in the released layout (with the ``module.`` prefix of DataParallel)."""
    ours = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, sources in official_key_map(model).items():
        value = ours[key]
        for m, official in enumerate(sources):
            part = value if len(sources) == 1 or value.dim() == 0 else value[m]
            out[f"module.{official}"] = part.clone()
    return out


def _infer_config(state: dict[str, Tensor], where: str) -> CENRefineNetConfig:
    """Depth, classes and modalities from the released keys; a missing part named in words."""
    released = f"{where}: not a released CEN RefineNet state dict"
    blocks = {k.split(".")[1] for k in state if k.startswith("layer3.") and k.count(".") > 1}
    if not blocks:
        raise CenError(f"{released}: no layer3.* keys (the ResNet encoder's third stage)")
    if len(blocks) not in _LAYER3_BLOCKS_TO_DEPTH:
        raise CenError(
            f"{released}: layer3 has {len(blocks)} blocks, expected 6, 23 or 36 "
            "(ResNet-50, -101 or -152)"
        )
    for key, part in (("clf_conv.module.weight", "the classifier"), ("alpha", "ensemble weights")):
        if key not in state:
            raise CenError(f"{released}: no {key!r} ({part})")
    return CENRefineNetConfig(
        backbone=RESNET_DEPTHS[_LAYER3_BLOCKS_TO_DEPTH[len(blocks)]],
        num_classes=int(state["clf_conv.module.weight"].shape[0]),
        num_modalities=int(state["alpha"].numel()),
    )


def load_official_state_dict(
    state: dict[str, Tensor], where: str = "checkpoint", bn_threshold: float = 2e-2
) -> CENRefineNet:
    """Build our model from a released-layout state dict; depth, classes and M are inferred."""
    check_state_dict(state, where)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    config = _infer_config(state, where)
    model = create_cen_refinenet(
        backbone=config.backbone,
        num_classes=config.num_classes,
        num_modalities=config.num_modalities,
        bn_threshold=bn_threshold,
    )
    load_mapped(model, state, official_key_map(model), "CEN RefineNet", where)
    return model


def read_official_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The ``segmenter`` state dict of a released ``.pth.tar`` (read with weights_only)."""
    path = Path(path)
    checkpoint = read_released_file(path, numpy_globals())
    state = checkpoint.get("segmenter", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or any(isinstance(v, dict) for v in state.values()):
        found = f"a {type(state).__name__}"
        if isinstance(state, dict):
            found = f"keys {', '.join(map(str, list(state)[:3]))}"
        raise CenError(f"{path}: expected a dict with a 'segmenter' state dict, found {found}")
    if "ensemble.alpha" in state and any(str(k).startswith("encoder.") for k in state):
        raise CenError(
            f"{path}: the state dict of a cenfusion model, without its settings: load it into "
            "the model it came from (load_state_dict), or save that model with "
            "cenfusion.save_segmenter"
        )
    return state


def load_official_checkpoint(path: str | Path, bn_threshold: float = 2e-2) -> CENRefineNet:
    """A released CEN segmentation checkpoint as our :class:`CENRefineNet`."""
    return load_official_state_dict(read_official_checkpoint(path), str(path), bn_threshold)
